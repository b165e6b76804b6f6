"""Training RWKV-4 on bytes: the one loop behind the command line and notebook 08.

    python -m rwkv_lib.train --preset ci --out-dir runs/ci            # seconds on 2 CPU cores
    python -m rwkv_lib.train --preset laptop                          # real text, on a CPU
    python -m rwkv_lib.train --preset enwik8 --out-dir runs/enwik8    # the RWKV-4 recipe, GPU
    python -m rwkv_lib.train --out-dir runs/enwik8 --resume           # continue where it stopped
    python -m rwkv_lib.train --init-from imported.pt --out-dir runs/ft  # fine-tune given weights

Every TrainConfig field can be overridden on the command line (`--lr_init 1e-3`,
`--grad_clip none`, `--betas 0.9 0.99`). The run directory receives config.json,
ckpt.pt (see rwkv_lib.checkpoint), metrics.json and loss.png.

Choices worth knowing:
- The vocabulary is built from the WHOLE corpus, not the train split, so that every byte
  of the validation and test splits has an id. It is stored in the checkpoint.
- Batch b of step s holds the training windows s*B .. s*B+B-1 of a WindowDataset, and
  window i depends only on (seed, i). The data order is therefore a pure function of
  (seed, step): resuming needs only the step, and gives bit-identical weights on CPU.
- Validation uses a fixed set of windows of the validation split (the same for every
  seed), so curves of different runs compare directly. The number to compare with
  published results comes from rwkv_lib.evaluate, which reads the whole test split.
- The loss is cross-entropy through L2Wrap (rwkv_lib.l2wrap); bits per byte = loss / ln 2.
- --resume continues a run: its weights, Adam's moments, step, data position, random state
  and loss history. --init-from starts a new run (step 0, fresh optimizer and schedule) from
  the weights of any checkpoint, such as one made by `python -m rwkv_lib.checkpoint import`
  from RWKV-LM's weights; n_layer and n_embd then default to the checkpoint's, and its
  vocabulary is kept if it covers every byte of the corpus.
- A good checkpoint is never replaced by a worse one: a checkpoint is written only when the
  weights are finite and give a finite loss on a validation batch; a run whose loss or
  weights turn nan or inf stops and names the last good checkpoint, which it kept. Every
  file is written atomically (rwkv_lib.atomic); leftovers of interrupted writes are removed.
  checkpoint_minutes adds checkpoints by the clock (the same checks, the same atomic file).
- With test_eval, a finished run reads the whole test split with the state carried
  (rwkv_lib.evaluate) and puts that next to xz -9e and the unigram entropy of the same
  bytes (rwkv_lib.baselines) in metrics.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import math
import sys
import time
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import cli, distributed
from .atomic import remove_stale_temps, write_atomically, write_text_atomically
from .baselines import compression_baselines
from .checkpoint import (
    CheckpointError,
    check_compatible,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .cli import resolve_device
from .data import (
    DATA_DIR,
    ByteVocab,
    WindowDataset,
    load_corpus,
    split_corpus,
    unigram_entropy_bits,
)
from .evaluate import evaluate_bpb
from .l2wrap import l2wrap
from .model import RWKV, RWKVConfig
from .stdlib_corpus import describe, read_metadata
from .wkv import BACKENDS

# The string fields that take one of a few values (the command line offers them as choices).
CHOICES = {"lr_schedule": ("constant", "exp"), "dtype": ("float32", "bf16"),
           "wkv_backend": BACKENDS, "dist_backend": distributed.BACKENDS}
FLOAT32_MAX = torch.finfo(torch.float32).max
EVAL_SEED = 1234  # validation windows are the same whatever the training seed
CHECKPOINT_NAME = "ckpt.pt"
RUN_FILES = (CHECKPOINT_NAME, "config.json", "metrics.json", "loss.png")  # what a run writes
TEST_STREAMS = 16  # contiguous streams of the test split read side by side (rwkv_lib.evaluate)
_clock = time.monotonic  # for the time-based checkpoints (tests replace it)


@dataclass
class TrainConfig:
    preset: str = "ci"
    # data and where the run goes
    corpus: str = "sample"  # "enwik8", "sample" (offline stand-in), "stdlib" or a file path
    data_dir: str | None = None  # where enwik8 lives; None means the default (data/)
    out_dir: str = "runs/ci"
    # model
    n_layer: int = 2
    n_embd: int = 96
    ctx_len: int = 64
    wkv_backend: str = "auto"  # see rwkv_lib.wkv
    # optimization: Adam (see make_optimizer) and the schedule of learning_rate()
    batch_size: int = 16
    max_steps: int = 300
    lr_init: float = 5e-3
    lr_final: float = 5e-4
    warmup_steps: int = 0  # linear ramp from lr_init / 10 to lr_init
    lr_schedule: str = "exp"  # "constant" (lr_init throughout) or "exp" (lr_init -> lr_final)
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled (AdamW), on the Linear layers' weights only
    grad_clip: float | None = 1.0  # max global gradient norm; None for no clipping
    dtype: str = "float32"  # "float32" or "bf16" (bfloat16 autocast, on CUDA only)
    device: str = "auto"  # "auto" (CUDA if available), "cpu", "cuda", "cuda:N" or "mps"
    seed: int = 0
    # evaluation, logging, checkpoints (all in optimizer steps)
    eval_interval: int = 50
    eval_iters: int = 4  # batches of fixed validation windows per evaluation
    log_interval: int = 10
    checkpoint_interval: int = 100  # 0: only at the end
    checkpoint_minutes: float = 0.0  # also when this long since the last one; 0: never
    test_eval: bool = False  # at the end: the whole test split, state carried, and xz
    num_workers: int = 0  # DataLoader worker processes
    progress: bool = True  # tqdm progress bar
    # torch.compile the model: True, False, or "auto" (see will_compile): fuses the many
    # element-wise operations around the matrix products; the first step then compiles
    compile: bool | str = "auto"
    dist_backend: str = "auto"  # under torchrun: "auto" (NCCL on CUDA, gloo on CPU), "nccl", "gloo"


PRESETS: dict[str, TrainConfig] = {
    # Tiny and quick on 2 CPU cores (~8 s with the C++ WKV operator, ~18 s with the PyTorch
    # fallback), yet it learns the sample corpus far below its unigram entropy.
    "ci": TrainConfig(),
    # The seed's own demo settings: faithful, and very slow to learn. (Its run length is
    # ours: the demo had none worth copying for a byte-level comparison.)
    "seed": TrainConfig(
        preset="seed", corpus="enwik8", out_dir="runs/seed", n_layer=12, n_embd=512,
        ctx_len=1024, batch_size=1, max_steps=100_000, lr_init=1e-5, lr_final=1e-5,
        lr_schedule="constant", betas=(0.9, 0.999), eps=1e-8, grad_clip=None,
        dtype="float32", eval_interval=1000, eval_iters=20, log_interval=50,
        checkpoint_interval=5000,
    ),
    # Real text on a laptop: the Python standard library. Sized by benchmarks/laptop_sweep.py
    # (results in benchmarks/results/cpu/laptop_sweep.json): the budget was 15 minutes of one
    # core of the development machine (an AMD EPYC), each candidate's speed measured first
    # and turned into a step count. The best point so far, L2-C128 at ctx_len 256, batch 16,
    # lr 4e-3 -> 4e-4, ran 18,868 tokens per CPU second there: 4,145 steps, and 1.441 bits
    # per byte on the test split (xz -9e: 1.320). L3-C192, with the same settings, had time
    # for 1,309 steps and reached 1.456. The preset is defined by that step count, so it is
    # the same run on every machine, sooner or later; eager (compile=False), as measured.
    "laptop": TrainConfig(
        preset="laptop", corpus="stdlib", out_dir="runs/laptop", n_layer=2, n_embd=128,
        ctx_len=256, batch_size=16, max_steps=4145, lr_init=4e-3, lr_final=4e-4,
        warmup_steps=50, lr_schedule="exp", betas=(0.9, 0.99), eps=1e-8, grad_clip=1.0,
        dtype="float32", eval_interval=200, eval_iters=8, log_interval=20,
        checkpoint_interval=0, checkpoint_minutes=3.0, test_eval=True, compile=False,
    ),
    # RWKV-4's enwik8 recipe at 12 layers, the depth of the published comparisons
    # (docs/rwkv4.md, section 13). 100k steps of 12 x 1024 bytes is ~1.2G bytes, ~14 passes.
    "enwik8": TrainConfig(
        preset="enwik8", corpus="enwik8", out_dir="runs/enwik8", n_layer=12, n_embd=512,
        ctx_len=1024, batch_size=12, max_steps=100_000, lr_init=8e-4, lr_final=1e-5,
        warmup_steps=500, lr_schedule="exp", betas=(0.9, 0.99), eps=1e-8, grad_clip=1.0,
        dtype="bf16", eval_interval=1000, eval_iters=20, log_interval=50,
        checkpoint_interval=5000, num_workers=2,
    ),
}


def get_config(preset: str = "ci", **overrides: typing.Any) -> TrainConfig:
    """A preset with some fields replaced: get_config("ci", max_steps=50)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def check_config(config: TrainConfig) -> None:
    """Raise ValueError listing every field with an impossible value, before any work."""
    problems = [f"{name} must be one of {allowed}, got {getattr(config, name)!r}"
                for name, allowed in CHOICES.items() if getattr(config, name) not in allowed]
    for name in ("n_layer", "n_embd", "ctx_len", "batch_size", "eval_interval", "eval_iters",
                 "log_interval"):
        if getattr(config, name) < 1:
            problems.append(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("max_steps", "warmup_steps", "checkpoint_interval", "num_workers", "seed"):
        if getattr(config, name) < 0:
            problems.append(f"{name} must be >= 0, got {getattr(config, name)}")
    if not (math.isfinite(config.checkpoint_minutes) and config.checkpoint_minutes >= 0):
        problems.append(f"checkpoint_minutes must be >= 0 (0: no checkpoints by the clock), "
                        f"got {config.checkpoint_minutes}")
    for name in ("lr_init", "lr_final", "eps"):
        value = getattr(config, name)
        if not (math.isfinite(value) and 0 < value <= FLOAT32_MAX):
            problems.append(f"{name} must be a finite number > 0 (at most float32's "
                            f"{FLOAT32_MAX:.3g}), got {value}")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        problems.append(f"weight_decay must be a finite number >= 0, got {config.weight_decay}")
    if config.grad_clip is not None and not (math.isfinite(config.grad_clip)
                                             and config.grad_clip > 0):
        problems.append(f"grad_clip must be > 0 or None, got {config.grad_clip} (a finite "
                        "number, or none for no clipping)")
    if len(config.betas) != 2 or not all(0 <= b < 1 for b in config.betas):
        problems.append(f"betas must be two numbers in [0, 1), got {config.betas}")
    device_problem = cli.device_problem(config.device)
    if device_problem:
        problems.append(f"device {device_problem}")
    if config.compile not in (True, False, "auto"):
        problems.append(f"compile must be true, false or auto, got {config.compile!r}")
    if problems:
        raise ValueError("invalid TrainConfig: " + "; ".join(problems))


# "auto" compiles on the CPU for runs of at least this many steps. On the 2-core
# development machine (benchmarks/cpu_bench.py, L4-C128) compiling the training step took
# 17 s with torch's compile cache warm and 170 s cold on a busy machine, and the compiled
# step then ran 1.25x to 2.2x as fast as the eager one: time that short runs such as the
# ci preset never earn back. The choice depends on the config alone, not on the step a run
# resumes from, so that a resumed run computes exactly what the uninterrupted one would.
AUTO_COMPILE_STEPS = 5000


def will_compile(config: TrainConfig, device: torch.device) -> bool:
    """Whether training with this config runs the model through torch.compile."""
    if config.compile == "auto":
        return device.type == "cpu" and config.max_steps >= AUTO_COMPILE_STEPS
    return bool(config.compile)


def config_from_dict(values: dict) -> TrainConfig:
    """The inverse of dataclasses.asdict, also for JSON (lists back to tuples). Fields that
    are missing take their defaults; unknown ones are an error."""
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"unknown TrainConfig fields {unknown} (written by another version "
                         "of rwkv_lib?)")
    fixed = {k: tuple(v) if typing.get_origin(hints[k]) is tuple else v
             for k, v in values.items()}
    return TrainConfig(**fixed)


