"""Time the CUDA WKV kernels, ours (sequential and chunked) beside RWKV-LM's v4 kernel.

    python benchmarks/wkv_gpu_bench.py --rwkv-lm .peers/RWKV-LM     # needs a CUDA GPU
    python benchmarks/wkv_gpu_bench.py --quick                       # one shape, ours only
    python benchmarks/wkv_gpu_bench.py --device cpu --shapes 2x16x8 --long-shapes 1x40x8 \\
        --sweep-chunks 1,2 --results-dir dry-run                      # dry run of the script

In one process: the device's copy bandwidth; at (B, T, C) = (1, 1024, 512), (12, 1024, 512)
and (32, 1024, 1024) a numerical check that the implementations agree, then the forward
pass (no autograd) and forward + backward of each; ours alone at T = 8192; and a sweep of
the chunk count of the chunked kernels. Each operation runs as a model calls it: the
autograd Function around the kernel, with its small steps (w = -exp(time_decay), output
allocation, sums over the batch). Times: `ms`, the median of CUDA-event timings of single
calls after a warm-up, launch gaps included; `GPU ms`, the GPU's own work per call from
the profiler. The forward's bandwidth fraction counts the bytes the kernel must move
(read k and v, write y: 12 bytes per element in float32) over `ms`, against a
device-to-device copy. Results go to <results-dir>/<device-slug>.json ("wkv" section),
and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import copy_bandwidth, device_info, gpu_ms, median_ms  # noqa: E402

SHAPES = [(1, 1024, 512), (12, 1024, 512), (32, 1024, 1024)]
LONG_SHAPES = [(1, 8192, 512), (12, 8192, 512)]
SWEEP_CHUNKS = [1, 2, 4, 8, 16, 32, 64]
FORWARD_BYTES = 12  # per element: read k and v, write y (float32)
INPUT_SETS = 3  # rotated between calls, so repeated calls do not find them all in L2
GRAD_NAMES = ("y", "time_decay", "time_first", "k", "v")
DEVICE = "cuda"  # set from --device


def make_inputs(shape: tuple[int, int, int], seed: int) -> list[torch.Tensor]:
    B, T, C = shape
    g = torch.Generator(device=DEVICE).manual_seed(seed)  # on the GPU: large shapes are quick
    td = torch.empty(C, device=DEVICE).uniform_(-5, 3, generator=g)  # RWKV-4's init range
    tf = torch.randn(C, device=DEVICE, generator=g)
    k = torch.randn(B, T, C, device=DEVICE, generator=g)
    v = torch.randn(B, T, C, device=DEVICE, generator=g)
    return [td, tf, k, v]


_sets: dict = {}


def input_sets(shape: tuple[int, int, int]) -> list[list[torch.Tensor]]:
    """INPUT_SETS input sets for a shape, the same for every implementation."""
    if shape not in _sets:
        _sets.clear()  # one shape at a time: the largest sets take 1.2 GB
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        _sets[shape] = [make_inputs(shape, seed=i) for i in range(INPUT_SETS)]
    return _sets[shape]


class Ours:
    """This project's op with the kernel chosen by RWKV_WKV_CUDA (and _CHUNKS)."""

    def __init__(self, kernel: str, chunks: int | None = None) -> None:
        from rwkv_lib.extension import load_wkv_extension
        from rwkv_lib.wkv_op import wkv_extension

        self.module = load_wkv_extension()
        if DEVICE == "cuda" and not self.module.has_cuda:
            from rwkv_lib import extension

            raise SystemExit(f"error: the WKV extension has no CUDA kernels: "
                             f"{extension._cuda_build_error}")
        self.op = wkv_extension
        self.kernel, self.chunks = kernel, chunks

    def select(self) -> None:
        os.environ["RWKV_WKV_CUDA"] = self.kernel
        if self.chunks is None:
            os.environ.pop("RWKV_WKV_CUDA_CHUNKS", None)
        else:
            os.environ["RWKV_WKV_CUDA_CHUNKS"] = str(self.chunks)

    def chunks_for(self, B: int, T: int, C: int) -> int | None:
        """The chunk count the op will use (0: the sequential kernel); None on the CPU."""
        if DEVICE != "cuda":
            return None
        self.select()
        return self.module.cuda_chunks(B, T, C)

    def __call__(self, td, tf, k, v):
        self.select()
        return self.op(td, tf, k, v)


