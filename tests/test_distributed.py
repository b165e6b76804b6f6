"""Data-parallel training: rwkv_lib.distributed, and rwkv_lib.train under torchrun.

The end-to-end tests start real torchrun jobs of two gloo processes on 127.0.0.1 (CPU, a
tiny model, OMP_NUM_THREADS=1), each with a timeout and in its own process group, which
is killed afterwards so that nothing outlives a test."""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from rwkv_lib import distributed
from rwkv_lib.checkpoint import load_checkpoint
from rwkv_lib.distributed import (
    NCCL_WITH_GLOO,
    Context,
    RankWindows,
    check_agreement,
    choose_backend,
    launch_from_env,
    local_device,
)
from rwkv_lib.l2wrap import l2wrap
from rwkv_lib.model import RWKV, RWKVConfig
from rwkv_lib.train import get_config, train

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT")
STEPS = 20


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


# --- the pieces, without processes ---

def test_launch_from_env():
    assert launch_from_env({}) is None
    launch = launch_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1",
                              "LOCAL_WORLD_SIZE": "2"})
    assert (launch.rank, launch.local_rank, launch.world_size, launch.local_world_size) == (
        3, 1, 4, 2)
    with pytest.raises(ValueError, match="RANK=None.*start the job with torchrun"):
        launch_from_env({"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="RANK 2 is not in 0..WORLD_SIZE-1"):
        launch_from_env({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})


def test_each_rank_takes_its_contiguous_share_of_every_step():
    whole = list(range(3 * 16, 6 * 16))  # one process, steps 3, 4, 5 at batch 16
    assert list(RankWindows(3, 6, 16)) == whole
    shares = [list(RankWindows(3, 6, 16, rank, 4)) for rank in range(4)]
    assert all(len(s) == 3 * 4 for s in shares)
    for k, step in enumerate(range(3, 6)):  # step s: rank r holds s*16 + 4r .. s*16 + 4r + 3
        together = [i for s in shares for i in s[4 * k:4 * k + 4]]
        assert together == list(range(step * 16, step * 16 + 16))
    windows = RankWindows(3, 6, 16, 2, 4)
    assert [windows[i] for i in range(len(windows))] == list(windows)
    assert windows[-1] == 5 * 16 + 8 + 3 and windows[1:3] == list(windows)[1:3]
    assert len(RankWindows(5, 5, 16, 1, 2)) == 0
    with pytest.raises(ValueError, match="batch_size 15 cannot be split evenly over 2 "
                                         "processes: choose a batch_size that is a multiple "
                                         "of 2"):
        RankWindows(0, 1, 15, 0, 2)


def test_backend_choice():
    assert choose_backend("auto", "cuda", True) == (NCCL_WITH_GLOO, None)
    assert choose_backend("nccl", "cuda", True) == (NCCL_WITH_GLOO, None)
    assert choose_backend("auto", "cuda", False) == ("gloo", None)  # e.g. Windows builds
    assert choose_backend("auto", "cpu", True) == ("gloo", None)
    assert choose_backend("gloo", "cuda", True) == ("gloo", None)
    backend, problem = choose_backend("nccl", "cpu", True)
    assert backend == "gloo" and "needs CUDA GPUs, but this process trains on the CPU" in problem
    backend, problem = choose_backend("nccl", "cuda", False)
    assert backend == "gloo" and "has a PyTorch without NCCL" in problem
    with pytest.raises(ValueError, match="dist_backend must be one of"):
        choose_backend("mpi", "cpu", False)
    # torch reads the NCCL choice as NCCL for CUDA tensors and gloo for CPU ones
    config = dist.distributed_c10d.BackendConfig(dist.Backend(NCCL_WITH_GLOO))
    assert config.get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}


def test_each_process_takes_the_gpu_of_its_local_rank():
    cpu = torch.device("cpu")
    assert local_device("cpu", 3, 4, True, 4) == (cpu, None)
    assert local_device("auto", 1, 2, False, 0) == (cpu, None)
    assert local_device("auto", 1, 2, True, 4) == (torch.device("cuda", 1), None)
    assert local_device("cuda", 3, 4, True, 4) == (torch.device("cuda", 3), None)
    for requested in ("auto", "cuda"):
        device, problem = local_device(requested, 2, 4, True, 2)
        assert device == cpu
        assert problem == ("this machine runs 4 processes but PyTorch sees 2 GPU(s), one per "
                           "process is needed: start --nproc_per_node 2, or pass --device cpu")
    assert local_device("cuda", 0, 2, False, 0)[1] == ("device 'cuda' was asked for, but "
                                                       "PyTorch sees no CUDA GPU")
    assert "pass --device cuda (or auto)" in local_device("cuda:1", 0, 2, True, 2)[1]
    assert "supports cpu and cuda" in local_device("mps", 0, 2, False, 0)[1]


def test_ranks_must_agree_on_the_kind_of_device():
    check_agreement([("cuda:0", None, "a"), ("cuda:1", None, "a"), ("cuda:0", None, "b")])
    with pytest.raises(ValueError, match=r"^the processes must all train on the same kind of "
                                         r"device, but they found cuda for ranks 0, 1 on a, "
                                         r"and cpu for rank 2 on b: give every machine its GPUs"):
        check_agreement([("cuda:0", None, "a"), ("cuda:1", None, "a"), ("cpu", None, "b")])
    with pytest.raises(ValueError, match=r"^rank 1 on a and ranks 2, 3 on b: no GPU; "
                                         r"rank 4 on b: another problem$"):
        check_agreement([("cpu", None, "a"), ("cpu", "no GPU", "a"), ("cpu", "no GPU", "b"),
                         ("cpu", "no GPU", "b"), ("cpu", "another problem", "b")])


def test_one_process_is_left_alone(no_torchrun, monkeypatch):
    for env in ({}, {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with distributed.start("cuda:7", batch_size=5, backend="nccl") as ctx:
            assert ctx == Context() and ctx.is_main and not ctx.distributed
            assert ctx.device is None  # train() resolves it as it always did
            assert not dist.is_initialized()
            model = torch.nn.Linear(2, 2)
            assert ctx.wrap(model) is model
            assert math.isnan(ctx.mean(float("nan")))
            assert ctx.mean(0.1) == 0.1
            assert list(ctx.windows(2, 4, 5)) == list(range(10, 20))
            ctx.barrier()


def test_an_uneven_batch_is_refused_before_any_work(no_torchrun, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    config = get_config("ci", out_dir=str(tmp_path / "run"), batch_size=15, device="cpu")
    with pytest.raises(ValueError, match="batch_size 15 cannot be split evenly over 2"):
        train(config)  # before the process group: nothing waits for the other rank
    assert not dist.is_initialized() and not (tmp_path / "run").exists()


def _grads(model, x, y, loss_fn) -> dict:
    model.zero_grad(set_to_none=True)
    logits = model(x)
    loss_fn(logits, y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("part", ["l2wrap push alone", "cross-entropy and l2wrap"])
def test_averaging_the_shares_gradients_gives_the_whole_batch_gradient(part):
    """What DistributedDataParallel computes (the mean of each rank's gradient) equals one
    process's gradient at the whole batch: the cross-entropy is a mean per share, and L2Wrap
    divides by the positions of its share, B/N * T, so the average divides by B * T."""
    torch.manual_seed(0)
    model = RWKV(RWKVConfig(vocab_size=11, n_layer=1, n_embd=16, ctx_len=8,
                            wkv_backend="pytorch"))
    with torch.no_grad():  # away from the initialization, whose many zeros hide gradients
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x, y = torch.randint(0, 11, (8, 8)), torch.randint(0, 11, (8, 8))

    def loss_fn(logits, y):
        if part == "l2wrap push alone":
            return l2wrap(logits.sum() * 0, logits)
        return l2wrap(F.cross_entropy(logits.flatten(0, 1), y.flatten()), logits)

    whole = _grads(model, x, y, loss_fn)
    shares = [_grads(model, x[r * 2:r * 2 + 2], y[r * 2:r * 2 + 2], loss_fn) for r in range(4)]
    assert all(g.norm() > 0 for g in whole.values())
    assert_weights_close({n: sum(s[n] for s in shares) / 4 for n in whole}, whole)


# --- real torchrun jobs ---

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def _run_all(commands: list[list[str]], timeout: float) -> list[subprocess.CompletedProcess]:
    """Start the commands together, each in its own process group, and wait for them all;
    afterwards (and on a timeout) kill whatever is left of each group."""
    procs = [subprocess.Popen(c, cwd=ROOT, env=_worker_env(), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True) for c in commands]
    results = []
    try:
        for command, proc in zip(commands, procs, strict=True):
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for p in procs:
                    os.killpg(p.pid, signal.SIGKILL)
                out, err = proc.communicate()
                pytest.fail(f"torchrun took more than {timeout} s\n{out}\n{err}")
            results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    finally:
        for p in procs:
            try:  # torchrun waits for its workers; this is for anything left all the same
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return results


def torchrun(*args: str, script: Path | None = None, machines: int = 1,
             timeout: float = 180) -> subprocess.CompletedProcess:
    """Run `torchrun -m rwkv_lib.train ARGS` (or SCRIPT ARGS) with two processes in all.
    With machines=2, two torchrun agents of one process each meet through the c10d
    rendezvous, as on two machines; the result then joins their outputs."""
    port = str(_free_port())
    target = [str(script)] if script else ["-m", "rwkv_lib.train"]
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    if machines == 1:
        launcher += ["--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", port]
    else:
        launcher += ["--nnodes", str(machines), "--nproc-per-node", str(2 // machines),
                     "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                     "--rdzv-id", "test"]
    results = _run_all([launcher + target + list(args)] * machines, timeout)
    return subprocess.CompletedProcess(
        launcher, max(r.returncode for r in results), "".join(r.stdout for r in results),
        "".join(r.stderr for r in results))


def _driver(tmp_path: Path, patch: str) -> Path:
    """A script that patches something in this process, then runs `python -m
    rwkv_lib.train` with its own command line and error handling."""
    path = tmp_path / "driver.py"
    path.write_text(textwrap.dedent("""\
        import os, runpy, signal
        import torch
        import rwkv_lib.l2wrap
        rank = int(os.environ["RANK"])
        {patch}
        runpy.run_module("rwkv_lib.train", run_name="__main__", alter_sys=True)
        """).format(patch=patch.strip()))
    return path


# l2wrap, replaced in the driver: call n is the forward of step n - 1 (0-based)
AT_CALL = """
real_l2wrap, calls = rwkv_lib.l2wrap.l2wrap, [0]
def at_call(n, action):
    def l2wrap(loss, logits):
        calls[0] += 1
        loss = real_l2wrap(loss, logits)
        return action(loss) if rank == 1 and calls[0] == n else loss
    rwkv_lib.l2wrap.l2wrap = l2wrap
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    words = [b"the", b"cat", b"sat", b"on", b"a", b"mat", b"and", b"dog", b"ran", b"far"]
    text = b" ".join(words[i] for i in rng.integers(0, len(words), 5000))[:20_000]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_bytes(text)
    return str(path)


def tiny(corpus: str, out_dir: Path, **overrides) -> dict:
    fields = dict(corpus=corpus, out_dir=str(out_dir), n_layer=1, n_embd=16, ctx_len=16,
                  batch_size=16, max_steps=STEPS, lr_init=5e-3, lr_final=5e-4,
                  wkv_backend="pytorch", device="cpu", eval_interval=10, eval_iters=2,
                  log_interval=5, checkpoint_interval=10, progress=False)
    return {**fields, **overrides}


def cli(fields: dict) -> list[str]:
    args = []
    for name, value in fields.items():
        args += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def run_here(fields: dict, **kwargs) -> dict:
    """The same run in this one process, as `python -m rwkv_lib.train` would do it."""
    return train(get_config("ci", **fields), **kwargs)


def assert_weights_close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    """Equal up to float32 rounding: every tensor within rtol of the other, relative to its
    size (elementwise, a weight near zero may differ by more than rtol of itself)."""
    assert a.keys() == b.keys()
    for name in a:
        diff = (a[name].double() - b[name].double()).norm()
        assert diff <= rtol * b[name].double().norm() + 1e-12, (name, float(diff))


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory, no_torchrun_module) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    run_here(tiny(corpus, out))
    return out


@pytest.fixture(scope="module")
def no_torchrun_module():
    with pytest.MonkeyPatch.context() as mp:
        for name in TORCHRUN_ENV:
            mp.delenv(name, raising=False)
        yield


@pytest.mark.slow
def test_two_processes_make_the_same_updates_as_one(corpus, tmp_path, one_process):
    out = tmp_path / "two"
    result = torchrun(*cli(tiny(corpus, out, progress=True)))
    assert result.returncode == 0, result.stderr
    ours, theirs = load_checkpoint(out / "ckpt.pt"), load_checkpoint(one_process / "ckpt.pt")
    assert ours["step"] == STEPS and ours["data_position"] == STEPS * 16
    assert not any(name.startswith("module.") for name in ours["model"])
    assert_weights_close(ours["model"], theirs["model"])

    m2 = json.loads((out / "metrics.json").read_text())
    m1 = json.loads((one_process / "metrics.json").read_text())
    for kind in ("train", "val"):
        assert [r["step"] for r in m2[kind]] == [r["step"] for r in m1[kind]]
        for r2, r1 in zip(m2[kind], m1[kind], strict=True):
            assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5), kind
    assert m2["final"]["val_bpb"] == pytest.approx(m1["final"]["val_bpb"], rel=1e-5)
    assert (out / "loss.png").is_file() and sorted(p.name for p in out.iterdir()) == [
        "ckpt.pt", "config.json", "loss.png", "metrics.json"]
    # rank 0 alone prints and shows a progress bar
    assert result.stdout.count(f"step     {STEPS} | train") == 1, result.stdout
    assert result.stdout.count("config: {") == 1
    shown = [int(n) for n in re.findall(rf"\| *(\d+)/{STEPS} \[", result.stderr)]
    assert shown and shown == sorted(shown) and shown[-1] == STEPS, result.stderr  # one bar


@pytest.mark.slow
def test_resume_with_another_number_of_processes(corpus, tmp_path, one_process):
    """10 steps on two processes (on two "machines", meeting through the c10d rendezvous),
    10 more on one: the 20 steps of one process."""
    fields = tiny(corpus, tmp_path / "run")
    result = torchrun(*cli(fields), "--stop-after", "10", machines=2)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt")["step"] == 10
    run_here(fields, resume=True)
    ours, theirs = load_checkpoint(tmp_path / "run" / "ckpt.pt"), load_checkpoint(
        one_process / "ckpt.pt")
    assert ours["step"] == STEPS
    assert_weights_close(ours["model"], theirs["model"])
    for a, b in zip(ours["optimizer"]["state"].values(), theirs["optimizer"]["state"].values(),
                    strict=True):
        assert_weights_close(a, b, rtol=1e-4)  # Adam's moments: squares of small gradients
    assert [r["step"] for r in ours["metrics"]["val"]] == [0, 10, 20]


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_job_and_keeps_a_good_checkpoint(corpus, tmp_path,
                                                                     no_torchrun):
    fields = tiny(corpus, tmp_path / "run", max_steps=40, checkpoint_interval=3,
                  eval_interval=100)
    script = _driver(tmp_path, AT_CALL + "at_call(8, lambda loss: os.kill(os.getpid(), "
                                         "signal.SIGKILL))")  # rank 1, in step 7
    result = torchrun(*cli(fields), script=script)
    assert result.returncode == 1
    assert "Signal 9 (SIGKILL) received by PID" in result.stderr, result.stderr
    saved = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    # Step 6's checkpoint, or step 3's if rank 0 was stopped while writing step 6's: either
    # way a whole one, whose weights are those of its step.
    assert saved["step"] in (3, 6)
    reference = run_here(tiny(corpus, tmp_path / "ref", max_steps=40, checkpoint_interval=3,
                              eval_interval=100), stop_after=saved["step"])
    assert_weights_close(saved["model"], load_checkpoint(reference["checkpoint"])["model"])


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_stops_every_rank(corpus, tmp_path, no_torchrun):
    fields = tiny(corpus, tmp_path / "run", checkpoint_interval=2, eval_interval=3)
    script = _driver(tmp_path, AT_CALL + "at_call(6, lambda loss: loss * float('nan'))")
    result = torchrun(*cli(fields), script=script, timeout=120)
    assert result.returncode == 1
    assert ("error: the training loss is nan at step 5; stopped before updating the weights. "
            "the last good checkpoint is") in result.stderr, result.stderr
    assert "ckpt.pt (step 4)" in result.stderr
    saved = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert saved["step"] == 4
    reference = run_here(tiny(corpus, tmp_path / "ref", checkpoint_interval=2, eval_interval=3),
                         stop_after=4)
    assert_weights_close(saved["model"], load_checkpoint(reference["checkpoint"])["model"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["step"] for r in metrics["val"]] == [0, 3]


@pytest.mark.slow
def test_checkpoints_by_the_clock_and_the_test_split_under_torchrun(corpus, tmp_path,
                                                                    no_torchrun):
    """Rank 0's clock alone says when a checkpoint is due (here: at every step, rank 1's
    clock never would), and rank 0 alone reads the test split: no rank waits for another
    in a collective operation that the other never reaches, and the test line is printed
    once."""
    script = tmp_path / "clock_driver.py"
    script.write_text(textwrap.dedent("""\
        import os, sys
        import rwkv_lib.train as train
        from rwkv_lib import cli
        if os.environ["RANK"] == "0":
            ticks = [0.0]
            def clock():
                ticks[0] += 61.0  # a minute and a second per call
                return ticks[0]
            train._clock = clock
        real_save = train.save_checkpoint
        def save(path, **kwargs):
            print(f"saved step {kwargs['step']}", flush=True)
            return real_save(path, **kwargs)
        train.save_checkpoint = save
        raise SystemExit(cli.run(train.main, sys.argv[1:]))
        """))
    fields = tiny(corpus, tmp_path / "run", checkpoint_interval=0, checkpoint_minutes=1.0,
                  test_eval=True)
    result = torchrun(*cli(fields), script=script)
    assert result.returncode == 0, result.stderr
    saved = [int(n) for n in re.findall(r"saved step (\d+)", result.stdout)]
    assert saved == list(range(1, STEPS + 1)), result.stdout
    assert result.stdout.count("test split, ") == 1, result.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["bytes"] > 0 and math.isfinite(metrics["test"]["bpb"])
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt")["step"] == STEPS


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names from /proc")
def test_no_gloo_thread_outlives_the_run(corpus, tmp_path, no_torchrun):
    """When train() returns, the process group is gone with its worker threads. A gloo
    worker still alive when the interpreter shuts down can be finishing its last collective
    then; it needs the GIL to free that collective's tensor, cannot have it any more, and
    the process aborts ("terminate called without an active exception"), a failed job
    after a finished run."""
    script = tmp_path / "threads_driver.py"
    script.write_text(textwrap.dedent("""\
        import os, sys
        import rwkv_lib.train as train
        train.main(sys.argv[1:])
        names = sorted(open(f"/proc/self/task/{t}/comm").read().strip()
                       for t in os.listdir("/proc/self/task"))
        print(f"rank {os.environ['RANK']} threads after the run: {names}", file=sys.stderr)
        """))
    result = torchrun(*cli(tiny(corpus, tmp_path / "run", max_steps=3)), script=script)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "threads after the run" in line]
    assert len(lines) == 2, result.stderr
    assert not [line for line in lines if "gloo" in line], lines


def _worker_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
def test_user_mistakes_are_one_line_errors_before_any_work(corpus, tmp_path, no_torchrun):
    uneven = torchrun(*cli(tiny(corpus, tmp_path / "uneven", batch_size=15)))
    # A CPU-only rank 0 and a rank 1 that sees GPUs and NCCL (PyTorch is told so in the
    # driver): the ranks must find out before either starts a backend the other lacks.
    script = _driver(tmp_path, "if rank == 1:\n    torch.cuda.is_available = lambda: True\n"
                               "    torch.cuda.device_count = lambda: 2\n"
                               "    torch.distributed.is_nccl_available = lambda: True")
    mixed = torchrun(*cli(tiny(corpus, tmp_path / "mixed", device="auto")), script=script)
    expected = {
        "uneven": (uneven, "error: batch_size 15 cannot be split evenly over 2 processes: "
                           "choose a batch_size that is a multiple of 2"),
        "mixed": (mixed, "error: the processes must all train on the same kind of device, "
                         "but they found cpu for rank 0 on "),
    }
    for name, (result, message) in expected.items():
        assert result.returncode == 1, (name, result.stderr)
        lines = _worker_lines(result.stderr)
        assert lines and all(line.startswith(message) for line in lines), (name, result.stderr)
        assert not re.search(r'File ".*rwkv_lib', result.stderr), result.stderr  # no traceback
        assert not (tmp_path / name).exists()
    assert ", and cuda for rank 1 on " in _worker_lines(mixed.stderr)[0]


def test_resuming_on_a_machine_with_fewer_gpus_restores_the_states_it_can(monkeypatch):
    """Rank 0 saves the random states of every GPU of its machine; a run resumed with fewer
    GPUs visible (fewer processes, CUDA_VISIBLE_DEVICES) must not set those of absent ones."""
    from rwkv_lib.checkpoint import restore_rng_state

    restored = []

    def record(state, device="cuda"):
        restored.append(torch.device("cuda", device) if isinstance(device, int) else device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", record)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", record)
    cpu_state = torch.get_rng_state()
    restore_rng_state({"torch": cpu_state, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8})
    assert restored == [torch.device("cuda", 0)]
    assert torch.equal(torch.get_rng_state(), cpu_state)
