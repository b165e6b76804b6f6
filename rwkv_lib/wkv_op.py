"""The compiled WKV operator as a differentiable function: the "cpp" and "cuda" backends
of `rwkv_lib.wkv` (notebook 06_wkv).

`rwkv_lib.extension.load_wkv_extension()` builds and loads the library, which registers
`torch.ops.rwkv.wkv_forward` and `torch.ops.rwkv.wkv_backward`. This module tells autograd
that the second is the derivative of the first (`_WKVFunction`), and tells torch.compile
what shapes they return (`register_fake_kernels`).
"""

from __future__ import annotations

import functools

import torch

from .extension import ExtensionUnavailable, load_wkv_extension, wkv_cuda_unavailable_reason
from .wkv import WKVState, check_state_types


@functools.cache
def register_fake_kernels() -> None:
    """Shape-only versions of the two ops, so torch.compile can trace through them.

    The compiler runs a model once on "fake" tensors that have shapes and dtypes but no
    data; these functions tell it what the C++ ops would return. Registered once per
    process, after the library that defines the ops is loaded (load_wkv_extension does it).
    """

    def compute(k: torch.Tensor) -> torch.dtype:
        return torch.float64 if k.dtype == torch.float64 else torch.float32

    def check_devices(op: str, k: torch.Tensor, **others: torch.Tensor | None) -> None:
        # the same message as the C++ check, which meta and fake tensors never reach
        for name, t in others.items():
            if t is not None and t.device != k.device:
                raise RuntimeError(f"{op}: {name} is on {t.device} but k is on {k.device}; "
                                   "all inputs must be on the same device")

    @torch.library.register_fake("rwkv::wkv_forward")
    def _(time_decay, time_first, k, v, state_a=None, state_b=None, state_p=None):
        check_devices("wkv_forward", k, time_decay=time_decay, time_first=time_first, v=v,
                      state_a=state_a, state_b=state_b, state_p=state_p)
        B, _, C = k.shape
        state = [k.new_empty((B, C), dtype=compute(k)) for _ in range(3)]
        return (k.new_empty(k.shape), *state)

    @torch.library.register_fake("rwkv::wkv_backward")
    def _(time_decay, time_first, k, v, state_a, state_b, state_p, grad_y,
          grad_state_a=None, grad_state_b=None, grad_state_p=None):
        B, _, C = k.shape
        state = [
            k.new_empty((B, C), dtype=s.dtype if s is not None else compute(k))
            for s in (state_a, state_b, state_p)
        ]
        return (time_decay.new_empty(time_decay.shape), time_first.new_empty(time_first.shape),
                k.new_empty(k.shape), v.new_empty(v.shape), *state)


class _WKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, time_decay, time_first, k, v, state_a, state_b, state_p):
        y, a, b, p = torch.ops.rwkv.wkv_forward(
            time_decay, time_first, k, v, state_a, state_b, state_p
        )
        # Backward replays the recurrence from the inputs: nothing of size (B, T, C)
        # beyond the inputs themselves is kept alive between forward and backward.
        ctx.save_for_backward(time_decay, time_first, k, v, state_a, state_b, state_p)
        return y, a, b, p

    @staticmethod
    def backward(ctx, grad_y, grad_a, grad_b, grad_p):
        time_decay, time_first, k, v, state_a, state_b, state_p = ctx.saved_tensors
        # All three gradients of the final state count: a loss may use a, b or p directly,
        # not only as the state of a next call (see cuda/wkv_math.h for the p part).
        grads = torch.ops.rwkv.wkv_backward(
            time_decay, time_first, k, v, state_a, state_b, state_p,
            grad_y.contiguous(), grad_a, grad_b, grad_p,
        )
        if state_a is None:
            grads = grads[:4] + (None, None, None)
        return grads


def _check_device(k: torch.Tensor, module) -> None:
    if k.device.type == "cuda" and not module.has_cuda:
        raise ExtensionUnavailable(
            f"the WKV extension was built without CUDA kernels: {wkv_cuda_unavailable_reason()}"
        )


def wkv_extension(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WKVState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, WKVState]:
    """WKV of RWKV-4 with the C++ (CPU) or CUDA kernels, differentiable.

    time_decay, time_first: (C,); k, v: (B, T, C), on the same device, any floating dtype
    (float16/bfloat16 are computed in float32, float64 in float64); non-contiguous inputs
    are copied. Returns y (B, T, C) in k's dtype, and with `return_state` also the final
    state (a, b, p), each (B, C) in float32 (float64 for float64 k), to pass as `state` to
    the next call; `state=None` starts from the empty state (a = b = 0, p = -1e38).

    Gradients reach time_decay, time_first, k and v, and the initial state, from y and
    from every part of the final state: when the state is handed to a next call (training
    on a long sequence in chunks gives the same gradients as one call) and when a loss
    uses a, b or p directly.
    """
    if torch.compiler.is_compiling():
        # Building and locking cannot be traced; the ops must exist already.
        if not hasattr(torch.ops.rwkv, "wkv_forward"):
            raise ExtensionUnavailable(
                "torch.compile: call rwkv_lib.extension.load_wkv_extension() (or run the "
                "model once) before compiling, so the WKV ops are registered"
            )
    else:
        _check_device(k, load_wkv_extension())
    check_state_types(state, "wkv_extension")
    state_a, state_b, state_p = (None, None, None) if state is None else state
    inputs = (time_decay, time_first, k, v, state_a, state_b, state_p)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        y, a, b, p = _WKVFunction.apply(*inputs)
    else:  # nothing to differentiate: the op itself, without autograd's bookkeeping
        y, a, b, p = torch.ops.rwkv.wkv_forward(*inputs)
    return (y, (a, b, p)) if return_state else y