class TrainingDiverged(FloatingPointError):
    """The loss or the weights became inf or nan; the run stopped, and the last good
    checkpoint (named in the message) was kept."""


def learning_rate(step: int, config: TrainConfig) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    if step < config.warmup_steps:
        return config.lr_init * (0.1 + 0.9 * step / config.warmup_steps)
    if config.lr_schedule == "constant":
        return config.lr_init
    if config.lr_schedule != "exp":
        raise ValueError(f"lr_schedule must be 'constant' or 'exp', got {config.lr_schedule!r}")
    # Exponential decay: a straight line from lr_init to lr_final on a log scale.
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.lr_init * (config.lr_final / config.lr_init) ** progress


def _autocast(config: TrainConfig, device: torch.device):
    if config.dtype == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model: RWKV, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam. AdamW with weight_decay 0 is exactly Adam; a nonzero decay is decoupled and
    applied, by role, to the weight matrices of the Linear layers only: key, value,
    receptance and output of time mixing, key, receptance and value of channel mixing, and
    the head. Not to the embedding: its rows would shrink at every step, also those of bytes
    the batch does not contain. Nor to LayerNorms, time_mix_* (stored as (1, 1, C), yet
    per-channel mixing weights), time_decay or time_first: gains and rates, not connections."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    matrices = [p for p in model.parameters() if id(p) in linear]
    others = [p for p in model.parameters() if id(p) not in linear]
    groups = [{"params": matrices, "weight_decay": config.weight_decay},
              {"params": others, "weight_decay": 0.0}]
    # torch's fused AdamW, where it runs (CPU and CUDA): one kernel over all the tensors
    # instead of a dozen small ops per tensor, about 4x faster a step on the CPU (the opt
    # rows of benchmarks/cpu_bench.py). The same update, rounded differently.
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(groups, lr=config.lr_init, betas=config.betas, eps=config.eps,
                             **({"fused": True} if fused else {}))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state, keeping this optimizer's implementation:
    load_state_dict would also take the saved groups' fused/foreach flags (a checkpoint of
    an older rwkv_lib, with the per-tensor AdamW, would turn fused off)."""
    chosen = [(g.get("fused"), g.get("foreach")) for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, (fused, foreach) in zip(optimizer.param_groups, chosen, strict=True):
        group["fused"], group["foreach"] = fused, foreach
        if fused:  # the fused kernel keeps the step count as a float32 on the parameter's device
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                if "step" in st:
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, batches: list, device: torch.device, autocast) -> float:
    """Mean cross-entropy (nats) over fixed (x, y) batches."""
    model.eval()
    total = 0.0
    for x, y in batches:
        with autocast:
            logits = model(x.to(device))
        total += float(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()))
    model.train()
    return total / len(batches)


def save_loss_plot(metrics: dict, path: str | Path) -> Path:
    """loss.png: train and validation bits per byte against steps, with the unigram line."""
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    train, val = metrics["train"], metrics["val"]
    if train:
        ax.plot([r["step"] for r in train], [r["bpb"] for r in train], label="train")
    if val:
        ax.plot([r["step"] for r in val], [r["bpb"] for r in val], "o-", label="validation")
    ax.axhline(metrics["unigram_entropy_bits"], color="gray", linestyle="--",
               label="unigram entropy (no context)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"{metrics['config']['preset']}: L{metrics['config']['n_layer']} "
                 f"C{metrics['config']['n_embd']} on {metrics['config']['corpus']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return write_atomically(path, lambda f: fig.savefig(f, format="png"), mode=0o644)


@contextlib.contextmanager
def _deterministic_when_compiled(config: TrainConfig):
    """Compiled code reduces in parallel in an order that varies from run to run (two
    runs on 2 threads differed by 6e-8); with deterministic algorithms requested while it
    is generated and run, a resumed run repeats the uninterrupted one bit for bit."""
    try:
        compiled = config.compile is not False and will_compile(config,
                                                                resolve_device(config.device))
    except RuntimeError:
        compiled = False  # train() itself reports the bad device
    if not compiled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _check_out_dir(out_dir: Path) -> None:
    """Fail now, not after the data is loaded, when out_dir cannot be a folder."""
    for folder in (out_dir, *out_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a folder, so out_dir cannot be "
                                         "made there", str(folder))
            return


def load_resumable(ckpt_path: Path) -> dict:
    """The checkpoint of a run to continue; imported weights have no run to continue."""
    if not ckpt_path.is_file() and not ckpt_path.is_dir():
        raise FileNotFoundError(f"no checkpoint to resume: {ckpt_path} does not exist; start "
                                "the run without --resume, or give the --out-dir of the run")
    ckpt = load_checkpoint(ckpt_path)
    if ckpt["optimizer"] is None:
        raise CheckpointError(
            f"{ckpt_path} holds weights without a training run to continue (no optimizer "
            f"state: imported or hand-made); start a new run from them with --init-from "
            f"{ckpt_path} and another --out-dir")
    return ckpt


def _vocab_for_init(init: dict, corpus_vocab: ByteVocab, config: TrainConfig) -> ByteVocab:
    """Fine-tuning keeps the model's vocabulary, which must cover every byte of the corpus."""
    vocab = ByteVocab.from_dict(init["vocab"])
    missing = sorted(set(corpus_vocab.byte_values) - set(vocab.byte_values))
    if missing:
        raise CheckpointError(
            f"the checkpoint's vocabulary of {vocab.size} byte values lacks {len(missing)} "
            f"that occur in {config.corpus} (byte {missing[0]} for one); fine-tune on a "
            "corpus it can read, or import the weights with --corpus naming their own corpus")
    return vocab


