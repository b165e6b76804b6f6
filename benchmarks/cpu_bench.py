"""RWKV-4 on the CPU against its peers, side by side in one process: one table.

    python benchmarks/cpu_bench.py --nanogpt PATH           # full run (about 2 minutes)
    python benchmarks/cpu_bench.py --nanogpt PATH --quick   # fewer repetitions (~1 minute)
    python benchmarks/cpu_bench.py --only gen,bw --json out.json

Peers (not dependencies of the project; install them to run this):
- the `rwkv` package (`pip install rwkv`), ChatRWKV's inference engine, strategy
  "cpu fp32", on the very file `rwkv_lib.checkpoint.export_rwkv_lm` writes for our model;
- nanoGPT's model.py, loaded from a checkout of karpathy/nanoGPT given as --nanogpt PATH
  (its GPT class and its AdamW set-up, with a width chosen to match our parameter count).

Rows (sections, for --only):
- gen: RNN-mode generation, ms per token: `rwkv_lib.generate.generate` (greedy, a one-token
  prompt, then N tokens) against the package's forward() loop with the same greedy argmax,
  at L12-C512 and L2-C96; ours also with bfloat16 weight matrices. The logits of both are
  compared first (max abs difference after a few tokens).
- prompt: a 512-token prompt in GPT mode (ours: `model(prompt, return_state=True)`, the
  package: forward() on the token list), then one RNN step from the state it returned.
  Also the prompt's matrix products alone, through torch's BLAS (what both use) and,
  where PyTorch has it, through oneDNN's float32 matmul: each bounds what a float32
  implementation on that library can gain on the package.
- train: training tokens per second of one optimizer step (forward, cross-entropy,
  backward, gradient clipping, AdamW), ours eager and with torch.compile, against nanoGPT
  eager and compiled, at equal parameter counts. Where our products go to oneDNN
  (`rwkv_lib.cpu_matmul`; nanoGPT's stay with the BLAS), ours compiled through the BLAS too.
- opt: one AdamW step on the weights of our L4-C128 and L12-C512 models: torch's
  one-tensor-at-a-time implementation (what nanoGPT's configure_optimizers gets on a CPU,
  and rwkv_lib.train used before) against fused=True (what make_optimizer builds).
- wkv: the C++ WKV operator against the PyTorch recurrence at (4, 256, 512).
- bw: the memory bandwidth of this machine (large copies and a large read), and the share
  of the read bandwidth the L12-C512 generation step achieves: each token reads every
  weight matrix once.

Every ratio is measured in one run, the two sides interleaved (A B A B ...), each time the
median of the repetitions. Threads: torch.set_num_threads(--threads, default 2) for all.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # wkv_bench, beside this file

SECTIONS = ("gen", "prompt", "train", "opt", "wkv", "bw")


def fail(message: str) -> None:
    raise SystemExit(f"cpu_bench: {message}")


def import_peers(need_rwkv: bool, need_nanogpt: bool, nanogpt: str | None):
    PackageRWKV = None
    if need_rwkv:
        try:
            os.environ.setdefault("RWKV_JIT_ON", "1")  # the package's default, TorchScript
            from rwkv.model import RWKV as PackageRWKV
        except ImportError:
            fail("the `rwkv` package is missing (the gen and prompt rows need it); install "
                 "it with `pip install rwkv`")
    gpt_module = None
    if need_nanogpt:
        if nanogpt is None:
            fail("the train rows need nanoGPT: pass --nanogpt PATH, a checkout of "
                 "karpathy/nanoGPT (or leave them out with --only)")
        path = Path(nanogpt) / "model.py"
        if not path.is_file():
            fail(f"no nanoGPT model.py at {path}; --nanogpt must name a nanoGPT checkout")
        spec = importlib.util.spec_from_file_location("nanogpt_model", path)
        gpt_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gpt_module)
    return PackageRWKV, gpt_module


# ---------------------------------------------------------------------------------------
# timing


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def side_by_side(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1
                 ) -> dict[str, float]:
    """Median seconds of each function, run in turns A B C A B C ..."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


# ---------------------------------------------------------------------------------------
# models


