import math

import numpy as np
import pytest
import torch

from rwkv_lib.model import (
    RWKV,
    STATE_P,
    RWKVConfig,
    TokenShift,
    count_parameters,
    state_dict_names,
)
from rwkv_lib.wkv import P_INIT


def _model(dtype=torch.float64, backend="pytorch", perturb=0.2, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = RWKVConfig(**{"vocab_size": 40, "n_layer": 2, "n_embd": 12, "ctx_len": 16,
                        "wkv_backend": backend, **kw})
    model = RWKV(cfg).to(dtype)
    # RWKV-4's init zeroes several matrices; perturb everything so every path matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * perturb)
    return model.eval()


def test_token_shift_against_hand_built_shift():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    expected = torch.zeros_like(x)
    for t in range(1, 4):
        expected[:, t] = x[:, t - 1]
    assert torch.equal(TokenShift()(x), expected)
    prev = torch.full((2, 3), -1.0)
    expected[:, 0] = prev
    assert torch.equal(TokenShift()(x, prev), expected)


def test_state_dict_names_match_spec():
    model = RWKV(RWKVConfig(vocab_size=10, n_layer=2, n_embd=8))
    spec = ["emb.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias"]
    for l in range(2):
        b = f"blocks.{l}."
        spec += [b + n for n in (
            "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
            "att.time_decay", "att.time_first", "att.time_mix_k", "att.time_mix_v",
            "att.time_mix_r", "att.key.weight", "att.value.weight", "att.receptance.weight",
            "att.output.weight", "ffn.time_mix_k", "ffn.time_mix_r", "ffn.key.weight",
            "ffn.receptance.weight", "ffn.value.weight")]
    spec += ["ln_out.weight", "ln_out.bias", "head.weight"]
    sd = model.state_dict()
    assert sorted(sd) == sorted(spec)
    assert list(sd) == state_dict_names(model.config)
    C = 8
    assert sd["blocks.1.att.time_decay"].shape == (C,)
    assert sd["blocks.1.att.time_mix_v"].shape == (1, 1, C)
    assert sd["blocks.1.ffn.key.weight"].shape == (4 * C, C)
    assert sd["blocks.1.ffn.value.weight"].shape == (C, 4 * C)


@pytest.mark.parametrize("L", [1, 3])
def test_init_matches_spec_formulas(L):
    V, C = 300, 8  # V > C exercises the head gain formula
    torch.manual_seed(0)
    model = RWKV(RWKVConfig(vocab_size=V, n_layer=L, n_embd=C))
    for l, block in enumerate(model.blocks):
        r0 = l / (L - 1) if L > 1 else 0.0
        r1 = 1 - l / L
        for c in range(C):
            d = c / C
            att, ffn = block.att, block.ffn
            assert att.time_decay[c].item() == pytest.approx(-5 + 8 * (c / (C - 1)) ** (0.7 + 1.3 * r0))
            assert att.time_first[c].item() == pytest.approx(math.log(0.3) + 0.5 * ((c + 1) % 3 - 1))
            assert att.time_mix_k[0, 0, c].item() == pytest.approx(d ** r1)
            assert att.time_mix_v[0, 0, c].item() == pytest.approx(d ** r1 + 0.3 * r0)
            assert att.time_mix_r[0, 0, c].item() == pytest.approx(d ** (0.5 * r1))
            assert ffn.time_mix_k[0, 0, c].item() == pytest.approx(d ** r1)
            assert ffn.time_mix_r[0, 0, c].item() == pytest.approx(d ** r1)
        for lin in (block.att.key, block.att.receptance, block.att.output,
                    block.ffn.value, block.ffn.receptance):
            assert lin.weight.abs().sum() == 0
        # orthogonal with gain g: W W^T = g^2 I (rows) when out <= in, W^T W = g^2 I otherwise
        w = block.att.value.weight.double()
        torch.testing.assert_close(w @ w.T, torch.eye(C, dtype=torch.float64), atol=1e-5, rtol=0)
        w = block.ffn.key.weight.double()  # 4C x C, gain sqrt(4) = 2
        torch.testing.assert_close(w.T @ w, 4 * torch.eye(C, dtype=torch.float64), atol=1e-4, rtol=0)
        assert torch.equal(block.ln1.weight, torch.ones(C)) and block.ln1.bias.abs().sum() == 0
    w = model.head.weight.double()  # V x C, V > C: gain 0.5 * sqrt(V / C)
    gain = 0.5 * math.sqrt(V / C)
    torch.testing.assert_close(w.T @ w, gain**2 * torch.eye(C, dtype=torch.float64), atol=1e-3, rtol=1e-5)
    assert model.emb.weight.abs().max() <= 1e-4


def test_head_gain_when_vocab_not_larger_than_width():
    torch.manual_seed(0)
    model = RWKV(RWKVConfig(vocab_size=6, n_layer=1, n_embd=8))
    w = model.head.weight.double()
    torch.testing.assert_close(w @ w.T, 0.25 * torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)


def test_parameter_count_formula_and_seed_config():
    for cfg in (RWKVConfig(vocab_size=40, n_layer=1, n_embd=12), RWKVConfig(vocab_size=7, n_layer=3, n_embd=5)):
        assert count_parameters(cfg) == sum(p.numel() for p in RWKV(cfg).parameters())
    seed = RWKVConfig(vocab_size=256, n_layer=12, n_embd=512, ctx_len=1024)
    C, V = 512, 256  # per layer 13 C^2 matrix weights + 11 C vectors; emb + head; ln0 + ln_out
    assert count_parameters(seed) == 12 * (13 * C * C + 11 * C) + 2 * V * C + 4 * C
    assert count_parameters(seed) == sum(p.numel() for p in RWKV(seed).parameters())


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kw,T", [({}, 9), ({"n_layer": 1}, 5), ({}, 1), ({"n_layer": 3, "n_embd": 7}, 6)])
@pytest.mark.parametrize("backend", ["pytorch", "auto"])
def test_rnn_mode_equals_gpt_mode(dtype, tol, kw, T, backend):
    model = _model(dtype, backend=backend, **kw)
    idx = torch.randint(0, 40, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        gpt = model(idx)
        state = model.init_state(2)
        rnn = []
        for t in range(T):
            logits, state = model.step(idx[:, t], state)
            rnn.append(logits)
    torch.testing.assert_close(torch.stack(rnn, 1), gpt, rtol=tol, atol=tol)


def test_gpt_mode_with_state_continues_a_sequence():
    model = _model()
    idx = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, full_state = model(idx, return_state=True)
        a, s = model(idx[:, :5], return_state=True)
        b, s = model(idx[:, 5:], state=s, return_state=True)
        # the state after the prompt hands over to RNN mode
        logits, _ = model.step(idx[:, 0], s)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, full_state, rtol=1e-12, atol=1e-12)
    assert logits.shape == (3, 40)


@pytest.mark.parametrize("backend", ["pytorch", "cpp"])
def test_without_autograd_the_same_numbers(backend):
    """Without autograd the model overwrites its own fresh intermediate tensors instead of
    allocating new ones: the outputs and states stay bit for bit those of the
    autograd path, and nothing the caller passed in changes. (RNN mode without autograd
    has its own kernels, checked against GPT mode elsewhere; products of MIN_ROWS rows or
    more may go to oneDNN without autograd, equal to rounding: tests/test_cpu_matmul.py.)"""
    model = _model(torch.float32, backend=backend)
    idx = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(5))
    given = model.init_state(3)
    given[:, :4] = torch.randn(given[:, :4].shape, generator=torch.Generator().manual_seed(6))
    kept = given.clone()
    with torch.enable_grad():
        logits, state = model(idx, state=given, return_state=True)
    with torch.no_grad():
        fast, fast_state = model(idx, state=given, return_state=True)
    assert torch.equal(fast, logits.detach()) and torch.equal(fast_state, state.detach())
    assert torch.equal(given, kept)  # the state passed in is left as it was
    with torch.no_grad():
        x = model.emb(idx)
        before = x.clone()
        block_out = model.blocks[0](x)
    assert torch.equal(x, before)
    with torch.enable_grad():
        assert torch.equal(block_out, model.blocks[0](before).detach())


