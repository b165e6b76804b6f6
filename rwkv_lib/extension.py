"""Building and loading the C++/CUDA extensions of the series (notebook 05_cpp_extension).

The sources live in `cuda/` at the root of the repository:

- `sigmoid.cpp`: a tiny teaching extension, notebook 04's custom sigmoid as a C++ op.
- `wkv_math.h`: the WKV recurrence, one time step, shared by the CPU and CUDA kernels.
- `wkv_cpu.cpp`, `wkv_cuda.cu`: the kernels, on raw pointers.
- `wkv_ops.cpp`: the PyTorch bindings, registered as `torch.ops.rwkv.wkv_forward` /
  `torch.ops.rwkv.wkv_backward` and also as plain functions of the Python module.

Nothing is compiled at import time. The first call of `load_wkv_extension()` compiles
with `torch.utils.cpp_extension.load` and ninja into a cache directory outside the
repository (`$RWKV_EXT_DIR`, else `rwkv_notebooks/` under torch's extensions directory),
which takes a minute or two; later calls, in this or any new process, import the cached
library without compiling. The build's name contains a hash of the sources, the flags and
the versions of Python and torch, so an edited source is rebuilt automatically (in a new
process: a process keeps the version it loaded first). Compiler output is shown only with
`verbose=True` or the environment variable `RWKV_EXT_VERBOSE=1`.

The CUDA kernels are compiled in when torch was built with CUDA, a GPU is visible and
nvcc is found; otherwise the build is CPU-only. When a build is impossible, the loaders
raise `ExtensionUnavailable`, whose message says why and what to install;
`rwkv_lib.wkv.wkv(..., backend="auto")` then falls back to its PyTorch backend.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path

import torch

# torch.utils.cpp_extension, without the notice a CUDA build of torch writes when there is no GPU
from .quiet_cpp_extension import cpp_extension

SOURCE_DIR = Path(__file__).resolve().parent.parent / "cuda"
WKV_SOURCES = ("wkv_ops.cpp", "wkv_cpu.cpp")
WKV_CUDA_SOURCES = ("wkv_cuda.cu",)
WKV_HEADERS = ("wkv_math.h",)  # not compiled on their own, but part of the hash
SIGMOID_SOURCES = ("sigmoid.cpp",)

WKVState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

_lock = threading.RLock()
_loaded: dict[str, types.ModuleType] = {}
_failed: dict[str, ExtensionUnavailable] = {}
_cuda_build_error: str | None = None  # why the loaded WKV build has no CUDA kernels


class ExtensionUnavailable(RuntimeError):
    """The C++/CUDA extension cannot be built or loaded here; the message says how to fix it."""


# ---------------------------------------------------------------------------------------
# Where and how to build


def cache_dir() -> Path:
    """The directory holding compiled extensions: $RWKV_EXT_DIR or a folder in torch's."""
    env = os.environ.get("RWKV_EXT_DIR")
    if env:
        return Path(env).expanduser()
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / "rwkv_notebooks"


def _verbose(verbose: bool) -> bool:
    return verbose or os.environ.get("RWKV_EXT_VERBOSE", "") not in ("", "0")


@functools.cache
def _is_gcc(cxx: str) -> bool:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return "Free Software Foundation" in out.stdout


def _use_openmp() -> bool:
    # at::parallel_for is a header template: without -fopenmp it silently runs on one
    # thread. With g++ on Linux, -fopenmp links libgomp.so.1, which resolves to the copy
    # torch has already loaded, so there is one OpenMP runtime. Elsewhere (clang's libomp,
    # macOS) a second runtime could be loaded, so the kernels stay single-threaded there.
    return (sys.platform.startswith("linux") and torch.backends.openmp.is_available()
            and _is_gcc(_cxx()))


def _cpu_flags() -> list[str]:
    if os.name == "nt":
        return ["/O2"]
    # -fno-math-errno and -fno-trapping-math let g++ vectorize the loops over channels,
    # exp included (see cuda/wkv_cpu.cpp); -march=native gives 256/512-bit vectors (the
    # build is cached per machine, see _cpu_identity).
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-march=native")
    if _use_openmp():
        flags.append("-fopenmp")
    return flags


def _cpu_identity() -> str:
    # -march=native code may not run on another processor sharing the cache directory.
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _cxx() -> str:
    # the compiler torch.utils.cpp_extension will run: $CXX, else its platform default
    return os.environ.get("CXX", "cl" if os.name == "nt" else "c++")


def _nvcc() -> str | None:
    home = cpp_extension.CUDA_HOME
    if home:
        path = Path(home) / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")
        if path.exists():
            return str(path)
    return shutil.which("nvcc")


