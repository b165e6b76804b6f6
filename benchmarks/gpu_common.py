"""What the GPU benchmarks share: the device's facts, timers, and the copy bandwidth.

Every function takes `device`: "cuda" for the real measurements, "cpu" for a dry run of a
benchmark script on a machine without a GPU (host timers, no profiler; for checking the
script, not for numbers).

Two times are taken for an operation:
- `median_ms`: CUDA events around each call, the median over the calls after a warm-up.
  This is the time a caller waits, launch gaps included: at batch 1 the host's launches
  can be slower than the GPU's work, and then this is what the model experiences.
- `gpu_ms`: the sum of the durations of every kernel, copy and memset the call ran, from
  PyTorch's profiler (CUPTI), per call: the GPU's own work, without the gaps.
"""

from __future__ import annotations

import platform
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable

import torch


def device_info(device: str = "cuda") -> dict:
    """Name, driver, CUDA and PyTorch versions, multiprocessors, memory."""
    if device == "cpu":
        return {"gpu": f"CPU dry run {platform.machine()}", "torch": torch.__version__,
                "python": platform.python_version()}
    props = torch.cuda.get_device_properties(0)
    info = {
        "gpu": torch.cuda.get_device_name(0),
        "capability": "{}.{}".format(*torch.cuda.get_device_capability(0)),
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": _driver_version(),
        "cuda_runtime": torch.version.cuda,
        "nvcc": _nvcc_version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    return info


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    return None


def _nvcc_version() -> str | None:
    from rwkv_lib.quiet_cpp_extension import cpp_extension

    nvcc = shutil.which("nvcc")
    if nvcc is None and cpp_extension.CUDA_HOME:
        nvcc = f"{cpp_extension.CUDA_HOME}/bin/nvcc"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, TypeError):
        return None
    match = re.search(r"release ([\d.]+)", out.stdout)
    return match.group(1) if match else None


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: str = "cuda", warmup: int = 5, reps: int = 30,
              budget_s: float = 3.0) -> float:
    """Median milliseconds of fn() by CUDA events (host timer on the CPU), after `warmup`
    calls; fewer repetitions for slow functions, so that one measurement takes about
    `budget_s` at most."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device != "cuda":
        times = []
        for _ in range(max(1, reps)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    reps = max(3, min(reps, int(budget_s * 1e3 / max(start.elapsed_time(end), 1e-3))))
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(reps)]
    for s, e in pairs:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs)


def gpu_ms(fn: Callable[[], object], device: str = "cuda", reps: int = 10) -> float | None:
    """Milliseconds of GPU work per call (kernels, copies, memsets), or None if the profiler
    is unavailable here (or on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    if device != "cuda":
        return None
    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
    except Exception as err:  # no CUPTI in this environment, for instance
        print(f"<!-- profiler unavailable: {err} -->")
        return None
    total_us = sum(e.time_range.elapsed_us() for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    return total_us / 1e3 / reps if total_us > 0 else None


def copy_bandwidth(device: str = "cuda", gib: float = 1.0) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
    x = torch.empty(int(gib * 2**30) // 4, device=device)
    x.normal_()
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), device, warmup=3, reps=20)
    return 2 * x.numel() * 4 / (ms / 1e3)


def matmul_rate(device: str = "cuda", n: int = 8192,
                dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP per second of an n x n x n matrix product on random data."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, warmup=3, reps=10)
    return 2 * n**3 / (ms / 1e3)
