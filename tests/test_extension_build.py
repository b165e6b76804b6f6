"""Building and caching compiled extensions (rwkv_lib.extension) when things go wrong: a
build killed halfway, another process building at the same time, a damaged library in the
cache, a cache folder that cannot be written.

Each case runs in fresh Python processes, as it happens to users (a restarted kernel, a
second notebook), with its own cache folder. Most of them build a tiny module without
torch's headers (`demo.cpp` below) through the same code as the real extensions, so a
build takes seconds rather than a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_extension import _FAILING_BUILD

from rwkv_lib import extension

REPO = Path(__file__).resolve().parent.parent

# A Python module in plain C++: TORCH_EXTENSION_NAME is defined by the build, as for every
# extension, and PyInit_<name> is what importing the library calls.
DEMO_CPP = r"""
#include <Python.h>

#define DEMO_STR2(x) #x
#define DEMO_STR(x) DEMO_STR2(x)
#define DEMO_CAT2(a, b) a##b
#define DEMO_CAT(a, b) DEMO_CAT2(a, b)

static struct PyModuleDef demo_module = {PyModuleDef_HEAD_INIT, DEMO_STR(TORCH_EXTENSION_NAME),
                                         nullptr, -1, nullptr};

PyMODINIT_FUNC DEMO_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
    PyObject* m = PyModule_Create(&demo_module);
    if (m != nullptr) PyModule_AddIntConstant(m, "answer", 42);
    return m;
}
"""

# Builds (or loads from the cache) the demo module with the library's own build function.
BUILD_DEMO = """
import json, sys
from pathlib import Path
from rwkv_lib import extension
extension.SOURCE_DIR = Path(sys.argv[1])
module = extension._build(sys.argv[2] if len(sys.argv) > 2 else "demo", ("demo.cpp",), (),
                          False, False)
print(json.dumps({"answer": module.answer, "file": module.__file__}))
"""

# A C++ compiler that never finishes a compile: every command with -c writes its process id
# to a marker file and sleeps; anything else (--version, ABI checks) goes to the real one.
STUCK_CXX = """#!/bin/sh
for arg in "$@"; do
  if [ "$arg" = "-c" ]; then
    echo $$ >> "$STUCK_MARKER"
    exec sleep 600
  fi
done
exec {real} "$@"
"""

BUILD_TIMEOUT = 180  # seconds: a demo build takes a few, even on a busy machine


@pytest.fixture(autouse=True)
def _needs_build_tools():
    missing = extension._missing_tools()
    if missing is not None:
        pytest.skip(f"C++ extensions cannot be built here: {missing}")


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RWKV_EXT_DIR": str(cache), **extra}
    env.pop("CXX", None)  # `c++` from PATH, so that a stuck one can be put in front
    env.pop("RWKV_EXT_VERBOSE", None)
    return env


def _demo_sources(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "demo.cpp").write_text(DEMO_CPP)
    return src


def _build_demo(src: Path, cache: Path, prefix: str = "demo") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BUILD_DEMO, str(src), prefix],
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                          env=_env(cache), cwd=REPO)


def _answer(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, f"exit code {out.returncode}\n{out.stdout}\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def _start_stuck_build(tmp_path: Path, src: Path, cache: Path) -> tuple[subprocess.Popen, Path]:
    """A process in its own process group whose build hangs in the compiler."""
    real = shutil.which("c++")
    if real is None:
        pytest.skip("the test puts a stuck `c++` in front of the real one on PATH")
    bin_dir = tmp_path / "stuck-bin"
    bin_dir.mkdir()
    stuck = bin_dir / "c++"
    stuck.write_text(STUCK_CXX.format(real=real))
    stuck.chmod(0o755)
    marker = tmp_path / "compiling"
    env = _env(cache, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               STUCK_MARKER=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", BUILD_DEMO, str(src)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + BUILD_TIMEOUT
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill_group(proc, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"the stuck build never reached the compiler:\n{out}\n{err[-3000:]}")
        time.sleep(0.05)
    return proc, marker


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    """Kill the build's process group (python and ninja), as a kernel restart does."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


