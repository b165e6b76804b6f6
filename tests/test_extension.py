"""The C++/CUDA WKV operator (rwkv_lib.wkv_op, built by rwkv_lib.extension) against the
definition and the PyTorch backend: values, gradients, dtypes, extreme inputs, state,
errors, and the build cache (more on building in test_extension_build.py)."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from rwkv_lib import extension
from rwkv_lib.extension import load_wkv_extension
from rwkv_lib.quiet_cpp_extension import cpp_extension
from rwkv_lib.wkv import initial_state, wkv_definition, wkv_pytorch
from rwkv_lib.wkv_op import wkv_extension

REPO = Path(__file__).resolve().parent.parent
CUDA_DIR = REPO / "cuda"


@pytest.fixture(scope="module")
def ext():
    """The built extension. Skips only when the build tools are truly absent."""
    missing = extension._missing_tools()
    if missing is not None:
        pytest.skip(f"C++ extension cannot be built here: {missing}")
    return load_wkv_extension()


def make_inputs(B, T, C, dtype=torch.float32, device="cpu", k_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    td = torch.empty(C).uniform_(-5, 3, generator=g)  # the range of RWKV-4's init
    tf = torch.randn(C, generator=g)
    k = torch.randn(B, T, C, generator=g) * k_scale
    v = torch.randn(B, T, C, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (td, tf, k, v)]


def value_and_grads(fn, inputs, grad_y):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    # allow_unused: with T = 1 time_decay plays no part (decay acts between tokens)
    grads = torch.autograd.grad(y, leaves, grad_y, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)]
    return y.detach(), grads


def assert_close_rel(actual, expected, rel, name=""):
    """Max error relative to the largest magnitude of the expected tensor."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() + 1e-12
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel:g} * {scale:.3g}"


GRAD_NAMES = ("time_decay", "time_first", "k", "v")

# ---------------------------------------------------------------------------------------
# Exactness in float64


