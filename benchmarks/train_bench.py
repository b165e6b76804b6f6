"""Training-step throughput of the enwik8 preset, ours beside RWKV-LM's v4 model.

    python benchmarks/train_bench.py --rwkv-lm .peers/RWKV-LM        # needs a CUDA GPU
    python benchmarks/train_bench.py --device cpu --n-layer 1 --n-embd 32 --ctx-len 16 \\
        --batch-size 2 --steps 2 --warmup 1 --results-dir dry-run   # dry run of the script

The model and step are those of `rwkv_lib.train` with the `enwik8` preset: L12-C512,
ctx 1024, batch 12, bfloat16 autocast, Adam (AdamW without decay), L2Wrap, gradient
clipping at 1.0, `loss.item()` every step. The vocabulary is 256 bytes (enwik8 itself is
not needed: the tokens are random, and data loading is not timed). Each of our rows uses
one WKV kernel (RWKV_WKV_CUDA). RWKV-LM's row is its RWKV-v4/src/model.py GPT with its
own CUDA kernel and its own optimizer choice (DeepSpeed's FusedAdam if installed, else
torch.optim.Adam), the same weights (ours, loaded by name), the same batches, the same
step (autocast, as its Lightning trainer's precision='bf16' does; clipping at 1.0) and
the TF32 setting of its train.py. Its trainer itself needs pytorch_lightning.lite, which
Lightning 2 dropped, so it is not used.

Model FLOPs utilization = tokens/s x FLOP per token / peak, with FLOP per token = 6 x
parameters (every parameter, the embedding included) + the WKV's share (WKV_FLOPS per
token, layer and channel), against the device's dense bf16 peak from its datasheet and
against an 8192^3 bf16 matrix product measured here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import device_info, matmul_rate  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s): NVIDIA's datasheets give them "with sparsity",
# twice the dense rate; the first name found in the device name wins.
PEAK_BF16_DENSE = [
    ("H200 NVL", 835.5, "NVIDIA H200 NVL datasheet: 1,671 TFLOPS bf16 with sparsity, halved"),
    ("H200", 989.5, "NVIDIA H200 SXM datasheet: 1,979 TFLOPS bf16 with sparsity, halved"),
    ("H100 NVL", 835.5, "NVIDIA H100 NVL datasheet: 1,671 TFLOPS bf16 with sparsity, halved"),
    ("H100 PCIe", 756.5, "NVIDIA H100 PCIe datasheet: 1,513 TFLOPS bf16 with sparsity, halved"),
    ("H100", 989.5, "NVIDIA H100 SXM datasheet: 1,979 TFLOPS bf16 with sparsity, halved"),
    ("A100", 312.0, "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense"),
]
# WKV FLOP per (token, layer, channel), forward + backward, counting an exp as one: about
# 20 in the forward step and 60 in the backward (which recomputes the state), from
# cuda/wkv_math.h. Next to 6 x parameters per token it is a fraction of a percent.
WKV_FLOPS = 80
VOCAB = 256


def peak_bf16(name: str) -> tuple[float | None, str | None]:
    for key, tflops, source in PEAK_BF16_DENSE:
        if key in name:
            return tflops * 1e12, source
    return None, None


def batches(n: int, batch_size: int, ctx_len: int, device: str) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, VOCAB, (batch_size, ctx_len + 1), generator=g)
        out.append((tokens[:, :-1].to(device), tokens[:, 1:].to(device)))
    return out


def time_steps(step, data: list[tuple], warmup: int, steps: int, device: str) -> dict:
    """Run warmup + steps training steps; the timed ones after a synchronization."""
    first_loss = None
    for i in range(warmup):
        loss = step(*data[i % len(data)])
        first_loss = loss if first_loss is None else first_loss
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        step(*data[(warmup + i) % len(data)])
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    x = data[0][0]
    return {"step_ms": seconds / steps * 1e3,
            "tokens_per_s": steps * x.numel() / seconds,
            "first_loss": first_loss,
            "max_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                               if device == "cuda" else None)}


def autocast(config, device: str):
    from rwkv_lib.train import _autocast

    return _autocast(config, torch.device(device))


def our_run(config, data, weights, kernel: str, args) -> dict:
    """Our model and rwkv_lib.train's step, with one WKV kernel."""
    from rwkv_lib.l2wrap import l2wrap
    from rwkv_lib.model import RWKV, RWKVConfig
    from rwkv_lib.train import make_optimizer

    os.environ["RWKV_WKV_CUDA"] = kernel
    os.environ.pop("RWKV_WKV_CUDA_CHUNKS", None)
    backend = "cuda" if args.device == "cuda" else "cpp"
    model = RWKV(RWKVConfig(vocab_size=VOCAB, n_layer=config.n_layer, n_embd=config.n_embd,
                            ctx_len=config.ctx_len, wkv_backend=backend))
    model.load_state_dict(weights)
    model = model.to(args.device).train()
    optimizer = make_optimizer(model, config)
    amp = autocast(config, args.device)

    def step(x, y) -> float:  # as rwkv_lib.train's loop
        with amp:
            logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        return _update(l2wrap(loss, logits), model, optimizer, config.grad_clip)

    result = time_steps(step, data, args.warmup, args.steps, args.device)
    return {"model": "ours", "kernel": kernel, **result,
            "optimizer": type(optimizer).__name__}


def _update(loss: torch.Tensor, model: torch.nn.Module, optimizer, grad_clip: float | None
            ) -> float:
    """Backward, clipping and the optimizer step, the same for both models; the loss."""
    value = loss.item()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return value