def random_rwkv(n_layer: int, n_embd: int, vocab_size: int, seed: int = 0):
    """An RWKV with random weights of a trained model's scale (the init zeroes several
    matrices, which would make the logit comparison weak)."""
    from rwkv_lib.model import RWKV, RWKVConfig

    torch.manual_seed(seed)
    model = RWKV(RWKVConfig(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.5 / math.sqrt(p.shape[1]))
    return model.eval()


def exported_pair(n_layer: int, n_embd: int, vocab_size: int, PackageRWKV, tmp: Path):
    """Our model and the package's, both loaded from one file written by export_rwkv_lm."""
    from rwkv_lib.checkpoint import export_rwkv_lm, import_rwkv_lm, save_checkpoint
    from rwkv_lib.data import ByteVocab

    model = random_rwkv(n_layer, n_embd, vocab_size)
    vocab = ByteVocab.from_data(np.arange(vocab_size, dtype=np.uint8))
    tmp = Path(tempfile.mkdtemp(dir=tmp))  # a folder per call: two rows may use one shape
    ckpt = tmp / f"L{n_layer}-C{n_embd}.pt"
    save_checkpoint(ckpt, model=model, optimizer=None, step=0, train_config={}, vocab=vocab)
    pth = export_rwkv_lm(ckpt, tmp / f"L{n_layer}-C{n_embd}.pth")
    ours = import_rwkv_lm(pth)
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints as it loads
        theirs = PackageRWKV(str(pth)[:-len(".pth")], "cpu fp32", verbose=False)
    return ours, theirs


def bytes_read_per_token(model) -> int:
    """Every weight once, except the embedding, of which one row is read."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.emb.weight
    return total - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


# ---------------------------------------------------------------------------------------
# sections


def bench_bandwidth(args) -> dict:
    n = (64 if args.quick else 256) * 2**20 // 4  # floats in the buffers
    x, y = torch.ones(n), torch.empty(n)
    xn, yn = np.ones(n, np.float32), np.empty(n, np.float32)
    t = side_by_side({"copy": lambda: y.copy_(x), "numpy": lambda: np.copyto(yn, xn),
                      "read": lambda: x.sum()}, reps=args.reps_small, warmup=2)
    return {"torch_copy_GBps": 2 * 4 * n / t["copy"] / 1e9,
            "numpy_copy_GBps": 2 * 4 * n / t["numpy"] / 1e9,
            "torch_read_GBps": 4 * n / t["read"] / 1e9}


def check_logits(ours, theirs, tokens: list[int]) -> float:
    """Max |logit difference| after each of `tokens`, ours (RNN steps) vs the package."""
    worst = 0.0
    state, pstate = ours.init_state(1), None
    with torch.no_grad():
        for t in tokens:
            logits = ours.step_(torch.tensor([t]), state)
            plogits, pstate = theirs.forward([t], pstate)
            worst = max(worst, (logits[0] - plogits.float()).abs().max().item())
    return worst


def same_logits(diff: float, what: str, tolerance: float = 1e-3) -> None:
    """Timing two implementations is only fair if they compute the same thing."""
    if not diff <= tolerance:
        fail(f"{what}: our logits and the rwkv package's differ by {diff:.3g} "
             f"(more than {tolerance}); the comparison would not be of the same model")


def bench_generation(args, PackageRWKV, tmp: Path) -> list[dict]:
    sizes = ((12, 512, 16 if args.quick else 48), (2, 96, 128 if args.quick else 512))
    return [generation_row(args, PackageRWKV, tmp, *size) for size in sizes]


def generation_row(args, PackageRWKV, tmp: Path, n_layer: int, n_embd: int,
                   tokens: int) -> dict:
    from rwkv_lib.generate import generate

    ours, theirs = exported_pair(n_layer, n_embd, args.vocab, PackageRWKV, tmp)
    diff = check_logits(ours, theirs, [1, 7, 42, 3, 200 % args.vocab])
    same_logits(diff, f"L{n_layer}-C{n_embd} RNN steps")

    def package_generate():  # the same loop: greedy, a one-token prompt
        out, state = theirs.forward([1], None)
        for _ in range(tokens):
            out, state = theirs.forward([int(out.argmax())], state)

    t = side_by_side({
        "ours": lambda: generate(ours, [1], tokens, temperature=0),
        "ours_bf16": lambda: generate(ours, [1], tokens, temperature=0,
                                      weights_dtype=torch.bfloat16),
        "rwkv_pkg": package_generate,
    }, reps=args.reps)
    ms = {k: v * 1e3 / tokens for k, v in t.items()}
    return {"model": f"L{n_layer}-C{n_embd}", "tokens": tokens, "max_logit_diff": diff,
            "bf16_max_logit_diff": bf16_logit_diff(ours),
            **{f"{k}_ms": v for k, v in ms.items()},
            "bytes_per_token": bytes_read_per_token(ours)}


def bf16_logit_diff(model, n: int = 8) -> float:
    from rwkv_lib.rnn_step import RNNStepper

    bf16 = RNNStepper(model, torch.bfloat16)
    s32, s16 = model.init_state(1), model.init_state(1)
    worst = 0.0
    with torch.no_grad():
        for t in range(n):
            token = torch.tensor([(7 * t + 1) % model.config.vocab_size])
            worst = max(worst, (model.step_(token, s32) - bf16(token, s16)).abs().max().item())
    return worst


def bench_prompt(args, PackageRWKV, tmp: Path) -> dict:
    from rwkv_lib import cpu_matmul

    ours, theirs = exported_pair(12, 512, args.vocab, PackageRWKV, tmp)
    prompt = torch.randint(0, args.vocab, (512,), generator=torch.Generator().manual_seed(0))
    ids = prompt.tolist()

    def ours_prompt():
        with torch.no_grad():
            return ours(prompt.reshape(1, -1), return_state=True)

    def ours_with_blas():
        with matmul_library("blas"):
            return ours_prompt()

    # the matrix products alone, the same for any float32 implementation on this BLAS:
    # what is left of the package's time beyond them bounds the ratio anyone can reach
    x = torch.randn(512, 512)
    mats = [p for name, p in ours.named_parameters() if name.startswith("blocks.")
            and p.dim() == 2]  # the head: only the last row needs it

    def products_with(linear):
        def products():
            with torch.no_grad():
                for w in mats:
                    linear(x if w.shape[1] == 512 else h, w)
        return products

    h = torch.randn(512, 2048)
    library = cpu_matmul.library()
    fns = {"ours": ours_prompt, "rwkv_pkg": lambda: theirs.forward(ids, None),
           "products": products_with(F.linear)}
    if library == "onednn":  # what the choice gains, beside it
        fns["ours_blas"] = ours_with_blas
    if cpu_matmul.onednn_works():
        # the same products through oneDNN's float32 matmul instead of the BLAS torch calls
        # (MKL in PyPI's x86 builds): how much the bound depends on the library, here
        fns["products_onednn"] = products_with(cpu_matmul.onednn_linear)
    t = side_by_side(fns, reps=max(3, args.reps // 2))
    # the state handed over to RNN mode: the next token's logits agree
    logits, state = ours_prompt()
    plogits, pstate = theirs.forward(ids, None)
    diff = (logits[0, -1] - plogits).abs().max().item()
    with torch.no_grad():
        nxt = ours.step_(torch.tensor([5]), state)
    pnxt, _ = theirs.forward([5], pstate)
    diff = max(diff, (nxt[0] - pnxt).abs().max().item())
    same_logits(diff, "the 512-token prompt")
    out = {"model": "L12-C512", "tokens": 512, "max_logit_diff": diff, "matmul": library,
           "ours_ms": t["ours"] * 1e3, "rwkv_pkg_ms": t["rwkv_pkg"] * 1e3,
           "products_only_ms": t["products"] * 1e3}
    for key in ("ours_blas", "products_onednn"):
        if key in t:
            out[f"{key}_ms"] = t[key] * 1e3
    return out


@contextlib.contextmanager
def matmul_library(name: str):
    """RWKV_CPU_MATMUL=name for the duration (rwkv_lib.cpu_matmul reads it at each call)."""
    before = os.environ.get("RWKV_CPU_MATMUL")
    os.environ["RWKV_CPU_MATMUL"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["RWKV_CPU_MATMUL"]
        else:
            os.environ["RWKV_CPU_MATMUL"] = before


def gpt_width_for(params: int, n_layer: int, n_head: int, vocab: int, ctx: int, gpt) -> int:
    """The nanoGPT n_embd (a multiple of n_head) whose parameter count is nearest."""
    def count(c: int) -> int:
        cfg = gpt.GPTConfig(block_size=ctx, vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                            n_embd=c, dropout=0.0, bias=True)
        with contextlib.redirect_stdout(io.StringIO()):
            return sum(p.numel() for p in gpt.GPT(cfg).parameters())
    guess = int(math.sqrt(params / (12 * n_layer)))
    widths = range(max(n_head, (guess - 16) // n_head * n_head), guess + 17, n_head)
    return min(widths, key=lambda c: abs(count(c) - params))


def bench_training(args, gpt) -> dict:
    from rwkv_lib import cpu_matmul
    from rwkv_lib.extension import load_wkv_extension
    from rwkv_lib.l2wrap import l2wrap
    from rwkv_lib.train import TrainConfig, make_optimizer

    load_wkv_extension()  # the compiled graph calls the registered ops
    L, C, ctx, batch = 4, 128, 64, 12
    rwkv = random_rwkv(L, C, args.vocab).train()
    n_rwkv = sum(p.numel() for p in rwkv.parameters())
    width = gpt_width_for(n_rwkv, L, 4, args.vocab, ctx, gpt)
    cfg = gpt.GPTConfig(block_size=ctx, vocab_size=args.vocab, n_layer=L, n_head=4,
                        n_embd=width, dropout=0.0, bias=True)
    with contextlib.redirect_stdout(io.StringIO()):
        nano = gpt.GPT(cfg).train()
        nano_opt = nano.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    n_gpt = sum(p.numel() for p in nano.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (batch, ctx), generator=g)
    y = torch.randint(0, args.vocab, (batch, ctx), generator=g)

    def rwkv_step_fn(runner, model, opt):
        def step():  # as in rwkv_lib.train
            logits = runner(x)
            loss = l2wrap(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()), logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return step

    def gpt_step_fn(runner, model, opt):
        def step():  # as in nanoGPT's train.py
            _, loss = runner(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    rwkv_opt = make_optimizer(rwkv, TrainConfig(lr_init=1e-3))
    rwkv_c = random_rwkv(L, C, args.vocab).train()
    rwkv_c_opt = make_optimizer(rwkv_c, TrainConfig(lr_init=1e-3))
    with contextlib.redirect_stdout(io.StringIO()):
        nano_c = gpt.GPT(cfg).train()
        nano_c_opt = nano_c.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    steps = {
        "ours_eager": rwkv_step_fn(rwkv, rwkv, rwkv_opt),
        "ours_compiled": rwkv_step_fn(torch.compile(rwkv_c), rwkv_c, rwkv_c_opt),
        "nanogpt_eager": gpt_step_fn(nano, nano, nano_opt),
        "nanogpt_compiled": gpt_step_fn(torch.compile(nano_c), nano_c, nano_c_opt),
    }
    library = cpu_matmul.library(autograd=True)
    if library == "onednn":  # what the choice gains, beside it (nanoGPT's products: the BLAS)
        rwkv_b = random_rwkv(L, C, args.vocab).train()
        blas_step = rwkv_step_fn(torch.compile(rwkv_b), rwkv_b,
                                 make_optimizer(rwkv_b, TrainConfig(lr_init=1e-3)))

        def ours_blas_step():
            # torch.compile guards on torch's oneDNN switch (not on an environment
            # variable the first graph was traced without), so this graph is its own
            with matmul_library("blas"), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="TF32 acceleration")  # flags' notice
                with torch.backends.mkldnn.flags(enabled=False):
                    blas_step()
        steps["ours_blas_compiled"] = ours_blas_step
    compile_s = {name: timed(fn) for name, fn in steps.items() if name.endswith("compiled")}
    inner = 2 if args.quick else 5  # optimizer steps per timed repetition

    def repeat(fn):
        return lambda: [fn() for _ in range(inner)]

    t = side_by_side({k: repeat(v) for k, v in steps.items()}, reps=args.reps)
    tokens = batch * ctx * inner
    return {"rwkv": f"L{L}-C{C}", "rwkv_params": n_rwkv,
            "nanogpt": f"L{L}-C{width} (4 heads)", "nanogpt_params": n_gpt,
            "ctx": ctx, "batch": batch, "matmul": library,
            **{f"{k}_tok_s": tokens / v for k, v in t.items()},
            **{f"{k}_first_step_s": v for k, v in compile_s.items()}}


def bench_optimizer(args) -> list[dict]:
    from rwkv_lib.train import TrainConfig, make_optimizer

    rows = []
    for n_layer, n_embd in ((4, 128), (12, 512)):
        model = random_rwkv(n_layer, n_embd, args.vocab).train()
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        fused = make_optimizer(model, TrainConfig(lr_init=1e-3))
        per_tensor = make_optimizer(model, TrainConfig(lr_init=1e-3))
        for group in per_tensor.param_groups:
            group["fused"] = None  # torch's default for CPU tensors: one tensor at a time
        t = side_by_side({"per_tensor": per_tensor.step, "fused": fused.step},
                         reps=args.reps)
        rows.append({"model": f"L{n_layer}-C{n_embd}",
                     "tensors": len(list(model.parameters())),
                     "per_tensor_ms": t["per_tensor"] * 1e3, "fused_ms": t["fused"] * 1e3})
    return rows


def bench_wkv(args) -> dict:
    import wkv_bench

    inputs = wkv_bench.make_inputs((4, 256, 512), "cpu")
    out = {}
    for pass_name in ("fwd", "fwd+bwd"):
        fns = {name: wkv_bench.passes(wkv_bench.backend_fn(name), inputs)[pass_name]
               for name in ("pytorch", "cpp")}
        inner = {"pytorch": 1, "cpp": 20}  # the C++ op is fast: many calls per timing

        def many(fn, n):
            return lambda: [fn() for _ in range(n)]

        t = side_by_side({k: many(fn, inner[k]) for k, fn in fns.items()},
                         reps=args.reps, warmup=2)
        ms = {k: t[k] * 1e3 / inner[k] for k in t}
        out[pass_name] = {"pytorch_ms": ms["pytorch"], "cpp_ms": ms["cpp"],
                          "cpp_ns_per_elem": ms["cpp"] * 1e6 / (4 * 256 * 512)}
    return out


# ---------------------------------------------------------------------------------------
# report


LIBRARY_NAMES = {"onednn": "oneDNN", "blas": "the BLAS"}  # rwkv_lib.cpu_matmul.library()


def speedup(ratio: float) -> str:
    """"1.20x faster", or "0.95x (slower)" below 1."""
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{ratio:.2f}x (slower)"


def table(results: dict) -> str:
    rows = ["| what | ours | peer | ours vs peer |", "|---|---:|---:|---:|"]
    for g in results.get("gen", []):
        rows.append(f"| generation {g['model']}, ms/token (fp32; logits differ by "
                    f"{g['max_logit_diff']:.1e}) | {g['ours_ms']:.3f} | {g['rwkv_pkg_ms']:.3f} "
                    f"(rwkv pkg) | {speedup(g['rwkv_pkg_ms'] / g['ours_ms'])} |")
        rows.append(f"| generation {g['model']}, ms/token, ours with bf16 matrices (logits "
                    f"differ from fp32 by {g['bf16_max_logit_diff']:.1e}) | "
                    f"{g['ours_bf16_ms']:.3f} | {g['rwkv_pkg_ms']:.3f} (rwkv pkg) | "
                    f"{speedup(g['rwkv_pkg_ms'] / g['ours_bf16_ms'])} |")
    if "prompt" in results:
        p = results["prompt"]
        products = LIBRARY_NAMES[p.get("matmul", "blas")]
        rows.append(f"| prompt of 512 tokens, {p['model']}, ms (products through {products}; "
                    f"logits differ by {p['max_logit_diff']:.1e}) | {p['ours_ms']:.1f} | "
                    f"{p['rwkv_pkg_ms']:.1f} (rwkv pkg) | "
                    f"{speedup(p['rwkv_pkg_ms'] / p['ours_ms'])} |")
        if "ours_blas_ms" in p:
            rows.append(f"| prompt of 512 tokens, ours with its products through the BLAS "
                        f"(RWKV_CPU_MATMUL=blas), ms | {p['ours_blas_ms']:.1f} | "
                        f"{p['rwkv_pkg_ms']:.1f} (rwkv pkg) | "
                        f"{speedup(p['rwkv_pkg_ms'] / p['ours_blas_ms'])} |")
        rows.append(f"| prompt of 512 tokens: its matrix products alone, ms (the most any "
                    f"float32 version could gain on the package: "
                    f"{p['rwkv_pkg_ms'] / p['products_only_ms']:.2f}x) | "
                    f"{p['products_only_ms']:.1f} | {p['rwkv_pkg_ms']:.1f} | - |")
        if "products_onednn_ms" in p:
            rows.append(f"| prompt of 512 tokens: the same products through oneDNN instead of "
                        f"the BLAS, ms (the bound with them: "
                        f"{p['rwkv_pkg_ms'] / p['products_onednn_ms']:.2f}x) | "
                        f"{p['products_onednn_ms']:.1f} | {p['rwkv_pkg_ms']:.1f} | - |")
    if "train" in results:
        t = results["train"]
        what = (f"training tokens/s, RWKV {t['rwkv']} ({t['rwkv_params']:,} params) vs "
                f"nanoGPT {t['nanogpt']} ({t['nanogpt_params']:,}), ctx {t['ctx']}, "
                f"batch {t['batch']}")
        products = LIBRARY_NAMES[t.get("matmul", "blas")]
        for mode in ("eager", "compiled"):
            o, n = t[f"ours_{mode}_tok_s"], t[f"nanogpt_{mode}_tok_s"]
            rows.append(f"| {what}, {mode} (our products through {products}) | {o:,.0f} | "
                        f"{n:,.0f} | {speedup(o / n)} |")
        if "ours_blas_compiled_tok_s" in t:
            o, n = t["ours_blas_compiled_tok_s"], t["nanogpt_compiled_tok_s"]
            rows.append(f"| {what}, compiled, ours with its products through the BLAS "
                        f"(RWKV_CPU_MATMUL=blas) | {o:,.0f} | {n:,.0f} | {speedup(o / n)} |")
        o, n = t["ours_compiled_tok_s"], t["nanogpt_eager_tok_s"]
        rows.append(f"| {what}, ours compiled vs nanoGPT eager | {o:,.0f} | {n:,.0f} "
                    f"| {speedup(o / n)} |")
        rows.append(f"| torch.compile, first step (compiling), s | "
                    f"{t['ours_compiled_first_step_s']:.1f} | "
                    f"{t['nanogpt_compiled_first_step_s']:.1f} | - |")
    for o in results.get("opt", []):
        rows.append(f"| AdamW step, {o['model']} ({o['tensors']} tensors), ms: fused (ours) vs "
                    f"one tensor at a time (nanoGPT's on a CPU) | {o['fused_ms']:.2f} | "
                    f"{o['per_tensor_ms']:.2f} | {o['per_tensor_ms'] / o['fused_ms']:.2f}x "
                    f"faster |")
    if "wkv" in results:
        for pass_name, w in results["wkv"].items():
            rows.append(f"| WKV op {pass_name} at (4, 256, 512), ms (C++: "
                        f"{w['cpp_ns_per_elem']:.3f} ns per token x channel) | "
                        f"{w['cpp_ms']:.3f} | {w['pytorch_ms']:.3f} (PyTorch recurrence) | "
                        f"{w['pytorch_ms'] / w['cpp_ms']:.1f}x faster |")
    if "bw" in results:
        b = results["bw"]
        rows.append(f"| memory bandwidth, GB/s: torch copy (read + write) "
                    f"{b['torch_copy_GBps']:.1f}, numpy copy {b['numpy_copy_GBps']:.1f}, "
                    f"torch read {b['torch_read_GBps']:.1f} | - | - | - |")
        for g in results.get("gen", []):
            if g["model"] != "L12-C512":
                continue
            for key, label, scale in (("ours_ms", "ours fp32", 1), ("ours_bf16_ms",
                                      "ours bf16", 0.5), ("rwkv_pkg_ms", "rwkv pkg fp32", 1)):
                gbps = g["bytes_per_token"] * scale / (g[key] / 1e3) / 1e9
                rows.append(f"| generation L12-C512, {label}: weights read at {gbps:.1f} GB/s, "
                            f"of the read bandwidth | {gbps / b['torch_read_GBps']:.0%} | - "
                            f"| - |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nanogpt", help="path of a karpathy/nanoGPT checkout (train rows)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and tokens")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256, help="vocabulary of the models")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    sections = [s for s in args.only.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        fail(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    args.reps = 5 if args.quick else 15
    args.reps_small = 3 if args.quick else 10
    PackageRWKV, gpt = import_peers("gen" in sections or "prompt" in sections,
                                    "train" in sections, args.nanogpt)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'quick' if args.quick else 'full'} run", flush=True)

    results: dict = {"threads": args.threads, "quick": args.quick, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        for section in SECTIONS:
            if section not in sections:
                continue
            t0 = time.perf_counter()
            if section == "bw":
                results["bw"] = bench_bandwidth(args)
            elif section == "gen":
                results["gen"] = bench_generation(args, PackageRWKV, Path(tmp))
            elif section == "prompt":
                results["prompt"] = bench_prompt(args, PackageRWKV, Path(tmp))
            elif section == "train":
                results["train"] = bench_training(args, gpt)
            elif section == "opt":
                results["opt"] = bench_optimizer(args)
            elif section == "wkv":
                results["wkv"] = bench_wkv(args)
            print(f"  {section}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print()
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