def test_gradcheck_float64_against_definition(ext):
    inputs = make_inputs(2, 6, 3, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(wkv_extension, leaves)
    grad_y = torch.randn(2, 6, 3, dtype=torch.float64)
    y, grads = value_and_grads(wkv_extension, inputs, grad_y)
    y_ref, grads_ref = value_and_grads(wkv_definition, inputs, grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10, msg=name)


def test_gradcheck_through_the_state(ext):
    # Two chunks joined by the state: gradients must pass from the second to the first.
    inputs = [t.requires_grad_() for t in make_inputs(2, 7, 3, dtype=torch.float64)]

    def chunked(td, tf, k, v):
        y1, state = wkv_extension(td, tf, k[:, :3], v[:, :3], return_state=True)
        return torch.cat([y1, wkv_extension(td, tf, k[:, 3:], v[:, 3:], state=state)], 1)

    assert torch.autograd.gradcheck(chunked, inputs)


def _state_after_prefix(td, tf, B, C, dtype=torch.float32, seed=0):
    """A state as it is met in practice: the one after a few random tokens."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, 5, C, generator=g).to(dtype) * 2
    v = torch.randn(B, 5, C, generator=g).to(dtype)
    _, state = wkv_pytorch(td.detach(), tf.detach(), k, v, return_state=True)
    return state


def _with_final_state(td, tf, k, v, *state):
    y, (a, b, p) = wkv_extension(td, tf, k, v, state=state or None, return_state=True)
    return y, a, b, p


@pytest.mark.parametrize("start", ["empty", "state"])
def test_gradcheck_through_every_output(ext, start):
    # y and all of the final state (a, b, p) as outputs: a loss may use each of them
    inputs = make_inputs(2, 6, 3, dtype=torch.float64, seed=4)
    if start == "state":
        inputs += _state_after_prefix(inputs[0], inputs[1], 2, 3, torch.float64, seed=5)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(_with_final_state, leaves)


@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (2, 19, 33), (3, 64, 7), (1, 300, 40)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("start", ["empty", "state"])
def test_loss_on_the_final_state_matches_pytorch_backend(ext, shape, start):
    B, T, C = shape
    inputs = make_inputs(*shape, k_scale=3.0, seed=T)
    if start == "state":
        inputs += _state_after_prefix(inputs[0], inputs[1], B, C, seed=T + 1)
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(shape, generator=g)] + [torch.randn(B, C, generator=g)
                                                   for _ in range(3)]

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        y, (a, b, p) = fn(*leaves[:4], state=tuple(leaves[4:]) or None, return_state=True)
        loss = sum((out * w).sum() for out, w in zip((y, a, b, p), weights, strict=True))
        found = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [torch.zeros_like(x) if d is None else d for x, d in zip(leaves, found,
                                                                         strict=True)]

    names = GRAD_NAMES + ("state a", "state b", "state p")
    for name, got, expected in zip(names, grads(wkv_extension), grads(wkv_pytorch),
                                   strict=False):
        assert_close_rel(got, expected, 1e-4, name)


def test_gradient_of_p_follows_the_max_chain(ext):
    # p0 far above every key: each step takes the p + w side of max(p + w, k), so the final
    # p is p0 + T w exactly, with dp/dp0 = 1, dp/dtime_decay = T w (w = -exp(time_decay))
    # and nothing for the keys. 37 channels: a full block of the CPU kernel and a partial one.
    B, T, C = 2, 40, 37
    td, tf, k, v = make_inputs(B, T, C, dtype=torch.float64)
    a0, b0 = torch.rand(B, C, dtype=torch.float64), 1 + torch.rand(B, C, dtype=torch.float64)
    p0 = torch.full((B, C), 1000.0, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (td, tf, k, v, a0, b0, p0)]
    _, (_, _, p) = wkv_extension(*leaves[:4], state=tuple(leaves[4:]), return_state=True)
    w = -torch.exp(td)
    torch.testing.assert_close(p, p0 + T * w)
    g_td, g_tf, g_k, g_v, g_a0, g_b0, g_p0 = torch.autograd.grad(p.sum(), leaves)
    torch.testing.assert_close(g_td, B * T * w)
    torch.testing.assert_close(g_p0, torch.ones_like(p0))
    for g in (g_tf, g_k, g_v, g_a0, g_b0):
        assert g.abs().max() < 1e-9


# ---------------------------------------------------------------------------------------
# float32 against the PyTorch stable backend


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1), (3, 1, 7), (2, 19, 33), (5, 40, 100), (1, 8, 515), (2, 4096, 3)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_matches_pytorch_backend(ext, shape):
    inputs = make_inputs(*shape, k_scale=3.0)
    grad_y = torch.randn(shape)
    y, grads = value_and_grads(wkv_extension, inputs, grad_y)
    y_ref, grads_ref = value_and_grads(wkv_pytorch, inputs, grad_y)
    assert y.dtype == torch.float32 and y.shape == shape
    assert_close_rel(y, y_ref, 1e-5, "y")
    for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape
        assert_close_rel(g, g_ref, 1e-4, name)


def test_non_contiguous_inputs(ext):
    td, tf, k, v = make_inputs(3, 9, 10)
    grad_y = torch.randn(3, 9, 10)
    # the same values in other memory layouts: strided slices and transposed storage
    td_nc = torch.stack([td, td], 1)[:, 0]
    tf_nc = torch.stack([tf, tf], 1)[:, 1]
    k_nc = k.transpose(1, 2).contiguous().transpose(1, 2)
    v_nc = torch.stack([v, v], 3)[..., 0]
    assert not any(t.is_contiguous() for t in (td_nc, tf_nc, k_nc, v_nc))
    y, grads = value_and_grads(wkv_extension, [td_nc, tf_nc, k_nc, v_nc], grad_y)
    y_ref, grads_ref = value_and_grads(wkv_extension, [td, tf, k, v], grad_y.contiguous())
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(ext, dtype):
    inputs = make_inputs(2, 30, 17, dtype=dtype)
    grad_y = torch.randn(2, 30, 17, dtype=dtype)
    y, grads = value_and_grads(wkv_extension, inputs, grad_y)
    assert y.dtype == dtype, "y comes back in the input dtype"
    assert all(g.dtype == dtype for g in grads)
    # reference: the same (rounded) inputs in float32; the only difference allowed is the
    # final rounding of the outputs to the half-precision dtype
    y32, grads32 = value_and_grads(wkv_extension, [t.float() for t in inputs], grad_y.float())
    torch.testing.assert_close(y, y32.to(dtype), rtol=0, atol=0)
    for g, g32 in zip(grads, grads32, strict=True):
        torch.testing.assert_close(g, g32.to(dtype), rtol=0, atol=0)
    _, state = wkv_extension(*inputs, return_state=True)
    assert all(s.dtype == torch.float32 for s in state)


def test_extreme_k_stays_finite_and_matches_safe_evaluation(ext):
    B, T, C = 2, 64, 9
    g = torch.Generator().manual_seed(1)
    td = torch.linspace(-8, 4, C)
    tf = torch.randn(C, generator=g) * 3
    k = (torch.rand(B, T, C, generator=g) * 2 - 1) * 1000  # uniform in [-1000, 1000]
    v = torch.randn(B, T, C, generator=g)
    grad_y = torch.randn(B, T, C, generator=g)
    y, grads = value_and_grads(wkv_extension, [td, tf, k, v], grad_y)
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(gr).all() for gr in grads)
    # safe=True evaluates the definition as a softmax, in float64: the truth for these inputs
    y_ref, grads_ref = value_and_grads(
        wkv_definition, [t.double() for t in (td, tf, k, v)], grad_y.double()
    )
    # float32 rounding of exponents near 1000 costs ~1e-4 relative; the backend does the same
    assert_close_rel(y, y_ref, 1e-3, "y")
    for name, gr, gr_ref in zip(GRAD_NAMES, grads, grads_ref, strict=True):
        assert_close_rel(gr, gr_ref, 1e-2, name)


@pytest.mark.parametrize("time_decay", [-30.0, 30.0, 100.0])
def test_extreme_decay(ext, time_decay):
    # w = -exp(100) overflows float32: it must act as "forget everything", not as NaN
    _, tf, k, v = make_inputs(2, 12, 5)
    td = torch.full((5,), time_decay)
    grad_y = torch.randn(2, 12, 5)
    y, grads = value_and_grads(wkv_extension, [td, tf, k, v], grad_y)
    y_ref, grads_ref = value_and_grads(
        wkv_definition, [t.double() for t in (td, tf, k, v)], grad_y.double()
    )
    assert all(torch.isfinite(t).all() for t in (y, *grads))
    assert_close_rel(y, y_ref, 1e-5, "y")
    for name, gr, gr_ref in zip(GRAD_NAMES[1:], grads[1:], grads_ref[1:], strict=True):
        assert_close_rel(gr, gr_ref, 1e-4, name)


# ---------------------------------------------------------------------------------------
# State


def test_chunks_with_carried_state_equal_one_long_call(ext):
    B, T, C = 2, 50, 21
    inputs = make_inputs(B, T, C, k_scale=3.0)
    grad_y = torch.randn(B, T, C)

    def chunked(td, tf, k, v):
        ys, state = [], None
        for lo, hi in [(0, 1), (1, 17), (17, 50)]:
            y, state = wkv_extension(td, tf, k[:, lo:hi], v[:, lo:hi], state=state,
                                     return_state=True)
            ys.append(y)
        return torch.cat(ys, 1)

    y, grads = value_and_grads(chunked, inputs, grad_y)
    y_ref, grads_ref = value_and_grads(wkv_extension, inputs, grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref, strict=True):
        assert_close_rel(g, g_ref, 1e-5, name)
    # the final state after the chunks is the one of the long call
    _, s_ref = wkv_extension(*inputs, return_state=True)
    state = None
    for lo, hi in [(0, 20), (20, 50)]:
        _, state = wkv_extension(*inputs[:2], inputs[2][:, lo:hi], inputs[3][:, lo:hi],
                                 state=state, return_state=True)
    for s, s_r in zip(state, s_ref, strict=True):
        torch.testing.assert_close(s, s_r, rtol=1e-6, atol=1e-6)


def test_state_convention_matches_pytorch_backend(ext):
    td, tf, k, v = make_inputs(2, 30, 6)
    s0 = initial_state(2, 6)
    y_a, s_a = wkv_extension(td, tf, k, v, state=s0, return_state=True)
    y_b, s_b = wkv_pytorch(td, tf, k, v, state=s0, return_state=True)
    torch.testing.assert_close(y_a, y_b, rtol=1e-5, atol=1e-6)
    for x, x_ref in zip(s_a, s_b, strict=True):
        assert x.shape == (2, 6) and x.dtype == torch.float32
        torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-6)
    # a state made by one backend continues correctly in the other
    y2 = wkv_pytorch(td, tf, k, v, state=s_a)
    torch.testing.assert_close(wkv_extension(td, tf, k, v, state=s_b), y2, rtol=1e-5,
                               atol=1e-6)


def test_without_gradients_the_same_result_and_no_graph(ext):
    """With nothing to differentiate (no_grad, or no input that requires grad) the op is
    called without the autograd Function: the same numbers, and no graph."""
    td, tf, k, v = make_inputs(2, 7, 5)
    state = tuple(t.clone() for t in wkv_extension(td, tf, k, v, return_state=True)[1])
    leaves = [t.clone().requires_grad_() for t in (td, tf, k, v)]
    y, s = wkv_extension(*leaves, state=state, return_state=True)
    assert y.grad_fn is not None and all(t.grad_fn is not None for t in s)
    with torch.no_grad():
        y_no_grad, s_no_grad = wkv_extension(*leaves, state=state, return_state=True)
    y_plain, s_plain = wkv_extension(td, tf, k, v, state=state, return_state=True)
    for got in (y_no_grad, *s_no_grad, y_plain, *s_plain):
        assert got.grad_fn is None and not got.requires_grad
    for a, b, c in zip((y, *s), (y_no_grad, *s_no_grad), (y_plain, *s_plain), strict=True):
        assert torch.equal(a.detach(), b) and torch.equal(a.detach(), c)


def test_torch_ops_and_pybind_functions_agree(ext):
    td, tf, k, v = make_inputs(2, 5, 4)
    via_ops = torch.ops.rwkv.wkv_forward(td, tf, k, v)
    via_module = ext.wkv_forward(td, tf, k, v)
    for a, b in zip(via_ops, via_module, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    gy = torch.randn(2, 5, 4)
    g_ops = torch.ops.rwkv.wkv_backward(td, tf, k, v, None, None, None, gy)
    g_mod = ext.wkv_backward(td, tf, k, v, None, None, None, gy)
    for a, b in zip(g_ops, g_mod, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Errors


def test_meta_tensors_give_shapes_and_dtypes(ext):
    """Meta tensors (no data) reach the op's fake kernel: shape inference without compute."""
    td, tf, k, v = (t.to("meta") for t in make_inputs(2, 7, 3))
    y, a, b, p = torch.ops.rwkv.wkv_forward(td, tf, k.half(), v)
    assert (y.device.type, y.shape, y.dtype) == ("meta", (2, 7, 3), torch.float16)
    assert all(s.shape == (2, 3) and s.dtype == torch.float32 for s in (a, b, p))
    grads = torch.ops.rwkv.wkv_backward(td, tf, k.double(), v, None, None, None, v)
    assert [tuple(g.shape) for g in grads] == [(3,), (3,), (2, 7, 3), (2, 7, 3)] + [(2, 3)] * 3
    assert grads[4].dtype == torch.float64
    grads = torch.ops.rwkv.wkv_backward(td, tf, k, v, a, b, p, v, a, b, p)
    assert [tuple(g.shape) for g in grads] == [(3,), (3,), (2, 7, 3), (2, 7, 3)] + [(2, 3)] * 3


def test_torch_compile_traces_the_op_forward_and_backward(ext):
    """fullgraph=True fails on any graph break, so this proves the fake kernels let the
    compiler see the op (values and gradients, with a state carried in and out)."""
    inputs = make_inputs(2, 9, 5, seed=11)
    state = tuple(s.detach() for s in wkv_extension(*inputs, return_state=True)[1])

    def fn(td, tf, k, v):
        y, (a, b, p) = wkv_extension(td, tf, k, v, state=state, return_state=True)
        return y * 2 + (a + b + p).sum(0, keepdim=True).unsqueeze(1) * 0.1

    grad_y = torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(3))
    y_eager, grads_eager = value_and_grads(fn, inputs, grad_y)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    y_comp, grads_comp = value_and_grads(compiled, inputs, grad_y)
    torch.testing.assert_close(y_comp, y_eager)
    for name, g_c, g_e in zip(["time_decay", "time_first", "k", "v"], grads_comp, grads_eager,
                              strict=True):
        torch.testing.assert_close(g_c, g_e, msg=name)


