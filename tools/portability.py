"""Install and test the project the way a new user does, once per Python found here.

For each Python version it finds (python3.10 ... python3.13 on PATH, and pyenv's versions),
this script makes a fresh virtual environment and a fresh clone of the committed tree in a
temporary folder, runs the README's set-up command and then its test command there, exactly
as README.md states them (read from it by their markers, as tests/test_project.py does), and
prints a Markdown table: the Python, the PyTorch version and build it got (cpu or cuda X.Y),
install time, size of the environment, the test summary line and the wall time.

Each run is as fresh as a new user's machine: an empty home folder (so no caches: pip's, unless
--pip-cache-dir is given, torch's extensions, matplotlib's fonts, Jupyter's), a fresh
TORCH_EXTENSIONS_DIR (the C++ extension is compiled afresh), and none of the variables that
would change what is tested (PYTHONPATH, VIRTUAL_ENV, MPLBACKEND, RWKV_*, ...). pip's own
configuration on this machine (indexes, find-links) is used, since it decides which PyTorch
build a user here gets.

    python tools/portability.py                                  # every Python found
    python tools/portability.py --python 3.11 3.12 --pip-cache-dir ~/.cache/pip

Every step has a timeout, and the temporary folder is removed at the end (--keep keeps it).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ("3.10", "3.11", "3.12", "3.13")

# Variables that would make a run differ from a new user's; they are not passed on.
DROPPED = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONWARNINGS",
           "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "MPLBACKEND", "MPLCONFIGDIR",
           "TORCH_EXTENSIONS_DIR", "PYTEST_ADDOPTS", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR",
           "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME",
           "XDG_DATA_HOME", "PIP_CACHE_DIR", "PIP_NO_CACHE_DIR")


def readme_command(readme: str, marker: str) -> str:
    """The one-line command in the fenced block after <!-- marker --> in README.md."""
    match = re.search(rf"<!-- {marker} -->\s*```(?:bash|sh)?\n(.+?)\n```", readme, re.S)
    if not match:
        raise SystemExit(f"README.md has no fenced command after <!-- {marker} -->")
    lines = [line.strip() for line in match.group(1).splitlines() if line.strip()]
    if len(lines) != 1:
        raise SystemExit(f"the README's {marker} must be one command, got {lines}")
    return lines[0]


# ---------------------------------------------------------------------------------------
# Finding the Pythons


def _version_of(python: str) -> str | None:
    """'3.12.1' for a working interpreter, else None (a pyenv shim of an inactive version)."""
    try:
        out = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    version = out.stdout.strip()
    return version if out.returncode == 0 and re.fullmatch(r"\d+\.\d+\.\d+\S*", version) else None


def _pyenv_root() -> Path | None:
    if shutil.which("pyenv"):
        out = subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=60)
        if out.returncode == 0 and out.stdout.strip():
            return Path(out.stdout.strip())
    env = os.environ.get("PYENV_ROOT")
    return Path(env) if env else None


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def find_pythons(wanted: list[str]) -> list[tuple[str, str]]:
    """(full version, interpreter path) for each wanted X.Y, or a path given as such."""
    found: dict[str, tuple[str, str]] = {}
    pyenv = _pyenv_root()
    for want in wanted:
        if os.sep in want or Path(want).is_file():  # an interpreter named by its path
            version = _version_of(want)
            if version is None:
                print(f"skipped {want}: it does not run")
            else:
                found[want] = (version, want)
            continue
        candidates = []
        if shutil.which(f"python{want}"):
            candidates.append(shutil.which(f"python{want}"))
        if pyenv is not None:  # the newest patch release of X.Y that pyenv holds
            dirs = sorted((pyenv / "versions").glob(f"{want}.*"), key=lambda p: _release(p.name),
                          reverse=True)
            candidates += [str(d / "bin" / f"python{want}") for d in dirs
                           if re.fullmatch(rf"{re.escape(want)}\.\d+", d.name)]
        for python in candidates:
            version = _version_of(python)
            if version is not None and version.startswith(want + "."):
                found[want] = (version, python)
                break
        else:
            print(f"skipped Python {want}: not found (python{want} on PATH, pyenv versions)")
    return list(found.values())


# ---------------------------------------------------------------------------------------
# Running one configuration


@dataclass
class Result:
    python: str
    torch: str = "-"
    build: str = "-"
    gpu: str = "-"
    install_s: float | None = None
    venv_bytes: int | None = None
    tests: str = "not run"
    wall_s: float = 0.0
    ok: bool = False


def _run(cmd: str | list[str], cwd: Path, env: dict[str, str], timeout: float,
         log: Path | None = None) -> tuple[int, str]:
    """Run a command in its own process group (all of it is killed on timeout): (rc, output).

    The output goes to `log` as it comes (follow it with tail -f), else to a temporary file.
    """
    shell = isinstance(cmd, str)
    with (open(log, "w+", encoding="utf-8", errors="replace") if log is not None
          else tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")) as out:
        proc = subprocess.Popen(cmd, shell=shell, cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                executable="/bin/bash" if shell and os.name != "nt" else None)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = 124
        finally:
            try:  # also whatever it left running (a notebook kernel, say)
                if hasattr(os, "killpg"):
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        if rc == 124:
            out.write(f"\n[timed out after {timeout:.0f} s]\n")
        out.flush()
        out.seek(0)
        text = out.read()
    return rc, text


def _size(path: Path) -> int:
    """Bytes of all files under path, each hard-linked file once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _summary_line(output: str) -> str:
    """pytest's last line, '312 passed, 5 skipped in 250.1s', without the ==== rule."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        bare = line.strip("= ")
        if re.search(r"\b(passed|failed|error|errors|skipped|no tests ran)\b", bare) and \
                re.search(r"\bin [\d.]+s\b", bare):
            return bare
    return lines[-1] if lines else "(no output)"


def _user_env(venv: Path, home: Path, ext_dir: Path, pip_cache: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROPPED and not k.startswith("RWKV_")}
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               HOME=str(home), USERPROFILE=str(home), TORCH_EXTENSIONS_DIR=str(ext_dir))
    if pip_cache is not None:
        env["PIP_CACHE_DIR"] = str(pip_cache)
    return env


def run_one(version: str, python: str, args: argparse.Namespace, commit: str,
            setup: str, test: str) -> Result:
    result = Result(python=version)
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"rwkv-port-{version}-", dir=args.work_dir))
    logs = Path(args.log_dir) if args.log_dir else work
    logs.mkdir(parents=True, exist_ok=True)
    tag = f"py{version}"
    try:
        repo, venv, home = work / "rwkv-notebooks", work / "venv", work / "home"
        home.mkdir()
        env = _user_env(venv, home, work / "torch_extensions", args.pip_cache_dir)
        steps = [
            (["git", "clone", "--quiet", "--no-checkout", str(ROOT), str(repo)], work, 600),
            (["git", "-C", str(repo), "checkout", "--quiet", "--detach", commit], work, 600),
            ([python, "-m", "venv", str(venv)], work, 600),
        ]
        for cmd, cwd, timeout in steps:
            rc, out = _run(cmd, cwd, env, timeout)
            if rc != 0:
                result.tests = f"set-up failed: {' '.join(cmd[:3])}: {out.strip()[-200:]}"
                return result

        print(f"[{version}] {setup}", flush=True)
        t0 = time.monotonic()
        rc, out = _run(setup, repo, env, args.install_timeout, logs / f"{tag}-install.log")
        result.install_s = time.monotonic() - t0
        result.venv_bytes = _size(venv)
        if rc != 0:
            result.tests = f"install failed (rc {rc}, log {logs / f'{tag}-install.log'})"
            print(out[-3000:])
            return result
        probe = ("import torch; print(torch.__version__); print(torch.version.cuda or '');"
                 "print(torch.cuda.is_available())")
        venv_python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
        rc, out = _run([str(venv_python), "-c", probe], repo, env, 600)
        if rc == 0:
            torch_version, cuda, gpu = (out.strip().splitlines() + ["", "", ""])[:3]
            result.torch, result.gpu = torch_version, "yes" if gpu == "True" else "no"
            result.build = f"cuda {cuda}" if cuda else "cpu"

        print(f"[{version}] {test}", flush=True)
        rc, out = _run(test, repo, env, args.test_timeout, logs / f"{tag}-test.log")
        result.tests = _summary_line(out)
        result.ok = rc == 0
        if not result.ok:  # what failed, and how (pytest's FAILURES section, shortened)
            start_at = out.find("= FAILURES =")
            end_at = out.find("short test summary info")
            details = out[start_at:end_at] if 0 <= start_at < end_at else out
            print(details[:6000] + ("\n[...]\n" + details[-2000:] if len(details) > 8000 else
                                    details[6000:]))
            failed = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
            print("\n".join(failed[:40]))
        return result
    finally:
        result.wall_s = time.monotonic() - start
        if args.keep:
            print(f"[{version}] kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Report


def _machine() -> str:
    gpu = "no GPU found (nvidia-smi)"
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
        names = [line.split(" (")[0] for line in out.stdout.splitlines() if line.strip()]
        if out.returncode == 0 and names:
            gpu = ", ".join(names)
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, {gpu}"


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def table(results: list[Result]) -> str:
    rows = ["| Python | PyTorch | build | GPU visible | install | venv size | tests | wall time |",
            "|---|---|---|---|---:|---:|---|---:|"]
    for r in results:
        size = "-" if r.venv_bytes is None else f"{r.venv_bytes / 2**30:.1f} GiB"
        rows.append(f"| {r.python} | {r.torch} | {r.build} | {r.gpu} | {_minutes(r.install_s)} "
                    f"| {size} | {r.tests} | {_minutes(r.wall_s)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", nargs="+", default=list(VERSIONS), metavar="X.Y",
                        help="Python versions (or interpreter paths) to test; default: "
                             + " ".join(VERSIONS))
    parser.add_argument("--pip-cache-dir", type=Path, default=None,
                        help="a pip cache shared by the runs (default: none, each run downloads "
                             "everything, like a new user)")
    parser.add_argument("--keep", action="store_true",
                        help="keep each run's folder (clone, venv, logs) instead of deleting it")
    parser.add_argument("--work-dir", default=None,
                        help="where the temporary folders go (default: the system's temp dir)")
    parser.add_argument("--log-dir", default=None,
                        help="also write each run's install and test logs here")
    parser.add_argument("--install-timeout", type=float, default=3600, metavar="S",
                        help="seconds allowed for the set-up command (default 3600)")
    parser.add_argument("--test-timeout", type=float, default=3600, metavar="S",
                        help="seconds allowed for the test command (default 3600)")
    args = parser.parse_args(argv)
    if args.pip_cache_dir is not None:
        args.pip_cache_dir = args.pip_cache_dir.expanduser().resolve()
        args.pip_cache_dir.mkdir(parents=True, exist_ok=True)
    if args.work_dir is not None:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup, test = readme_command(readme, "setup-command"), readme_command(readme, "test-command")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"],
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        print("note: uncommitted changes are not tested; the runs use the committed tree")
    pythons = find_pythons(args.python)
    if not pythons:
        print("no Python to test was found")
        return 1

    results = []
    try:
        for version, python in pythons:
            print(f"== Python {version} ({python})", flush=True)
            results.append(run_one(version, python, args, commit, setup, test))
            print(table(results[-1:]), flush=True)
    except KeyboardInterrupt:
        print("interrupted")
    print()
    print(f"Commit {commit[:12]} on {_machine()}; set-up `{setup}`, tests `{test}`.")
    print(table(results))
    return 0 if results and all(r.ok for r in results) and len(results) == len(pythons) else 1


if __name__ == "__main__":
    sys.exit(main())
