"""The fused RNN-mode step: the whole model, one token per row, in one C++ call
(used by notebook 09_generation's `generate`).

`RWKV.step` and `RWKV.step_` run it whenever it applies (see `fused_weights`), and fall
back to the PyTorch ops of rwkv_lib.model otherwise; both give the same logits within
float rounding (tests/test_rnn_step.py). The kernel is cuda/rwkv_step_cpu.cpp, built
into the WKV extension and called as torch.ops.rwkv.rnn_step.

`RNNStepper` gathers the weights once for a loop of many tokens, and can hold them as
bfloat16, which halves the bytes read per token (the step of a large model is bound by
memory bandwidth: every token reads every weight once).
"""

from __future__ import annotations

import torch

_BACKENDS = ("auto", "cpp")  # the model backends under which the fused step may run


def extension_loads(backend: str) -> bool:
    """Whether the extension with the fused step can be loaded (built on first use).
    Under backend "cpp" a failed build raises; under "auto" the PyTorch ops run instead."""
    from .extension import ExtensionUnavailable, load_wkv_extension

    try:
        load_wkv_extension()
    except ExtensionUnavailable:
        if backend == "cpp":
            raise
        return False
    return True


def _layer_weights(block: torch.nn.Module) -> list[torch.Tensor]:
    # _parameters/_modules directly: nn.Module.__getattr__ is slow, and a step of a small
    # model is short enough that 200 attribute look-ups would show in its time
    mods = block._modules
    att, ffn = mods["att"]._modules, mods["ffn"]._modules
    ap, fp = mods["att"]._parameters, mods["ffn"]._parameters
    ln1, ln2 = mods["ln1"]._parameters, mods["ln2"]._parameters
    return [
        ln1["weight"], ln1["bias"], ln2["weight"], ln2["bias"],
        ap["time_decay"], ap["time_first"], ap["time_mix_k"], ap["time_mix_v"], ap["time_mix_r"],
        att["key"]._parameters["weight"], att["value"]._parameters["weight"],
        att["receptance"]._parameters["weight"], att["output"]._parameters["weight"],
        fp["time_mix_k"], fp["time_mix_r"], ffn["key"]._parameters["weight"],
        ffn["receptance"]._parameters["weight"], ffn["value"]._parameters["weight"],
    ]


def model_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters in the kernel's order: emb, ln0, per layer 18 tensors (see
    cuda/rwkv_step_cpu.cpp), ln_out, head. The tensors themselves, not copies."""
    mods = model._modules
    blocks = list(mods["blocks"]._modules.values())
    ln0 = blocks[0]._modules["ln0"]._parameters
    weights = [mods["emb"]._parameters["weight"], ln0["weight"], ln0["bias"]]
    for block in blocks:
        weights += _layer_weights(block)
    ln_out = mods["ln_out"]._parameters
    return weights + [ln_out["weight"], ln_out["bias"], mods["head"]._parameters["weight"]]


def fused_weights(model: torch.nn.Module, state: torch.Tensor) -> list[torch.Tensor] | None:
    """The model's weights for the fused step, or None where it does not apply: with
    autograd recording (the kernel has no backward), off the CPU, under the "pytorch" and
    "definition" backends, for a model whose dtype is not the state's, or when the
    extension cannot be built (backend "auto")."""
    backend = model.config.wkv_backend
    if (torch.is_grad_enabled() or state.device.type != "cpu" or backend not in _BACKENDS
            or model.head.weight.dtype != state.dtype or not state.is_contiguous()):
        return None
    if not extension_loads(backend):
        return None
    return model_weights(model)


def run(weights: list[torch.Tensor], token: torch.Tensor, state: torch.Tensor,
        eps: float) -> torch.Tensor:
    """One fused step: logits (B, V); `state` (n_layer, 5, B, C) is updated in place."""
    return torch.ops.rwkv.rnn_step(token.long(), state, weights, eps)


class RNNStepper:
    """RNN mode for a loop over many tokens: `logits = stepper(token, state)` updates the
    state in place, like `model.step_`, with the weights gathered once.

    dtype=None uses the model's parameters themselves (so in-place changes to them are
    seen). dtype=torch.bfloat16 keeps bfloat16 copies of the matrices (the float32
    vectors and state stay float32), made when the stepper is: make a new stepper after
    changing the weights. Falls back to `model.step_` wherever the fused step does not
    apply (see `fused_weights`); bfloat16 then raises, as it needs the fused kernel.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        if dtype not in (None, torch.bfloat16):
            raise ValueError(f"RNNStepper: dtype must be None or torch.bfloat16, got {dtype}")
        self.model = model
        self.dtype = dtype
        self.eps = model.ln_out.eps
        self._weights: list[torch.Tensor] | None = None
        if dtype is not None:
            probe = model.init_state(1)
            with torch.no_grad():
                if fused_weights(model, probe) is None or probe.dtype != torch.float32:
                    raise ValueError("RNNStepper: bfloat16 weights need a float32 model on "
                                     "the CPU and the C++ extension (backend 'auto' or 'cpp')")
                self._weights = [w.to(dtype) if w.dim() == 2 else w
                                 for w in model_weights(model)]

    @torch.no_grad()
    def __call__(self, token: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        if self._weights is None:
            weights = fused_weights(self.model, state)
            if weights is None:
                return self.model.step_(token, state)
            self._weights = weights
        self.model._check_state(state, token.shape[0])
        return run(self._weights, token, state, self.eps)