def test_init_state_layout():
    model = _model(torch.float32)
    s = model.init_state(4)
    assert s.shape == (2, 5, 4, 12) and s.dtype == torch.float32
    assert (s[:, STATE_P] == P_INIT).all()
    assert s[:, :STATE_P].abs().sum() == 0


def test_step_does_not_modify_the_given_state():
    model = _model()
    s = model.init_state(1)
    before = s.clone()
    model.step(torch.tensor([1]), s)
    assert torch.equal(s, before)


def test_gradients_reach_every_parameter():
    model = _model(torch.float32).train()
    idx = torch.randint(0, 40, (2, 8))
    model(idx).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_clear_errors_for_bad_input():
    model = _model(torch.float32)
    with pytest.raises(ValueError, match=r"integer token ids of shape \(B, T\)"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        model(torch.tensor([[1, 40]]))
    with pytest.raises(ValueError, match="state must have shape"):
        model.step(torch.tensor([1, 2]), model.init_state(1))
    with pytest.raises(ValueError, match="n_layer"):
        RWKV(RWKVConfig(n_layer=0))


def test_runs_under_torch_compile():
    model = _model(torch.float32, backend="pytorch", n_layer=1)
    idx = torch.randint(0, 40, (1, 6))
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), model(idx))


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda s: [s], TypeError, r"state must be a tensor .* got list"),
        (lambda s: s.double(), TypeError, r"state must be torch\.float32 .* got torch\.float64"),
        (lambda s: s.half(), TypeError, r"state must be torch\.float32 .* got torch\.float16"),
        (lambda s: s.long(), TypeError, r"state must be torch\.float32 .* got torch\.int64"),
        # meta stands in for another device (a CUDA state for a CPU model)
        (lambda s: s.to("meta"), ValueError, "state is on meta but the model is on cpu"),
    ],
    ids=["list", "float64", "float16", "int64", "device"],
)
def test_clear_errors_for_bad_states(make, error, message):
    model = _model(torch.float32)
    state = make(model.init_state(2))
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(error, match=message):
        model.step(idx[:, 0], state)
    with pytest.raises(error, match=message):
        model(idx, state=state)


