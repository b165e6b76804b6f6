"""The chunked CUDA kernels' code (cuda/wkv_chunked.h), run on the CPU.

tests/wkv_chunked_harness.cpp compiles the header the CUDA kernels are made of with the
host compiler and runs every thread of a block as a fiber that yields at each barrier,
in several orders. So the GPU's arithmetic, indexing, block layout and barriers are
checked here, against the stable recurrence, autograd and the sequential C++ operator,
without a GPU.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_wkv_chunked import autograd_grads, inputs, output_grads, some_state

from rwkv_lib.wkv import P_INIT, wkv_definition, wkv_pytorch

REPO = Path(__file__).resolve().parent.parent
SENTINEL = -3.5e33  # written around every output buffer: out-of-bounds writes change it
GUARD = 64


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler {cxx!r} to build the CPU harness")
    lib = tmp_path_factory.mktemp("harness") / "wkv_chunked_harness.so"
    cmd = [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
           f"-I{REPO / 'cuda'}", str(REPO / "tests" / "wkv_chunked_harness.cpp"), "-o", str(lib)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return Harness(ctypes.CDLL(str(lib)))


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


class Guarded:
    """An output buffer with sentinel guard zones on both sides."""

    def __init__(self, shape, dtype):
        n = 1
        for s in shape:
            n *= s
        self.storage = torch.full((n + 2 * GUARD,), SENTINEL, dtype=dtype)
        self.tensor = self.storage[GUARD:GUARD + n].view(*shape)
        self.tensor.fill_(float("nan"))  # every element must be written

    def check(self, name: str, written: bool = True) -> torch.Tensor:
        guards = torch.cat([self.storage[:GUARD], self.storage[-GUARD:]])
        assert (guards == SENTINEL).all(), f"{name}: written out of bounds"
        if written:
            assert not self.tensor.isnan().any(), f"{name}: some elements were not written"
        return self.tensor


class Harness:
    def __init__(self, lib):
        self.lib = lib
        i64, i32, u32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p
        for suffix in ("f32", "f64"):
            fwd = getattr(lib, f"wkv_harness_forward_{suffix}")
            fwd.argtypes = [i64, i64, i64, i32, i32, u32] + [vp] * 11
            fwd.restype = i32
            bwd = getattr(lib, f"wkv_harness_backward_{suffix}")
            bwd.argtypes = [i64, i64, i64, i32, i32, u32] + [vp] * 11 + [i32] + [vp] * 8
            bwd.restype = i32
        lib.wkv_harness_layout.argtypes = [i64, i64, i64, i32, ctypes.POINTER(i64)]
        lib.wkv_harness_auto_chunks.argtypes = [i64, i64, i64, i32]
        lib.wkv_harness_auto_chunks.restype = i32
        self.max_chunks = lib.wkv_harness_max_chunks()
        self.max_threads = lib.wkv_harness_max_threads()

    @staticmethod
    def _prepare(td, tf, k, v, state, dtype):
        # as wkv_ops.cpp: w = -exp(time_decay), finite; everything contiguous in the compute dtype
        w = -torch.exp(td.to(dtype)).clamp(max=1e38).contiguous()
        tensors = [w, tf.to(dtype).contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous()]
        states = [None] * 3 if state is None else [s.to(dtype).contiguous() for s in state]
        return tensors, states

    def forward(self, td, tf, k, v, chunks, state=None, order=0, seed=0, dtype=torch.float64):
        B, T, C = k.shape
        (w, u, kc, vc), (a0, b0, p0) = self._prepare(td, tf, k, v, state, dtype)
        outs = [Guarded((B, T, C), dtype)] + [Guarded((B, C), dtype) for _ in range(3)]
        fn = getattr(self.lib, f"wkv_harness_forward_{'f64' if dtype == torch.float64 else 'f32'}")
        rc = fn(B, T, C, chunks, order, seed, *map(_ptr, (w, u, kc, vc, a0, b0, p0)),
                *(_ptr(o.tensor) for o in outs))
        assert rc != 2, "the block's threads did not meet at the same barriers"
        assert rc == 0
        y, aT, bT, pT = (o.check(n) for o, n in zip(outs, ("y", "aT", "bT", "pT"), strict=True))
        return y, (aT, bT, pT)

    def backward(self, td, tf, k, v, gy, chunks, state=None, grad_state=(None, None, None),
                 exact_p=True, order=0, seed=0, dtype=torch.float64):
        B, T, C = k.shape
        (w, u, kc, vc), (a0, b0, p0) = self._prepare(td, tf, k, v, state, dtype)
        gyc = gy.to(dtype).contiguous()
        gaT, gbT, gpT = (None if g is None else g.to(dtype).contiguous() for g in grad_state)
        big = [Guarded((B, T, C), dtype) for _ in range(3)]  # saved_p, gk, gv
        small = [Guarded((B, C), dtype) for _ in range(2)]  # gw, gu
        init = [Guarded((B, C), dtype) for _ in range(3)] if state is not None else [None] * 3
        fn = getattr(self.lib, f"wkv_harness_backward_{'f64' if dtype == torch.float64 else 'f32'}")
        rc = fn(B, T, C, chunks, order, seed, *map(_ptr, (w, u, kc, vc, a0, b0, p0, gyc, gaT, gbT,
                                                          gpT)),
                int(exact_p), _ptr(big[0].tensor), _ptr(small[0].tensor), _ptr(small[1].tensor),
                _ptr(big[1].tensor), _ptr(big[2].tensor),
                *(None if g is None else _ptr(g.tensor) for g in init))
        assert rc != 2, "the block's threads did not meet at the same barriers"
        assert rc == 0
        big[0].check("saved_p")
        gk, gv = big[1].check("gk"), big[2].check("gv")
        gw, gu = small[0].check("gw"), small[1].check("gu")
        # as wkv_ops.cpp: sum the rows, chain rule through w = -exp(time_decay)
        grads = [gw.sum(0) * w, gu.sum(0), gk, gv]
        if state is not None:
            grads += [g.check(n) for g, n in zip(init, ("ga0", "gb0", "gp0"), strict=True)]
        return grads

    def layout(self, B, T, C, chunks):
        out = (ctypes.c_int64 * 6)()
        self.lib.wkv_harness_layout(B, T, C, chunks, out)
        return dict(zip(("J", "n_ch", "threads", "L", "groups", "blocks"), out, strict=True))


# (B, T, C): channels not a multiple of the block's, T < J (empty chunks), T = 1
SHAPES = [(2, 13, 5), (1, 37, 33), (3, 5, 20), (2, 1, 9)]
CHUNKS = [1, 2, 3, 7, 64]


def _close(actual, expected, rtol, atol, names):
    for name, a, e in zip(names, actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=name)


# ---------------------------------------------------------------------------------------
# Layout and the by-shape rule


@pytest.mark.parametrize("B, T, C", [(1, 1024, 512), (12, 1024, 512), (3, 5, 20), (2, 8192, 7)])
@pytest.mark.parametrize("chunks", [1, 2, 3, 5, 22, 64])
def test_layout_covers_every_token_and_channel(harness, B, T, C, chunks):
    lay = harness.layout(B, T, C, chunks)
    n = lay["n_ch"]
    assert n >= 8 and n & (n - 1) == 0, "a power of two, at least a 32-byte sector of floats"
    assert lay["threads"] == n * chunks <= harness.max_threads
    assert lay["L"] * chunks >= T and (lay["L"] - 1) * chunks < T  # the shortest chunks that fit
    assert lay["groups"] * n >= C > (lay["groups"] - 1) * n
    assert lay["blocks"] == B * lay["groups"]


@pytest.mark.parametrize(
    "shape, expected",
    [((1, 1024, 512), 64), ((12, 1024, 512), 22), ((32, 1024, 1024), 4), ((1, 8, 512), 2),
     ((128, 1024, 1024), 1), ((1, 8192, 512), 64)],
)
def test_auto_chunks_rule(harness, shape, expected):
    # 132 multiprocessors (an H100 or H200): at most ~1024 threads each, chunks of >= 4 tokens
    assert harness.lib.wkv_harness_auto_chunks(*shape, 132) == expected


# ---------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("with_state", [False, True], ids=["empty-state", "given-state"])
def test_forward_float64(harness, shape, chunks, with_state):
    B, T, C = shape
    td, tf, k, v = inputs(B, T, C, k_scale=3.0)
    state = some_state(B, C) if with_state else None
    y, final = harness.forward(td, tf, k, v, chunks, state)
    y_ref, final_ref = wkv_pytorch(td, tf, k, v, state=state, return_state=True)
    _close([y, *final], [y_ref, *final_ref], 1e-12, 1e-12, ["y", "a", "b", "p"])
    if not with_state:
        torch.testing.assert_close(y, wkv_definition(td, tf, k, v), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("chunks", [1, 3, 64])
def test_forward_float32_against_float64(harness, chunks):
    B, T, C = 2, 300, 33
    td, tf, k, v = inputs(B, T, C, k_scale=3.0, seed=21)
    y, final = harness.forward(td.float(), tf.float(), k.float(), v.float(), chunks,
                               dtype=torch.float32)
    y_ref, final_ref = wkv_pytorch(td, tf, k, v, return_state=True)
    assert y.dtype == torch.float32
    scale = y_ref.abs().max()
    assert (y.double() - y_ref).abs().max() <= 1e-5 * scale
    # the state accumulates rounding over T steps: ~3e-5 for the sequential float32 op too
    _close([s.double() for s in final], final_ref, 1e-4, 1e-5, ["a", "b", "p"])


@pytest.mark.parametrize("chunks", [1, 2, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_extreme_k(harness, chunks, dtype):
    B, T, C = 2, 40, 6
    td, tf, _, v = inputs(B, T, C, seed=22)
    k = torch.empty(B, T, C, dtype=torch.float64).uniform_(
        -1000, 1000, generator=torch.Generator().manual_seed(23))
    y, _ = harness.forward(td, tf, k, v, chunks, dtype=dtype)
    assert torch.isfinite(y).all()
    ref = wkv_definition(td, tf, k.to(dtype).double(), v.to(dtype).double())
    tol = 1e-10 if dtype == torch.float64 else 1e-3  # float32 rounding of exponents near 1000
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()


# ---------------------------------------------------------------------------------------
# Backward


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("chunks", CHUNKS)
def test_backward_float64_exact_equals_autograd(harness, shape, chunks):
    """Gradients of a loss on y and on the final (a, b, p) directly, from a given state."""
    B, T, C = shape
    td, tf, k, v = inputs(B, T, C, k_scale=2.0, seed=24)
    state = some_state(B, C)
    gy, ga, gb, gp = output_grads(B, T, C, seed=25)
    grads = harness.backward(td, tf, k, v, gy, chunks, state, (ga, gb, gp), exact_p=True)
    expected = autograd_grads(td, tf, k, v, state, gy, ga, gb, gp)
    names = ["time_decay", "time_first", "k", "v", "a0", "b0", "p0"]
    _close(grads, expected, 1e-9, 1e-10, names)


@pytest.mark.parametrize("chunks", CHUNKS)
def test_backward_empty_state_and_no_final_gradients(harness, chunks):
    B, T, C = 2, 13, 5
    td, tf, k, v = inputs(B, T, C, seed=26)
    gy = output_grads(B, T, C, seed=27)[0]
    grads = harness.backward(td, tf, k, v, gy, chunks)
    zero_state = (torch.zeros(B, C, dtype=torch.float64),) * 2 + (
        torch.full((B, C), P_INIT, dtype=torch.float64),)
    zeros = torch.zeros(B, C, dtype=torch.float64)
    expected = autograd_grads(td, tf, k, v, zero_state, gy, zeros, zeros, zeros)[:4]
    _close(grads, expected, 1e-9, 1e-10, ["time_decay", "time_first", "k", "v"])


@pytest.mark.parametrize("chunks", CHUNKS)
def test_backward_equals_the_sequential_operator(harness, chunks):
    """The chunked kernel's gradients are the sequential kernel's (the C++ op on the CPU),
    the final p's included."""
    from rwkv_lib import extension

    if extension._missing_tools() is not None:
        pytest.skip("the C++ extension cannot be built here")
    extension.load_wkv_extension()
    B, T, C = 3, 17, 6
    td, tf, k, v = inputs(B, T, C, k_scale=3.0, seed=28)
    state = some_state(B, C)
    gy, ga, gb, gp = output_grads(B, T, C, seed=29)
    expected = torch.ops.rwkv.wkv_backward(td, tf, k, v, *state, gy, ga, gb, gp)
    grads = harness.backward(td, tf, k, v, gy, chunks, state, (ga, gb, gp), exact_p=True)
    _close(grads, expected, 1e-9, 1e-10,
           ["time_decay", "time_first", "k", "v", "a0", "b0", "p0"])