def test_torch_compile_of_the_model_with_the_cpp_backend(ext):
    from rwkv_lib.model import RWKV, RWKVConfig

    torch.manual_seed(0)
    model = RWKV(RWKVConfig(vocab_size=17, n_layer=2, n_embd=16, ctx_len=8, wkv_backend="cpp"))
    with torch.no_grad():  # move off the init's zeros so every gradient is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    idx = torch.randint(0, 17, (2, 8))

    def loss_and_grads(m):
        model.zero_grad()
        loss = m(idx).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_eager, grads_eager = loss_and_grads(model)
    torch._dynamo.reset()
    loss_comp, grads_comp = loss_and_grads(torch.compile(model, backend="aot_eager",
                                                         fullgraph=True))
    torch.testing.assert_close(loss_comp, loss_eager)
    for name, g in grads_eager.items():
        torch.testing.assert_close(grads_comp[name], g, msg=name)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.__setitem__(2, a[2][0]), "k must have shape"),
        (lambda a: a.__setitem__(3, a[3][:, :-1]), "v has shape"),
        (lambda a: a.__setitem__(0, a[0][:-1]), "time_decay must have shape"),
        (lambda a: a.__setitem__(1, a[1][None]), "time_first must have shape"),
        (lambda a: a.__setitem__(2, a[2].long()), "k must be a floating-point tensor"),
        (lambda a: a.__setitem__(0, a[0].int()), "time_decay must be a floating-point"),
        (lambda a: a.__setitem__(1, a[1].to("meta")), "time_first is on meta but k is on cpu"),
        (lambda a: a.__setitem__(2, a[2].to("meta")), "time_decay is on cpu but k is on meta"),
    ],
    ids=["k-2d", "v-shape", "td-length", "tf-2d", "k-int", "td-int", "devices", "devices2"],
)
def test_clear_errors(ext, change, message):
    args = make_inputs(2, 3, 4)
    change(args)
    with pytest.raises(RuntimeError, match=message):
        wkv_extension(*args)


