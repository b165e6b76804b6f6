import pytest
import torch

from rwkv_lib.generate import generate, sample_logits
from rwkv_lib.model import RWKV, RWKVConfig


def _model():
    torch.manual_seed(0)
    model = RWKV(RWKVConfig(vocab_size=30, n_layer=2, n_embd=16, wkv_backend="pytorch"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample_logits(logits, temperature=0).tolist() == [1, 0]


def test_top_p_keeps_only_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two only
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    ids = sample_logits(logits, top_p=0.7, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(ids, minlength=4)
    assert counts[2] == 0 and counts[3] == 0
    assert 0.55 < counts[0] / 4000 < 0.70  # renormalized: 0.5 / 0.8 = 0.625
    # the most likely token always stays, even for a tiny top_p
    assert (sample_logits(logits[:10], top_p=1e-9) == 0).all()


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([1.0, 0.0]).expand(20000, 2)
    g = torch.Generator().manual_seed(1)
    hot = sample_logits(logits, temperature=5.0, generator=g).float().mean()
    cold = sample_logits(logits, temperature=0.2, generator=g).float().mean()
    assert cold < 0.02 < 0.4 < hot  # share of the less likely token


def test_sampling_argument_errors():
    with pytest.raises(ValueError, match="temperature"):
        sample_logits(torch.zeros(3), temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        sample_logits(torch.zeros(3), top_p=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
     ({"top_p": float("nan")}, "top_p")],
    ids=["temperature-nan", "temperature-inf", "top_p-nan"],
)
def test_non_finite_sampling_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_logits(torch.zeros(2, 3), **kwargs)


def test_generation_is_reproducible_and_seeded():
    model = _model()
    a = generate(model, [1, 2, 3], 20, temperature=1.0, top_p=0.9, seed=5)
    b = generate(model, [1, 2, 3], 20, temperature=1.0, top_p=0.9, seed=5)
    c = generate(model, [1, 2, 3], 20, temperature=1.0, top_p=0.9, seed=6)
    assert a == b and a != c and len(a) == 20 and all(0 <= t < 30 for t in a)


def test_greedy_generation_matches_gpt_mode_argmax():
    # Greedy RNN-mode decoding must pick, at each step, the argmax of GPT mode's logits
    # over the whole sequence so far.
    model = _model().eval()
    prompt = [4, 7, 1]
    out = generate(model, prompt, 8, temperature=0)
    seq = prompt + out
    with torch.no_grad():
        logits = model(torch.tensor([seq]))[0]
    assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == out


def test_empty_prompt_is_an_error():
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(_model(), [], 3)


@pytest.mark.parametrize("backend", ["pytorch", "auto"])
@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.9, 0.8)])
def test_continuing_a_text_equals_one_long_call(backend, temperature, top_p):
    model = _model()
    model.config.wkv_backend = backend
    for block in model.blocks:
        block.att.backend = backend
    whole = generate(model, [1, 2, 3], 20, temperature, top_p, seed=4)
    first, state = generate(model, [1, 2, 3], 10, temperature, top_p, seed=4,
                            return_state=True)
    second, state = generate(model, [], 10, temperature, top_p, state=state, return_state=True)
    assert first + second == whole
    # the state is the one after all 23 tokens, whichever way they came
    with torch.no_grad():
        _, expected = model(torch.tensor([[1, 2, 3] + whole]), return_state=True)
    torch.testing.assert_close(state.rnn, expected, rtol=1e-4, atol=1e-4)


def test_continuing_with_more_prompt():
    # continuing with new prompt ids is the same as having them at the end of the text
    model = _model()
    first, state = generate(model, [1, 2], 5, temperature=0, return_state=True)
    more = generate(model, [7, 8], 6, temperature=0, state=state)
    assert more == generate(model, [1, 2] + first + [7, 8], 6, temperature=0)


def test_continuing_does_not_change_the_given_state():
    model = _model()
    _, state = generate(model, [1, 2], 3, return_state=True)
    rnn = state.rnn.clone()
    a = generate(model, [], 5, state=state)
    assert torch.equal(state.rnn, rnn) and a == generate(model, [], 5, state=state)
    assert generate(model, [], 5, state=state, seed=9) == generate(model, [], 5, state=state,
                                                                   seed=9)


def test_bfloat16_weights_generate():
    torch.manual_seed(0)
    model = RWKV(RWKVConfig(vocab_size=30, n_layer=2, n_embd=16))
    ids = generate(model, [1, 2, 3], 12, temperature=0, weights_dtype=torch.bfloat16)
    assert len(ids) == 12 and all(0 <= t < 30 for t in ids)
