"""Which library computes the model's float32 matrix products on the CPU.

PyTorch's x86 builds send `F.linear` to the BLAS, Intel's MKL. On AMD processors MKL's
sgemm is not its best: it seems to run its AVX2 kernels there (on a Zen 5, capping it with
`MKL_ENABLE_INSTRUCTIONS=AVX2` left its speed unchanged), while oneDNN's float32 matmul,
which the same builds carry, uses AVX-512 (`ONEDNN_VERBOSE=1` names its avx512_core
kernel). On a 2-core AMD EPYC (Zen 4, whose AVX-512 units are 256 bits wide) oneDNN ran a
512-token prompt's products 1.11x-1.17x faster; on a Zen 5 (512-bit units) about 2x
faster, and the products of a training step too (benchmarks/README, the "prompt" and
"training" rows). So `Linear`, the model's linear layer, hands its product to oneDNN when
all of these hold:

- the input and weight are float32 on the CPU, neither empty, with at least `MIN_ROWS`
  rows (below it oneDNN's fixed cost per call can lose, single-threaded, on 512 x 512
  weights), and CPU autocast is off;
- the library chosen is oneDNN. `RWKV_CPU_MATMUL=onednn` chooses it, `blas` keeps the BLAS
  everywhere, and `auto` (the default) chooses it on AMD processors where torch's oneDNN
  works: on any of them for products without autograd (prompts, evaluation), and from
  Zen 5 (CPU family 26) on for the products training differentiates, where it was
  measured with its backward (on Zen 4 an earlier measurement of the backward's products
  found oneDNN as fast as MKL or slower). On Intel processors `auto` keeps MKL, PyTorch's
  own choice for float32 there; oneDNN has not been measured against it on them.

Under autograd the product is a registered operator (`torch.ops.rwkv_lib.onednn_linear`)
whose backward is two more oneDNN products, so `torch.compile` keeps it whole. Set
`RWKV_CPU_MATMUL` before a model is compiled: a compiled graph does not notice the
variable appear later (it does notice `torch.backends.mkldnn.flags(enabled=False)`). The
two libraries agree to float rounding (a few 1e-7 of the product's scale), not bit for
bit: where oneDNN is used, results match another processor's only to that rounding.
"""

from __future__ import annotations

import os
import platform
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_ROWS = 64
LIBRARIES = ("auto", "blas", "onednn")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) through oneDNN's matmul (PyTorch's binding of oneDNN's linear)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_works() -> bool:
    """Whether this torch has oneDNN's linear and it computes x @ w.T, to float rounding."""
    global _onednn_ok
    if _onednn_ok is None:  # a plain global, not functools.cache: torch.compile reads it
        _onednn_ok = _check_onednn()
    return _onednn_ok


_onednn_ok: bool | None = None


def _check_onednn() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 512, generator=g), torch.randn(256, 512, generator=g)
    try:
        with torch.no_grad():
            diff = (onednn_linear(x, w) - F.linear(x, w)).abs().max().item()
    except (RuntimeError, AttributeError):  # an older torch without the op
        return False
    return diff < 1e-3


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ("vendor_id", "cpu family", ...), or
    the same two fields from Windows' processor name; empty where neither is there."""
    global _cpu_fields
    if _cpu_fields is None:  # read once, kept in a global as onednn_works does
        _cpu_fields = _read_cpuinfo()
    return _cpu_fields


_cpu_fields: dict[str, str] | None = None


def _read_cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    if "vendor_id" not in fields:  # Windows: "AMD64 Family 26 Model 2 Stepping 0, AuthenticAMD"
        name = platform.processor()
        vendor = next((v for v in ("AuthenticAMD", "GenuineIntel") if v in name), "")
        family = re.search(r"Family (\d+)", name)
        fields = {"vendor_id": vendor, "cpu family": family.group(1) if family else ""}
    return fields


def processor_vendor() -> str:
    """The CPU's vendor string ("AuthenticAMD", "GenuineIntel"), or "" where unknown."""
    return _cpuinfo().get("vendor_id", "")


def processor_family() -> int:
    """The CPU's family number (AMD: 25 for Zen 3 and Zen 4, 26 for Zen 5), 0 where unknown."""
    family = _cpuinfo().get("cpu family", "")
    return int(family) if family.isdigit() else 0


ZEN5_FAMILY = 26


def library(autograd: bool = False) -> str:
    """"onednn" or "blas": what `Linear` uses here for float32 products, those that autograd
    differentiates (training) or the others."""
    choice = os.environ.get("RWKV_CPU_MATMUL", "auto").strip().lower() or "auto"
    if choice not in LIBRARIES:
        raise ValueError(f"RWKV_CPU_MATMUL must be one of {', '.join(LIBRARIES)}, got "
                         f"{choice!r}; unset it to let the library choose")
    if choice == "blas" or not torch.backends.mkldnn.enabled:
        return "blas"
    if choice == "onednn":
        if not onednn_works():
            raise ValueError("RWKV_CPU_MATMUL=onednn, but this build of torch has no working "
                             "oneDNN linear; unset it or set it to blas")
        return "onednn"
    if processor_vendor() != "AuthenticAMD" or not onednn_works():
        return "blas"
    return "onednn" if not autograd or processor_family() >= ZEN5_FAMILY else "blas"


@torch.library.custom_op("rwkv_lib::onednn_linear", mutates_args=())
def onednn_linear_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T through oneDNN, as an operator autograd and torch.compile see whole."""
    return onednn_linear(x.contiguous(), weight.contiguous())


@onednn_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _save_for_backward(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    # dx = dy @ w and dw = dy^T @ x, each as a product "a @ b.T" with contiguous operands;
    # the transposed copies cost about a third of the oneDNN products they feed (0.9 against
    # 2.5 ms a layer of the benchmark's training step), still far less than MKL's 5.6 ms
    x, weight = ctx.saved_tensors
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = onednn_linear_op(dy2, weight.t().contiguous()).view(x.shape)
    if ctx.needs_input_grad[1]:
        x2 = x.reshape(-1, x.shape[-1])
        dw = onednn_linear_op(dy2.t().contiguous(), x2.t().contiguous())
    return dx, dw


onednn_linear_op.register_autograd(_backward, setup_context=_save_for_backward)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict names) whose float32 CPU products go to
    the library `library()` names."""

    def __init__(self, *args, **kwargs) -> None:
        library()  # a bad RWKV_CPU_MATMUL fails when the model is built, not mid-run
        _cpuinfo(), onednn_works()  # read now, so that torch.compile never traces them
        super().__init__(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not (x.dtype == torch.float32 == w.dtype and x.device.type == "cpu" == w.device.type
                and x.dim() >= 2 and w.numel() > 0  # oneDNN builds no product with an empty side
                and x.numel() >= MIN_ROWS * x.shape[-1]
                and not torch.is_autocast_enabled("cpu")):
            return F.linear(x, w, self.bias)
        autograd = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (
            self.bias is not None and self.bias.requires_grad))
        if library(autograd) == "blas":
            return F.linear(x, w, self.bias)
        if not autograd and not torch.compiler.is_compiling():
            return onednn_linear(x, w, self.bias)  # the direct call: no operator overhead
        y = onednn_linear_op(x, w)
        return y if self.bias is None else y + self.bias