@pytest.fixture
def stuck_compilers(tmp_path):
    """Ends the stuck compilers a test leaves behind. Ninja starts each command in a process
    group of its own, so killing the build's group leaves them running, as it does for
    real builds (where they finish on their own)."""
    yield
    marker = tmp_path / "compiling"
    if marker.exists():
        for line in marker.read_text().split():
            try:
                os.kill(int(line), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_build_killed_midway_does_not_block_later_processes(tmp_path, sig, stuck_compilers):
    src, cache = _demo_sources(tmp_path), tmp_path / "cache"
    proc, _ = _start_stuck_build(tmp_path, src, cache)
    _kill_group(proc, sig)
    # torch's own lock file is left behind: the situation in which every later build used
    # to wait for it forever
    assert list(cache.glob("*/lock")), "expected torch's build lock to be left behind"
    assert _answer(_build_demo(src, cache))["answer"] == 42


def test_waiting_for_a_live_build_says_what_it_waits_for(tmp_path, stuck_compilers):
    src, cache = _demo_sources(tmp_path), tmp_path / "cache"
    first, _ = _start_stuck_build(tmp_path, src, cache)
    log = tmp_path / "second.err"
    with open(log, "w") as err:
        second = subprocess.Popen([sys.executable, "-c", BUILD_DEMO, str(src)], env=_env(cache),
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            try:
                deadline = time.monotonic() + 60
                while "waiting" not in log.read_text():
                    assert second.poll() is None, f"the second process ended: {log.read_text()}"
                    assert time.monotonic() < deadline, "the second process waits without a word"
                    time.sleep(0.1)
            finally:
                _kill_group(first, signal.SIGKILL)  # the first build dies: the second goes on
            out, _ = second.communicate(timeout=BUILD_TIMEOUT)
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()
    message = log.read_text().strip().splitlines()
    assert len(message) == 1, message
    assert f"process {first.pid}" in message[0] and "demo" in message[0], message[0]
    assert second.returncode == 0, message
    assert json.loads(out.strip().splitlines()[-1])["answer"] == 42


def test_simultaneous_first_builds_compile_once(tmp_path):
    src, cache = _demo_sources(tmp_path), tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_DEMO, str(src)], env=_env(cache),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    try:
        results = [p.communicate(timeout=BUILD_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    files = set()
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["answer"] == 42
        files.add(result["file"])
    assert len(files) == 1
    # ninja's log lists every command it ran: one compile, by whichever process came first
    (log,) = cache.glob("*/.ninja_log")
    outputs = [line.split("\t")[3] for line in log.read_text().splitlines()
               if not line.startswith("#")]
    assert outputs.count("demo.o") == 1, log.read_text()


def test_a_damaged_library_in_the_cache_is_rebuilt(tmp_path):
    src, cache = _demo_sources(tmp_path), tmp_path / "cache"
    library = Path(_answer(_build_demo(src, cache))["file"])
    good = library.read_bytes()
    damages = {
        "truncated": good[:4096],  # a few KiB of a real library: importing it raised SIGBUS
        "garbage": bytes(range(256)) * (len(good) // 256),
        "empty": b"",
    }
    for damage, data in damages.items():
        library.write_bytes(data)
        out = _build_demo(src, cache)
        assert out.returncode != -signal.SIGBUS, f"{damage}: importing it crashed Python"
        assert _answer(out)["answer"] == 42, damage
        assert library.stat().st_size > 4096, damage
    # the rebuilt library is then used as it is
    mtime = library.stat().st_mtime_ns
    assert _answer(_build_demo(src, cache))["answer"] == 42
    assert library.stat().st_mtime_ns == mtime, "a good library was rebuilt"


def test_a_whole_library_that_does_not_load_is_reported_not_rebuilt(tmp_path):
    # A library that matches its manifest but fails to import has a cause outside the
    # build (here: it is another module's library); rebuilding it in every process would
    # cost minutes each time and fix nothing.
    src, cache = _demo_sources(tmp_path), tmp_path / "cache"
    library = Path(_answer(_build_demo(src, cache))["file"])
    other = Path(_answer(_build_demo(src, cache, prefix="other"))["file"])
    tmp = library.with_suffix(".tmp")
    shutil.copyfile(other, tmp)
    os.replace(tmp, library)  # a new file: never rewrite a library in place
    extension._write_manifest(library)
    out = _build_demo(src, cache)
    assert out.returncode == 1
    assert "ExtensionUnavailable" in out.stderr and "does not load here" in out.stderr
    assert library.read_bytes() == other.read_bytes(), "it was rebuilt"




@pytest.mark.parametrize("where", ["cache-is-a-file", "cache-under-a-file"])
def test_a_cache_folder_that_cannot_be_made_falls_back(tmp_path, where):
    # Tests run as root, for whom permissions do not stop a write; a regular file in the
    # way stops mkdir for everyone.
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder\n")
    cache = blocker if where == "cache-is-a-file" else blocker / "cache"
    out = subprocess.run([sys.executable, "-c", _FAILING_BUILD], capture_output=True, text=True,
                         timeout=BUILD_TIMEOUT, env=_env(cache), cwd=REPO)
    result = _answer(out)
    assert result["message"] is not None, "loading should have failed"
    assert str(blocker) in result["message"] and "RWKV_EXT_DIR" in result["message"]
    assert result["finite"]
    assert len(result["warnings"]) == 1 and "unavailable" in result["warnings"][0]
