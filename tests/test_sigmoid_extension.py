"""The teaching sigmoid extension (cuda/sigmoid.cpp) against torch.sigmoid."""

import pytest
import torch

from rwkv_lib import extension
from rwkv_lib.extension import load_sigmoid_extension
from rwkv_lib.sigmoid_op import sigmoid_extension


@pytest.fixture(scope="module")
def ext():
    missing = extension._missing_tools()
    if missing is not None:
        pytest.skip(f"C++ extension cannot be built here: {missing}")
    return load_sigmoid_extension()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_torch_including_extremes(ext, dtype):
    x = torch.cat([torch.randn(100), torch.tensor([-1000.0, -100.0, -20.0, 0.0, 20.0, 1000.0])])
    x = x.to(dtype)
    y = ext.forward(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y, torch.sigmoid(x))


def test_backward_matches_autograd_and_gradcheck(ext):
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sigmoid_extension, (x,))
    grad = torch.randn(4, 7, dtype=torch.float64)
    (g,) = torch.autograd.grad(sigmoid_extension(x), x, grad)
    (g_ref,) = torch.autograd.grad(torch.sigmoid(x), x, grad)
    torch.testing.assert_close(g, g_ref)


def test_non_contiguous_input(ext):
    x = torch.randn(6, 8).t()
    assert not x.is_contiguous()
    torch.testing.assert_close(ext.forward(x), torch.sigmoid(x))


def test_errors(ext):
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        ext.forward(torch.arange(3))
    with pytest.raises(RuntimeError, match="grad_y has shape"):
        ext.backward(torch.ones(3), torch.ones(4))
