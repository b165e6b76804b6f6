"""One point of the sweep behind the laptop preset: equal training time, which model wins?

    python benchmarks/laptop_sweep.py run L3-C192 --n_layer 3 --n_embd 192 --ctx_len 256 \
        --batch_size 16 --lr_init 4e-3 --lr_final 4e-4     # measure, train, evaluate, record
    python benchmarks/laptop_sweep.py measure --n_layer 4 --n_embd 256   # throughput only
    python benchmarks/laptop_sweep.py run L3-C192 ... --steps 2000       # a given step count
    python benchmarks/laptop_sweep.py choose L3-C192    # mark the point the preset is
    python benchmarks/laptop_sweep.py table             # the results as a Markdown table

Each point starts from the laptop preset (rwkv_lib.train.PRESETS["laptop"]) with the
given fields replaced, and goes in two stages:

1. Throughput, with rwkv-bench.lock in the temp folder held (flock), so that timing runs never
   overlap: a few warm-up steps of train()'s exact step, then several short windows of
   steps, each timed on its own. The machine is shared, so the clock is the CPU time
   this single-threaded process got, not the wall clock: it is what the steps cost
   whoever else is running, and the fastest window estimates one unloaded core.
   (On a busy machine two threads are far worse than one: at every parallel operation
   one thread waits for the other to be scheduled again; wall-clock windows of a
   two-thread process never ran unhindered, see --threads 2.)
2. The time budget (default 15 minutes of that one core) times that speed is a number
   of tokens, hence of optimizer steps. The model is trained for exactly that many steps
   on one thread, without the lock (on a shared machine, run the script with
   `nice -n 10`): the bits per byte it reaches depend on the steps, not on how busy the
   machine was. Then both held-out splits are read whole, in order, with the RNN state
   carried (rwkv_lib.evaluate), and the test split is set next to xz -9e.

The record (config, parameters, steps, tokens, every window's speed, validation and test
bits per byte) replaces the point of the same name in the results file
(default benchmarks/results/cpu/laptop_sweep.json).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rwkv_lib.atomic import write_text_atomically  # noqa: E402
from rwkv_lib.checkpoint import load_checkpoint, load_model  # noqa: E402
from rwkv_lib.data import ByteVocab, WindowDataset, load_corpus, split_corpus  # noqa: E402
from rwkv_lib.evaluate import evaluate_bpb  # noqa: E402
from rwkv_lib.l2wrap import l2wrap  # noqa: E402
from rwkv_lib.model import RWKV, RWKVConfig  # noqa: E402
from rwkv_lib.stdlib_corpus import read_metadata  # noqa: E402
from rwkv_lib.train import (  # noqa: E402
    CHECKPOINT_NAME,
    TrainConfig,
    get_config,
    make_optimizer,
    train,
)

LOCK = str(Path(tempfile.gettempdir()) / "rwkv-bench.lock")  # shared by timing runs
RESULTS = REPO / "benchmarks" / "results" / "cpu" / "laptop_sweep.json"
FIELDS = ("n_layer", "n_embd", "ctx_len", "batch_size", "lr_init", "lr_final", "warmup_steps",
          "lr_schedule", "corpus", "seed", "wkv_backend")
EVAL_STREAMS = 16


@contextlib.contextmanager
def bench_lock(path: str = LOCK):
    """flock(2) on `path`: the same lock as `flock <temp folder>/rwkv-bench.lock COMMAND`."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def time_windows(step, tokens_per_step: int, threads: int = 1, windows: int = 10,
                 window_seconds: float = 1.0, warmup_steps: int = 3) -> dict:
    """Tokens per second of `step()` (one optimizer step) on `threads` threads.

    A window is a whole number of steps lasting about `window_seconds` unloaded. Each
    window is timed twice: by the wall clock, and by the CPU time the process got. On one
    thread, CPU time is what the work costs whoever else runs; on a shared machine the
    fastest window by CPU time ("tokens_per_second") is the estimate of the speed of one
    unloaded core. Each window's utilization, CPU time / (wall time x threads), says how
    much of the cores the process had: near 1 only when no one else needed them."""
    torch.set_num_threads(threads)

    def steps(n: int) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            step()
        return time.perf_counter() - t0, time.process_time() - c0

    steps(warmup_steps)
    probe = min(steps(1)[1] / threads for _ in range(3))  # CPU time sizes the windows
    per_window = max(1, math.ceil(window_seconds / probe))
    timed = [steps(per_window) for _ in range(windows)]
    tokens = per_window * tokens_per_step
    cpu_rates = [tokens * threads / cpu for _, cpu in timed]
    wall_rates = [tokens / wall for wall, _ in timed]
    return {"tokens_per_second": max(cpu_rates) if threads == 1 else max(wall_rates),
            "clock": "cpu" if threads == 1 else "wall", "threads": threads,
            "cpu_rates": cpu_rates, "wall_rates": wall_rates,
            "utilization": [cpu / (wall * threads) for wall, cpu in timed],
            "window_steps": per_window, "tokens_per_step": tokens_per_step}


