"""Training on several GPUs or machines: torchrun and DistributedDataParallel (notebook 08).

    torchrun --nproc_per_node=4 -m rwkv_lib.train --preset enwik8 --out-dir runs/enwik8

torchrun starts the command once per process and tells each copy who it is in environment
variables: RANK (0..N-1 over all machines), LOCAL_RANK (0.. on this machine), WORLD_SIZE (N),
LOCAL_WORLD_SIZE, and where to meet (MASTER_ADDR, MASTER_PORT). Without them, or with a
single process, nothing here does anything and training is what it always was. The
README's "Training on several GPUs or machines" has the commands for several machines.

Data parallelism, as rwkv_lib.train does it:
- Every process holds the whole model. DistributedDataParallel starts them all from rank
  0's weights and, during backward, replaces every gradient by its average over the
  processes, so every optimizer takes the same step and the weights stay equal.
- The global batch is split: step s holds the windows s*B .. s*B+B-1, as in one process,
  and rank r takes the r-th contiguous slice of B/N of them. Each rank's loss is the mean
  over its slice; the average of the N slice gradients is the gradient of the mean over all
  B windows, the same update as one process at batch B up to the order of floating-point
  additions. L2Wrap divides its push by the positions it sees (B/N * T) and the average
  divides by N again: 1/(B*T), as in one process.
- The numbers that decide what happens next (the training loss, the validation loss) are
  averaged over the ranks, so every rank sees the same value: a non-finite loss on any
  rank makes the average non-finite on all of them, and all stop at the same step.
- Rank 0 alone writes files and prints; the others compute the same things quietly. The
  checkpoint holds the plain model's weights (no "module." prefix) and rank 0's random
  states, which every rank restores on resume. Training draws no random numbers (window i
  is a function of (seed, i)), so resuming needs only the step, whatever the number of
  processes before and after.

Backends: NCCL for CUDA tensors (with gloo beside it for the few CPU-side numbers), gloo
when training on CPUs. `dist_backend` in TrainConfig overrides the choice.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

BACKENDS = ("auto", "nccl", "gloo")
# NCCL moves the CUDA tensors (the gradients); gloo, beside it, the small CPU tensors of
# the checks and averages below, so they work whatever device a rank trains on.
NCCL_WITH_GLOO = "cpu:gloo,cuda:nccl"


@dataclass(frozen=True)
class Launch:
    """What torchrun says about this process."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int


def launch_from_env(environ: dict[str, str] | None = None) -> Launch | None:
    """This process's place in a torchrun job, or None when it was not started by one."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    try:
        rank, local_rank, world_size = (int(env[n]) for n in names)
        local_world_size = int(env.get("LOCAL_WORLD_SIZE", world_size))
    except (KeyError, ValueError):
        shown = ", ".join(f"{n}={env.get(n)!r}" for n in names)
        raise ValueError(f"WORLD_SIZE is set, so this looks like a torchrun process, but "
                         f"{shown} are not all whole numbers; start the job with torchrun, "
                         f"or unset WORLD_SIZE to train in one process") from None
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK {rank} is not in 0..WORLD_SIZE-1 ({world_size - 1})")
    return Launch(rank, local_rank, world_size, local_world_size)


def check_batch_split(batch_size: int, world_size: int) -> None:
    """The global batch must divide evenly, so that each rank's mean weighs the same."""
    if batch_size % world_size:
        raise ValueError(
            f"batch_size {batch_size} cannot be split evenly over {world_size} processes: "
            f"choose a batch_size that is a multiple of {world_size}, or a number of "
            f"processes that divides {batch_size}")