def _cuda_build_possible() -> tuple[bool, str]:
    """Whether to compile the CUDA kernels, and if not, why not."""
    if torch.version.cuda is None:
        return False, "this torch build has no CUDA support (a CPU-only wheel)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    if _nvcc() is None:
        return False, (
            f"nvcc was not found; install a CUDA toolkit matching torch.version.cuda "
            f"({torch.version.cuda}) and set CUDA_HOME"
        )
    return True, ""


def _missing_tools() -> str | None:
    """A message naming what to install when the compiler or ninja is missing, else None."""
    if os.name == "nt" and shutil.which("cl") is None:
        return (
            "the MSVC compiler (cl.exe) was not found; install the Visual Studio Build Tools "
            "('Desktop development with C++') and run from an x64 Native Tools prompt"
        )
    cxx = _cxx()
    if os.name != "nt" and shutil.which(cxx) is None:
        hint = "xcode-select --install" if sys.platform == "darwin" else "e.g. apt install g++"
        return f"the C++ compiler {cxx!r} was not found; install a C++ compiler ({hint})"
    if not cpp_extension.is_ninja_available():
        return "ninja was not found; install it with `pip install ninja`"
    return None


def _fix_hint(cuda: bool) -> str:
    if os.name == "nt":
        hint = "install the MSVC build tools (Visual Studio 'Desktop development with C++')"
    else:
        hint = "install a C++ compiler (g++ or clang++) and `pip install ninja`"
    if cuda:
        hint += f", and a CUDA toolkit matching torch.version.cuda ({torch.version.cuda})"
    return hint + "; run with verbose=True (or RWKV_EXT_VERBOSE=1) to see the full build log"


def _build_name(prefix: str, files: list[Path], flags: list[str], cuda: bool) -> str:
    """A name unique to the sources, flags and toolchain: change any and it is rebuilt."""
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    config = [
        *flags,
        torch.__version__,
        str(torch.version.cuda),
        sys.version,
        platform.machine(),
        _cxx(),
        _cpu_identity(),
    ]
    if cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        devices = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        config += [arch_list, str(devices), str(_nvcc())]
    h.update("\n".join(config).encode())
    return f"{prefix}_{'cuda' if cuda else 'cpu'}_{h.hexdigest()[:16]}"


def _import_built(name: str, build_dir: Path) -> types.ModuleType | None:
    """Import an already compiled library of this name, or return None if there is none."""
    path = build_dir / f"{name}{'.pyd' if os.name == 'nt' else '.so'}"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan(prefix: str, sources: tuple[str, ...], headers: tuple[str, ...],
          cuda: bool) -> tuple[list[Path], list[str], list[str], str]:
    """Files, C++ flags, nvcc flags and cache name of one build."""
    files = [SOURCE_DIR / s for s in sources + headers]
    cflags = _cpu_flags() + (["-DWITH_CUDA"] if cuda else [])
    cuda_flags = ["-O3", "-DWITH_CUDA"] if cuda else []
    name = ""
    if all(p.exists() for p in files):
        name = _build_name(prefix, files, cflags + cuda_flags, cuda)
    return files, cflags, cuda_flags, name


def _build(prefix: str, sources: tuple[str, ...], headers: tuple[str, ...], cuda: bool,
           verbose: bool) -> types.ModuleType:
    """Build (or find in the cache) and import one extension; raise ExtensionUnavailable."""
    files, cflags, cuda_flags, name = _plan(prefix, sources, headers, cuda)
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise ExtensionUnavailable(
            f"the extension's C++ sources were not found ({', '.join(missing)}); they ship "
            "with the repository, so install rwkv_lib from a checkout with `pip install -e .`"
        )
    build_dir = cache_dir() / name
    try:
        module = _import_built(name, build_dir)
        if module is not None:
            if _verbose(verbose):
                print(f"rwkv_lib.extension: using the cached build {module.__file__}")
            return module
    except ImportError:
        pass  # a broken or partial library: let cpp_extension rebuild it
    problem = _missing_tools()
    if problem is not None:
        raise ExtensionUnavailable(f"cannot build the C++ extension: {problem}")
    build_dir.mkdir(parents=True, exist_ok=True)
    compiled = [str(SOURCE_DIR / s) for s in sources]
    try:
        return cpp_extension.load(
            name=name,
            sources=compiled,
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_flags or None,
            extra_include_paths=[str(SOURCE_DIR)],
            extra_ldflags=["-fopenmp"] if "-fopenmp" in cflags else None,
            build_directory=str(build_dir),
            verbose=_verbose(verbose),
            with_cuda=cuda,
        )
    except Exception as err:  # compiler errors, linker errors, import errors alike
        log = str(err).strip().splitlines()
        tail = "\n".join(log[-12:])
        raise ExtensionUnavailable(
            f"building the C++ extension {name!r} in {build_dir} failed. "
            f"Fix: {_fix_hint(cuda)} (deleting that folder forces a clean rebuild)."
            f"\nLast lines of the build output:\n{tail}"
        ) from err