def test_state_errors(ext):
    td, tf, k, v = make_inputs(2, 3, 4)
    a, b, p = initial_state(2, 4)
    with pytest.raises(RuntimeError, match=r"state b must have shape \(B, C\) = \(2, 4\)"):
        wkv_extension(td, tf, k, v, state=(a, b[:1], p))
    with pytest.raises(RuntimeError, match="all three state tensors"):
        torch.ops.rwkv.wkv_forward(td, tf, k, v, a, None, p)
    with pytest.raises(ValueError, match="tuple"):
        wkv_extension(td, tf, k, v, state=(a, b))
    with pytest.raises(TypeError, match="state p must be a tensor, got NoneType"):
        wkv_extension(td, tf, k, v, state=[a, b, None])
    with pytest.raises(TypeError, match="state a must be a floating-point tensor"):
        wkv_extension(td, tf, k, v, state=(a.long(), b, p))


# ---------------------------------------------------------------------------------------
# Building: cache, failure, compile checks

_SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
        env={**_SUBPROCESS_ENV, **env}, cwd=REPO,
    )


def test_second_process_reuses_the_build(ext):
    library = Path(ext.__file__)
    build_dir = library.parent
    before = {p.name: p.stat().st_mtime_ns for p in build_dir.iterdir() if p.is_file()}
    code = (
        "import json, time; t = time.perf_counter()\n"
        "from rwkv_lib.extension import load_wkv_extension\n"
        "m = load_wkv_extension()\n"
        "print(json.dumps({'file': m.__file__, 'seconds': time.perf_counter() - t}))\n"
    )
    out = _run_python(code)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(result["file"]) == library
    after = {p.name: p.stat().st_mtime_ns for p in build_dir.iterdir() if p.is_file()}
    assert after == before, "the second process rewrote build files (it recompiled)"
    assert result["seconds"] < 15, f"loading from the cache took {result['seconds']:.1f} s"


