"""The CUDA kernels of the WKV operator, sequential and chunked (`pytest -m cuda`; every
test here is skipped without a GPU).

Each test runs once per kernel choice: RWKV_WKV_CUDA=sequential (wkv_cuda.cu) and the
chunked kernels (wkv_cuda_chunked.cu) with the by-shape number of chunks and with 1, 3
and 64 chunks per sequence (RWKV_WKV_CUDA_CHUNKS). References are the float64 definition
or recurrence; inputs are float32 unless a test says otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_extension import GRAD_NAMES, assert_close_rel, make_inputs, value_and_grads

from rwkv_lib.extension import load_wkv_extension
from rwkv_lib.wkv import P_INIT, wkv, wkv_definition, wkv_pytorch
from rwkv_lib.wkv_op import wkv_extension

pytestmark = pytest.mark.cuda
DEVICE = "cuda"
KERNELS = ["sequential", "chunked", "chunked:1", "chunked:3", "chunked:64"]


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    """Selects the kernel for the test through the environment, as a user would."""
    name, _, chunks = request.param.partition(":")
    monkeypatch.setenv("RWKV_WKV_CUDA", name)
    if chunks:
        monkeypatch.setenv("RWKV_WKV_CUDA_CHUNKS", chunks)
    else:
        monkeypatch.delenv("RWKV_WKV_CUDA_CHUNKS", raising=False)
    module = load_wkv_extension()
    if not module.has_cuda:
        from rwkv_lib import extension

        pytest.fail(f"a GPU is present but the extension has no CUDA kernels: "
                    f"{extension._cuda_build_error}")
    return request.param


def poison_allocator(*shapes):
    """Fill freed memory of these sizes with NaN: the op's outputs come from at::empty,
    which reuses freed blocks, so an element a kernel forgets to write shows up as NaN
    instead of a stale value from an earlier, correct call."""
    junk = [torch.full(s, float("nan"), device=DEVICE) for s in shapes for _ in range(3)]
    del junk


def random(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------
# The choice of kernel


def test_kernel_choice_follows_the_environment(monkeypatch):
    module = load_wkv_extension()
    assert module.has_cuda
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    monkeypatch.delenv("RWKV_WKV_CUDA_CHUNKS", raising=False)
    monkeypatch.delenv("RWKV_WKV_CUDA", raising=False)
    assert module.cuda_chunks(1, 1024, 512) == 0, "sequential is the default"
    monkeypatch.setenv("RWKV_WKV_CUDA", "sequential")
    assert module.cuda_chunks(1, 1024, 512) == 0
    monkeypatch.setenv("RWKV_WKV_CUDA", "chunked")
    for B, T, C in [(1, 1024, 512), (12, 1024, 512), (32, 1024, 1024), (256, 1024, 1024)]:
        rule = max(1, min(64, math.ceil(T / 4), sm * 1024 // (B * C)))  # wkv_auto_chunks
        assert module.cuda_chunks(B, T, C) == rule, (B, T, C)
    monkeypatch.setenv("RWKV_WKV_CUDA", "auto")
    assert module.cuda_chunks(1, 1024, 512) >= 2, "batch 1 needs the chunked kernels"
    assert module.cuda_chunks(256, 1024, 1024) == 0, "B*C fills the GPU: sequential"
    monkeypatch.setenv("RWKV_WKV_CUDA", "chunked")
    monkeypatch.setenv("RWKV_WKV_CUDA_CHUNKS", "5")
    assert module.cuda_chunks(1, 1024, 512) == 5


@pytest.mark.parametrize(
    "kernel_env, chunks_env, message",
    [("fast", None, r"RWKV_WKV_CUDA=fast is not a kernel choice; set it to sequential"),
     ("chunked", "0", r"RWKV_WKV_CUDA_CHUNKS=0 is not a chunk count"),
     ("chunked", "65", r"RWKV_WKV_CUDA_CHUNKS=65 is not a chunk count"),
     ("chunked", "two", r"RWKV_WKV_CUDA_CHUNKS=two is not a chunk count"),
     ("sequential", "3", r"RWKV_WKV_CUDA_CHUNKS=3 applies to the chunked kernels only")],
)
def test_bad_kernel_settings_give_one_clear_error(monkeypatch, kernel_env, chunks_env, message):
    load_wkv_extension()
    monkeypatch.setenv("RWKV_WKV_CUDA", kernel_env)
    if chunks_env is None:
        monkeypatch.delenv("RWKV_WKV_CUDA_CHUNKS", raising=False)
    else:
        monkeypatch.setenv("RWKV_WKV_CUDA_CHUNKS", chunks_env)
    td, tf, k, v = make_inputs(1, 8, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match="wkv_forward: " + message):
        wkv_extension(td, tf, k, v)


# ---------------------------------------------------------------------------------------
# Values and gradients


def test_gradcheck_float64(kernel):
    inputs = [t.requires_grad_() for t in make_inputs(2, 6, 3, torch.float64, DEVICE)]
    assert torch.autograd.gradcheck(wkv_extension, inputs)

    def two_calls(td, tf, k, v):  # the gradient must cross the state between them
        y1, state = wkv_extension(td, tf, k[:, :4], v[:, :4], return_state=True)
        return torch.cat([y1, wkv_extension(td, tf, k[:, 4:], v[:, 4:], state=state)], 1)

    assert torch.autograd.gradcheck(two_calls, inputs)


# B*C not a multiple of 32 (33, 515, 7 channels), T = 1, T longer than a block of chunks
SHAPES = [(1, 1, 1), (3, 17, 33), (2, 64, 515), (1, 300, 7), (12, 128, 512)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_match_the_float64_definition(kernel, shape):
    inputs = make_inputs(*shape, k_scale=3.0, device=DEVICE)
    grad_y = random(*shape, seed=1).to(DEVICE)
    poison_allocator(shape, shape, shape)
    y, grads = value_and_grads(wkv_extension, inputs, grad_y)
    y_ref, grads_ref = value_and_grads(wkv_definition, [t.double() for t in inputs],
                                       grad_y.double())
    assert y.dtype == torch.float32 and y.device.type == "cuda"
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    assert_close_rel(y, y_ref, 1e-5, "y")
    for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref, strict=True):
        assert_close_rel(g, g_ref, 1e-4, name)


def test_extreme_k(kernel):
    B, T, C = 2, 64, 9
    g = torch.Generator().manual_seed(1)
    td = torch.linspace(-8, 4, C)
    tf = torch.randn(C, generator=g) * 3
    k = (torch.rand(B, T, C, generator=g) * 2 - 1) * 1000  # uniform in [-1000, 1000]
    v = torch.randn(B, T, C, generator=g)
    grad_y = torch.randn(B, T, C, generator=g)
    inputs = [t.to(DEVICE) for t in (td, tf, k, v)]
    y, grads = value_and_grads(wkv_extension, inputs, grad_y.to(DEVICE))
    assert torch.isfinite(y).all() and all(torch.isfinite(gr).all() for gr in grads)
    y_ref, grads_ref = value_and_grads(wkv_definition, [t.double() for t in inputs],
                                       grad_y.to(DEVICE).double())
    assert_close_rel(y, y_ref, 1e-3, "y")  # float32 rounding of exponents near 1000
    for name, gr, gr_ref in zip(GRAD_NAMES, grads, grads_ref, strict=True):
        assert_close_rel(gr, gr_ref, 1e-2, name)


@pytest.mark.parametrize("time_decay", [-30.0, 30.0, 100.0])
def test_extreme_decay(kernel, time_decay):
    # w = -exp(100) overflows float32: it must act as "forget everything", not as nan
    _, tf, k, v = make_inputs(2, 12, 5, device=DEVICE)
    td = torch.full((5,), time_decay, device=DEVICE)
    grad_y = random(2, 12, 5, seed=2).to(DEVICE)
    y, grads = value_and_grads(wkv_extension, [td, tf, k, v], grad_y)
    y_ref, grads_ref = value_and_grads(wkv_definition, [t.double() for t in (td, tf, k, v)],
                                       grad_y.double())
    assert all(torch.isfinite(t).all() for t in (y, *grads))
    assert_close_rel(y, y_ref, 1e-5, "y")
    for name, gr, gr_ref in zip(GRAD_NAMES[1:], grads[1:], grads_ref[1:], strict=True):
        assert_close_rel(gr, gr_ref, 1e-4, name)


@pytest.mark.parametrize("shape", [(1, 8192, 37), (2, 8192, 515)], ids=lambda s: "x".join(map(str, s)))
def test_long_sequence_beyond_rwkv_lm_t_max(kernel, shape):
    """T = 8192, eight times RWKV-LM's compile-time T_MAX; the reference is the C++ CPU
    operator in float64 (itself checked against the definition)."""
    inputs = make_inputs(*shape, k_scale=3.0, device=DEVICE, seed=4)
    grad_y = random(*shape, seed=5).to(DEVICE)
    poison_allocator(shape, shape, shape)
    y, grads = value_and_grads(wkv_extension, inputs, grad_y)
    y_ref, grads_ref = value_and_grads(wkv_extension, [t.double().cpu() for t in inputs],
                                       grad_y.double().cpu())
    # float32 over 8192 steps: about 1e-5 relative for the PyTorch recurrence as well
    assert_close_rel(y.cpu(), y_ref, 1e-4, "y")
    for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref, strict=True):
        assert_close_rel(g.cpu(), g_ref, 1e-3, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(kernel, dtype):
    inputs = make_inputs(2, 30, 17, dtype=dtype, device=DEVICE)
    grad_y = random(2, 30, 17, seed=6).to(DEVICE, dtype)
    y, grads = value_and_grads(wkv_extension, inputs, grad_y)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    y32, grads32 = value_and_grads(wkv_extension, [t.float() for t in inputs], grad_y.float())
    torch.testing.assert_close(y, y32.to(dtype), rtol=0, atol=0)
    for g, g32 in zip(grads, grads32, strict=True):
        torch.testing.assert_close(g, g32.to(dtype), rtol=0, atol=0)
    _, state = wkv_extension(*inputs, return_state=True)
    assert all(s.dtype == torch.float32 for s in state)


# ---------------------------------------------------------------------------------------
# State


def test_chunked_calls_equal_one_call(kernel):
    B, T, C = 2, 50, 21
    inputs = make_inputs(B, T, C, k_scale=3.0, device=DEVICE, seed=7)
    grad_y = random(B, T, C, seed=8).to(DEVICE)

    def in_pieces(td, tf, k, v):
        ys, state = [], None
        for lo, hi in [(0, 1), (1, 17), (17, 50)]:
            y, state = wkv_extension(td, tf, k[:, lo:hi], v[:, lo:hi], state=state,
                                     return_state=True)
            ys.append(y)
        return torch.cat(ys, 1)

    y, grads = value_and_grads(in_pieces, inputs, grad_y)
    y_ref, grads_ref = value_and_grads(wkv_extension, inputs, grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref, strict=True):
        assert_close_rel(g, g_ref, 1e-5, name)
    _, s_ref = wkv_extension(*inputs, return_state=True)
    state = None
    for lo, hi in [(0, 20), (20, 50)]:
        _, state = wkv_extension(*inputs[:2], inputs[2][:, lo:hi], inputs[3][:, lo:hi],
                                 state=state, return_state=True)
    for s, s_r in zip(state, s_ref, strict=True):
        torch.testing.assert_close(s, s_r, rtol=1e-5, atol=1e-6)


def test_state_in_and_out_matches_the_recurrence(kernel):
    td, tf, k, v = make_inputs(3, 40, 19, device=DEVICE, seed=9)
    g = torch.Generator().manual_seed(10)
    state = (torch.randn(3, 19, generator=g).to(DEVICE), torch.rand(3, 19, generator=g).add(0.5)
             .to(DEVICE), (torch.randn(3, 19, generator=g) * 2).to(DEVICE))
    y, final = wkv_extension(td, tf, k, v, state=state, return_state=True)
    y_ref, final_ref = wkv_pytorch(*(t.double() for t in (td, tf, k, v)),
                                   state=tuple(s.double() for s in state), return_state=True)
    assert_close_rel(y, y_ref, 1e-5, "y")
    for name, s, s_ref in zip("abp", final, final_ref, strict=True):
        assert s.dtype == torch.float32 and s.shape == (3, 19)
        assert_close_rel(s, s_ref, 1e-5, name)


def test_gradient_through_the_final_state_matches_the_pytorch_backend(kernel):
    """The final (a, b, p) enter a following call, so the loss uses them through A = a e^p
    and B = b e^p: every gradient, the initial state's included, must equal autograd's
    through the PyTorch recurrence (float64)."""
    B, T, C = 2, 23, 6
    inputs = make_inputs(B, T, C, dtype=torch.float64, device=DEVICE, seed=11)
    g = torch.Generator().manual_seed(12)
    state0 = [torch.randn(B, C, generator=g, dtype=torch.float64).to(DEVICE),
              torch.rand(B, C, generator=g, dtype=torch.float64).add(0.5).to(DEVICE),
              (torch.randn(B, C, generator=g, dtype=torch.float64) * 2).to(DEVICE)]
    g1 = torch.randn(B, 9, C, generator=g, dtype=torch.float64).to(DEVICE)
    g2 = torch.randn(B, T - 9, C, generator=g, dtype=torch.float64).to(DEVICE)

    def grads(backend):
        leaves = [t.clone().requires_grad_() for t in (*inputs, *state0)]
        td, tf, k, v, a0, b0, p0 = leaves
        y1, state = wkv(td, tf, k[:, :9], v[:, :9], backend=backend, state=(a0, b0, p0),
                        return_state=True)
        y2 = wkv(td, tf, k[:, 9:], v[:, 9:], backend="pytorch", state=state)
        return torch.autograd.grad((g1 * y1).sum() + (g2 * y2).sum(), leaves)

    for name, got, ref in zip([*GRAD_NAMES, "a0", "b0", "p0"], grads("cuda"), grads("pytorch"),
                              strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10, msg=name)


def test_gradient_of_a_loss_on_the_final_state_itself(kernel):
    """A loss on a, b and p separately needs dL/dp_T in the backward pass (grad_state_p)."""
    arguments = [a.name for a in torch.ops.rwkv.wkv_backward.default._schema.arguments]
    if "grad_state_p" not in arguments:
        pytest.skip("this build's op has no grad_state_p: it treats the final state as used "
                    "through A and B only (see the previous test)")
    B, T, C = 2, 15, 6
    inputs = make_inputs(B, T, C, dtype=torch.float64, device=DEVICE, seed=13)
    g = torch.Generator().manual_seed(14)
    weights = [torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE)
               for s in ((B, T, C), (B, C), (B, C), (B, C))]

    def grads(backend):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y, (a, b, p) = wkv(*leaves, backend=backend, return_state=True)
        loss = sum((w * x).sum() for w, x in zip(weights, (y, a, b, p), strict=True))
        return torch.autograd.grad(loss, leaves)

    for name, got, ref in zip(GRAD_NAMES, grads("cuda"), grads("pytorch"), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10, msg=name)


# ---------------------------------------------------------------------------------------
# Layouts, the compiler, the model


def test_non_contiguous_inputs(kernel):
    td, tf, k, v = make_inputs(3, 9, 10, device=DEVICE)
    grad_y = random(3, 9, 10, seed=15).to(DEVICE)
    td_nc = torch.stack([td, td], 1)[:, 0]
    tf_nc = torch.stack([tf, tf], 1)[:, 1]
    k_nc = k.transpose(1, 2).contiguous().transpose(1, 2)
    v_nc = torch.stack([v, v], 3)[..., 0]
    assert not any(t.is_contiguous() for t in (td_nc, tf_nc, k_nc, v_nc))
    y, grads = value_and_grads(wkv_extension, [td_nc, tf_nc, k_nc, v_nc], grad_y)
    y_ref, grads_ref = value_and_grads(wkv_extension, [td, tf, k, v], grad_y)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


def test_torch_compile_traces_the_op(kernel):
    inputs = make_inputs(2, 9, 5, device=DEVICE, seed=11)
    state = tuple(s.detach() for s in wkv_extension(*inputs, return_state=True)[1])

    def fn(td, tf, k, v):
        y, (a, b, p) = wkv_extension(td, tf, k, v, state=state, return_state=True)
        return y * 2 + a.sum(0, keepdim=True).unsqueeze(1) * 0

    grad_y = random(2, 9, 5, seed=3).to(DEVICE)
    y_eager, grads_eager = value_and_grads(fn, inputs, grad_y)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    y_comp, grads_comp = value_and_grads(compiled, inputs, grad_y)
    torch.testing.assert_close(y_comp, y_eager)
    for name, g_c, g_e in zip(GRAD_NAMES, grads_comp, grads_eager, strict=True):
        torch.testing.assert_close(g_c, g_e, msg=name)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_model_gpt_mode_equals_rnn_mode(kernel, dtype, tol):
    from rwkv_lib.model import RWKV, RWKVConfig

    torch.manual_seed(0)
    model = RWKV(RWKVConfig(vocab_size=40, n_layer=2, n_embd=36, ctx_len=16,
                            wkv_backend="cuda")).to(DEVICE, dtype)
    with torch.no_grad():  # the init zeroes several matrices: perturb so every path matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    idx = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        gpt = model(idx)
        state = model.init_state(3)
        assert state.device.type == "cuda" and (state[:, 3] == P_INIT).all()
        rnn = []
        for t in range(idx.shape[1]):
            logits, state = model.step(idx[:, t], state)
            rnn.append(logits)
    torch.testing.assert_close(torch.stack(rnn, 1), gpt, rtol=tol, atol=tol)
