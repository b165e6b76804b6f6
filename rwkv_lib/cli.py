"""What the command lines (train, evaluate, generate, checkpoint, data) have in common.

A mistake a user can make (a bad value, a missing or unreadable file, a file where a folder
should be, a full disk, a GPU that is not there, a damaged checkpoint) ends the command with
one line on stderr saying what is wrong and what to do, and exit status 1; a usage error
(an argument argparse rejects) with one line and status 2, argparse's convention. Anything
else is a bug and keeps its traceback. RWKV_TRACEBACK=1 shows the traceback in every case.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import sys
import typing
from collections.abc import Callable, Sequence

import torch

DEVICES = "auto (a CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error on one line instead of the whole usage text first."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- argument types: argparse names the option in the error ------------------------------------

def positive_int(text: str) -> int:
    value = _parse(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _parse(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _parse(float, text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def probability(text: str) -> float:
    """A number in (0, 1], as top-p takes."""
    value = _parse(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def device_name(text: str) -> str:
    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _parse(kind: type, text: str) -> typing.Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}"
                                          f", got {text!r}") from None


# --- devices and WKV backends --------------------------------------------------------------------

def device_problem(name: object) -> str | None:
    """Why `name` is no device name we accept, or None if it is one."""
    if isinstance(name, str) and _DEVICE.fullmatch(name):
        return None
    return f"must be one of {DEVICES}; got {name!r}"


def resolve_device(name: str) -> torch.device:
    """The torch.device for a device name, checked to exist on this machine: "auto" is a
    CUDA GPU if PyTorch sees one, else the CPU. Raises ValueError saying what to use."""
    problem = device_problem(name)
    if problem:
        raise ValueError(f"device {problem}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for, but PyTorch sees no CUDA GPU "
                             "here; use the device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} was asked for, but PyTorch sees "
                             f"{torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for, but PyTorch sees no Apple GPU here; "
                         "use the device cpu (or auto)")
    return device


def check_backend_device(backend: str, device: torch.device) -> None:
    """The compiled WKV kernels run where they were built for: 'cpp' on the CPU, 'cuda' on a
    GPU. The other backends run anywhere."""
    wanted = {"cpp": "cpu", "cuda": "cuda"}.get(backend)
    if wanted is not None and device.type != wanted:
        raise ValueError(f"the WKV backend {backend!r} runs on {wanted} tensors only, but the "
                         f"device is {device}; use the backend auto (or pytorch)")


# --- one line per error ----------------------------------------------------------------------

_OS_REASONS = {
    errno.ENOENT: "not found; check the path",
    errno.ENOTDIR: "not a folder (a file is in the way on this path); check the path",
    errno.EISDIR: "is a folder, not a file; give the path of a file",
    errno.EACCES: "permission denied; choose a place you may read and write",
    errno.EPERM: "operation not permitted; choose a place you may read and write",
    errno.EROFS: "on a read-only file system; choose a place you may write to",
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere",
    errno.EEXIST: "already exists; choose another path",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
}


def describe(err: BaseException) -> str | None:
    """The line to show for an error a user can cause, or None for a bug."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return ("out of memory on the GPU; try a smaller batch_size (--batch-size) or "
                "ctx_len (--ctx-len), or dtype bf16")
    if isinstance(err, OSError):
        if err.filename is not None:
            where = str(err.filename)
            if err.filename2 is not None:
                where += f" -> {err.filename2}"
            return f"{where}: {_OS_REASONS.get(err.errno, err.strerror or str(err))}"
        if err.errno is not None and err.strerror:
            return err.strerror
        return str(err) or type(err).__name__
    if isinstance(err, (ValueError, FloatingPointError)):
        return str(err)
    extension = sys.modules.get("rwkv_lib.extension")  # loaded if it could have raised
    if extension is not None and isinstance(err, extension.ExtensionUnavailable):
        return str(err)
    return None


def one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def run(main: Callable[[Sequence[str] | None], object],
        argv: Sequence[str] | None = None) -> int:
    """Call a command line's main and turn a user's mistake into one line on stderr.
    Returns the exit status: main's own if it returns an int, else 0; 1 after an error."""
    try:
        result = main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        line = describe(err)
        if line is None or os.environ.get("RWKV_TRACEBACK"):
            raise
        print(f"error: {one_line(line)}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0