def rwkv_lm_run(config, data, weights, args) -> dict:
    """RWKV-LM's v4 GPT with its kernel, our weights and batches, the same step."""
    from rwkv_lm import import_model

    module = import_model(args.rwkv_lm, "bf16" if config.dtype == "bf16" else "fp32")
    # RWKV-v4/train.py: TF32 for every mode but fp32 (its trainer sets the same)
    torch.backends.cuda.matmul.allow_tf32 = config.dtype == "bf16"
    torch.backends.cudnn.allow_tf32 = config.dtype == "bf16"
    model = module.GPT(module.GPTConfig(VOCAB, config.ctx_len, model_type="RWKV",
                                        n_layer=config.n_layer, n_embd=config.n_embd))
    model.load_state_dict(weights)  # strict: the parameter names are the same
    model = model.to(args.device).train()
    optimizer = model.configure_optimizers(types.SimpleNamespace(
        learning_rate=config.lr_init, betas=config.betas, eps=config.eps))
    amp = autocast(config, args.device)

    def step(x, y) -> float:
        with amp:
            loss = model(x, y)  # cross-entropy through its L2Wrap
        return _update(loss, model, optimizer, config.grad_clip)

    try:
        result = time_steps(step, data, args.warmup, args.steps, args.device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False  # back to PyTorch's default
        torch.backends.cudnn.allow_tf32 = True
    return {"model": "RWKV-LM v4", "kernel": "RWKV-LM", **result,
            "optimizer": type(optimizer).__name__}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rwkv-lm", metavar="PATH", default=None,
                        help="an RWKV-LM checkout (a folder holding RWKV-v4/) to compare with")
    parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--kernels", default="sequential,chunked",
                        help="our WKV kernels to run with (RWKV_WKV_CUDA values)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a dry run of this script (use small --n-layer etc.)")
    for name in ("n_layer", "n_embd", "ctx_len", "batch_size"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"override the enwik8 preset's {name}")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU is visible; this benchmark needs one "
                         "(--device cpu runs it as a dry run)")
    from rwkv_lib.gpu_results import device_slug, train_table, update_results
    from rwkv_lib.model import RWKV, RWKVConfig
    from rwkv_lib.train import get_config

    overrides = {k: getattr(args, k) for k in ("n_layer", "n_embd", "ctx_len", "batch_size")
                 if getattr(args, k) is not None}
    config = get_config("enwik8", **overrides)
    info = device_info(args.device)
    print(", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    torch.manual_seed(config.seed)
    reference = RWKV(RWKVConfig(vocab_size=VOCAB, n_layer=config.n_layer, n_embd=config.n_embd,
                                ctx_len=config.ctx_len))
    weights = {k: v.clone() for k, v in reference.state_dict().items()}
    n_params = sum(p.numel() for p in reference.parameters())
    del reference
    data = batches(4, config.batch_size, config.ctx_len, args.device)
    flops_per_token = 6 * n_params + WKV_FLOPS * config.n_layer * config.n_embd
    peak, peak_source = peak_bf16(info["gpu"]) if args.device == "cuda" else (None, None)
    measured = matmul_rate(args.device) if args.device == "cuda" else None
    print(f"L{config.n_layer}-C{config.n_embd}, ctx {config.ctx_len}, batch {config.batch_size},"
          f" {config.dtype}: {n_params:,} parameters, {flops_per_token / 1e6:.1f} MFLOP/token; "
          f"peak {peak and peak / 1e12} TFLOP/s ({peak_source}); measured bf16 matmul "
          f"{measured and round(measured / 1e12, 1)} TFLOP/s", flush=True)

    rows = []
    for kernel in [k for k in args.kernels.split(",") if k]:
        rows.append(our_run(config, data, weights, kernel, args))
        print(rows[-1], flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    rwkv_error = None
    if args.rwkv_lm and args.device == "cuda":
        try:
            rows.append(rwkv_lm_run(config, data, weights, args))
            print(rows[-1], flush=True)
        except Exception as err:  # report why, keep our rows
            rwkv_error = f"{type(err).__name__}: {err}"
            print(f"RWKV-LM's model did not run: {rwkv_error}", flush=True)
    for r in rows:
        achieved = r["tokens_per_s"] * flops_per_token
        r["mfu_datasheet"] = achieved / peak if peak else None
        r["mfu_measured"] = achieved / measured if measured else None

    data_out = {
        "config": {"preset": "enwik8", "n_layer": config.n_layer, "n_embd": config.n_embd,
                   "ctx_len": config.ctx_len, "batch_size": config.batch_size,
                   "dtype": config.dtype, "vocab_size": VOCAB, "grad_clip": config.grad_clip},
        "rows": rows, "parameters": n_params, "flops_per_token": flops_per_token,
        "wkv_flops_per_token_layer_channel": WKV_FLOPS,
        "peak_bf16_flops": peak, "peak_source": peak_source, "measured_bf16_matmul_flops": measured,
        "steps": args.steps, "warmup": args.warmup, "rwkv_lm_error": rwkv_error,
        "rwkv_lm_path": args.rwkv_lm,
    }
    path = update_results(Path(args.results_dir) / f"{device_slug(info['gpu'])}.json", "train",
                          data_out, info)
    print(f"\nwrote {path}\n")
    print(train_table({"device": info, "train": data_out}))
    return data_out


if __name__ == "__main__":
    main()
