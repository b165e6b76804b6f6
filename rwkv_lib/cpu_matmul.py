"""Which library computes the model's float32 matrix products on the CPU, without autograd.

PyTorch's x86 builds send `F.linear` to the BLAS, Intel's MKL. On AMD processors MKL's
sgemm is not its best: on a 2-core AMD EPYC (Zen 4) it ran the products of a 512-token
prompt at L12-C512 (512 rows, 512 or 2048 wide) 1.11x-1.17x slower than oneDNN's float32
matmul, which the same builds carry (benchmarks/README, the "prompt" rows). So `Linear`, the
model's linear layer, hands its product to oneDNN when all of these hold:

- autograd is off (`torch.no_grad()`, `torch.inference_mode()`): prompts and evaluation.
  Training keeps the BLAS, whose backward it needs anyway;
- the input and weight are float32 on the CPU, neither empty, with at least `MIN_ROWS`
  rows (below it oneDNN's fixed cost per call can lose, single-threaded, on 512 x 512
  weights);
- the library chosen is oneDNN: `RWKV_CPU_MATMUL=onednn`, or `auto` (the default) on an
  AMD processor where torch's oneDNN works. `RWKV_CPU_MATMUL=blas` keeps the BLAS
  everywhere. On Intel processors `auto` keeps MKL, PyTorch's own choice for float32
  there; oneDNN has not been measured against it on them.

The two libraries agree to float rounding (a few 1e-7 of the product's scale), not bit for
bit: on a processor where oneDNN is used, the same model gives the same numbers with or
without autograd only to that rounding.
"""

from __future__ import annotations

import functools
import os
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_ROWS = 64
LIBRARIES = ("auto", "blas", "onednn")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) through oneDNN's matmul (PyTorch's binding of oneDNN's linear)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def onednn_works() -> bool:
    """Whether this torch has oneDNN's linear and it computes x @ w.T, to float rounding."""
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


@functools.cache
def processor_vendor() -> str:
    """The CPU's vendor string ("AuthenticAMD", "GenuineIntel"), or "" where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    # Windows names the vendor at the end: "AMD64 Family 25 Model 97 ..., AuthenticAMD"
    name = platform.processor()
    return next((v for v in ("AuthenticAMD", "GenuineIntel") if v in name), "")


def library() -> str:
    """"onednn" or "blas": what `Linear` uses for float32 products without autograd here."""
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
    return "onednn" if processor_vendor() == "AuthenticAMD" and onednn_works() else "blas"


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict names) whose float32 CPU product without
    autograd goes to the library `library()` names."""

    def __init__(self, *args, **kwargs) -> None:
        library()  # a bad RWKV_CPU_MATMUL fails when the model is built, not mid-run
        super().__init__(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (not torch.is_grad_enabled() and x.dtype == torch.float32 == w.dtype
                and x.device.type == "cpu" == w.device.type and x.dim() >= 2
                and w.numel() > 0  # oneDNN builds no product with an empty side
                and x.numel() >= MIN_ROWS * x.shape[-1]
                and not torch.compiler.is_compiling() and library() == "onednn"):
            return onednn_linear(x, w, self.bias)
        return F.linear(x, w, self.bias)