def training_batches(config: TrainConfig):
    """The vocabulary and an iterator over train()'s batches (x, y) for `config`."""
    data = load_corpus(config.corpus, data_dir=config.data_dir)
    vocab = ByteVocab.from_data(data)
    windows = WindowDataset(split_corpus(data)["train"], config.ctx_len,
                            config.max_steps * config.batch_size, seed=config.seed, vocab=vocab)
    return vocab, iter(DataLoader(windows, batch_size=config.batch_size))


def measure_throughput(config: TrainConfig, threads: int = 1, windows: int = 10) -> dict:
    """time_windows for train()'s step: data, forward, L2Wrap, backward, clipping, Adam."""
    vocab, batches = training_batches(dataclasses.replace(config, max_steps=10**7))
    torch.manual_seed(config.seed)
    model = RWKV(RWKVConfig(vocab_size=vocab.size, n_layer=config.n_layer, n_embd=config.n_embd,
                            ctx_len=config.ctx_len, wkv_backend=config.wkv_backend))
    optimizer = make_optimizer(model, config)

    def step() -> None:
        x, y = next(batches)
        logits = model(x)
        loss = l2wrap(F.cross_entropy(logits.flatten(0, 1), y.flatten()), logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)
        optimizer.step()

    timing = time_windows(step, config.batch_size * config.ctx_len, threads, windows)
    return {**timing, "params": sum(p.numel() for p in model.parameters())}


def _write_json_atomically(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(value, indent=1) + "\n", mode=0o644)


def _update(path: Path, change) -> dict:
    """Read the results file, apply `change` to it, write it back atomically."""
    lock_path = Path(tempfile.gettempdir()) / f"{path.name}.lock"
    with open(lock_path, "a") as lock:  # another point may finish at the same time
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.is_file() else {"points": []}
        results["about"] = __doc__.split("\n\n")[0].strip()
        change(results)
        _write_json_atomically(path, results)
    return results


def store(record: dict, path: Path) -> None:
    """Put `record` into the results file, replacing the point of the same name."""
    def put(results: dict) -> None:
        kept = [p for p in results["points"] if p["name"] != record["name"]]
        results["points"] = kept + [record]

    _update(path, put)


def choose(name: str, path: Path) -> None:
    """Mark the point that PRESETS["laptop"] is (tests/test_train.py checks the two agree)."""
    def mark(results: dict) -> None:
        if name not in [p["name"] for p in results["points"]]:
            raise SystemExit(f"error: no point named {name!r} in {path}")
        results["chosen"] = name

    _update(path, mark)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _finished_run(run_dir: Path, config: TrainConfig) -> dict | None:
    """train()'s result for a run of `config` that already finished in `run_dir`, else None."""
    ckpt_path, metrics_path = run_dir / CHECKPOINT_NAME, run_dir / "metrics.json"
    if not (ckpt_path.is_file() and metrics_path.is_file()):
        return None
    saved = load_checkpoint(ckpt_path)
    metrics = json.loads(metrics_path.read_text())
    same = all(saved["train_config"][f] == getattr(config, f) for f in FIELDS)
    if not (same and saved["step"] == config.max_steps and "test" in metrics):
        return None
    return {**metrics["final"], "checkpoint": str(ckpt_path)}


