"""Building and loading the C++/CUDA extensions of the series (notebook 05_cpp_extension).

The sources live in `cuda/` at the root of the repository:

- `sigmoid.cpp`: a tiny teaching extension, notebook 04's custom sigmoid as a C++ op.
- `wkv_math.h`: the WKV recurrence, one time step, shared by the CPU and CUDA kernels.
- `wkv_cpu.cpp`, `wkv_cuda.cu`: the kernels, on raw pointers.
- `wkv_chunked.h`, `wkv_cuda_chunked.cu`: CUDA kernels parallel over time as well (for
  small B*C), chosen with the environment variable `RWKV_WKV_CUDA`
  (`sequential`, the default, `chunked` or `auto`; see `wkv_cuda_chunked.cu`).
- `wkv_ops.cpp`: the PyTorch bindings, registered as `torch.ops.rwkv.wkv_forward` /
  `torch.ops.rwkv.wkv_backward` and also as plain functions of the Python module.

This module builds and loads them; their faces in Python live beside their siblings:
`rwkv_lib.wkv_op` (the WKV operator's autograd Function and fake kernels, the "cpp" and
"cuda" backends of `rwkv_lib.wkv`) and `rwkv_lib.sigmoid_op`.

Nothing is compiled at import time. The first call of `load_wkv_extension()` compiles
with `torch.utils.cpp_extension.load` and ninja into a cache directory outside the
repository (`$RWKV_EXT_DIR`, else `rwkv_notebooks/` under torch's extensions directory),
which takes a minute or two; later calls, in this or any new process, import the cached
library without compiling. The build's name contains a hash of the sources, the flags and
the versions of Python and torch, so an edited source is rebuilt automatically (in a new
process: a process keeps the version it loaded first). Compiler output is shown only with
`verbose=True` or the environment variable `RWKV_EXT_VERBOSE=1`.

A cached library is imported only once it is known to be whole. A successful build ends by
writing a manifest with the library's size and SHA-256 (atomically, after the import
worked); a library without a matching manifest (a build killed halfway, a truncated or
overwritten file, which could crash Python on import) is deleted with the rest of its
build folder and rebuilt. One process at a time builds a given folder: it holds an OS lock
on a file there for the whole build, which the kernel releases if the process dies, so a
killed build never blocks the next one; a process that has to wait for a live build says
on stderr for whom it waits.

The CUDA kernels are compiled in when torch was built with CUDA, a GPU is visible and
nvcc is found; otherwise the build is CPU-only. When a build is impossible (no compiler,
a failed compile, a cache directory that cannot be written), the loaders raise
`ExtensionUnavailable`, whose message says why and what to do;
`rwkv_lib.wkv.wkv(..., backend="auto")` then falls back to its PyTorch backend.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

# torch.utils.cpp_extension, without the notice a CUDA build of torch writes when there is no GPU
from .quiet_cpp_extension import cpp_extension

if os.name == "nt":
    import msvcrt
else:
    import fcntl

SOURCE_DIR = Path(__file__).resolve().parent.parent / "cuda"
WKV_SOURCES = ("wkv_ops.cpp", "wkv_cpu.cpp", "rwkv_step_cpu.cpp")
WKV_CUDA_SOURCES = ("wkv_cuda.cu", "wkv_cuda_chunked.cu")
WKV_HEADERS = ("wkv_math.h", "wkv_chunked.h")  # not compiled on their own, but hashed
SIGMOID_SOURCES = ("sigmoid.cpp",)

# Part of every build's name: it changes whenever what a build folder holds changes meaning
# (here: a library counts only with its manifest), so folders of older versions, which
# other checkouts may still use, are never touched.
CACHE_LAYOUT = "manifest-1"
MANIFEST_NAME = "rwkv_manifest.json"
LOCK_NAME = "rwkv_build.lock"  # held (flock / msvcrt.locking) while a process builds
OWNER_NAME = "rwkv_build.owner"  # who holds it, for the message of a process that waits

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
        CACHE_LAYOUT,
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


# ---------------------------------------------------------------------------------------
# The cache: verified libraries, one builder per folder


def _library_path(build_dir: Path, name: str) -> Path:
    return build_dir / f"{name}{'.pyd' if os.name == 'nt' else '.so'}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_verified(library: Path) -> bool:
    """Whether the library is the one its build's manifest describes (size and SHA-256)."""
    try:
        manifest = json.loads((library.parent / MANIFEST_NAME).read_text())
        return (manifest["library"] == library.name
                and manifest["size"] == library.stat().st_size
                and manifest["sha256"] == _sha256(library))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_manifest(library: Path) -> None:
    record = {"library": library.name, "size": library.stat().st_size,
              "sha256": _sha256(library), "torch": torch.__version__}
    tmp = library.parent / f"{MANIFEST_NAME}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, library.parent / MANIFEST_NAME)  # readers see no manifest or a whole one