@pytest.mark.parametrize("chunks", [1, 3, 64])
def test_backward_float32_against_float64(harness, chunks):
    B, T, C = 2, 300, 33
    td, tf, k, v = inputs(B, T, C, k_scale=3.0, seed=30)
    state = some_state(B, C)
    gy, ga, gb, gp = output_grads(B, T, C, seed=31)
    f32 = [t.float() for t in (td, tf, k, v)]
    grads = harness.backward(*f32, gy.float(), chunks, tuple(s.float() for s in state),
                             (ga.float(), gb.float(), gp.float()), dtype=torch.float32)
    expected = autograd_grads(td, tf, k, v, state, gy, ga, gb, gp)
    for name, g, e in zip(["time_decay", "time_first", "k", "v", "a0", "b0", "p0"], grads,
                          expected, strict=True):
        assert g.dtype == torch.float32
        err = (g.double() - e).abs().max()
        assert err <= 1e-4 * e.abs().max() + 1e-6, f"{name}: {err:.3g}"


@pytest.mark.parametrize("td", [-30.0, 30.0, 100.0])
@pytest.mark.parametrize("chunks", [1, 4, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_decay(harness, td, chunks, dtype):
    # w = -exp(100) overflows float32: it must act as "forget everything", not as nan
    B, T, C = 2, 11, 4
    td_, tf, k, v = inputs(B, T, C, seed=32, td=td)
    state = some_state(B, C)
    gy, ga, gb, gp = output_grads(B, T, C, seed=33)
    y, _ = harness.forward(td_, tf, k, v, chunks, state, dtype=dtype)
    grads = harness.backward(td_, tf, k, v, gy, chunks, state, (ga, gb, gp), dtype=dtype)
    assert all(torch.isfinite(t).all() for t in (y, *grads))
    y_ref = wkv_pytorch(td_, tf, k, v, state=state)
    expected = autograd_grads(td_, tf, k, v, state, gy, ga, gb, gp)
    rel = 1e-9 if dtype == torch.float64 else 1e-4
    assert (y.double() - y_ref).abs().max() <= rel * y_ref.abs().max()
    for g, e in zip(grads, expected, strict=True):
        assert (g.double() - e).abs().max() <= rel * e.abs().max() + 1e-7


@pytest.mark.parametrize("chunks", [1, 2, 7, 64])
def test_backward_extreme_k_float32(harness, chunks):
    B, T, C = 2, 64, 9
    g = torch.Generator().manual_seed(34)
    td = torch.linspace(-8, 4, C, dtype=torch.float64)
    tf = torch.randn(C, generator=g, dtype=torch.float64) * 3
    k = (torch.rand(B, T, C, generator=g, dtype=torch.float64) * 2 - 1) * 1000
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    gy = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    grads = harness.backward(td, tf, k, v, gy, chunks, dtype=torch.float32)
    assert all(torch.isfinite(gr).all() for gr in grads)
    leaves = [t.float().double().requires_grad_() for t in (td, tf, k, v)]
    expected = torch.autograd.grad(wkv_definition(*leaves), leaves, gy)
    for gr, e in zip(grads, expected, strict=True):  # as the op's own extreme-k test
        assert (gr.double() - e).abs().max() <= 1e-2 * e.abs().max()


# ---------------------------------------------------------------------------------------
# Barriers: the result must not depend on the order in which a block's threads run


@pytest.mark.parametrize("chunks", [2, 3, 7, 64])
def test_thread_order_does_not_matter(harness, chunks):
    B, T, C = 2, 29, 19
    td, tf, k, v = inputs(B, T, C, k_scale=2.0, seed=35)
    state = some_state(B, C)
    gy, ga, gb, gp = output_grads(B, T, C, seed=36)
    runs = []
    for order, seed in [(0, 0), (1, 0), (2, 1), (2, 2)]:
        y, final = harness.forward(td, tf, k, v, chunks, state, order=order, seed=seed,
                                   dtype=torch.float32)
        grads = harness.backward(td, tf, k, v, gy, chunks, state, (ga, gb, gp), order=order,
                                 seed=seed, dtype=torch.float32)
        runs.append([y, *final, *grads])
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)