def _load_cached(key: str, build: Callable[[], types.ModuleType]) -> types.ModuleType:
    with _lock:
        if key in _loaded:
            return _loaded[key]
        if key in _failed:  # do not retry a failed build on every call
            raise _failed[key]
        try:
            module = build()
        except ExtensionUnavailable as err:
            _failed[key] = err
            raise
        _loaded[key] = module
        return module


# ---------------------------------------------------------------------------------------
# Public loaders


def load_wkv_extension(verbose: bool = False) -> types.ModuleType:
    """The compiled WKV module (built on first use, cached on disk and per process).

    Importing it also registers torch.ops.rwkv.wkv_forward and torch.ops.rwkv.wkv_backward.
    The module's `has_cuda` says whether it contains the CUDA kernels. Raises
    ExtensionUnavailable when no build is possible.
    """

    def build() -> types.ModuleType:
        global _cuda_build_error
        cuda, why_not = _cuda_build_possible()
        if cuda:
            try:
                return _build("rwkv_wkv", WKV_SOURCES + WKV_CUDA_SOURCES, WKV_HEADERS, True,
                              verbose)
            except ExtensionUnavailable as err:
                # Keep the CPU kernels usable; CUDA tensors will get this message.
                why_not = f"the CUDA build failed: {err}"
        _cuda_build_error = why_not
        return _build("rwkv_wkv", WKV_SOURCES, WKV_HEADERS, False, verbose)

    module = _load_cached("wkv", build)
    _register_fake_kernels()
    return module


@functools.cache
def _register_fake_kernels() -> None:
    """Shape-only versions of the two ops, so torch.compile can trace through them.

    The compiler runs a model once on "fake" tensors that have shapes and dtypes but no
    data; these functions tell it what the C++ ops would return. Registered once per
    process, after the library that defines the ops is loaded.
    """

    def compute(k: torch.Tensor) -> torch.dtype:
        return torch.float64 if k.dtype == torch.float64 else torch.float32

    def check_devices(op: str, k: torch.Tensor, **others: torch.Tensor | None) -> None:
        # the same message as the C++ check, which meta and fake tensors never reach
        for name, t in others.items():
            if t is not None and t.device != k.device:
                raise RuntimeError(f"{op}: {name} is on {t.device} but k is on {k.device}; "
                                   "all inputs must be on the same device")

    @torch.library.register_fake("rwkv::wkv_forward")
    def _(time_decay, time_first, k, v, state_a=None, state_b=None, state_p=None):
        check_devices("wkv_forward", k, time_decay=time_decay, time_first=time_first, v=v,
                      state_a=state_a, state_b=state_b, state_p=state_p)
        B, _, C = k.shape
        state = [k.new_empty((B, C), dtype=compute(k)) for _ in range(3)]
        return (k.new_empty(k.shape), *state)

    @torch.library.register_fake("rwkv::wkv_backward")
    def _(time_decay, time_first, k, v, state_a, state_b, state_p, grad_y,
          grad_state_a=None, grad_state_b=None):
        B, _, C = k.shape
        state = [
            k.new_empty((B, C), dtype=s.dtype if s is not None else compute(k))
            for s in (state_a, state_b, state_p)
        ]
        return (time_decay.new_empty(time_decay.shape), time_first.new_empty(time_first.shape),
                k.new_empty(k.shape), v.new_empty(v.shape), *state)


def load_sigmoid_extension(verbose: bool = False) -> types.ModuleType:
    """The teaching sigmoid extension (cuda/sigmoid.cpp): `forward(x)`, `backward(grad, y)`."""
    return _load_cached(
        "sigmoid", lambda: _build("rwkv_sigmoid", SIGMOID_SOURCES, (), False, verbose)
    )


class _SigmoidFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = load_sigmoid_extension().forward(x)
        ctx.save_for_backward(y)  # sigmoid' = y (1 - y): the output is all backward needs
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return load_sigmoid_extension().backward(grad_y.contiguous(), y)


def sigmoid_extension(x: torch.Tensor) -> torch.Tensor:
    """Sigmoid computed by the C++ extension, differentiable (CPU tensors)."""
    return _SigmoidFunction.apply(x)


# ---------------------------------------------------------------------------------------
# The WKV operator as an autograd Function


