"""The fused RNN-mode step (cuda/rwkv_step_cpu.cpp via rwkv_lib.rnn_step) against the
PyTorch ops of rwkv_lib.model: values, in-place state, bfloat16 weights, threads, errors."""

from __future__ import annotations

import pytest
import torch

from rwkv_lib import extension, rnn_step
from rwkv_lib.model import RWKV, RWKVConfig
from rwkv_lib.rnn_step import RNNStepper


@pytest.fixture(scope="module", autouse=True)
def ext():
    missing = extension._missing_tools()
    if missing is not None:
        pytest.skip(f"C++ extension cannot be built here: {missing}")
    return extension.load_wkv_extension()


def _pair(dtype=torch.float32, vocab_size=37, **kw):
    """The same random weights twice: one model for the fused step, one for PyTorch ops."""
    torch.manual_seed(0)
    config = dict(vocab_size=vocab_size, n_layer=2, n_embd=20)
    config.update(kw)
    fused = RWKV(RWKVConfig(**config, wkv_backend="auto")).to(dtype).eval()
    with torch.no_grad():
        for p in fused.parameters():  # the init leaves several matrices at zero
            p.add_(torch.randn_like(p) * 0.3)
    reference = RWKV(RWKVConfig(**config, wkv_backend="pytorch")).to(dtype).eval()
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def _tokens(n, B, V, seed=1):
    return torch.randint(0, V, (n, B), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def count_fused(monkeypatch):
    """Counts the calls of the C++ step, so a test knows which path ran."""
    calls = []
    run = rnn_step.run

    def counting(*args, **kwargs):
        calls.append(1)
        return run(*args, **kwargs)

    monkeypatch.setattr(rnn_step, "run", counting)
    return calls


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("kw,B", [({}, 1), ({}, 3), ({"n_layer": 1, "n_embd": 7}, 2),
                                  ({"n_layer": 3, "n_embd": 48, "vocab_size": 5}, 2)])
def test_fused_step_equals_pytorch_ops(dtype, tol, kw, B, count_fused):
    fused, reference = _pair(dtype, **kw)
    V = fused.config.vocab_size
    s1, s2 = fused.init_state(B), reference.init_state(B)
    with torch.no_grad():
        for token in _tokens(8, B, V):
            l1, s1 = fused.step(token, s1)
            l2, s2 = reference.step(token, s2)
            torch.testing.assert_close(l1, l2, rtol=tol, atol=tol)
    torch.testing.assert_close(s1, s2, rtol=tol, atol=tol)
    assert len(count_fused) == 8 and l1.dtype == dtype


def test_step_in_place_equals_step(count_fused):
    model, _ = _pair()
    state = model.init_state(2)
    copy = state.clone()
    with torch.no_grad():
        for token in _tokens(5, 2, 37):
            logits, copy = model.step(token, copy)
            assert torch.equal(model.step_(token, state), logits)
    assert torch.equal(state, copy) and len(count_fused) == 10


def test_pytorch_ops_under_autograd(count_fused):
    # With autograd recording the fused step (which has no backward) must not run.
    model, reference = _pair()
    logits, _ = model.step(torch.tensor([3]), model.init_state(1))
    assert logits.requires_grad and not count_fused
    with torch.no_grad():
        expected, _ = reference.step(torch.tensor([3]), reference.init_state(1))
    torch.testing.assert_close(logits.detach(), expected)


def test_threads_do_not_change_the_result():
    # Each thread owns whole output rows, so the sums are the same whatever the split.
    model, _ = _pair(n_embd=256, n_layer=1)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            state = model.init_state(2)
            with torch.no_grad():
                for token in _tokens(3, 2, 37):
                    logits = model.step_(token, state)
            results.append((logits, state))
    finally:
        torch.set_num_threads(threads)
    for logits, state in results[1:]:
        assert torch.equal(logits, results[0][0]) and torch.equal(state, results[0][1])


def test_bfloat16_weights_are_the_rounded_float32_weights():
    model, reference = _pair(n_embd=32)
    with torch.no_grad():  # the same network with its matrices rounded to bfloat16
        for p in reference.parameters():
            if p.dim() == 2:
                p.copy_(p.bfloat16().float())
    stepper = RNNStepper(model, torch.bfloat16)
    s1, s2, s3 = model.init_state(1), reference.init_state(1), model.init_state(1)
    with torch.no_grad():
        for token in _tokens(6, 1, 37):
            l1 = stepper(token, s1)
            l2 = reference.step_(token, s2)
            l3 = model.step_(token, s3)
    torch.testing.assert_close(l1, l2, rtol=2e-5, atol=2e-5)
    assert (l1 - l3).abs().max() > 1e-4  # and it is not the float32 model
    assert l1.dtype == torch.float32


def test_stepper_without_copies_sees_weight_updates():
    model, _ = _pair()
    stepper = RNNStepper(model)
    token = torch.tensor([4])
    before = stepper(token, model.init_state(1))
    with torch.no_grad():
        model.head.weight.mul_(2)
        expected = model.step_(token, model.init_state(1))
    after = stepper(token, model.init_state(1))
    torch.testing.assert_close(after, expected)
    torch.testing.assert_close(after, 2 * before)


def test_errors():
    model, _ = _pair()
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"token id 37 is outside \[0, 37\)"):
            rnn_step.run(rnn_step.model_weights(model), torch.tensor([37]),
                         model.init_state(1), 1e-5)
        weights = rnn_step.model_weights(model)
        with pytest.raises(RuntimeError, match="blocks.0.att.time_decay has dtype Double"):
            weights[7] = weights[7].double()
            rnn_step.run(weights, torch.tensor([1]), model.init_state(1), 1e-5)
        with pytest.raises(RuntimeError, match="weights of dtype Double with a Float state"):
            rnn_step.run(rnn_step.model_weights(model.double()), torch.tensor([1]),
                         torch.zeros(2, 5, 1, 20), 1e-5)
        with pytest.raises(RuntimeError, match="6 \\+ 18 \\* n_layer"):
            rnn_step.run(rnn_step.model_weights(model)[:-1], torch.tensor([1]),
                         torch.zeros(2, 5, 1, 20, dtype=torch.float64), 1e-5)
    with pytest.raises(ValueError, match="bfloat16"):
        RNNStepper(RWKV(RWKVConfig(vocab_size=5, n_layer=1, n_embd=4,
                                   wkv_backend="pytorch")), torch.bfloat16)
    with pytest.raises(ValueError, match="dtype must be"):
        RNNStepper(model, torch.float16)
