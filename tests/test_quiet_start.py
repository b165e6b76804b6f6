"""Importing rwkv_lib, and running any notebook's set-up cell, write nothing to stderr.

A stored notebook has nothing on stderr, so a notice written there at start-up fails that
notebook's test, and only on the machines where it is written: a CUDA build of PyTorch on a
machine without a GPU, say, where importing torch.utils.cpp_extension logs "No CUDA runtime
is found". Each check runs in a fresh interpreter with a clean environment, as a new kernel
would, with a CUDA build of PyTorch without a GPU simulated (torch says it was built with
CUDA, sees no GPU, and CUDA_HOME names a folder), whichever build is installed here; the
imports are also checked on this machine as it is (the notebook tests themselves check the
set-up cells as they are).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["rwkv_lib"] + sorted(
    f"rwkv_lib.{p.stem}" for p in (ROOT / "rwkv_lib").glob("*.py") if p.stem != "__init__"
)
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# What a CUDA build of PyTorch reports on a machine without a GPU. It must run before
# anything imports torch.utils.cpp_extension, which looks for the CUDA toolkit on import.
SIMULATE_CUDA_BUILD_WITHOUT_GPU = """\
import torch
torch.version.cuda = "13.0"
torch.cuda._is_compiled = lambda: True
torch.cuda.is_available = lambda: False
"""

# Variables a user's shell has and the run needs; nothing else is passed on (no CUDA_HOME,
# PYTHONWARNINGS, MPLBACKEND, ...). The extension caches are kept, so that nothing is
# compiled twice.
_KEPT = ("PATH", "HOME", "USERPROFILE", "SYSTEMROOT", "TMPDIR", "TEMP", "TMP", "LANG",
         "CXX", "TORCH_EXTENSIONS_DIR", "RWKV_EXT_DIR")


def _env(tmp_path: Path, cuda_build: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _KEPT or k.startswith("LC_")}
    env["PYTHONPATH"] = str(ROOT)  # this checkout's rwkv_lib, installed or not
    if cuda_build:
        home = tmp_path / "cuda_home"
        home.mkdir()
        env["CUDA_HOME"] = str(home)
        # torch.version.cuda changes the extension's build name: rather than compile it
        # again, make the build impossible, which the set-up cells must handle quietly too.
        env["RWKV_EXT_DIR"] = str(tmp_path / "empty_cache")
        env["CXX"] = "no-such-compiler"
    return env


def _run(code: str, tmp_path: Path, cuda_build: bool, cwd: Path = ROOT):
    prelude = SIMULATE_CUDA_BUILD_WITHOUT_GPU if cuda_build else ""
    return subprocess.run(
        [sys.executable, "-c", prelude + code], cwd=cwd, env=_env(tmp_path, cuda_build),
        capture_output=True, text=True, timeout=600,
    )


def _setup_cell(notebook: Path) -> str:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


CONDITIONS = pytest.mark.parametrize(
    "cuda_build", [False, True], ids=["as-installed", "cuda-build-without-gpu"]
)


def test_the_simulation_reproduces_the_notice(tmp_path):
    # If torch stops writing this notice, the simulation below no longer tests anything.
    result = _run("from torch.utils import cpp_extension", tmp_path, cuda_build=True)
    assert "No CUDA runtime is found" in result.stderr, (
        "the simulated CUDA build no longer makes torch.utils.cpp_extension write its notice; "
        f"update SIMULATE_CUDA_BUILD_WITHOUT_GPU. stderr: {result.stderr!r}"
    )


@CONDITIONS
def test_importing_every_module_writes_nothing_to_stderr(tmp_path, cuda_build):
    result = _run("".join(f"import {m}\n" for m in MODULES), tmp_path, cuda_build)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"importing rwkv_lib wrote to stderr:\n{result.stderr}"


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_setup_cell_writes_nothing_to_stderr_on_a_cuda_build_without_gpu(tmp_path, notebook):
    code = f"exec(compile({_setup_cell(notebook)!r}, {notebook.name!r}, 'exec'), {{'__name__': '__main__'}})\n"
    result = _run(code, tmp_path, cuda_build=True, cwd=notebook.parent)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"the set-up cell of {notebook.name} wrote to stderr:\n{result.stderr}"


_IMPORTS_IT = re.compile(
    r"^\s*(from torch\.utils import .*\bcpp_extension\b|(from|import) torch\.utils\.cpp_extension\b)",
    re.M,
)


def test_cpp_extension_is_imported_only_through_the_quiet_import():
    # Any direct import that runs first brings the notice back on a CUDA build without a GPU.
    sources = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
               for folder in ("rwkv_lib", "tests", "benchmarks") for p in (ROOT / folder).glob("*.py")
               if p.name not in ("quiet_cpp_extension.py", Path(__file__).name)}
    for notebook in NOTEBOOKS:
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        sources[notebook.name] = "\n".join("".join(c["source"]) for c in cells
                                           if c["cell_type"] == "code")
    direct = [name for name, text in sources.items() if _IMPORTS_IT.search(text)]
    assert not direct, (
        f"{direct} import torch.utils.cpp_extension directly; use "
        "`from rwkv_lib.quiet_cpp_extension import cpp_extension`"
    )