def local_device(requested: str, local_rank: int, local_world_size: int,
                 cuda_available: bool, device_count: int) -> tuple[torch.device, str | None]:
    """The device of one process of several, and what is wrong with the request, if anything.

    Each process takes the GPU of its local rank, so "cuda" (or "auto" on a machine with
    GPUs) needs at least as many GPUs as processes on the machine. On a problem the device
    returned is the CPU, where the processes can still meet to report it."""
    cpu = torch.device("cpu")
    if requested == "cpu":
        return cpu, None
    if requested not in ("auto", "cuda"):
        if requested.startswith("cuda:"):
            return cpu, (f"device {requested!r}: with several processes each one takes the GPU "
                         f"of its local rank; pass --device cuda (or auto), and choose the GPUs "
                         f"with CUDA_VISIBLE_DEVICES")
        return cpu, f"device {requested!r}: training on several processes supports cpu and cuda"
    if not cuda_available:
        if requested == "cuda":
            return cpu, "device 'cuda' was asked for, but PyTorch sees no CUDA GPU"
        return cpu, None
    if local_rank >= device_count:
        return cpu, (f"this machine runs {local_world_size} processes but PyTorch sees "
                     f"{device_count} GPU(s), one per process is needed: start "
                     f"--nproc_per_node {device_count}, or pass --device cpu")
    return torch.device("cuda", local_rank), None


def choose_backend(requested: str, device_type: str, nccl_available: bool
                   ) -> tuple[str, str | None]:
    """The init_process_group backend for a rank training on `device_type`, and a problem.

    "auto": NCCL (with gloo for CPU tensors) on CUDA when PyTorch has NCCL, else gloo.
    On a problem the answer is gloo, which every PyTorch build has."""
    if requested not in BACKENDS:
        raise ValueError(f"dist_backend must be one of {BACKENDS}, got {requested!r}")
    nccl_usable = device_type == "cuda" and nccl_available
    if requested == "gloo" or (requested == "auto" and not nccl_usable):
        return "gloo", None
    if not nccl_usable:
        why = "trains on the CPU" if device_type != "cuda" else "has a PyTorch without NCCL"
        return "gloo", f"dist_backend 'nccl' needs CUDA GPUs, but this process {why}; use gloo"
    return NCCL_WITH_GLOO, None


def check_agreement(reports: Sequence[tuple[str, str | None, str]]) -> None:
    """Raise ValueError, with one line for the whole job, if any rank reported a problem or
    the ranks are on different kinds of device. `reports[r]` = (device, problem, host)."""
    problems: dict[str, list[tuple[int, str]]] = {}
    kinds: dict[str, list[tuple[int, str]]] = {}
    for rank, (device, problem, host) in enumerate(reports):
        if problem:
            problems.setdefault(problem, []).append((rank, host))
        kinds.setdefault(torch.device(device).type, []).append((rank, host))
    if problems:
        raise ValueError("; ".join(f"{_ranks(where)}: {problem}"
                                   for problem, where in problems.items()))
    if len(kinds) > 1:
        found = ", and ".join(f"{kind} for {_ranks(where)}" for kind, where in kinds.items())
        raise ValueError(f"the processes must all train on the same kind of device, but they "
                         f"found {found}: give every machine its GPUs (check "
                         f"CUDA_VISIBLE_DEVICES), or pass --device cpu")


def _ranks(where: list[tuple[int, str]]) -> str:
    """[(0, "a"), (1, "a"), (2, "b")] -> "ranks 0, 1 on a and rank 2 on b"."""
    hosts: dict[str, list[str]] = {}
    for rank, host in where:
        hosts.setdefault(host, []).append(str(rank))
    return " and ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(r)} on {host}"
                        for host, r in hosts.items())


class RankWindows(Sequence[int]):
    """The training windows of one rank, step by step: its contiguous share of each step's
    global batch. For one process, range(first_step * B, end_step * B)."""

    def __init__(self, first_step: int, end_step: int, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> None:
        check_batch_split(batch_size, world_size)
        self.first_step, self.steps = first_step, max(0, end_step - first_step)
        self.batch_size, self.share = batch_size, batch_size // world_size
        self.offset = rank * self.share

    def __len__(self) -> int:
        return self.steps * self.share

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)}")
        step, j = divmod(i, self.share)
        return (self.first_step + step) * self.batch_size + self.offset + j

    def __iter__(self) -> Iterator[int]:
        for step in range(self.first_step, self.first_step + self.steps):
            start = step * self.batch_size + self.offset
            yield from range(start, start + self.share)