def passes(fn, sets: list[list[torch.Tensor]]):
    """Forward without autograd and forward + backward, each call on the next input set."""
    leaves = [[t.clone().requires_grad_() for t in s] for s in sets]
    grad_y = [torch.randn_like(s[2]) for s in sets]
    counter = {"fwd": 0, "fwd+bwd": 0}

    def forward() -> None:
        i = counter["fwd"] = (counter["fwd"] + 1) % len(sets)
        with torch.no_grad():
            fn(*sets[i])

    def forward_backward() -> None:
        i = counter["fwd+bwd"] = (counter["fwd+bwd"] + 1) % len(sets)
        for t in leaves[i]:
            t.grad = None
        fn(*leaves[i]).backward(grad_y[i])

    return {"fwd": forward, "fwd+bwd": forward_backward}


def values_and_grads(fn, inputs, grad_y):
    leaves = [t.clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, leaves, grad_y)
    return [y.detach(), *grads]


def agreement(impls: dict, shape) -> list[dict]:
    """Max differences of y and of the four gradients between each implementation and the
    first one, on the same inputs."""
    inputs = make_inputs(shape, seed=99)
    grad_y = torch.randn(shape, device=DEVICE,
                         generator=torch.Generator(device=DEVICE).manual_seed(98))
    names = list(impls)
    ref_name = names[0]
    ref = values_and_grads(impls[ref_name], inputs, grad_y)
    rows = []
    for name in names[1:]:
        got = values_and_grads(impls[name], inputs, grad_y)
        diffs = {n: (a - b).abs().max().item()
                 for n, a, b in zip(GRAD_NAMES, got, ref, strict=True)}
        scale = {n: b.abs().max().item() for n, b in zip(GRAD_NAMES, ref, strict=True)}
        worst = max(diffs[n] / max(scale[n], 1e-30) for n in GRAD_NAMES)
        rows.append({"B": shape[0], "T": shape[1], "C": shape[2], "impl": name,
                     "reference": ref_name, "max_abs_diff": diffs, "max_abs_reference": scale,
                     "worst_relative": worst, "agree": worst < 1e-3})
        flag = "agree" if worst < 1e-3 else "DISAGREE"
        print(f"{name} vs {ref_name} at {shape}: " + ", ".join(
            f"{n} {diffs[n]:.2e}" for n in GRAD_NAMES) + f" (worst relative {worst:.1e}: {flag})",
            flush=True)
    return rows


def measure(name: str, fn, shape, reps: int, chunks: int | None, copy_bw: float) -> list[dict]:
    B, T, C = shape
    rows = []
    for pass_name, call in passes(fn, input_sets(shape)).items():
        ms = median_ms(call, DEVICE, reps=reps)
        gms = gpu_ms(call, DEVICE)
        row = {"impl": name, "B": B, "T": T, "C": C, "pass": pass_name, "chunks": chunks,
               "ms": ms, "gpu_ms": gms, "ns_per_element": ms * 1e6 / (B * T * C),
               "bandwidth_fraction": None, "gpu_bandwidth_fraction": None,
               "speedup_vs_rwkv_lm": None, "gpu_speedup_vs_rwkv_lm": None}
        if pass_name == "fwd":
            row["bandwidth_fraction"] = FORWARD_BYTES * B * T * C / (ms / 1e3) / copy_bw
            if gms:
                row["gpu_bandwidth_fraction"] = FORWARD_BYTES * B * T * C / (gms / 1e3) / copy_bw
        rows.append(row)
        gpu_text = "-" if gms is None else f"{gms:.4f}"
        print(f"  {name:16s} {B:3d},{T:5d},{C:5d} {pass_name:8s} chunks {chunks!s:4s} "
              f"{ms:9.4f} ms  GPU {gpu_text:>8s} ms", flush=True)
    return rows


def add_speedups(rows: list[dict]) -> None:
    theirs = {(r["B"], r["T"], r["C"], r["pass"]): r for r in rows if r["impl"] == "rwkv-lm"}
    for r in rows:
        ref = theirs.get((r["B"], r["T"], r["C"], r["pass"]))
        if ref is not None:
            r["speedup_vs_rwkv_lm"] = ref["ms"] / r["ms"]
            if ref["gpu_ms"] and r["gpu_ms"]:
                r["gpu_speedup_vs_rwkv_lm"] = ref["gpu_ms"] / r["gpu_ms"]


def _shapes(text: str) -> list[tuple[int, int, int]]:
    try:
        shapes = [tuple(int(x) for x in item.split("x")) for item in text.split(",") if item]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected shapes like 1x1024x512,12x8x4, got {text!r}")
    return shapes


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,2,4, got {text!r}") from err


