"""BlinkDL/RWKV-LM's RWKV-4 CUDA kernel and model, loaded from a checkout for side-by-side
benchmarks.

Nothing of RWKV-LM is copied into this repository: the benchmarks take the path of a
checkout (`--rwkv-lm PATH`, a folder holding `RWKV-v4/`), import its
`RWKV-v4/src/model.py`, which builds `RWKV-v4/cuda/wkv_op.cpp` and `wkv_cuda.cu` with its
own flags when it is imported, and call what it defines. If that import fails (its
TorchScript modules need a torch that still has TorchScript), the kernel alone is built
with the flags read from the same file, so the kernel comparison still runs.

What RWKV-v4/src/model.py needs (read from the file): torch, `RWKV_FLOAT_MODE` in the
environment ("fp32", "fp16" or "bf16"), the working directory set to RWKV-v4 while it is
imported (its kernel sources are given as relative paths), and optionally DeepSpeed (only
for its FusedAdam, with torch.optim.Adam as its own fallback). Its training loop
(src/trainer.py) needs pytorch_lightning.lite, which Lightning 2 no longer has; the
benchmarks therefore drive its GPT model with their own loop.

    python benchmarks/rwkv_lm.py --build PATH    # build the kernel now (prints the flags)
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import torch

V4 = "RWKV-v4"
MODEL_FILE = "src/model.py"
KERNEL_SOURCES = ("cuda/wkv_op.cpp", "cuda/wkv_cuda.cu")


class RwkvLmUnavailable(RuntimeError):
    """The checkout is missing or unusable here; the message says why."""


def v4_dir(path: str | Path) -> Path:
    """The RWKV-v4 folder of a checkout, checked for the files the benchmarks use."""
    root = Path(path).expanduser().resolve()
    v4 = root / V4 if (root / V4).is_dir() else root
    missing = [f for f in (MODEL_FILE, *KERNEL_SOURCES) if not (v4 / f).is_file()]
    if missing:
        raise RwkvLmUnavailable(
            f"{v4} is not an RWKV-LM checkout's RWKV-v4 folder (missing {', '.join(missing)}). "
            "Export one from a clone of BlinkDL/RWKV-LM with `mkdir -p .peers/RWKV-LM/RWKV-v4 "
            "&& git --git-dir=PATH/.git archive HEAD:RWKV-v4 | tar -x -C .peers/RWKV-LM/RWKV-v4`"
        )
    return v4


def commit(path: str | Path) -> str | None:
    """The commit the checkout was exported from, if its COMMIT file says."""
    for candidate in (Path(path) / "COMMIT", v4_dir(path).parent / "COMMIT"):
        if candidate.is_file():
            return candidate.read_text().strip() or None
    return None


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def kernel_flags(path: str | Path) -> tuple[list[str], int]:
    """(extra_cuda_cflags, T_MAX) exactly as RWKV-v4/src/model.py passes them to load()."""
    source = (v4_dir(path) / MODEL_FILE).read_text()
    tree = ast.parse(source)
    names: dict[str, object] = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Constant)):
            names[node.targets[0].id] = node.value.value

    def value(node: ast.AST) -> str:
        if isinstance(node, ast.Constant):
            return str(node.value)
        if isinstance(node, ast.JoinedStr):  # f'-DTmax={T_MAX}'
            return "".join(value(v) for v in node.values)
        if isinstance(node, ast.FormattedValue) and isinstance(node.value, ast.Name):
            return str(names[node.value.id])
        raise RwkvLmUnavailable(f"cannot read the kernel flags of {MODEL_FILE}: "
                                f"{ast.dump(node)}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load":
            for kw in node.keywords:
                if kw.arg == "extra_cuda_cflags" and isinstance(kw.value, ast.List):
                    return [value(e) for e in kw.value.elts], int(names.get("T_MAX", 0))
    raise RwkvLmUnavailable(f"no load(..., extra_cuda_cflags=[...]) call in {MODEL_FILE}")


def import_model(path: str | Path, float_mode: str = "fp32") -> types.ModuleType:
    """Import RWKV-v4/src/model.py (which builds its kernel) as a module of its own.

    RWKV_FLOAT_MODE is read by its WKV function at every call, so it can be changed later.
    RWKV_LOAD_MODEL=True skips its (slow) initialization in GPT(): the benchmarks load
    this project's weights into it instead.
    """
    v4 = v4_dir(path)
    os.environ["RWKV_FLOAT_MODE"] = float_mode
    os.environ.setdefault("RWKV_LOAD_MODEL", "True")
    name = "rwkv_lm_v4_model"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, v4 / MODEL_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with _working_directory(v4):
        spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def build_kernel(path: str | Path) -> types.ModuleType:
    """Only the kernel, built as model.py builds it (same name, sources and flags, so the
    build is shared with a later import_model in the same extensions folder)."""
    from rwkv_lib.quiet_cpp_extension import cpp_extension

    v4 = v4_dir(path)
    flags, _ = kernel_flags(path)
    with _working_directory(v4):
        return cpp_extension.load(name="wkv", sources=list(KERNEL_SOURCES), verbose=True,
                                  extra_cuda_cflags=flags)


class RwkvLmWKV:
    """RWKV-LM's WKV operator on float32 CUDA tensors: y = wkv(time_decay, time_first, k, v).

    Through its own autograd Function (model.WKV, as its model calls it) when the model
    file imports; otherwise the raw kernel with the same steps around it (w =
    -exp(time_decay), zero-filled gradient buffers, sums over the batch).
    """

    def __init__(self, path: str | Path) -> None:
        self.flags, self.t_max = kernel_flags(path)
        self.commit = commit(path)
        self.import_error: str | None = None
        try:
            self.model = import_model(path, "fp32")
            self.kernel = self.model.wkv_cuda
            self.via = "RWKV-v4/src/model.py WKV.apply"
        except Exception as err:  # TorchScript missing, or anything else in that file
            self.model = None
            self.import_error = f"{type(err).__name__}: {err}"
            self.kernel = build_kernel(path)
            self.via = "the kernel built with model.py's flags (the model file did not import)"

    def check(self, B: int, T: int, C: int) -> None:
        if T > self.t_max or (B * C) % min(C, 32):
            raise ValueError(f"RWKV-LM's kernel needs T <= {self.t_max} and B*C a multiple "
                             f"of min(C, 32); got B, T, C = {B}, {T}, {C}")

    def __call__(self, time_decay, time_first, k, v):
        B, T, C = k.shape
        self.check(B, T, C)
        if self.model is not None:
            os.environ["RWKV_FLOAT_MODE"] = "fp32"
            return self.model.WKV.apply(B, T, C, time_decay, time_first, k, v)
        return _RawWKV.apply(self.kernel, time_decay, time_first, k, v)


class _RawWKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel, time_decay, time_first, k, v):
        B, T, C = k.shape
        w = -torch.exp(time_decay.float().contiguous())
        u, k, v = (t.float().contiguous() for t in (time_first, k, v))
        y = torch.empty((B, T, C), device=k.device)
        kernel.forward(B, T, C, w, u, k, v, y)
        ctx.kernel = kernel
        ctx.save_for_backward(w, u, k, v)
        return y

    @staticmethod
    def backward(ctx, gy):
        w, u, k, v = ctx.saved_tensors
        B, T, C = k.shape
        gw = torch.zeros((B, C), device=k.device)
        gu = torch.zeros((B, C), device=k.device)
        gk = torch.zeros((B, T, C), device=k.device)
        gv = torch.zeros((B, T, C), device=k.device)
        ctx.kernel.backward(B, T, C, w, u, k, v, gy.float().contiguous(), gw, gu, gk, gv)
        return None, gw.sum(0), gu.sum(0), gk, gv


def main() -> None:
    parser = argparse.ArgumentParser(description="build RWKV-LM's v4 kernel from a checkout")
    parser.add_argument("--build", metavar="PATH", required=True,
                        help="an RWKV-LM checkout (or its RWKV-v4 folder)")
    args = parser.parse_args()
    try:
        flags, t_max = kernel_flags(args.build)
        print(f"RWKV-LM v4 kernel flags: {flags} (T_MAX = {t_max})")
        build_kernel(args.build)
    except RwkvLmUnavailable as err:
        sys.exit(f"error: {err}")
    print("built")


if __name__ == "__main__":
    main()
