"""Text generation in RNN mode: temperature and top-p sampling (notebook 09_generation).

The prompt goes through GPT mode once (all its tokens in parallel, returning the state),
then each new token costs one `model.step`: constant time and memory per token,
however long the text already is.

    python -m rwkv_lib.generate runs/ci/ckpt.pt --prompt "<page>" --tokens 200
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .data import ByteVocab
from .model import RWKV
from .rnn_step import RNNStepper


def sample_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token id per row of `logits` (..., V).

    temperature 0 is greedy decoding (argmax). Otherwise probabilities are
    softmax(logits / temperature), cut to the smallest set of most likely tokens whose
    total probability reaches top_p (the nucleus), renormalized, and sampled.
    """
    if not 0 <= temperature < float("inf"):  # false for nan too, which samples garbage
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 0 < top_p <= 1:  # also false for nan
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the tokens before it already reach top_p; the first always stays
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    flat = probs.reshape(-1, probs.shape[-1])
    ids = torch.multinomial(flat, 1, generator=generator)
    return ids.reshape(probs.shape[:-1])


@dataclass
class GenerationState:
    """Where a generated text stands, to continue it later (`generate(..., state=...)`).

    rnn: the RNN state (n_layer, 5, 1, C) after every token so far, the last one included;
    logits: (1, V), the scores for the token after them; rng: the sampling generator's
    state, so that a continued text draws the same random numbers as one long call.
    """

    rnn: torch.Tensor
    logits: torch.Tensor
    rng: torch.Tensor


@torch.no_grad()
def generate(
    model: RWKV, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int,
    temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
    state: GenerationState | None = None, return_state: bool = False,
    weights_dtype: torch.dtype | None = None,
) -> list[int] | tuple[list[int], GenerationState]:
    """Continue `prompt` (token ids) by `max_new_tokens` ids; seeded and reproducible.

    The prompt runs in GPT mode (all its tokens at once), each new token is one RNN step.
    `return_state=True` also returns a GenerationState; passing it back as `state`
    continues that text (`prompt` may then be empty, or hold ids to append first), and
    generating 10 then 10 more gives the same ids as generating 20. `seed` None means 0
    for a new text, and the random stream of `state` when continuing one.
    `weights_dtype=torch.bfloat16` runs the RNN steps with bfloat16 copies of the weight
    matrices (CPU only; see rwkv_lib.rnn_step.RNNStepper).
    """
    device = model.head.weight.device
    prompt = torch.as_tensor(prompt, dtype=torch.long, device=device).reshape(1, -1)
    if prompt.shape[1] == 0 and state is None:
        raise ValueError("generate: the prompt is empty; give at least one token")
    generator = torch.Generator(device=device)
    if seed is not None or state is None:
        generator.manual_seed(0 if seed is None else seed)
    else:
        generator.set_state(state.rng)
    was_training = model.training
    model.eval()
    try:
        if state is None:
            logits, rnn = model(prompt, return_state=True)
            logits = logits[:, -1]
        else:
            rnn, logits = state.rnn.clone(), state.logits
            if prompt.shape[1]:
                logits, rnn = model(prompt, state=rnn, return_state=True)
                logits = logits[:, -1]
        step = RNNStepper(model, weights_dtype)  # weights gathered once for the whole loop
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = sample_logits(logits, temperature, top_p, generator)
            out.append(int(token))
            # the step after the last token too: its state is what a continuation needs
            logits = step(token, rnn)
    finally:
        model.train(was_training)
    if return_state:
        return out, GenerationState(rnn, logits, generator.get_state())
    return out


def generate_text(
    model: RWKV, vocab: ByteVocab, prompt: str | bytes, max_new_tokens: int,
    temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
    state: GenerationState | None = None, return_state: bool = False,
) -> str | tuple[str, GenerationState]:
    """Encode a text prompt, continue it, and return the new text (bytes decoded as
    UTF-8; a multi-byte character cut by the end shows as U+FFFD). `state` and
    `return_state` continue a text as in `generate`."""
    data = prompt.encode("utf-8") if isinstance(prompt, str) else prompt
    result = generate(model, vocab.encode(data), max_new_tokens, temperature, top_p, seed,
                      state=state, return_state=return_state)
    if return_state:
        ids, new_state = result
        return vocab.decode_text(ids), new_state
    return vocab.decode_text(result)


def main(argv: Sequence[str] | None = None) -> int:
    from . import cli
    from .checkpoint import load_model  # the checkpoint format lives with training
    from .wkv import BACKENDS

    parser = cli.ArgumentParser(prog="python -m rwkv_lib.generate",
                                description="Generate text from a trained checkpoint.")
    parser.add_argument("checkpoint", help="a checkpoint written by python -m rwkv_lib.train")
    parser.add_argument("--prompt", default="<page>\n  <title>", help="text to continue")
    parser.add_argument("--tokens", type=cli.non_negative_int, default=300,
                        help="number of bytes to generate")
    parser.add_argument("--temperature", type=cli.non_negative_float, default=1.0,
                        help="0 means greedy")
    parser.add_argument("--top-p", type=cli.probability, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=cli.device_name, default="cpu", help=cli.DEVICES)
    parser.add_argument("--wkv-backend", choices=BACKENDS, default="auto",
                        help="how to compute WKV here, whatever the checkpoint was trained "
                             "with (see rwkv_lib.wkv)")
    args = parser.parse_args(argv)
    if not args.prompt:
        raise ValueError("the prompt is empty; give at least one character with --prompt")
    device = cli.resolve_device(args.device)
    cli.check_backend_device(args.wkv_backend, device)

    model, vocab, _ = load_model(args.checkpoint, device=device, wkv_backend=args.wkv_backend)
    try:
        vocab.encode(args.prompt)
    except ValueError as err:
        first = str(err).split(". ")[0]
        raise ValueError(f"the model cannot read the prompt: {first}; use only characters of "
                         "the corpus it was trained on") from err
    text = generate_text(model, vocab, args.prompt, args.tokens, args.temperature,
                         args.top_p, args.seed)
    sys.stdout.write(args.prompt + text + "\n")
    return 0


if __name__ == "__main__":
    from .cli import run

    raise SystemExit(run(main, sys.argv[1:]))