def test_build_name_changes_with_sources_and_flags(tmp_path):
    src = tmp_path / "op.cpp"
    src.write_text("int f() { return 1; }\n")
    name = extension._build_name("demo", [src], ["-O3"], cuda=False)
    assert name == extension._build_name("demo", [src], ["-O3"], cuda=False)
    assert name != extension._build_name("demo", [src], ["-O2"], cuda=False)
    src.write_text("int f() { return 2; }\n")
    assert name != extension._build_name("demo", [src], ["-O3"], cuda=False)


_FAILING_BUILD = """
import json, warnings, torch
from rwkv_lib.extension import ExtensionUnavailable, load_wkv_extension
from rwkv_lib.wkv import wkv
try:
    load_wkv_extension()
    message = None
except ExtensionUnavailable as err:
    message = str(err)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = wkv(torch.zeros(3), torch.zeros(3), torch.randn(1, 4, 3), torch.randn(1, 4, 3))
print(json.dumps({"message": message, "warnings": [str(w.message) for w in caught],
                  "finite": bool(torch.isfinite(y).all())}))
"""


@pytest.mark.parametrize(
    "cxx, expected",
    [("/nonexistent", r"compiler '/nonexistent' was not found; install a C\+\+ compiler"),
     ("/bin/false", r"failed\. Fix: install a C\+\+ compiler")],
    ids=["missing-compiler", "broken-compiler"],
)
def test_build_failure_raises_extension_unavailable(tmp_path, cxx, expected):
    if not Path(cxx).exists() and cxx != "/nonexistent":
        pytest.skip(f"{cxx} does not exist here")
    out = _run_python(_FAILING_BUILD, CXX=cxx, RWKV_EXT_DIR=str(tmp_path / "fresh-cache"))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["message"] is not None, "the build should have failed"
    assert re.search(expected, result["message"]), result["message"]
    # wkv(backend="auto") falls back to the PyTorch backend, saying why, once
    assert result["finite"]
    assert any("unavailable" in w for w in result["warnings"]), result["warnings"]


def _gxx_or_skip() -> str:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler {cxx!r}")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    if "Free Software Foundation" not in version:
        pytest.skip("the compiler's vector code is checked for g++ only")
    return cxx