def test_state_dtype_follows_the_model():
    # a float64 model computes in float64, so its state is float64; float32 is refused
    model = _model(torch.float64)
    idx = torch.tensor([[1, 2]])
    model(idx, state=model.init_state(1))
    with pytest.raises(TypeError, match=r"state must be torch\.float64"):
        model(idx, state=model.init_state(1).float())


@pytest.mark.parametrize(
    "idx, error, message",
    [
        (torch.zeros(2, 0, dtype=torch.long), ValueError, r"empty \(T = 0\)"),
        (torch.zeros(0, 3, dtype=torch.long), ValueError, r"batch is empty \(B = 0\)"),
        ([[1, 2, 3]], TypeError, r"token ids must be a torch\.Tensor .* got list"),
        (np.array([[1, 2, 3]]), TypeError, r"token ids must be a torch\.Tensor .* got ndarray"),
        (torch.tensor([[1, 2]], device="meta"), ValueError, "token ids are on meta but the model"),
    ],
    ids=["T=0", "B=0", "list", "numpy", "device"],
)
def test_clear_errors_for_bad_ids(idx, error, message):
    model = _model(torch.float32)
    with pytest.raises(error, match=message):
        model(idx)


def test_clear_errors_for_bad_tokens_in_rnn_mode():
    model = _model(torch.float32)
    with pytest.raises(TypeError, match=r"token ids must be a torch\.Tensor .* got int"):
        model.step(3, model.init_state(1))
    with pytest.raises(ValueError, match=r"batch is empty \(B = 0\)"):
        model.step(torch.zeros(0, dtype=torch.long), model.init_state(0))
