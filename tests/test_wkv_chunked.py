"""The chunked WKV algorithm (rwkv_lib.wkv_chunked), forward and hand-written backward, in
float64 against the definition, the stable recurrence and autograd."""

from __future__ import annotations

import pytest
import torch

from rwkv_lib.wkv import P_INIT, wkv_definition, wkv_pytorch
from rwkv_lib.wkv_chunked import wkv_chunked_backward, wkv_chunked_forward

GRAD_NAMES = ("time_decay", "time_first", "k", "v", "a0", "b0", "p0")


def inputs(B=2, T=13, C=5, k_scale=1.0, seed=0, td=None):
    g = torch.Generator().manual_seed(seed)
    time_decay = torch.empty(C, dtype=torch.float64).uniform_(-5, 3, generator=g)
    if td is not None:
        time_decay = torch.full((C,), float(td), dtype=torch.float64)
    time_first = torch.randn(C, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, C, generator=g, dtype=torch.float64) * k_scale
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    return time_decay, time_first, k, v


def some_state(B, C, seed=1):
    """A state as a previous call would leave it: a and b of order 1, b > 0, any p."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, C, generator=g, dtype=torch.float64)
    b = torch.rand(B, C, generator=g, dtype=torch.float64) + 0.5
    p = torch.randn(B, C, generator=g, dtype=torch.float64) * 2
    return a, b, p


def output_grads(B, T, C, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64)
            for shape in ((B, T, C), (B, C), (B, C), (B, C))]


def autograd_grads(td, tf, k, v, state, gy, ga, gb, gp):
    """Exact gradients of sum(gy*y) + sum(ga*a_T) + sum(gb*b_T) + sum(gp*p_T), by autograd
    through the stable recurrence."""
    leaves = [t.clone().requires_grad_() for t in (td, tf, k, v, *state)]
    y, (a, b, p) = wkv_pytorch(*leaves[:4], state=tuple(leaves[4:]), return_state=True)
    loss = (gy * y).sum() + (ga * a).sum() + (gb * b).sum() + (gp * p).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, grads, strict=True)]


def assert_grads_close(actual, expected, rtol=1e-9, atol=1e-10):
    assert len(actual) == len(expected)
    for name, g, g_ref in zip(GRAD_NAMES, actual, expected, strict=False):
        torch.testing.assert_close(g, g_ref, rtol=rtol, atol=atol, msg=name)


CHUNK_LENS = [1, 2, 3, 7, 13, 20]  # T = 13: every token its own chunk, ..., one chunk, > T


@pytest.mark.parametrize("chunk_len", CHUNK_LENS)
def test_forward_matches_recurrence_and_definition(chunk_len):
    td, tf, k, v = inputs(k_scale=3.0)
    y, state = wkv_chunked_forward(td, tf, k, v, chunk_len)
    y_ref, state_ref = wkv_pytorch(td, tf, k, v, return_state=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, wkv_definition(td, tf, k, v), rtol=1e-11, atol=1e-12)
    for s, s_ref in zip(state, state_ref, strict=True):
        torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_len", CHUNK_LENS)
def test_forward_from_a_given_state(chunk_len):
    td, tf, k, v = inputs(seed=3)
    state = some_state(2, 5)
    y, final = wkv_chunked_forward(td, tf, k, v, chunk_len, state=state)
    y_ref, final_ref = wkv_pytorch(td, tf, k, v, state=state, return_state=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for s, s_ref in zip(final, final_ref, strict=True):
        torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_len", CHUNK_LENS)
@pytest.mark.parametrize("with_state", [False, True], ids=["empty-state", "given-state"])
def test_backward_equals_autograd_including_the_final_state(chunk_len, with_state):
    B, T, C = 2, 13, 5
    td, tf, k, v = inputs(B, T, C, k_scale=2.0, seed=4)
    state = some_state(B, C) if with_state else (torch.zeros(B, C, dtype=torch.float64),
                                                  torch.zeros(B, C, dtype=torch.float64),
                                                  torch.full((B, C), P_INIT, dtype=torch.float64))
    gy, ga, gb, gp = output_grads(B, T, C)
    grads = wkv_chunked_backward(td, tf, k, v, gy, chunk_len, state=state,
                                 grad_state=(ga, gb, gp))
    expected = autograd_grads(td, tf, k, v, state, gy, ga, gb, gp)
    if not with_state:  # the empty state's p0 = -1e38 is no variable anyone trains
        grads, expected = grads[:6], expected[:6]
    assert_grads_close(grads, expected)


@pytest.mark.parametrize("chunk_len", [1, 3, 7, 13])
def test_backward_without_the_p_chain_is_the_gradient_through_A_and_B(chunk_len):
    """exact_p=False is exact when the final state is used only through A = a e^p and
    B = b e^p, as a following call uses it."""
    B, T, C = 2, 13, 5
    td, tf, k, v = inputs(B, T, C, seed=5)
    state = some_state(B, C)
    gy, cA, cB, _ = output_grads(B, T, C, seed=6)
    leaves = [t.clone().requires_grad_() for t in (td, tf, k, v, *state)]
    y, (a, b, p) = wkv_pytorch(*leaves[:4], state=tuple(leaves[4:]), return_state=True)
    loss = (gy * y).sum() + (cA * a * p.exp()).sum() + (cB * b * p.exp()).sum()
    expected = torch.autograd.grad(loss, leaves)
    with torch.no_grad():
        _, (aT, bT, pT) = wkv_pytorch(td, tf, k, v, state=state, return_state=True)
    grad_state = (cA * pT.exp(), cB * pT.exp(), None)  # dL/da_T, dL/db_T
    for exact in (False, True):
        gp = None if not exact else (cA * aT + cB * bT) * pT.exp()  # what autograd gives p
        grads = wkv_chunked_backward(td, tf, k, v, gy, chunk_len, state=state,
                                     grad_state=grad_state[:2] + (gp,), exact_p=exact)
        assert_grads_close(grads, expected)


@pytest.mark.parametrize("chunk_len", [1, 2, 7, 64])
def test_extreme_k(chunk_len):
    B, T, C = 2, 40, 6
    td, tf, _, v = inputs(B, T, C, seed=7)
    k = torch.empty(B, T, C, dtype=torch.float64).uniform_(
        -1000, 1000, generator=torch.Generator().manual_seed(8))
    y, _ = wkv_chunked_forward(td, tf, k, v, chunk_len)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, wkv_definition(td, tf, k, v), rtol=1e-10, atol=1e-12)
    state = some_state(B, C)
    gy, ga, gb, gp = output_grads(B, T, C, seed=9)
    grads = wkv_chunked_backward(td, tf, k, v, gy, chunk_len, state=state,
                                 grad_state=(ga, gb, gp))
    assert all(torch.isfinite(g).all() for g in grads)
    assert_grads_close(grads, autograd_grads(td, tf, k, v, state, gy, ga, gb, gp), rtol=1e-8)


@pytest.mark.parametrize("td", [-30.0, 30.0, 100.0])
@pytest.mark.parametrize("chunk_len", [1, 4, 11])
def test_extreme_decay(td, chunk_len):
    # time_decay 100: w = -exp(100) is clamped at -1e38 (forget everything), never inf or nan
    B, T, C = 2, 11, 4
    td_, tf, k, v = inputs(B, T, C, seed=10, td=td)
    state = some_state(B, C)
    y, final = wkv_chunked_forward(td_, tf, k, v, chunk_len, state=state)
    y_ref, final_ref = wkv_pytorch(td_, tf, k, v, state=state, return_state=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for s, s_ref in zip(final, final_ref, strict=True):
        torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-12)
    gy, ga, gb, gp = output_grads(B, T, C, seed=11)
    grads = wkv_chunked_backward(td_, tf, k, v, gy, chunk_len, state=state,
                                 grad_state=(ga, gb, gp))
    assert all(torch.isfinite(g).all() for g in grads)
    assert_grads_close(grads, autograd_grads(td_, tf, k, v, state, gy, ga, gb, gp), rtol=1e-8)


def test_chunked_backward_matches_the_cpp_operator():
    """The C++ op (sequential kernel) and the chunked reference give the same gradients,
    the final p's included."""
    from rwkv_lib import extension

    if extension._missing_tools() is not None:
        pytest.skip("the C++ extension cannot be built here")
    extension.load_wkv_extension()
    B, T, C = 3, 17, 6
    td, tf, k, v = inputs(B, T, C, k_scale=3.0, seed=12)
    state = some_state(B, C)
    gy, ga, gb, gp = output_grads(B, T, C, seed=13)
    expected = torch.ops.rwkv.wkv_backward(td, tf, k, v, *state, gy, ga, gb, gp)
    for chunk_len in (1, 5, 17):
        grads = wkv_chunked_backward(td, tf, k, v, gy, chunk_len, state=state,
                                     grad_state=(ga, gb, gp))
        assert_grads_close(grads, expected)


def test_chunk_len_must_be_positive():
    td, tf, k, v = inputs()
    with pytest.raises(ValueError, match="chunk_len must be >= 1"):
        wkv_chunked_forward(td, tf, k, v, 0)