@dataclass(frozen=True)
class Context:
    """This process's part in training. The defaults are the one-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # None: one process, the caller picks as always
    backend: str | None = None
    group: Any = None  # the process group of the model's gradients; None: the default one

    @property
    def is_main(self) -> bool:
        """Whether this process writes the files and prints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def windows(self, first_step: int, end_step: int, batch_size: int) -> RankWindows:
        """This rank's windows for steps first_step .. end_step-1 (a DataLoader sampler;
        the loader's batch_size is then batch_size // world_size)."""
        return RankWindows(first_step, end_step, batch_size, self.rank, self.world_size)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model inside DistributedDataParallel, or the model itself for one process.
        Save `model`, not the wrapper: its state dict has the plain names."""
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" \
            else None
        return DistributedDataParallel(model, device_ids=ids, process_group=self.group)

    def mean(self, value: float) -> float:
        """The average of `value` over the ranks (the value itself for one process). A nan or
        inf on any rank gives a nan or inf average on every rank."""
        if not self.distributed:
            return value
        total = torch.tensor(value, dtype=torch.float64)  # a CPU tensor: gloo carries it
        dist.all_reduce(total)
        return float(total) / self.world_size

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            dist.all_reduce(torch.zeros(1))  # on the CPU, so gloo, whatever the model's backend


def silence_other_ranks() -> None:
    """Under torchrun, send the standard output of every rank but 0 to nowhere, so that
    what the run prints appears once. Errors (standard error) stay visible."""
    launch = launch_from_env()
    if launch is not None and launch.rank != 0:
        sys.stdout = open(os.devnull, "w")  # for the rest of the process


@contextlib.contextmanager
def start(device: str = "auto", batch_size: int = 1, backend: str = "auto"
          ) -> Iterator[Context]:
    """Join the torchrun job this process belongs to, for the duration of the block.

    Without torchrun, or with one process, yields Context() and does nothing else. Otherwise
    it checks, before any work, that the batch splits evenly and that every rank has a usable
    device of the same kind as the others (one clear ValueError, the same on every rank),
    initializes the process group, sets this rank's GPU, and keeps the other ranks quiet
    (their standard output and error) inside the block. The group is destroyed on leaving."""
    launch = launch_from_env()
    if launch is None or launch.world_size == 1:
        yield Context()
        return
    check_batch_split(batch_size, launch.world_size)
    cuda = torch.cuda.is_available()
    here, problem = local_device(device, launch.local_rank, launch.local_world_size, cuda,
                                 torch.cuda.device_count() if cuda else 0)
    chosen, backend_problem = choose_backend(backend, here.type, dist.is_nccl_available())
    # DistributedDataParallel imports torch._dynamo on first use. Imported after the group
    # exists (torch 2.13), it keeps the group alive past destroy_process_group, and with it
    # gloo's worker threads: one still freeing its last collective's tensor when the
    # interpreter shuts down cannot take the GIL, and the process aborts after a finished
    # run ("terminate called without an active exception"). Imported first, it does not.
    importlib.import_module("torch._dynamo")
    # The ranks first meet over gloo, which every build has and which needs no GPU: a rank
    # that would start NCCL where another cannot must hear about it, not fail or hang.
    dist.init_process_group(backend="gloo")
    try:
        reports: list = [None] * launch.world_size
        dist.all_gather_object(reports, (str(here), problem or backend_problem,
                                         socket.gethostname(), chosen))
        check_agreement([report[:3] for report in reports])
        if len({report[3] for report in reports}) > 1:
            raise ValueError("the processes must all use the same communication backend, but "
                             "some have NCCL and some do not: pass --dist_backend gloo")
        if here.type == "cuda":
            torch.cuda.set_device(here)
        # The model's gradients go over NCCL when the ranks train on GPUs; the few CPU
        # numbers of Context.mean and barrier stay on the gloo group.
        group = dist.new_group(backend="nccl") if chosen == NCCL_WITH_GLOO else None
        context = Context(launch.rank, launch.world_size, launch.local_rank, here, chosen,
                          group)
        with contextlib.ExitStack() as stack:
            if not context.is_main:
                sink = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(sink))
                stack.enter_context(contextlib.redirect_stderr(sink))
            yield context
    finally:
        dist.destroy_process_group()