def run_point(name: str, config: TrainConfig, budget_minutes: float, steps: int | None,
              tokens_per_second: float | None, windows: int, results: Path,
              runs_dir: Path) -> dict:
    run_dir = runs_dir / name
    measured, measurement_file = None, run_dir / "measurement.json"
    if steps is None and tokens_per_second is None and measurement_file.is_file():
        measured = json.loads(measurement_file.read_text())  # an interrupted point, again
        tokens_per_second = measured["tokens_per_second"]
    if steps is None:
        if tokens_per_second is None:
            with bench_lock():
                measured = measure_throughput(config, threads=1, windows=windows)
            _write_json_atomically(measurement_file, measured)
            tokens_per_second = measured["tokens_per_second"]
            print(f"{name}: fastest window {tokens_per_second:,.0f} tokens per CPU second (all: "
                  + ", ".join(f"{r:,.0f}" for r in measured["cpu_rates"]) + ")", flush=True)
        tokens_per_step = config.batch_size * config.ctx_len
        steps = int(budget_minutes * 60 * tokens_per_second // tokens_per_step)
    torch.set_num_threads(1)  # the budget is in single-core time; one thread also suffers
    # least on a busy machine (two threads wait for each other at every parallel op)
    config = dataclasses.replace(config, max_steps=steps, out_dir=str(run_dir),
                                 progress=False, test_eval=True)
    print(f"{name}: {steps:,} steps", flush=True)
    t0 = time.perf_counter()
    result = _finished_run(run_dir, config)
    if result is None:
        result = train(config)
    else:
        print(f"{name}: reusing the finished run in {run_dir}", flush=True)
    wall = result["seconds"] if result.get("seconds") else time.perf_counter() - t0
    model, vocab, _ = load_model(result["checkpoint"])
    data = load_corpus(config.corpus, data_dir=config.data_dir)
    val = evaluate_bpb(model, vocab.encode(split_corpus(data)["val"]), chunk_len=1024,
                       batch_size=EVAL_STREAMS)
    test = result["test"]
    record = {
        "name": name,
        "config": {f: getattr(config, f) for f in FIELDS},
        "params": sum(t.numel() for t in model.parameters()),
        "steps": steps,
        "tokens": steps * config.batch_size * config.ctx_len,
        "budget_minutes": budget_minutes,
        "tokens_per_second": tokens_per_second,
        "measurement": measured,
        "val_bpb": val["bpb"],
        "test_bpb": test["bpb"],
        "test_xz_bpb": test["xz_bpb"],
        "test_unigram_entropy_bits": test["unigram_entropy_bits"],
        "test_bpb_over_xz": test["bpb_over_xz"],
        "last_val_windows_bpb": result["val_bpb"],
        "wall_minutes": wall / 60,  # on the shared machine: contended, for information only
        "corpus": read_metadata(data.filename) or {"name": config.corpus, "bytes": len(data)},
        "machine": {"cpu": _cpu_name(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
    }
    store(record, results)
    print(f"{name}: {record['params']:,} params, {steps:,} steps, {record['tokens']:,} tokens: "
          f"val {val['bpb']:.4f}, test {test['bpb']:.4f} bits per byte (xz -9e "
          f"{test['xz_bpb']:.4f}, ratio {test['bpb_over_xz']:.3f})", flush=True)
    return record


def table(path: Path) -> str:
    """The points as a Markdown table, best validation first."""
    results = json.loads(path.read_text())
    rows = ["| point | params | ctx | batch | lr | steps | tokens | tokens/s (1 core) | "
            "val bpb | test bpb | test / xz -9e |", "|---|---:|---:|---:|---|---:|---:|---:|"
            "---:|---:|---:|"]
    for p in sorted(results["points"], key=lambda p: p["val_bpb"]):
        c = p["config"]
        mark = " (preset)" if p["name"] == results.get("chosen") else ""
        rows.append(f"| {p['name']}{mark} | {p['params']:,} | {c['ctx_len']} | "
                    f"{c['batch_size']} | {c['lr_init']:g} to {c['lr_final']:g} | "
                    f"{p['steps']:,} | {p['tokens'] / 1e6:.1f}M | "
                    f"{p['tokens_per_second']:,.0f} | {p['val_bpb']:.3f} | {p['test_bpb']:.3f} | "
                    f"{p['test_bpb_over_xz']:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    measure = sub.add_parser("measure", help="throughput only")
    run = sub.add_parser("run", help="measure, then train for the budget and evaluate")
    pick = sub.add_parser("choose", help="mark the point the laptop preset is")
    pick.add_argument("name")
    show = sub.add_parser("table", help="print the points as a Markdown table")
    for p in (pick, show):
        p.add_argument("--results", type=Path, default=RESULTS)
    run.add_argument("name", help="the point's name in the results file")
    run.add_argument("--budget-minutes", type=float, default=15.0)
    run.add_argument("--steps", type=int, default=None, help="skip the measurement")
    run.add_argument("--tokens-per-second", type=float, default=None,
                     help="skip the measurement, use this speed")
    run.add_argument("--results", type=Path, default=RESULTS)
    run.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "laptop-sweep")
    for p in (measure, run):
        p.add_argument("--windows", type=int, default=10)
        p.add_argument("--threads", type=int, default=1,
                       help="1: time by CPU time (robust on a shared machine); more: by the "
                            "wall clock, the fastest window")
        for field in ("n_layer", "n_embd", "ctx_len", "batch_size", "warmup_steps", "seed"):
            p.add_argument(f"--{field}", type=int, default=None)
        for field in ("lr_init", "lr_final"):
            p.add_argument(f"--{field}", type=float, default=None)
        for field in ("lr_schedule", "corpus", "wkv_backend"):
            p.add_argument(f"--{field}", default=None)
    args = parser.parse_args(argv)
    if args.command == "choose":
        choose(args.name, args.results)
        return 0
    if args.command == "table":
        print(table(args.results))
        return 0
    overrides = {f: getattr(args, f) for f in FIELDS if getattr(args, f, None) is not None}
    config = get_config("laptop", device="cpu", **overrides)
    if args.command == "measure":
        with bench_lock():
            m = measure_throughput(config, threads=args.threads, windows=args.windows)
        print(json.dumps({**{f: getattr(config, f) for f in FIELDS}, **m}))
        return 0
    run_point(args.name, config, args.budget_minutes, args.steps, args.tokens_per_second,
              args.windows, args.results, args.runs_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