def _splits(data, config: TrainConfig) -> dict:
    try:
        splits = split_corpus(data)
    except ValueError as err:
        raise ValueError(f"corpus {config.corpus} is too small: {err}") from err
    for name, label in (("train", "training"), ("val", "validation")):
        if len(splits[name]) < config.ctx_len + 1:
            raise ValueError(
                f"the {label} split of {config.corpus} has {len(splits[name]):,} bytes, too few "
                f"for windows of ctx_len {config.ctx_len} (each needs {config.ctx_len + 1}); "
                "use a smaller ctx_len (--ctx-len) or a larger corpus")
    return splits


def _nonfinite_weights(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]


def train(config: TrainConfig, resume: bool = False, stop_after: int | None = None,
          init_from: str | Path | None = None) -> dict:
    """Train (or with `resume`, continue from out_dir/ckpt.pt) and return the final metrics
    and the paths written. `stop_after` ends this call after that many steps, with a
    checkpoint, so a long run can be split over several calls. `init_from` starts a new run
    from the weights of that checkpoint (fine-tuning) instead of a fresh initialization.

    When there are no steps to take (max_steps 0, or a checkpoint already at max_steps),
    nothing is written, and the result says so: {"nothing_to_do": True, ...}.

    Started by torchrun, every process runs this with the same config and trains its share
    of each batch with DistributedDataParallel (see rwkv_lib.distributed); rank 0 writes."""
    check_config(config)
    with distributed.start(config.device, config.batch_size, config.dist_backend) as ctx, \
            _deterministic_when_compiled(config):
        try:
            return _train(config, ctx, resume, stop_after, init_from)
        except TrainingDiverged:
            ctx.barrier()  # all ranks stop at the same step, after rank 0 has written its files
            raise