class _WKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, time_decay, time_first, k, v, state_a, state_b, state_p):
        y, a, b, p = torch.ops.rwkv.wkv_forward(
            time_decay, time_first, k, v, state_a, state_b, state_p
        )
        # Backward replays the recurrence from the inputs: nothing of size (B, T, C)
        # beyond the inputs themselves is kept alive between forward and backward.
        ctx.save_for_backward(time_decay, time_first, k, v, state_a, state_b, state_p)
        return y, a, b, p

    @staticmethod
    def backward(ctx, grad_y, grad_a, grad_b, grad_p):
        time_decay, time_first, k, v, state_a, state_b, state_p = ctx.saved_tensors
        # grad_p is not used: the final state enters whatever follows only through
        # A = a*e^p and B = b*e^p (as in a next call), and then dL/dp = ga*a + gb*b
        # carries no information beyond grad_a and grad_b.
        grads = torch.ops.rwkv.wkv_backward(
            time_decay, time_first, k, v, state_a, state_b, state_p,
            grad_y.contiguous(), grad_a, grad_b,
        )
        if state_a is None:
            grads = grads[:4] + (None, None, None)
        return grads


def _check_device(k: torch.Tensor, module: types.ModuleType) -> None:
    if k.device.type == "cuda" and not module.has_cuda:
        raise ExtensionUnavailable(
            f"the WKV extension was built without CUDA kernels: {_cuda_build_error}"
        )


def wkv_extension(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WKVState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, WKVState]:
    """WKV of RWKV-4 with the C++ (CPU) or CUDA kernels, differentiable.

    time_decay, time_first: (C,); k, v: (B, T, C), on the same device, any floating dtype
    (float16/bfloat16 are computed in float32, float64 in float64); non-contiguous inputs
    are copied. Returns y (B, T, C) in k's dtype, and with `return_state` also the final
    state (a, b, p), each (B, C) in float32 (float64 for float64 k), to pass as `state` to
    the next call; `state=None` starts from the empty state (a = b = 0, p = -1e38).

    Gradients reach time_decay, time_first, k and v, and also flow through the state when
    it is handed from one call to the next (training on a long sequence in chunks gives
    the same gradients as one call). A loss that uses a, b or p directly, rather than as
    the state of a following call, gets no gradient from them.
    """
    if torch.compiler.is_compiling():
        # Building and locking cannot be traced; the ops must exist already.
        if not hasattr(torch.ops.rwkv, "wkv_forward"):
            raise ExtensionUnavailable(
                "torch.compile: call rwkv_lib.extension.load_wkv_extension() (or run the "
                "model once) before compiling, so the WKV ops are registered"
            )
    else:
        _check_device(k, load_wkv_extension())
    if state is None:
        state_a = state_b = state_p = None
    else:
        if len(state) != 3:
            raise ValueError("wkv_extension: state must be a tuple (a, b, p)")
        state_a, state_b, state_p = state
    y, a, b, p = _WKVFunction.apply(time_decay, time_first, k, v, state_a, state_b, state_p)
    return (y, (a, b, p)) if return_state else y


# ---------------------------------------------------------------------------------------
# Environment report


def extension_status(build: bool = False) -> dict:
    """What is needed to build the extensions, what is present, and what can be used.

    With build=False nothing is compiled: "cpu" and "cuda" then say "loaded", "cached"
    (compiled before, loads in a second), "buildable" or "unavailable: <why>". With
    build=True the WKV extension is built if needed, so the answers are definite.
    """
    missing = _missing_tools()
    cuda_ok, cuda_why = _cuda_build_possible()
    status: dict = {
        "cache_dir": str(cache_dir()),
        "compiler": shutil.which(_cxx()),
        "ninja": cpp_extension.is_ninja_available(),
        "nvcc": _nvcc(),
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.is_available(),
    }
    if build:
        try:
            module = load_wkv_extension()
        except ExtensionUnavailable as err:
            status["cpu"] = status["cuda"] = f"unavailable: {err}"
            return status
        status["cpu"] = "loaded"
        status["cuda"] = "loaded" if module.has_cuda else f"unavailable: {_cuda_build_error}"
        return status
    loaded = _loaded.get("wkv")

    def state(cuda: bool) -> str:
        if loaded is not None and (not cuda or loaded.has_cuda):
            return "loaded"
        if cuda and not cuda_ok:
            return f"unavailable: {cuda_why}"
        sources = WKV_SOURCES + (WKV_CUDA_SOURCES if cuda else ())
        _, _, _, name = _plan("rwkv_wkv", sources, WKV_HEADERS, cuda)
        if not name:
            return "unavailable: the sources in cuda/ are missing"
        if any((cache_dir() / name).glob(f"{name}.*")):
            return "cached"
        return f"unavailable: {missing}" if missing else "buildable"

    status["cpu"] = state(False)
    status["cuda"] = state(True)
    return status