@pytest.mark.parametrize("target", ["build flags", "x86-64-v3", "x86-64"])
def test_cpu_inner_loops_are_vectorized(target):
    """g++ must turn every `#pragma omp simd` channel loop of wkv_cpu.cpp into SIMD code:
    with the flags of the build, and for AVX2 and plain SSE2 targets on x86-64."""
    if target != "build flags" and platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86-64 targets")
    cxx = _gxx_or_skip()
    source = CUDA_DIR / "wkv_cpu.cpp"
    lines = source.read_text().splitlines()
    # 1-based number of the `for` line after each pragma
    loops = [i + 2 for i, line in enumerate(lines) if line.strip() == "#pragma omp simd"]
    assert len(loops) == 3
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    flags = extension._cpu_flags()
    if target != "build flags":
        flags = [f for f in flags if not f.startswith("-march")] + [f"-march={target}"]
    cmd = [cxx, "-std=c++17", "-fPIC", *includes, *flags,
           "-fopt-info-vec-optimized", "-c", str(source), "-o", os.devnull]
    report = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    vectorized = {int(m) for m in re.findall(r"wkv_cpu\.cpp:(\d+):\d+: optimized: loop vectorized",
                                             report.stderr)}
    for line in loops:  # g++ names the loop's line or the first line of its body
        assert vectorized & {line, line + 1}, f"the loop at wkv_cpu.cpp:{line} was not vectorized"


def test_cpu_kernels_use_512_bit_vectors_where_the_processor_has_them():
    """g++ tunes -march=native on many Intel processors to prefer 256-bit vectors even
    where AVX-512 is there; the WKV loops are bound by exp and division, and 16 lanes
    instead of 8 make them faster (benchmarks/cpu_bench.py, the wkv rows)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or \
            "avx512f" not in extension._cpu_identity().split():
        pytest.skip("needs an x86-64 processor with AVX-512")
    assembly = _cpu_assembly(CUDA_DIR / "wkv_cpu.cpp")
    assert re.search(r"%zmm\d+", assembly), "no 512-bit register is used"


def test_cpu_kernels_compute_exp_inline():
    """The exponential of the recurrence is inlined into the vector loops: no call to
    expf or to one of its vector variants (a call saves and restores the loop's vector
    registers, and its out-of-range path made the first token of every sequence slow).
    The float64 kernels, there for gradcheck, keep glibc's exp."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86-64 assembly")
    assembly = _cpu_assembly(CUDA_DIR / "wkv_cpu.cpp")
    calls = re.findall(r"\bcall\s+(\S*expf\b\S*)", assembly)
    assert not calls, f"wkv_cpu.cpp still calls {sorted(set(calls))}"


def _cpu_assembly(source: Path) -> str:
    cxx = _gxx_or_skip()
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd = [cxx, "-std=c++17", "-fPIC", *includes, *extension._cpu_flags(), "-S",
           str(source), "-o", "-"]
    assembly = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert assembly.returncode == 0, assembly.stderr[-2000:]
    return assembly.stdout


_EXP_PROGRAM = r"""
#include <cmath>
#include <cstdio>
#include "wkv_math.h"
// Every STRIDE-th float from 0 down to -88, through the vectorized loop of the build flags.
int main() {
    const long n = 1L << 21;
    static float x[1L << 21], y[1L << 21];
    float worst = 0.0f, worst_at = 0.0f;
    long nonzero_below = 0, count = 0;
    for (float start = 0.0f; start > -88.0f; ) {
        long m = 0;
        for (; m < n && start > -88.0f; ++m) {
            x[m] = start;
            for (int s = 0; s < STRIDE; ++s) start = std::nextafter(start, -100.0f);
        }
#pragma omp simd
        for (long i = 0; i < m; ++i) y[i] = wkv_exp_nonpositive(x[i]);
        for (long i = 0; i < m; ++i) {
            ++count;
            if (x[i] < -87.0f) { nonzero_below += y[i] != 0.0f; continue; }
            const double ref = std::exp(static_cast<double>(x[i]));
            const float rf = static_cast<float>(ref);
            const double ulp = std::nextafter(rf, INFINITY) - rf;
            const float err = static_cast<float>(std::fabs(y[i] - ref) / ulp);
            if (err > worst) { worst = err; worst_at = x[i]; }
        }
    }
    x[0] = 0.0f; x[1] = -INFINITY; x[2] = NAN; x[3] = -1e38f;
    for (int i = 0; i < 4; ++i) y[i] = wkv_exp_nonpositive(x[i]);
    std::printf("%ld %.4f %.9g %ld %.9g %.9g %.9g %.9g\n", count, worst, worst_at,
                nonzero_below, y[0], y[1], y[2], y[3]);
}
"""


