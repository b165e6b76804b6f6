import pytest
import torch

from rwkv_lib.wkv import P_INIT, initial_state, wkv, wkv_definition, wkv_pytorch


def _inputs(B=2, T=7, C=5, dtype=torch.float64, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    td = torch.randn(C, generator=g, dtype=dtype)
    tf = torch.randn(C, generator=g, dtype=dtype)
    k = torch.randn(B, T, C, generator=g, dtype=dtype) * scale
    v = torch.randn(B, T, C, generator=g, dtype=dtype)
    return td, tf, k, v


def wkv_loop(td, tf, k, v):
    """The formula with plain Python loops, independent of both backends."""
    B, T, C = k.shape
    w, u = -torch.exp(td), tf
    y = torch.empty_like(k)
    for b in range(B):
        for t in range(T):
            num = torch.exp(u + k[b, t]) * v[b, t]
            den = torch.exp(u + k[b, t])
            for i in range(t):
                e = torch.exp((t - 1 - i) * w + k[b, i])
                num, den = num + e * v[b, i], den + e
            y[b, t] = num / den
    return y


def test_definition_matches_plain_loops():
    td, tf, k, v = _inputs()
    torch.testing.assert_close(wkv_definition(td, tf, k, v), wkv_loop(td, tf, k, v))
    torch.testing.assert_close(wkv_definition(td, tf, k, v, safe=False), wkv_loop(td, tf, k, v))


def test_first_step_is_v():
    # at t = 0 only the current token is visible, so y_0 = v_0 whatever u and k
    td, tf, k, v = _inputs()
    torch.testing.assert_close(wkv(td, tf, k, v, backend="pytorch")[:, 0], v[:, 0])


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 7, 5), (3, 16, 4)])
def test_pytorch_matches_definition_float64(shape):
    td, tf, k, v = _inputs(*shape)
    torch.testing.assert_close(
        wkv(td, tf, k, v, backend="pytorch"), wkv(td, tf, k, v, backend="definition"),
        rtol=1e-10, atol=1e-12)


def test_gradcheck_stable_against_definition():
    td, tf, k, v = (t.requires_grad_() for t in _inputs(2, 6, 3))
    assert torch.autograd.gradcheck(
        lambda *a: wkv(*a, backend="pytorch"), (td, tf, k, v), eps=1e-6, atol=1e-6)
    # and the gradients of the two backends agree
    g = torch.randn(2, 6, 3, dtype=torch.float64)
    grads = [torch.autograd.grad((wkv(td, tf, k, v, backend=b) * g).sum(), (td, tf, k, v))
             for b in ("pytorch", "definition")]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_naive_definition_overflows_but_stable_does_not():
    td, tf, k, v = _inputs(1, 8, 4, dtype=torch.float32)
    k = k + 200.0  # e^200 overflows float32
    naive = wkv_definition(td, tf, k, v, safe=False)
    assert not torch.isfinite(naive).all()
    stable = wkv(td, tf, k, v, backend="pytorch")
    assert torch.isfinite(stable).all()
    torch.testing.assert_close(stable, wkv_definition(td, tf, k, v), rtol=1e-5, atol=1e-5)


def test_extreme_k_stays_finite_and_matches_safe_definition():
    td, tf, k, v = _inputs(2, 32, 8)
    k = torch.empty_like(k).uniform_(-1000, 1000, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float64, torch.float32):
        args = [t.to(dtype) for t in (td, tf, k, v)]
        y = wkv(*args, backend="pytorch")
        assert torch.isfinite(y).all()
        ref = wkv_definition(*(t.double() for t in args))
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_chunked_with_state_equals_one_pass():
    td, tf, k, v = _inputs(2, 20, 6)
    full, full_state = wkv_pytorch(td, tf, k, v, return_state=True)
    y1, s = wkv(td, tf, k[:, :7], v[:, :7], backend="pytorch", return_state=True)
    y2, s = wkv(td, tf, k[:, 7:], v[:, 7:], backend="pytorch", state=s, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), full)
    for a, b in zip(s, full_state, strict=True):
        torch.testing.assert_close(a, b)


def test_gradients_flow_through_the_state_between_chunks():
    inputs = _inputs(2, 12, 4, seed=5)
    weight = torch.randn(2, 12, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def grads(chunked: bool):
        td, tf, k, v = (t.clone().requires_grad_() for t in inputs)
        if chunked:
            y1, s = wkv(td, tf, k[:, :5], v[:, :5], backend="pytorch", return_state=True)
            y2 = wkv(td, tf, k[:, 5:], v[:, 5:], backend="pytorch", state=s)
            y = torch.cat([y1, y2], 1)
        else:
            y = wkv(td, tf, k, v, backend="pytorch")
        return torch.autograd.grad((y * weight).sum(), (td, tf, k, v))

    for g_chunked, g_whole in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(g_chunked, g_whole)


def test_initial_state_values():
    a, b, p = initial_state(2, 3)
    assert a.abs().sum() == 0 and b.abs().sum() == 0 and (p == P_INIT).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    td, tf, k, v = (t.to(dtype) for t in _inputs(2, 9, 4, dtype=torch.float32))
    y = wkv(td, tf, k, v, backend="pytorch")
    assert y.dtype == dtype
    ref = wkv_definition(*(t.double() for t in (td, tf, k, v)))
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)
    _, (a, _, _) = wkv(td, tf, k, v, backend="pytorch", return_state=True)
    assert a.dtype == torch.float32


def test_clear_errors():
    td, tf, k, v = _inputs()
    with pytest.raises(ValueError, match=r"shape \(B, T, C\)"):
        wkv(td, tf, k[0], v[0])
    with pytest.raises(ValueError, match="v has shape"):
        wkv(td, tf, k, v[:, :3])
    with pytest.raises(ValueError, match="time_decay must have shape"):
        wkv(td[:3], tf, k, v)
    with pytest.raises(TypeError, match="floating-point"):
        wkv(td, tf, k.long(), v)
    with pytest.raises(ValueError, match="unknown backend"):
        wkv(td, tf, k, v, backend="fortran")
    with pytest.raises(ValueError, match="empty"):
        wkv(td, tf, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="state a must have shape"):
        wkv(td, tf, k, v, backend="pytorch", state=initial_state(3, 5))
    with pytest.raises(ValueError, match="needs cuda tensors"):
        wkv(td, tf, k, v, backend="cuda")


@pytest.mark.parametrize("backend", ["pytorch", "auto"])
def test_clear_errors_for_bad_states(backend):
    td, tf, k, v = _inputs()
    a, b, p = initial_state(2, 5, dtype=torch.float64)
    cases = [
        (torch.stack([a, b, p]), TypeError, r"state must be a tuple \(a, b, p\) .* got Tensor"),
        ("abp", TypeError, r"state must be a tuple \(a, b, p\) .* got str"),
        ((a, b), ValueError, "got 2 items"),
        ((a, b, None), TypeError, "state p must be a tensor, got NoneType"),
        ((a, b.tolist(), p), TypeError, "state b must be a tensor, got list"),
        ((a, b, p.long()), TypeError, "state p must be a floating-point tensor"),
    ]
    for state, error, message in cases:
        with pytest.raises(error, match=message):
            wkv(td, tf, k, v, backend=backend, state=state)


def test_inputs_that_are_not_tensors():
    td, tf, k, v = _inputs()
    with pytest.raises(TypeError, match="wkv: k must be a tensor, got list"):
        wkv(td, tf, k.tolist(), v)
