"""Time the WKV backends: forward, and forward + backward, at RWKV-4 training shapes.

    python benchmarks/wkv_bench.py              # CPU (2 threads) and CUDA if present
    python benchmarks/wkv_bench.py --quick      # one small shape, few repetitions
    python benchmarks/wkv_bench.py --threads 8 --device cpu

Prints a markdown table: the median time after warm-up, the time per (token x channel),
the speed-up over the PyTorch stable backend (the Python loop over time), and on CUDA the
achieved memory bandwidth as a fraction of the device's measured copy bandwidth, counting
the minimum traffic of the operator in float32: 12 bytes per element forward (read k, v;
write y) and 24 more backward (read k, v, y, grad_y; write grad_k, grad_v), so 36 for
forward + backward.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

CPU_SHAPES = [(4, 256, 512), (1, 1024, 512), (12, 1024, 512)]
CUDA_SHAPES = [(1, 1024, 512), (12, 1024, 512)]
MIN_BYTES = {"fwd": 12, "fwd+bwd": 36}
DEFINITION_MAX_ELEMENTS = 2**24  # the definition holds a (B, T, T, C) tensor


def make_inputs(shape: tuple[int, int, int], device: str) -> list[torch.Tensor]:
    B, T, C = shape
    g = torch.Generator().manual_seed(0)
    td = torch.empty(C).uniform_(-5, 3, generator=g)
    tf = torch.randn(C, generator=g)
    k = torch.randn(B, T, C, generator=g)
    v = torch.randn(B, T, C, generator=g)
    return [t.to(device) for t in (td, tf, k, v)]


def timer(device: str) -> Callable[[Callable[[], object]], float]:
    """A function that runs fn once and returns the elapsed milliseconds."""
    if device == "cuda":

        def run(fn: Callable[[], object]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)

        return run

    def run(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return run


def median_ms(fn: Callable[[], object], device: str, warmup: int, reps: int,
              budget_s: float) -> float:
    """Median over `reps` runs after `warmup`, with fewer runs for very slow functions."""
    run = timer(device)
    first = run(fn)  # also a warm-up
    for _ in range(warmup - 1):
        run(fn)
    reps = max(1, min(reps, int(budget_s * 1e3 / max(first, 1e-3))))
    return statistics.median(run(fn) for _ in range(reps))


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    x = torch.empty(256 * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), device, warmup=3, reps=10, budget_s=5)
    return 2 * x.numel() * 4 / (ms / 1e3)


def backend_fn(name: str) -> Callable[..., torch.Tensor]:
    from rwkv_lib.wkv import wkv  # lazily: importing the library is the benchmark's business

    return lambda td, tf, k, v: wkv(td, tf, k, v, backend=name)


def passes(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]):
    """The two timed passes: forward without autograd, and forward + backward."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    grad_y = torch.randn_like(inputs[2])

    def forward() -> None:
        with torch.no_grad():
            fn(*inputs)

    def forward_backward() -> None:
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad_y)

    return {"fwd": forward, "fwd+bwd": forward_backward}


def available_backends(device: str) -> list[str]:
    from rwkv_lib.extension import ExtensionUnavailable, load_wkv_extension

    names = ["pytorch", "definition"]
    try:
        module = load_wkv_extension()
    except ExtensionUnavailable as err:
        print(f"<!-- C++/CUDA extension unavailable: {err} -->")
        return names
    if device == "cpu":
        names.append("cpp")
    elif module.has_cuda:
        names.append("cuda")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="one shape, few repetitions")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (at most)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warmup, reps, budget = (1, 3, 3.0) if args.quick else (3, args.reps, 20.0)

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            raise SystemExit("no CUDA GPU is available")
        devices.remove("cuda")

    print(f"torch {torch.__version__}, {args.threads} CPU threads"
          + (f", GPU {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    print()
    print("| backend | device | B, T, C | pass | ms | ns / (token x channel) "
          "| speed-up vs pytorch | bandwidth / copy |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for device in devices:
        shapes = CPU_SHAPES if device == "cpu" else CUDA_SHAPES
        if args.quick:
            shapes = shapes[:1]
        bandwidth = copy_bandwidth(device) if device == "cuda" else None
        for shape in shapes:
            B, T, C = shape
            inputs = make_inputs(shape, device)
            reference: dict[str, float] = {}
            for name in available_backends(device):
                if name == "definition" and B * T * T * C > DEFINITION_MAX_ELEMENTS:
                    continue  # O(T^2) memory: only for small shapes
                for pass_name, fn in passes(backend_fn(name), inputs).items():
                    ms = median_ms(fn, device, warmup, reps, budget)
                    if name == "pytorch":
                        reference[pass_name] = ms
                    ns = ms * 1e6 / (B * T * C)
                    ratio = reference.get(pass_name)
                    ratio_text = f"{ratio / ms:.1f}x" if ratio else "-"
                    bw_text = "-"
                    if bandwidth is not None:
                        achieved = MIN_BYTES[pass_name] * B * T * C / (ms / 1e3)
                        bw_text = f"{achieved / bandwidth:.2f}"
                    print(f"| {name} | {device} | {B}, {T}, {C} | {pass_name} | {ms:.3f} "
                          f"| {ns:.3f} | {ratio_text} | {bw_text} |", flush=True)
    if any(d == "cuda" for d in devices):
        print(f"\ncopy bandwidth measured on the GPU: {copy_bandwidth('cuda') / 1e9:.0f} GB/s")


if __name__ == "__main__":
    main()