def test_cpu_exp_is_within_two_ulp(tmp_path):
    """The CPU kernels' own e^x (cuda/wkv_math.h) against exp in double precision over
    [-87, 0] (about 1.6 million floats, compiled with the build's flags, vectorized as in
    the kernels); 0 below -87 (results under 2^-125 carry nothing into sums of at least 1),
    exactly 1 at 0, NaN for NaN."""
    cxx = _gxx_or_skip()
    source = tmp_path / "exp_check.cpp"
    source.write_text(_EXP_PROGRAM)
    program = tmp_path / "exp_check"
    flags = [f for f in extension._cpu_flags() if f != "-fopenmp"]  # no threads needed
    build = subprocess.run([cxx, "-std=c++17", *flags, f"-I{CUDA_DIR}", "-DSTRIDE=677",
                            str(source), "-o", str(program)], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    out = subprocess.run([str(program)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    count, worst, worst_at, nonzero_below, at0, at_minf, at_nan, at_empty = \
        out.stdout.split()
    assert int(count) > 1_500_000
    assert float(worst) <= 2.0, f"{worst} ulp at x = {worst_at}"
    assert int(nonzero_below) == 0
    assert float(at0) == 1.0 and float(at_minf) == 0.0 and float(at_empty) == 0.0
    assert at_nan.lower() in ("nan", "-nan")


def _nvcc_or_skip() -> str:
    nvcc = shutil.which("nvcc") or extension._nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not installed; the CUDA source cannot be compile-checked")
    return nvcc


@pytest.mark.parametrize("source", extension.WKV_CUDA_SOURCES)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_source_compiles_on_its_own(tmp_path, arch, source):
    nvcc = _nvcc_or_skip()
    obj = tmp_path / "kernels.o"
    out = subprocess.run(
        [nvcc, "-c", f"-arch={arch}", "-O3", "-Xptxas", "-v", str(CUDA_DIR / source), "-o",
         str(obj)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert obj.stat().st_size > 0
    if source != "wkv_cuda_chunked.cu":
        return
    # ptxas' report, per kernel: the float kernels keep everything in registers (a spill
    # goes to slow local memory), and the registers of a full block fit one multiprocessor
    # (64K registers on sm_80 and sm_90), or the launch would fail at run time.
    max_threads = int(re.search(r"kWkvMaxThreads = (\d+);",
                                (CUDA_DIR / "wkv_chunked.h").read_text()).group(1))
    reports = re.findall(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores.*?"
                         r"Used (\d+) registers", out.stderr, re.S)
    assert len(reports) == 4, out.stderr  # forward and backward, float and double
    for name, spills, registers in reports:
        assert int(registers) * max_threads <= 65536, f"{name}: {registers} registers"
        if "IfE" in name:  # the float instantiations
            assert int(spills) == 0, f"{name} spills {spills} bytes to local memory"


@pytest.mark.slow
def test_cuda_bindings_link_against_the_kernels(tmp_path):
    """wkv_ops.cpp compiled as the CUDA build compiles it (-DWITH_CUDA) needs only symbols
    that the nvcc-compiled kernels define, with the same C++ signatures: checked here with
    nm, so that a mismatch shows up without a GPU machine."""
    nvcc = _nvcc_or_skip()
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None or shutil.which("nm") is None:
        pytest.skip("needs a C++ compiler and nm")
    # where nvcc finds the CUDA headers (nvcc may be a wrapper script): ask it
    dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True, timeout=60)
    cuda_includes = [p for p in re.findall(r'-I"?([^"\s]+)', dry.stderr)
                     if (Path(p) / "cuda_runtime_api.h").exists()]
    if not cuda_includes:
        pytest.skip("could not find the CUDA headers nvcc uses")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    includes += [f"-I{cuda_includes[0]}", f"-I{sysconfig.get_paths()['include']}"]
    generated = "c10/cuda/impl/cuda_cmake_macros.h"  # generated; CPU-only wheels lack it
    if not any((Path(p[2:]) / generated).exists() for p in includes):
        stub = tmp_path / "stub" / generated
        stub.parent.mkdir(parents=True)
        stub.write_text("#pragma once\n")
        includes.append(f"-I{tmp_path / 'stub'}")
    objects = {}
    for source in ("wkv_ops.cpp", *extension.WKV_CUDA_SOURCES):
        obj = tmp_path / f"{source}.o"
        if source.endswith(".cu"):
            cmd = [nvcc, "-c", "-arch=sm_90", "-O1", f"-I{CUDA_DIR}", str(CUDA_DIR / source)]
        else:
            if not any((Path(p[2:]) / "c10" / "cuda" / "CUDAGuard.h").exists() for p in includes):
                pytest.skip("this torch has no c10/cuda headers")
            cmd = [cxx, "-std=c++17", "-c", "-O0", "-fPIC", "-DWITH_CUDA",
                   "-DTORCH_EXTENSION_NAME=rwkv_link_check", *includes, str(CUDA_DIR / source)]
        out = subprocess.run([*cmd, "-o", str(obj)], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{source}:\n{out.stderr[-3000:]}"
        objects[source] = obj

    def symbols(obj: Path, flag: str) -> set[str]:
        out = subprocess.run(["nm", flag, str(obj)], capture_output=True, text=True, check=True)
        return {line.split()[-1] for line in out.stdout.splitlines() if "wkv_" in line}

    needed = {s for s in symbols(objects["wkv_ops.cpp"], "--undefined-only") if "cuda" in s}
    defined = set().union(*(symbols(objects[s], "--defined-only")
                            for s in extension.WKV_CUDA_SOURCES))
    assert len(needed) >= 10, needed  # both kernels' launchers, float and double, and more
    assert needed <= defined, f"undefined in the CUDA objects: {sorted(needed - defined)}"


def test_cpu_kernels_are_multithreaded(ext):
    # at::parallel_for runs on one thread unless the extension itself is built with OpenMP
    if extension._use_openmp():
        assert ext.parallel == "openmp"


def test_extension_status_reports_cpu(ext):
    status = extension.extension_status()
    assert status["cpu"] == "loaded"
    assert status["ninja"] is True
    if not torch.cuda.is_available():
        assert status["cuda"].startswith("unavailable")


# ---------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


def _cuda_ext():
    module = load_wkv_extension()
    if not module.has_cuda:
        pytest.fail(f"a GPU is present but the extension has no CUDA kernels: "
                    f"{extension._cuda_build_error}")
    return module


@pytest.mark.cuda
def test_cuda_gradcheck_float64():
    _cuda_ext()
    inputs = [t.requires_grad_() for t in make_inputs(2, 6, 3, torch.float64, "cuda")]
    assert torch.autograd.gradcheck(wkv_extension, inputs)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (3, 17, 33), (2, 64, 515), (1, 4096, 5), (12, 128, 512)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_cuda_matches_cpu(shape):
    _cuda_ext()
    inputs = make_inputs(*shape, k_scale=3.0)
    grad_y = torch.randn(shape)
    y, grads = value_and_grads(wkv_extension, inputs, grad_y)
    y_gpu, grads_gpu = value_and_grads(
        wkv_extension, [t.cuda() for t in inputs], grad_y.cuda()
    )
    assert_close_rel(y_gpu.cpu(), y, 1e-5, "y")
    for name, g, g_gpu in zip(GRAD_NAMES, grads, grads_gpu, strict=True):
        assert_close_rel(g_gpu.cpu(), g, 1e-4, name)


@pytest.mark.cuda
@pytest.mark.parametrize("start", ["empty", "state"])
def test_cuda_gradients_of_the_final_state_match_cpu(start):
    _cuda_ext()
    B, T, C = 3, 50, 70
    inputs = make_inputs(B, T, C, k_scale=3.0, seed=2)
    if start == "state":
        inputs += _state_after_prefix(inputs[0], inputs[1], B, C, seed=3)
    g = torch.Generator().manual_seed(4)
    weights = [torch.randn(B, T, C, generator=g)] + [torch.randn(B, C, generator=g)
                                                     for _ in range(3)]

    def grads(device):
        leaves = [t.detach().to(device).requires_grad_() for t in inputs]
        y, state = wkv_extension(*leaves[:4], state=tuple(leaves[4:]) or None,
                                 return_state=True)
        loss = sum((out * w.to(device)).sum() for out, w in zip((y, *state), weights,
                                                                 strict=True))
        return [d.cpu() for d in torch.autograd.grad(loss, leaves)]

    names = GRAD_NAMES + ("state a", "state b", "state p")
    for name, g_gpu, g_cpu in zip(names, grads("cuda"), grads("cpu"), strict=False):
        assert_close_rel(g_gpu, g_cpu, 1e-4, name)


@pytest.mark.cuda
def test_cuda_extremes_state_and_half_precision():
    _cuda_ext()
    td, tf, k, v = make_inputs(2, 40, 7, device="cuda")
    k = (torch.rand_like(k) * 2 - 1) * 1000
    y = wkv_extension(td, tf, k, v)
    y_ref = wkv_definition(*(t.double() for t in (td, tf, k, v)))
    assert torch.isfinite(y).all()
    assert_close_rel(y, y_ref, 1e-3, "y")
    y1, state = wkv_extension(td, tf, k[:, :15], v[:, :15], return_state=True)
    y2 = wkv_extension(td, tf, k[:, 15:], v[:, 15:], state=state)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-5, atol=1e-5)
    for dtype in (torch.float16, torch.bfloat16):
        y_half = wkv_extension(td, tf, k.to(dtype), v.to(dtype))
        y32 = wkv_extension(td, tf, k.to(dtype).float(), v.to(dtype).float())
        assert y_half.dtype == dtype
        torch.testing.assert_close(y_half, y32.to(dtype), rtol=0, atol=0)
