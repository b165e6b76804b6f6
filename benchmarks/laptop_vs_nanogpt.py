"""The laptop preset next to a GPT of the same size, data and token budget (nanoGPT's).

    git clone https://github.com/karpathy/nanoGPT /somewhere/nanoGPT
    python benchmarks/laptop_vs_nanogpt.py --nanogpt /somewhere/nanoGPT
    python benchmarks/laptop_vs_nanogpt.py --nanogpt /somewhere/nanoGPT --rwkv-run runs/laptop
    python benchmarks/laptop_vs_nanogpt.py --nanogpt /somewhere/nanoGPT --max-steps 20 \
        --max-test-bytes 20000 --results check.json                          # a quick check

RWKV's claim is that it trains like a GPT (in parallel over the sequence) and runs like an
RNN (a fixed-size state, however long the text). This puts it to a small test:

- The same bytes: train() of the laptop preset (or a finished run of it, --rwkv-run) and
  nanoGPT's GPT (its model.py, loaded from the given checkout; nothing of it is copied
  here), trained on the same training windows in the same order, batch for batch, for the
  same number of steps. The GPT has the same depth and context and the width whose
  parameter count is closest to RWKV's. It is trained with nanoGPT's recipe for small
  character models (config/train_shakespeare_char.py: AdamW, learning rate 1e-3, warm-up
  100 steps, cosine decay to 1e-4, betas (0.9, 0.99), weight decay 0.1, clipping 1.0),
  without dropout (the run sees less than one pass over its training data).
- Scored the same way: a GPT sees at most ctx bytes, so both are scored on the test
  split in windows of ctx bytes, each read from scratch (RWKV from the zero state):
  "windows" (non-overlapping: a byte's context is 0..ctx-1 bytes, on average half the
  window) and "sliding" (windows every ctx/2 bytes, each scoring only its last half: every
  byte after the first window sees at least ctx/2 bytes). RWKV's own way is a separate
  column: the split read in order with the state carried (rwkv_lib.evaluate), each byte
  predicted from everything before it, at the same cost per byte as a window.
- Time: tokens per CPU second of one thread, the fastest of several timed windows (see
  laptop_sweep.time_windows), for each model; "minutes" is the token budget at that speed.
  The wall time of the actual runs on a shared machine is printed for information.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from laptop_sweep import (  # noqa: E402
    _write_json_atomically,
    measure_throughput,
    time_windows,
    training_batches,
)

from rwkv_lib.baselines import compression_baselines  # noqa: E402
from rwkv_lib.checkpoint import load_checkpoint, load_model  # noqa: E402
from rwkv_lib.data import DATA_DIR, load_corpus, split_corpus  # noqa: E402
from rwkv_lib.evaluate import evaluate_bpb  # noqa: E402
from rwkv_lib.train import TrainConfig, get_config, train  # noqa: E402

RESULTS = HERE / "results" / "cpu" / "laptop_vs_nanogpt.json"  # results/*.json: GPU files
# nanoGPT's small-character-model recipe (config/train_shakespeare_char.py), dropout off
GPT_RECIPE = {"lr": 1e-3, "min_lr": 1e-4, "warmup": 100, "betas": (0.9, 0.99),
              "weight_decay": 0.1, "grad_clip": 1.0, "head_size": 64}


def load_nanogpt(checkout: Path):
    """nanoGPT's model.py from a checkout, imported under its own name."""
    path = Path(checkout) / "model.py"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; --nanogpt must be a nanoGPT checkout "
                         f"(git clone https://github.com/karpathy/nanoGPT)")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpt_params(n_layer: int, n_embd: int, vocab: int, ctx: int) -> int:
    """Parameters of nanoGPT's GPT with biases (tied embedding and head)."""
    C = n_embd
    per_layer = 12 * C * C + 13 * C  # attention 4C^2 + MLP 8C^2; biases and LayerNorms
    return n_layer * per_layer + vocab * C + ctx * C + 2 * C


def matching_gpt_shape(target: int, n_layer: int, vocab: int, ctx: int) -> tuple[int, int]:
    """(n_embd, n_head) with heads of about 64 channels and the parameter count closest
    to `target`, at depth n_layer."""
    best = None
    for C in range(16, 4097, 4):
        heads = max(1, round(C / GPT_RECIPE["head_size"]))
        if C % heads:
            continue
        gap = abs(gpt_params(n_layer, C, vocab, ctx) - target)
        if best is None or gap < best[0]:
            best = (gap, C, heads)
    return best[1], best[2]


def gpt_lr(step: int, steps: int) -> float:
    """Linear warm-up, then half a cosine from lr down to min_lr at the last step."""
    lr, low, warm = GPT_RECIPE["lr"], GPT_RECIPE["min_lr"], GPT_RECIPE["warmup"]
    if step < warm:
        return lr * (step + 1) / (warm + 1)
    progress = min(1.0, (step - warm) / max(1, steps - warm))
    return low + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - low)


