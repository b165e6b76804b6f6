"""Bits per byte on a whole split, read in order, the RNN state carried along (notebook 08).

Training windows see at most ctx_len bytes of context. Evaluation does better: the split
is read from start to end in chunks, and the state after one chunk is the starting state
of the next (GPT mode with a state, `model(chunk, state=..., return_state=True)`), so every
byte is predicted from everything before it. The result does not depend on the chunk
length, only on how the split is cut into streams:

    To use a batch, the split is cut into `batch_size` contiguous streams, each read in
    order with its own state. Each stream starts from the zero state, so its first bytes
    are predicted with little context; on a 5 MB split with a handful of streams that
    costs nothing visible. With n bytes and B streams, B * ((n - 1) // B) bytes are
    predicted: every byte after the first, less up to B - 1 at the very end.

bits per byte = (sum of cross-entropy over the predicted bytes, in nats) / count / ln 2

    python -m rwkv_lib.evaluate runs/enwik8/ckpt.pt --split test
    python -m rwkv_lib.evaluate runs/enwik8/ckpt.pt --device cpu   # a GPU's model, on a CPU
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import cli
from .model import RWKV
from .wkv import BACKENDS


@torch.no_grad()
def evaluate_bpb(
    model: RWKV, tokens: np.ndarray, chunk_len: int = 1024, batch_size: int = 1,
    max_bytes: int | None = None, progress: bool = False,
) -> dict:
    """Walk `tokens` (token ids) in order and return {"bpb", "loss", "predicted", "bytes",
    "streams"}: bits per byte, mean cross-entropy in nats, and what was counted."""
    if chunk_len < 1 or batch_size < 1:
        raise ValueError(f"chunk_len and batch_size must be >= 1, got {chunk_len}, {batch_size}")
    tokens = np.asarray(tokens[:max_bytes] if max_bytes is not None else tokens)
    n = len(tokens)
    stream_len = (n - 1) // batch_size  # bytes each stream predicts
    if stream_len < 1:
        raise ValueError(f"evaluate_bpb: {n} bytes are too few for {batch_size} streams")
    device = model.head.weight.device
    ids = torch.from_numpy(tokens[: batch_size * stream_len + 1].astype(np.int64))
    # Stream j reads inputs ids[j*L : (j+1)*L] and predicts ids[j*L+1 : (j+1)*L+1].
    starts = torch.arange(batch_size) * stream_len
    x_all = torch.stack([ids[s : s + stream_len] for s in starts.tolist()])
    y_all = torch.stack([ids[s + 1 : s + stream_len + 1] for s in starts.tolist()])

    was_training = model.training
    model.eval()
    state = model.init_state(batch_size, device)
    total_nats = 0.0  # a Python float (double): millions of terms lose nothing
    for t0 in tqdm(range(0, stream_len, chunk_len), desc="evaluating", unit="chunk",
                   disable=not progress):
        x = x_all[:, t0 : t0 + chunk_len].to(device)
        y = y_all[:, t0 : t0 + chunk_len].to(device)
        logits, state = model(x, state=state, return_state=True)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                               reduction="sum")
        total_nats += float(loss)
    model.train(was_training)
    predicted = batch_size * stream_len
    loss = total_nats / predicted
    return {"bpb": loss / math.log(2), "loss": loss, "predicted": predicted, "bytes": n,
            "streams": batch_size}


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m rwkv_lib.evaluate",
        description="Bits per byte of a checkpoint on a whole split, read in order with the "
        "RNN state carried from chunk to chunk. On enwik8's test split (the last 5 MB) this "
        "is the number that published byte-level results are compared with, e.g. "
        "Transformer-XL 12L 1.06, SHA-RNN 1.07, Al-Rfou T12 1.11 bpc.")
    parser.add_argument("checkpoint", help="a checkpoint written by python -m rwkv_lib.train")
    parser.add_argument("--corpus", default=None,
                        help="enwik8, sample or a file (default: the checkpoint's own corpus)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--max-bytes", type=cli.positive_int, default=None,
                        help="evaluate only the first N bytes of the split (a quick estimate)")
    parser.add_argument("--chunk-len", type=cli.positive_int, default=1024)
    parser.add_argument("--batch-size", type=cli.positive_int, default=1,
                        help="number of contiguous streams read in parallel")
    parser.add_argument("--device", type=cli.device_name, default="auto", help=cli.DEVICES)
    parser.add_argument("--wkv-backend", choices=BACKENDS, default="auto",
                        help="how to compute WKV here, whatever the checkpoint was trained "
                             "with (see rwkv_lib.wkv)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from .checkpoint import load_model
    from .data import load_corpus, split_corpus

    device = cli.resolve_device(args.device)
    cli.check_backend_device(args.wkv_backend, device)
    model, vocab, train_config = load_model(args.checkpoint, device=device,
                                            wkv_backend=args.wkv_backend)
    corpus = args.corpus or train_config.get("corpus")
    if corpus is None:
        parser.error("the checkpoint does not name its corpus; pass --corpus")
    data = split_corpus(load_corpus(corpus, data_dir=args.data_dir))[args.split]
    if args.max_bytes is not None:
        data = data[: args.max_bytes]
    try:
        tokens = vocab.encode(data)
    except ValueError as err:
        first = str(err).split(". ")[0]
        raise ValueError(f"the {args.split} split of {corpus} does not fit the checkpoint's "
                         f"vocabulary: {first}. Evaluate on the corpus the model was trained "
                         "on (--corpus)") from err
    result = evaluate_bpb(model, tokens, chunk_len=args.chunk_len,
                          batch_size=args.batch_size, progress=not args.no_progress)
    print(f"{corpus} {args.split}: {result['bpb']:.4f} bits per byte "
          f"({result['predicted']:,} bytes predicted in {result['streams']} stream(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main, sys.argv[1:]))