def _import_library(name: str, library: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _import_cached(name: str, build_dir: Path, verbose: bool) -> types.ModuleType | None:
    """The cached library, imported, if there is a verified one; else None.

    Verification comes first because importing a damaged library can kill the process
    (SIGBUS on a truncated file), where no exception could be caught. A verified library
    that does not import is not rebuilt on every call: the cause lies in this environment
    (a missing system library, say), which a rebuild of identical sources rarely fixes."""
    library = _library_path(build_dir, name)
    if not _is_verified(library):
        return None
    try:
        module = _import_library(name, library)
    except ImportError as err:
        raise ExtensionUnavailable(
            f"the compiled extension {library} is whole but does not load here: {err}. "
            f"Fix what the message names, or delete {build_dir} to rebuild it"
        ) from err
    if _verbose(verbose):
        print(f"rwkv_lib.extension: using the cached build {library}")
    return module


if os.name == "nt":

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _wait_lock(fd: int) -> None:
        while not _try_lock(fd):
            time.sleep(0.5)

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _wait_lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def _build_lock(build_dir: Path, name: str) -> Iterator[None]:
    """Hold the build folder's lock for the duration of the block.

    An OS lock, not a lock file that must be deleted: the kernel releases it when its
    process ends, however it ends, so a killed build cannot leave it held. (Python's file
    descriptors are not inherited, so compilers left running by a killed build do not
    hold it either.) While another live process holds it, say so, once, and wait.
    """
    fd = os.open(build_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd):
            try:
                owner = (build_dir / OWNER_NAME).read_text().strip()
            except OSError:
                owner = ""
            print(f"rwkv_lib.extension: waiting for {owner or 'another process'} to finish "
                  f"building {name} in {build_dir}", file=sys.stderr, flush=True)
            _wait_lock(fd)
        try:
            (build_dir / OWNER_NAME).write_text(
                f"process {os.getpid()} on {socket.gethostname()}\n")
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


def _clear_build_outputs(build_dir: Path) -> None:
    """Delete what earlier builds left in the folder, whole or not, except the lock.

    Ninja would otherwise take a damaged library that is newer than its objects for up to
    date, and torch's own lock file (torch.utils.file_baton), left behind by a killed build,
    would make cpp_extension.load wait for it forever. The folder's name is unique to the
    sources and flags, so nothing reusable is lost."""
    (build_dir / MANIFEST_NAME).unlink(missing_ok=True)  # first: no moment with a stale one
    for entry in build_dir.iterdir():
        if entry.name in (LOCK_NAME, OWNER_NAME):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _compile(name: str, build_dir: Path, sources: tuple[str, ...], cflags: list[str],
             cuda_flags: list[str], cuda: bool, verbose: bool) -> types.ModuleType:
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(SOURCE_DIR / s) for s in sources],
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
            f"Fix: {_fix_hint(cuda)}.\nLast lines of the build output:\n{tail}"
        ) from err


def _build(prefix: str, sources: tuple[str, ...], headers: tuple[str, ...], cuda: bool,
           verbose: bool) -> types.ModuleType:
    """Import one extension from the cache, building it first if needed.

    Every way this can fail raises ExtensionUnavailable."""
    try:
        files, cflags, cuda_flags, name = _plan(prefix, sources, headers, cuda)
    except (OSError, RuntimeError) as err:  # unreadable sources, a GPU that fails to answer
        raise ExtensionUnavailable(f"cannot prepare the build of {prefix}: {err}") from err
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise ExtensionUnavailable(
            f"the extension's C++ sources were not found ({', '.join(missing)}); they ship "
            "with the repository, so install rwkv_lib from a checkout with `pip install -e .`"
        )
    build_dir = cache_dir() / name
    module = _import_cached(name, build_dir, verbose)  # no lock, no writes: a read-only
    if module is not None:                             # cache of good builds works
        return module
    problem = _missing_tools()
    if problem is not None:
        raise ExtensionUnavailable(f"cannot build the C++ extension: {problem}")
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with _build_lock(build_dir, name):
            module = _import_cached(name, build_dir, verbose)  # built while we waited?
            if module is None:
                _clear_build_outputs(build_dir)
                module = _compile(name, build_dir, sources, cflags, cuda_flags, cuda, verbose)
                library = _library_path(build_dir, name)
                try:
                    _write_manifest(library)
                except OSError:
                    pass  # the module works; without a manifest the next process rebuilds
    except OSError as err:
        raise ExtensionUnavailable(
            f"cannot build the C++ extension in {build_dir}: {err}. Set RWKV_EXT_DIR to a "
            "folder you can write to, where the compiled extensions are kept"
        ) from err
    return module


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

    Importing it also registers torch.ops.rwkv.wkv_forward and torch.ops.rwkv.wkv_backward,
    and loading registers their fake kernels (rwkv_lib.wkv_op), so that torch.compile can
    trace them. The module's `has_cuda` says whether it contains the CUDA kernels. Raises
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
    from .wkv_op import register_fake_kernels  # the ops' Python side; it imports this module

    register_fake_kernels()
    return module


def wkv_cuda_unavailable_reason() -> str | None:
    """Why the loaded WKV module has no CUDA kernels (None before loading, or when it has)."""
    return _cuda_build_error


def load_sigmoid_extension(verbose: bool = False) -> types.ModuleType:
    """The teaching sigmoid extension (cuda/sigmoid.cpp): `forward(x)`, `backward(grad, y)`.

    Its autograd Function is in rwkv_lib.sigmoid_op."""
    return _load_cached(
        "sigmoid", lambda: _build("rwkv_sigmoid", SIGMOID_SOURCES, (), False, verbose)
    )


# ---------------------------------------------------------------------------------------
# Environment report


def extension_status(build: bool = False) -> dict:
    """What is needed to build the extensions, what is present, and what can be used.

    With build=False nothing is compiled: "cpu" and "cuda" then say "loaded", "cached"
    (compiled before and verified, loads in a second), "buildable" or "unavailable: <why>".
    With build=True the WKV extension is built if needed, so the answers are definite.
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
        if _is_verified(_library_path(cache_dir() / name, name)):
            return "cached"
        return f"unavailable: {missing}" if missing else "buildable"

    status["cpu"] = state(False)
    status["cuda"] = state(True)
    return status