def build_gpt(nanogpt, config: TrainConfig, vocab_size: int, target_params: int):
    n_embd, n_head = matching_gpt_shape(target_params, config.n_layer, vocab_size,
                                        config.ctx_len)
    gpt_config = nanogpt.GPTConfig(block_size=config.ctx_len, vocab_size=vocab_size,
                                   n_layer=config.n_layer, n_head=n_head, n_embd=n_embd,
                                   dropout=0.0, bias=True)
    torch.manual_seed(config.seed)
    with contextlib.redirect_stdout(sys.stderr):  # nanoGPT prints its parameter count
        model = nanogpt.GPT(gpt_config)
    return model, gpt_config


def gpt_step_fn(model, config: TrainConfig, batches):
    with contextlib.redirect_stdout(sys.stderr):
        optimizer = model.configure_optimizers(GPT_RECIPE["weight_decay"], GPT_RECIPE["lr"],
                                               GPT_RECIPE["betas"], "cpu")
    state = {"step": 0}

    def step() -> float:
        for group in optimizer.param_groups:
            group["lr"] = gpt_lr(state["step"], config.max_steps)
        x, y = next(batches)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GPT_RECIPE["grad_clip"])
        optimizer.step()
        state["step"] += 1
        return loss.item()

    return step


def train_gpt(nanogpt, config: TrainConfig, vocab_size: int, target_params: int) -> tuple:
    vocab, batches = training_batches(config)
    model, gpt_config = build_gpt(nanogpt, config, vocab.size, target_params)
    step = gpt_step_fn(model, config, batches)
    t0, recent = time.perf_counter(), []
    for s in range(config.max_steps):
        recent.append(step())
        if (s + 1) % max(1, config.max_steps // 20) == 0 or s + 1 == config.max_steps:
            print(f"gpt step {s + 1:6d} | train {np.mean(recent) / math.log(2):.3f} bpb | "
                  f"lr {gpt_lr(s, config.max_steps):.2e}", flush=True)
            recent = []
    return model.eval(), gpt_config, time.perf_counter() - t0


@torch.no_grad()
def windowed_bpb(logits_of, ids: np.ndarray, ctx: int, stride: int, batch: int = 32) -> dict:
    """Bits per byte over windows of ctx bytes (and their next bytes) starting every
    `stride` bytes, each read from scratch. Every byte is scored once: the first window
    scores all its positions, each later one only its last `stride`, the ones that
    the windows before it did not reach."""
    if not 1 <= stride <= ctx:
        raise ValueError(f"need 1 <= stride <= ctx, got {stride}, {ctx}")
    ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    starts = list(range(0, len(ids) - ctx, stride))
    nats, predicted = 0.0, 0
    for i in range(0, len(starts), batch):
        group = starts[i:i + batch]
        x = torch.stack([ids[s:s + ctx] for s in group])
        y = torch.stack([ids[s + 1:s + ctx + 1] for s in group])
        losses = F.cross_entropy(logits_of(x).float().transpose(1, 2), y, reduction="none")
        keep = torch.zeros_like(losses, dtype=torch.bool)
        keep[:, ctx - stride:] = True
        if group[0] == 0:
            keep[0] = True
        nats += float(losses[keep].sum())
        predicted += int(keep.sum())
    return {"bpb": nats / predicted / math.log(2), "predicted": predicted, "windows": len(starts)}


def score(logits_of, ids: np.ndarray, ctx: int) -> dict:
    return {"windows": windowed_bpb(logits_of, ids, ctx, ctx),
            "sliding": windowed_bpb(logits_of, ids, ctx, ctx // 2)}


def rwkv_run(config: TrainConfig, run_dir: Path | None, out_dir: Path) -> tuple[Path, float]:
    """A finished laptop run with this config (reused), or a new one; (checkpoint, seconds)."""
    if run_dir is not None:
        ckpt = load_checkpoint(run_dir / "ckpt.pt")
        saved = ckpt["train_config"]
        fields = ("corpus", "n_layer", "n_embd", "ctx_len", "batch_size", "max_steps", "seed")
        differ = [f for f in fields if saved[f] != getattr(config, f)]
        if differ or ckpt["step"] != config.max_steps:
            raise SystemExit(f"error: {run_dir} is not a finished run of this configuration "
                             f"(differs in {differ or ['step']}); leave out --rwkv-run to "
                             f"train one")
        seconds = json.loads((run_dir / "metrics.json").read_text())["final"]["seconds"]
        return run_dir / "ckpt.pt", seconds
    t0 = time.perf_counter()
    # test_eval off: the test split is scored below, the same way for both models
    result = train(dataclasses.replace(config, out_dir=str(out_dir), progress=False,
                                       test_eval=False))
    return Path(result["checkpoint"]), time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout")
    parser.add_argument("--rwkv-run", type=Path, default=None,
                        help="a finished run of the laptop preset to reuse")
    parser.add_argument("--corpus", default=None, help="default: the laptop preset's")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="default: the laptop preset's (a few for a quick check)")
    parser.add_argument("--runs-dir", type=Path, default=HERE.parent / "runs" / "vs-nanogpt")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--windows", type=int, default=10, help="timed windows per model")
    parser.add_argument("--max-test-bytes", type=int, default=None,
                        help="score only the start of the test split (a quick check)")
    args = parser.parse_args(argv)

    nanogpt = load_nanogpt(args.nanogpt)
    overrides = {k: v for k, v in (("corpus", args.corpus), ("max_steps", args.max_steps))
                 if v is not None}
    config = get_config("laptop", device="cpu", **overrides)
    tokens = config.max_steps * config.batch_size * config.ctx_len

    # speed first (quick), with the benchmark lock, before the long runs
    from laptop_sweep import bench_lock
    with bench_lock():
        rwkv_speed = measure_throughput(config, threads=1, windows=args.windows)
        vocab, batches = training_batches(dataclasses.replace(config, max_steps=10**7))
        probe, _ = build_gpt(nanogpt, config, vocab.size, rwkv_speed["params"])
        gpt_speed = time_windows(gpt_step_fn(probe, config, batches),
                                 config.batch_size * config.ctx_len, threads=1,
                                 windows=args.windows)
    del probe

    torch.set_num_threads(1)
    ckpt_path, rwkv_seconds = rwkv_run(config, args.rwkv_run, args.runs_dir / "rwkv")
    rwkv, rwkv_vocab, _ = load_model(ckpt_path)
    rwkv_params = sum(p.numel() for p in rwkv.parameters())
    gpt, gpt_config, gpt_seconds = train_gpt(nanogpt, config, rwkv_vocab.size, rwkv_params)
    gpt_params_n = sum(p.numel() for p in gpt.parameters())

    data = load_corpus(config.corpus, data_dir=config.data_dir)
    test = split_corpus(data)["test"][:args.max_test_bytes]
    ids = rwkv_vocab.encode(test)
    ctx = config.ctx_len
    rows = {
        "RWKV-4 (rwkv_lib)": {
            "shape": f"L{config.n_layer} C{config.n_embd}", "params": rwkv_params,
            "tokens_per_cpu_second": rwkv_speed["tokens_per_second"],
            "wall_minutes": rwkv_seconds / 60,
            **score(lambda x: rwkv(x), ids, ctx),
            "state_carried": evaluate_bpb(rwkv, ids, chunk_len=1024, batch_size=16)["bpb"]},
        "GPT (nanoGPT model.py)": {
            "shape": f"L{gpt_config.n_layer} C{gpt_config.n_embd} H{gpt_config.n_head}",
            "params": gpt_params_n, "tokens_per_cpu_second": gpt_speed["tokens_per_second"],
            "wall_minutes": gpt_seconds / 60,
            **score(lambda x: gpt(x, x)[0], ids, ctx), "state_carried": None},
    }
    cache = Path(config.data_dir) if config.data_dir is not None else DATA_DIR
    xz = compression_baselines(test, cache_dir=cache)
    for row in rows.values():
        row["tokens"] = tokens
        row["minutes_one_core"] = tokens / row["tokens_per_cpu_second"] / 60

    head = (f"{'model':<24}{'shape':>14}{'params':>11}{'tokens':>12}{'min (1 core)':>14}"
            f"{'windows':>9}{'sliding':>9}{'state':>8}")
    print(f"\ntest split of {config.corpus}: {len(test):,} bytes; bits per byte (lower is "
          f"better), contexts of {ctx} bytes; xz -9e {xz['xz_bpb']:.3f}, unigram "
          f"{xz['unigram_entropy_bits']:.3f}")
    print(head)
    for name, r in rows.items():
        state = "-" if r["state_carried"] is None else f"{r['state_carried']:.3f}"
        print(f"{name:<24}{r['shape']:>14}{r['params']:>11,}{r['tokens']:>12,}"
              f"{r['minutes_one_core']:>14.1f}{r['windows']['bpb']:>9.3f}"
              f"{r['sliding']['bpb']:>9.3f}{state:>8}")
    _write_json_atomically(args.results, {
        "about": __doc__.split("\n\n")[0].strip(), "corpus": config.corpus,
        "config": {f: getattr(config, f) for f in ("n_layer", "n_embd", "ctx_len", "batch_size",
                                                   "max_steps", "seed")},
        "gpt_recipe": GPT_RECIPE, "test_bytes": len(test), "test_xz_bpb": xz["xz_bpb"],
        "test_unigram_entropy_bits": xz["unigram_entropy_bits"], "models": rows})
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
