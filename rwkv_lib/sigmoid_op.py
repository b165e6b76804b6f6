"""The teaching sigmoid extension as a differentiable function (notebook 05_cpp_extension).

Notebook 04's custom sigmoid Function with its forward and backward in C++
(`cuda/sigmoid.cpp`, built and loaded by `rwkv_lib.extension.load_sigmoid_extension`).
"""

from __future__ import annotations

import torch

from .extension import load_sigmoid_extension


class _SigmoidFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = load_sigmoid_extension().forward(x)
        ctx.save_for_backward(y)  # sigmoid' = y (1 - y): the output is all backward needs
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return load_sigmoid_extension().backward(grad_y.contiguous(), y)


def sigmoid_extension(x: torch.Tensor) -> torch.Tensor:
    """Sigmoid computed by the C++ extension, differentiable (CPU tensors)."""
    return _SigmoidFunction.apply(x)