def _train(config: TrainConfig, ctx: distributed.Context, resume: bool,
           stop_after: int | None, init_from: str | Path | None) -> dict:
    t_start = time.perf_counter()
    check_config(config)
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1 (the steps to take in this call), got "
                         f"{stop_after}")
    if resume and init_from is not None:
        raise ValueError("resume continues the run in out_dir, init_from starts a new run "
                         "from a checkpoint's weights: pass one of them")
    out_dir = Path(config.out_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    _check_out_dir(out_dir)
    device = resolve_device(config.device) if ctx.device is None else ctx.device

    # --- what to start from, checked before the data is read ---
    ckpt, init, step = None, None, 0
    if resume:
        ckpt = load_resumable(ckpt_path)  # on CPU: RNG states must stay there
        check_compatible(ckpt, config)
        step = ckpt["step"]
    end = config.max_steps if stop_after is None else min(config.max_steps, step + stop_after)
    if end <= step:
        if resume:
            why = (f"the checkpoint {ckpt_path} is already at step {step} of max_steps "
                   f"{config.max_steps}; give a larger max_steps to train further")
        else:
            why = "max_steps is 0"
        print(f"nothing to do: {why}. Nothing was written.")
        return {"nothing_to_do": True, "step": step, "out_dir": str(out_dir),
                "checkpoint": str(ckpt_path) if resume else None,
                "seconds": time.perf_counter() - t_start, "train_tokens_per_second": 0.0}
    if init_from is not None:
        init = load_checkpoint(init_from)
        check_compatible(init, config)

    autocast = _autocast(config, device)
    if config.dtype == "bf16" and device.type != "cuda":
        print(f"note: bf16 autocast is used on CUDA only; training in float32 on {device}")

    # --- data: the whole corpus for the vocabulary, the train split for windows ---
    data = load_corpus(config.corpus, data_dir=config.data_dir)
    corpus_record = {"name": config.corpus, "bytes": len(data)}
    stdlib_metadata = read_metadata(data.filename)  # None unless it is the stdlib corpus
    if stdlib_metadata is not None:
        corpus_record.update(stdlib_metadata)
    vocab = ByteVocab.from_data(data)
    if init is not None:
        vocab = _vocab_for_init(init, vocab, config)
    if ckpt is not None:
        check_compatible(ckpt, config, vocab)
    splits = _splits(data, config)
    train_set = WindowDataset(splits["train"], config.ctx_len, config.max_steps * config.batch_size,
                              seed=config.seed, vocab=vocab)
    val_set = WindowDataset(splits["val"], config.ctx_len, config.eval_iters * config.batch_size,
                            seed=EVAL_SEED, vocab=vocab)
    val_batches = list(DataLoader(val_set, batch_size=config.batch_size // ctx.world_size,
                                  sampler=ctx.windows(0, config.eval_iters, config.batch_size)))
    unigram = unigram_entropy_bits(splits["val"])

    # --- model and optimizer, fresh, from given weights, or from the checkpoint ---
    torch.manual_seed(config.seed)
    model_config = RWKVConfig(vocab_size=vocab.size, n_layer=config.n_layer,
                              n_embd=config.n_embd, ctx_len=config.ctx_len,
                              wkv_backend=config.wkv_backend)
    model = RWKV(model_config).to(device)
    optimizer = make_optimizer(model, config)
    metrics = {"config": dataclasses.asdict(config), "corpus": corpus_record,
               "vocab_size": vocab.size, "unigram_entropy_bits": unigram, "train": [], "val": []}
    if init is not None:
        model.load_state_dict(init["model"])
        metrics["init_from"] = {"path": str(init_from), "step": init["step"]}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        try:
            load_optimizer_state(optimizer, ckpt["optimizer"])
        except ValueError as err:  # other parameter groups: an older rwkv_lib wrote it
            raise CheckpointError(
                f"{ckpt_path}: its optimizer state does not fit this rwkv_lib's parameter "
                f"groups ({err}); start a new run from its weights with --init-from "
                f"{ckpt_path}") from err
        saved = ckpt["metrics"]
        metrics["train"], metrics["val"] = saved.get("train", []), saved.get("val", [])
        if "init_from" in saved:
            metrics["init_from"] = saved["init_from"]
        restore_rng_state(ckpt["rng_state"])

    # Everything is checked: from here on the run writes, and only into out_dir.
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temps(out_dir, RUN_FILES)
        if stale:
            print(f"removed {len(stale)} temporary file(s) left by an interrupted write: "
                  + ", ".join(p.name for p in stale))
        write_text_atomically(out_dir / "config.json",
                              json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    runner = ctx.wrap(model)  # DistributedDataParallel under torchrun, else the model itself
    if will_compile(config, device):
        from .extension import load_wkv_extension

        if config.wkv_backend in ("auto", "cpp", "cuda"):
            with contextlib.suppress(Exception):  # "auto" falls back when it cannot build
                load_wkv_extension()  # the compiled graph calls the ops: register them first
        runner = torch.compile(runner)
    n_params = sum(p.numel() for p in model.parameters())
    if stdlib_metadata is not None:
        print(describe(stdlib_metadata))
    print(f"{config.corpus}: {len(data):,} bytes, vocabulary {vocab.size}, unigram entropy "
          f"of the validation split {unigram:.3f} bits per byte")
    start = f", resuming at step {step}" if resume else ""
    if init is not None:
        start = f", starting from the weights of {init_from}"
    print(f"model L{config.n_layer} C{config.n_embd}: {n_params:,} parameters on {device}"
          + start)

    loader = DataLoader(train_set, batch_size=config.batch_size // ctx.world_size,
                        sampler=ctx.windows(step, end, config.batch_size),
                        num_workers=config.num_workers, pin_memory=device.type == "cuda")
    tokens_per_step = config.batch_size * config.ctx_len

    saved_step = step if resume else None
    saved_at = _clock()  # the start counts as a save for checkpoint_minutes

    def write_metrics() -> None:
        if not ctx.is_main:
            return
        # allow_nan=False: the file stays valid JSON (nan is not); no record is ever nan
        write_text_atomically(out_dir / "metrics.json",
                              json.dumps(metrics, indent=1, allow_nan=False) + "\n")

    def diverged(what: str) -> TrainingDiverged:
        bar.close()
        write_metrics()
        last = "no checkpoint was written yet"
        if saved_step is not None:
            last = f"the last good checkpoint is {ckpt_path} (step {saved_step}), kept as it was"
        return TrainingDiverged(f"{what}. {last}. Try a lower lr_init, grad_clip 1.0, or dtype "
                                "float32.")

    def checkpoint() -> None:
        # Written only if it is good: finite weights that give a finite loss on a validation
        # batch (weights can be finite, yet so large that the next forward pass overflows).
        nonlocal saved_step, saved_at
        broken = _nonfinite_weights(model)  # the same on every rank: the weights are
        if broken:
            named = ", ".join(broken[:3]) + (", ..." if len(broken) > 3 else "")
            raise diverged(
                f"after {step} steps the weights are not finite (nan or inf in {named}), "
                f"although the last training loss was {loss_value:.4g}; no checkpoint was "
                f"written at step {step}")
        # every rank runs the probe (DDP's forward is collective), on its share of the batch
        probe = ctx.mean(estimate_loss(runner, val_batches[:1], device, autocast))
        if not math.isfinite(probe):
            raise diverged(f"after {step} steps the weights give a validation loss of {probe}; "
                           f"no checkpoint was written at step {step}")
        if ctx.is_main:  # `model`, not the DDP wrapper: RWKV-LM's names, no "module."
            save_checkpoint(ckpt_path, model=model, optimizer=optimizer, step=step,
                            train_config=config, vocab=vocab,
                            data_position=step * config.batch_size, metrics=metrics)
        saved_step, saved_at = step, _clock()

    def checkpoint_due() -> bool:
        if config.checkpoint_interval and step % config.checkpoint_interval == 0:
            return True
        if not config.checkpoint_minutes:
            return False
        late = ctx.is_main and _clock() - saved_at >= 60 * config.checkpoint_minutes
        # rank 0's clock decides for every rank: checkpoint() holds collective operations
        return ctx.mean(float(late)) > 0

    def evaluate() -> float:
        val_loss = ctx.mean(estimate_loss(runner, val_batches, device, autocast))
        if not math.isfinite(val_loss):
            raise diverged(f"the validation loss is {val_loss} after {step} steps: the weights "
                           "no longer give finite numbers")
        metrics["val"].append({"step": step, "tokens": step * tokens_per_step,
                               "loss": val_loss, "bpb": val_loss / math.log(2)})
        return val_loss

    def report(line: str) -> None:
        (bar.write if config.progress else print)(line)

    # This call's steps, from `step` (where a resumed run stands) to `end`: tqdm's rate, hence
    # its ETA, counts only the steps made since `initial`, and ends where this call ends.
    bar = tqdm(total=end, initial=step, disable=not config.progress,
               unit="step", dynamic_ncols=True)
    if step == 0 and not metrics["val"]:
        # The untrained model, the curve's first point: about log2(vocabulary size).
        report(f"step      0 | val {evaluate() / math.log(2):.3f} bpb")
    recent: list[float] = []  # losses since the last log line
    since_eval: list[float] = []  # losses since the last evaluation
    first_step, train_time = step, 0.0
    model.train()
    for x, y in loader:
        t0 = time.perf_counter()
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            logits = runner(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss = l2wrap(loss, logits)
        loss_value = ctx.mean(loss.item())  # the same on every rank: all stop together
        if not math.isfinite(loss_value):
            raise diverged(f"the training loss is {loss_value} at step {step}; stopped before "
                           "updating the weights")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        step += 1
        train_time += time.perf_counter() - t0
        bar.update(1)
        recent.append(loss_value)
        since_eval.append(loss_value)

        if step % config.log_interval == 0 or step == end:
            mean = sum(recent) / len(recent)
            metrics["train"].append({"step": step, "tokens": step * tokens_per_step,
                                     "loss": mean, "bpb": mean / math.log(2), "lr": lr})
            recent = []
            tok_s = (step - first_step) * tokens_per_step / max(train_time, 1e-9)
            bar.set_postfix(bpb=f"{mean / math.log(2):.3f}", lr=f"{lr:.2e}",
                            tok_s=f"{tok_s:,.0f}", refresh=False)
        if step % config.eval_interval == 0 or step == end:
            val_bpb = evaluate() / math.log(2)
            train_bpb = sum(since_eval) / len(since_eval) / math.log(2)
            since_eval = []
            report(f"step {step:6d} | train {train_bpb:.3f} bpb | val {val_bpb:.3f} bpb | "
                   f"lr {lr:.2e}")
            write_metrics()
        if checkpoint_due() or step == end:
            checkpoint()
    bar.close()

    final = {
        "step": step,
        "tokens": step * tokens_per_step,
        "train_loss": metrics["train"][-1]["loss"] if metrics["train"] else None,
        "val_loss": metrics["val"][-1]["loss"],
        "val_bpb": metrics["val"][-1]["bpb"],
        "unigram_entropy_bits": unigram,
        "seconds": time.perf_counter() - t_start,  # everything: data, evaluation, saving
        "train_tokens_per_second": (step - first_step) * tokens_per_step / max(train_time, 1e-9),
    }
    # Rank 0 alone reads the test split, with the plain model (no collective operations), so
    # the other ranks neither wait for it nor repeat it; they finish as they always do.
    if config.test_eval and step == config.max_steps and ctx.is_main:
        report(f"reading the test split ({len(splits['test']):,} bytes) in order, the state "
               "carried, and compressing it with xz -9e")
        metrics["test"] = final["test"] = _evaluate_test(model, vocab, splits["test"], config)
        final["seconds"] = time.perf_counter() - t_start  # the test split included
    metrics["final"] = final
    write_metrics()
    if ctx.is_main:
        save_loss_plot(metrics, out_dir / "loss.png")
    print(f"step {step}: validation {final['val_bpb']:.3f} bits per byte, unigram entropy "
          f"{unigram:.3f}; wrote {ckpt_path}")
    if "test" in final:
        t = final["test"]
        print(f"test split, {t['bytes']:,} bytes: model {t['bpb']:.3f} bits per byte (read in "
              f"order, state carried) | xz -9e {t['xz_bpb']:.3f} | unigram entropy "
              f"{t['unigram_entropy_bits']:.3f}")
    paths = {name: str(out_dir / name) for name in RUN_FILES}
    return {**final, "nothing_to_do": False, "out_dir": str(out_dir),
            "checkpoint": paths["ckpt.pt"],
            "config_path": paths["config.json"], "metrics_path": paths["metrics.json"],
            "plot_path": paths["loss.png"]}


def _evaluate_test(model: RWKV, vocab: ByteVocab, test_bytes, config: TrainConfig) -> dict:
    """The whole test split, and what xz -9e and the unigram entropy make of the same bytes."""
    # as many streams as the split allows, up to TEST_STREAMS (a tiny corpus has few bytes)
    streams = max(1, min(TEST_STREAMS, (len(test_bytes) - 1) // 2))
    scored = evaluate_bpb(model, vocab.encode(test_bytes), chunk_len=1024, batch_size=streams,
                          progress=config.progress)
    # xz takes seconds a megabyte: cached in the data folder, by the bytes' sha256
    cache = Path(config.data_dir) if config.data_dir is not None else DATA_DIR
    try:
        baselines = compression_baselines(test_bytes, cache_dir=cache)
    except OSError:  # a read-only data folder: the numbers, without keeping them
        baselines = compression_baselines(test_bytes)
    return {"bpb": scored["bpb"], "loss": scored["loss"], "predicted": scored["predicted"],
            "streams": scored["streams"], "bytes": baselines["bytes"],
            "xz_bpb": baselines["xz_bpb"], "xz_bytes": baselines["xz_bytes"],
            "unigram_entropy_bits": baselines["unigram_entropy_bits"],
            "bpb_over_xz": scored["bpb"] / baselines["xz_bpb"]}


# --- command line: one option per TrainConfig field, generated from the dataclass ---

def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_compile(text: str) -> bool | str:
    if text.lower() == "auto":
        return "auto"
    try:
        return _parse_bool(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected true, false or auto, got {text!r}") from None


_parse_compile.__name__ = "true, false or auto"


def _converter(hint: typing.Any) -> typing.Callable[[str], typing.Any]:
    """str -> value for a field's type; `X | None` also accepts "none"."""
    args = typing.get_args(hint)
    if hint == bool | str:  # compile: true, false or auto
        return _parse_compile
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = _converter(next(a for a in args if a is not type(None)))

        def optional(text: str) -> typing.Any:
            return None if text.lower() in ("none", "null") else inner(text)

        optional.__name__ = f"{inner.__name__} or none"  # argparse names it in errors
        return optional
    if hint is bool:
        return _parse_bool
    return hint


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m rwkv_lib.train",
        description="Train RWKV-4 on bytes. Start from a preset, override any field.",
        epilog="Fields may be written --max_steps or --max-steps. Booleans take true/false; "
               "optional numbers take none; --betas takes two numbers.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="starting configuration (default: ci, or the checkpoint's own "
                             "configuration with --resume)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out-dir from its ckpt.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh even if --out-dir already holds a checkpoint")
    parser.add_argument("--stop-after", type=cli.positive_int, default=None,
                        help="stop (with a checkpoint) after this many steps in this call")
    parser.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                        help="start a new run (step 0, fresh optimizer) from the weights of "
                             "this checkpoint, e.g. one made by python -m rwkv_lib.checkpoint "
                             "import; n_layer and n_embd default to the checkpoint's")
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name == "preset":
            continue
        hint = hints[field.name]
        flags = sorted({f"--{field.name}", f"--{field.name.replace('_', '-')}"})
        kwargs: dict[str, typing.Any] = {"dest": field.name, "default": argparse.SUPPRESS}
        if typing.get_origin(hint) is tuple:
            item_types = typing.get_args(hint)
            kwargs.update(nargs=len(item_types), type=item_types[0], metavar=field.name.upper())
        else:
            kwargs["type"] = _converter(hint)
        if field.name in CHOICES:
            kwargs["choices"] = CHOICES[field.name]
        kwargs["help"] = f"ci preset: {field.default!r}"
        parser.add_argument(*flags, **kwargs)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    distributed.silence_other_ranks()  # under torchrun, what rank 0 prints is enough
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    preset, resume = args.pop("preset"), args.pop("resume")
    overwrite, stop_after = args.pop("overwrite"), args.pop("stop_after")
    init_from = args.pop("init_from")
    if resume and overwrite:
        parser.error("--resume continues the run in --out-dir and --overwrite starts it "
                     "afresh: pass one of them")
    if resume and init_from is not None:
        parser.error("--init-from starts a new run from a checkpoint's weights and --resume "
                     "continues the run in --out-dir: pass one of them")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    out_dir = Path(overrides.get("out_dir", PRESETS[preset or "ci"].out_dir))
    ckpt_path = out_dir / CHECKPOINT_NAME
    if resume and preset is None:
        # Resume what was run, not the default preset: the checkpoint knows its config.
        base = config_from_dict(load_resumable(ckpt_path)["train_config"])
    else:
        base = PRESETS[preset or "ci"]
        if ckpt_path.exists() and not (resume or overwrite):
            parser.error(f"{ckpt_path} exists: pass --resume to continue that run, "
                         f"--overwrite to start afresh, or choose another --out-dir")
    if init_from is not None:  # the model's shape is the checkpoint's unless given
        shape = load_checkpoint(init_from)["model_config"]
        base = dataclasses.replace(base, n_layer=shape["n_layer"], n_embd=shape["n_embd"])
    config = dataclasses.replace(base, **overrides)
    try:
        check_config(config)
    except ValueError as err:
        parser.error(str(err))
    if overrides:
        print("overrides: " + ", ".join(f"{k}={v!r}" for k, v in overrides.items()))
    print("config: " + json.dumps(dataclasses.asdict(config)))
    result = train(config, resume=resume, stop_after=stop_after, init_from=init_from)
    if not result["nothing_to_do"]:
        print(f"done in {result['seconds']:.1f} s "
              f"({result['train_tokens_per_second']:,.0f} tokens/s while training)")
    return result


if __name__ == "__main__":
    # A mistake (a bad value, a missing file, a diverged run...) is one line, not a traceback.
    raise SystemExit(cli.run(main, sys.argv[1:]))
