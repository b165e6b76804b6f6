"""Run each CUDA WKV kernel once forward and backward on small, awkward shapes, for
NVIDIA's compute-sanitizer (benchmarks/gpu_check.sh runs it):

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/wkv_sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/wkv_sanitize.py

memcheck reports out-of-bounds and misaligned accesses, racecheck hazards on shared memory
(a missing barrier in the chunked kernels' scans), synccheck barriers not reached by every
thread. The shapes have idle channels in the last block of a row (C = 13) and empty chunks
(T smaller than the chunk count); the calls pass an initial state and gradients of the
final state, so that every pointer of the kernels is used.
"""

from __future__ import annotations

import os

import torch

from rwkv_lib.extension import load_wkv_extension

KERNELS = [("sequential", None), ("chunked", 1), ("chunked", 3), ("chunked", 64)]
SHAPES = [(2, 37, 13), (1, 5, 9)]


def main() -> None:
    module = load_wkv_extension()
    assert module.has_cuda, "the extension has no CUDA kernels"
    for kernel, chunks in KERNELS:
        os.environ["RWKV_WKV_CUDA"] = kernel
        os.environ.pop("RWKV_WKV_CUDA_CHUNKS", None)
        if chunks is not None:
            os.environ["RWKV_WKV_CUDA_CHUNKS"] = str(chunks)
        for dtype in (torch.float32, torch.float64):
            for B, T, C in SHAPES:
                g = torch.Generator(device="cuda").manual_seed(0)
                td, tf = (torch.randn(C, device="cuda", dtype=dtype, generator=g)
                          for _ in range(2))
                k, v, gy = (torch.randn(B, T, C, device="cuda", dtype=dtype, generator=g)
                            for _ in range(3))
                a0, b0, p0, ga, gb = (torch.randn(B, C, device="cuda", dtype=dtype, generator=g)
                                      for _ in range(5))
                b0 = b0.abs() + 0.5
                for state in (None, (a0, b0, p0)):
                    y, aT, bT, pT = torch.ops.rwkv.wkv_forward(td, tf, k, v, *(state or ()))
                    torch.ops.rwkv.wkv_backward(td, tf, k, v, *(state or (None,) * 3), gy, ga, gb)
                torch.cuda.synchronize()
        print(f"{kernel} {chunks}: ran", flush=True)
    print("ok")


if __name__ == "__main__":
    main()