def _rwkv_lm(path: str) -> tuple[object | None, dict]:
    from rwkv_lm import RwkvLmUnavailable, RwkvLmWKV

    info: dict = {"path": path}
    try:
        theirs = RwkvLmWKV(path)
    except (RwkvLmUnavailable, OSError, RuntimeError, ImportError) as err:
        info["error"] = f"{type(err).__name__}: {err}"
        print(f"RWKV-LM unavailable: {info['error']}", flush=True)
        return None, info
    info.update(flags=theirs.flags, t_max=theirs.t_max, commit=theirs.commit, via=theirs.via,
                import_error=theirs.import_error)
    print(f"RWKV-LM {theirs.commit}: {theirs.via}; flags {theirs.flags}", flush=True)
    return theirs, info


def main(argv: list[str] | None = None) -> dict:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rwkv-lm", metavar="PATH", default=None,
                        help="an RWKV-LM checkout (a folder holding RWKV-v4/) to compare with")
    parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"),
                        help="where <device-slug>.json is written (default: benchmarks/results)")
    parser.add_argument("--reps", type=int, default=30,
                        help="timed calls per measurement (at most)")
    parser.add_argument("--quick", action="store_true", help="one shape, no sweep, few calls")
    parser.add_argument("--shapes", type=_shapes, default=SHAPES, help="B x T x C, comma-separated")
    parser.add_argument("--long-shapes", type=_shapes, default=LONG_SHAPES,
                        help="shapes timed for ours only (T beyond RWKV-LM's T_MAX)")
    parser.add_argument("--sweep-chunks", type=_ints, default=SWEEP_CHUNKS,
                        help="chunk counts of the sweep (empty: no sweep)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a dry run of this script with the CPU kernels (no numbers "
                             "worth keeping)")
    args = parser.parse_args(argv)
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU is visible; this benchmark needs one "
                         "(--device cpu runs it as a dry run)")
    from rwkv_lib.gpu_results import device_slug, update_results, wkv_table

    info = device_info(DEVICE)
    print(", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    reps = 5 if args.quick else args.reps
    shapes = args.shapes[:1] if args.quick else args.shapes
    long_shapes = [] if args.quick else args.long_shapes
    sweep_chunks = [] if args.quick else args.sweep_chunks
    copy_bw = copy_bandwidth(DEVICE, gib=1.0 if DEVICE == "cuda" else 0.05)
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (bytes read + written)", flush=True)

    sequential, chunked = Ours("sequential"), Ours("chunked")
    impls: dict = {"ours-sequential": sequential, "ours-chunked": chunked}
    rwkv_info: dict = {"path": None}
    if args.rwkv_lm and DEVICE == "cuda":
        theirs, rwkv_info = _rwkv_lm(args.rwkv_lm)
        if theirs is not None:
            impls["rwkv-lm"] = theirs

    rows, checks, sweep = [], [], []
    for shape in shapes:
        here = {n: f for n, f in impls.items()
                if n != "rwkv-lm" or (shape[1] <= f.t_max and (shape[0] * shape[2]) % 32 == 0)}
        checks += agreement(here, shape)
        for name, fn in here.items():
            chunks = fn.chunks_for(*shape) if isinstance(fn, Ours) else None
            rows += measure(name, fn, shape, reps, chunks, copy_bw)
    for shape in long_shapes:  # beyond RWKV-LM's T_MAX: ours only
        checks += agreement({"ours-sequential": sequential, "ours-chunked": chunked}, shape)
        for name in ("ours-sequential", "ours-chunked"):
            fn = impls[name]
            rows += measure(name, fn, shape, reps, fn.chunks_for(*shape), copy_bw)
    add_speedups(rows)
    if sweep_chunks:
        print("chunk-count sweep of the chunked kernels:", flush=True)
        for shape in shapes + long_shapes:
            for J in sweep_chunks:
                sweep += measure("ours-chunked", Ours("chunked", J), shape, max(5, reps // 3), J,
                                 copy_bw)

    data = {"copy_bandwidth_gbps": copy_bw / 1e9, "rows": rows, "agreement": checks,
            "chunk_sweep": sweep, "rwkv_lm": rwkv_info, "forward_bytes_per_element": FORWARD_BYTES,
            "timing": "ms: median of CUDA-event timings of single calls after 5 warm-up calls, "
                      f"{INPUT_SETS} input sets rotated; GPU ms: profiler sum of GPU work per call"}
    path = update_results(Path(args.results_dir) / f"{device_slug(info['gpu'])}.json", "wkv",
                          data, info)
    print(f"\nwrote {path}\n")
    print(wkv_table({"device": info, "wkv": data}))
    if any(not c["agree"] for c in checks):
        print("\nWARNING: some implementations disagree (see above)")
    return data


if __name__ == "__main__":
    main()
