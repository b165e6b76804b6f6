import dataclasses
import json
import lzma
import math
import platform
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkv_lib import train as train_mod
from rwkv_lib.checkpoint import CheckpointError, load_checkpoint, load_model
from rwkv_lib.data import load_corpus, split_corpus, unigram_entropy_bits
from rwkv_lib.evaluate import evaluate_bpb
from rwkv_lib.train import (
    PRESETS,
    TrainConfig,
    TrainingDiverged,
    config_from_dict,
    get_config,
    learning_rate,
    main,
    train,
)


@pytest.fixture
def corpus(tmp_path):
    """20 kB of text with some structure, so a tiny model has something to learn."""
    rng = np.random.default_rng(0)
    words = [b"the", b"cat", b"sat", b"on", b"a", b"mat", b"and", b"dog", b"ran", b"far"]
    text = b" ".join(words[i] for i in rng.integers(0, len(words), 5000))[:20_000]
    path = tmp_path / "corpus.txt"
    path.write_bytes(text)
    return str(path)


def tiny(corpus, out_dir, **overrides) -> TrainConfig:
    fields = dict(corpus=corpus, out_dir=str(out_dir), n_layer=1, n_embd=16, ctx_len=16,
                  batch_size=4, max_steps=6, lr_init=3e-3, lr_final=1e-3, wkv_backend="pytorch",
                  device="cpu", eval_interval=3, eval_iters=2, log_interval=1,
                  checkpoint_interval=2, progress=False)
    return get_config("ci", **{**fields, **overrides})


def _weights_equal(a, b) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_presets_follow_the_spec():
    seed, recipe, ci = PRESETS["seed"], PRESETS["enwik8"], PRESETS["ci"]
    assert (seed.n_layer, seed.n_embd, seed.ctx_len, seed.batch_size) == (12, 512, 1024, 1)
    assert (seed.lr_init, seed.lr_schedule, seed.betas, seed.eps) == (1e-5, "constant",
                                                                      (0.9, 0.999), 1e-8)
    assert seed.dtype == "float32" and seed.corpus == "enwik8" and seed.grad_clip is None
    assert (recipe.n_layer, recipe.n_embd, recipe.ctx_len, recipe.batch_size) == (12, 512,
                                                                                  1024, 12)
    assert (recipe.lr_init, recipe.lr_final, recipe.lr_schedule) == (8e-4, 1e-5, "exp")
    assert (recipe.betas, recipe.eps, recipe.weight_decay) == ((0.9, 0.99), 1e-8, 0.0)
    assert recipe.grad_clip == 1.0 and recipe.dtype == "bf16" and recipe.warmup_steps > 0
    assert ci.corpus == "sample" and ci.compile == "auto"
    assert not train_mod.will_compile(ci, torch.device("cpu"))  # too short to pay off
    assert all(name == config.preset for name, config in PRESETS.items())


def test_learning_rate_schedules():
    c = TrainConfig(max_steps=110, warmup_steps=10, lr_init=1e-3, lr_final=1e-5)
    assert learning_rate(0, c) == pytest.approx(1e-4)  # warm-up starts at lr_init / 10
    assert learning_rate(5, c) == pytest.approx(0.55e-3)
    assert learning_rate(10, c) == pytest.approx(1e-3)
    assert learning_rate(60, c) == pytest.approx(1e-4)  # halfway on a log scale
    assert learning_rate(110, c) == pytest.approx(1e-5)
    assert learning_rate(500, c) == pytest.approx(1e-5)
    flat = dataclasses.replace(c, lr_schedule="constant", warmup_steps=0)
    assert {learning_rate(s, flat) for s in (0, 50, 200)} == {1e-3}
    with pytest.raises(ValueError, match="lr_schedule"):
        learning_rate(20, dataclasses.replace(c, lr_schedule="cosine"))


def test_config_round_trips_through_json():
    config = get_config("enwik8", grad_clip=None)
    assert config_from_dict(json.loads(json.dumps(dataclasses.asdict(config)))) == config


def test_resume_is_exact(corpus, tmp_path):
    whole = train(tiny(corpus, tmp_path / "whole"))
    split = tiny(corpus, tmp_path / "split")
    first = train(split, stop_after=3)
    assert first["step"] == 3 and load_checkpoint(first["checkpoint"])["step"] == 3
    second = train(split, resume=True)
    assert second["step"] == 6

    a, b = load_checkpoint(whole["checkpoint"]), load_checkpoint(second["checkpoint"])
    _weights_equal(a["model"], b["model"])
    for p, q in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                    strict=True):
        _weights_equal(p, q)
    assert a["data_position"] == b["data_position"] == 6 * 4
    assert a["metrics"]["val"] == b["metrics"]["val"]  # the same curve, evaluated the same


def test_resume_refuses_another_model(corpus, tmp_path):
    train(tiny(corpus, tmp_path, max_steps=2))
    with pytest.raises(CheckpointError, match="n_embd: checkpoint 16, config 32"):
        train(tiny(corpus, tmp_path, max_steps=4, n_embd=32), resume=True)
    assert json.loads((tmp_path / "config.json").read_text())["n_embd"] == 16  # untouched


def test_training_learns_and_writes_its_files(corpus, tmp_path):
    result = train(tiny(corpus, tmp_path, max_steps=30, eval_interval=30, checkpoint_interval=0))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    first, last = metrics["val"][0], metrics["val"][-1]
    assert first["step"] == 0 and last["step"] == 30
    assert first["bpb"] == pytest.approx(math.log2(metrics["vocab_size"]), abs=0.5)
    assert last["bpb"] < first["bpb"] - 0.5 and last["bpb"] == result["val_bpb"]
    assert result["unigram_entropy_bits"] == metrics["unigram_entropy_bits"]
    assert [r["step"] for r in metrics["train"]] == list(range(1, 31))
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "config.json").read_text())["max_steps"] == 30


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    reference = train(tiny(corpus, tmp_path / "ref"), stop_after=4)
    calls = {"n": 0}
    real_l2wrap = train_mod.l2wrap

    def nan_at_step_5(loss, logits):
        calls["n"] += 1
        loss = real_l2wrap(loss, logits)
        return loss * float("nan") if calls["n"] == 6 else loss  # 0-based step 5

    monkeypatch.setattr(train_mod, "l2wrap", nan_at_step_5)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5.*last good checkpoint "
                                               r".*ckpt.pt \(step 4\)"):
        train(tiny(corpus, tmp_path / "run"))
    saved = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert saved["step"] == 4
    _weights_equal(saved["model"], load_checkpoint(reference["checkpoint"])["model"])
    assert isinstance(TrainingDiverged("x"), FloatingPointError)


def test_command_line(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--preset", "ci", "--out-dir", str(out), "--max_steps", "3", "--corpus", corpus,
            "--n-layer", "1", "--n_embd", "16", "--ctx_len", "16", "--batch_size", "4",
            "--wkv_backend", "pytorch", "--device", "cpu", "--eval_iters", "1",
            "--progress", "false", "--grad_clip", "none", "--betas", "0.8", "0.9"]
    result = main(args)
    printed = capsys.readouterr().out
    assert "overrides: out_dir=" in printed and "max_steps=3" in printed
    assert "grad_clip=None" in printed and "betas=(0.8, 0.9)" in printed
    for name in ("ckpt.pt", "config.json", "metrics.json", "loss.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "config.json").read_text())
    assert saved["max_steps"] == 3 and saved["grad_clip"] is None and saved["betas"] == [0.8, 0.9]
    assert saved["progress"] is False and saved["n_layer"] == 1
    assert result["step"] == 3

    with pytest.raises(SystemExit):  # a second fresh start must not clobber the checkpoint
        main(args)
    assert "--resume" in capsys.readouterr().err
    # --resume without --preset continues with the checkpoint's own configuration
    resumed = main(["--out-dir", str(out), "--resume", "--max-steps", "5"])
    assert resumed["step"] == 5 and load_checkpoint(out / "ckpt.pt")["train_config"]["n_layer"] == 1


def test_command_line_rejects_bad_values(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out-dir", str(tmp_path), "--progress", "maybe"])
    with pytest.raises(SystemExit):
        main(["--out-dir", str(tmp_path), "--max_steps", "many"])
    with pytest.raises(SystemExit):
        main(["--out-dir", str(tmp_path), "--dtype", "fp16"])
    assert "max_steps" in capsys.readouterr().err


def test_bad_config_is_refused_before_any_work(tmp_path):
    bad = get_config("ci", out_dir=str(tmp_path / "run"), dtype="fp16", batch_size=0,
                     grad_clip=0.0)
    with pytest.raises(ValueError, match=r"dtype must be one of .*batch_size must be >= 1.*"
                                         r"grad_clip must be > 0 or None"):
        train(bad)
    assert not (tmp_path / "run").exists()


def test_compile_auto_depends_on_the_config_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    long_run = get_config("ci", max_steps=train_mod.AUTO_COMPILE_STEPS)
    assert train_mod.will_compile(long_run, cpu) and not train_mod.will_compile(long_run, cuda)
    short = get_config("ci", max_steps=train_mod.AUTO_COMPILE_STEPS - 1)
    assert not train_mod.will_compile(short, cpu)
    assert train_mod.will_compile(get_config("ci", compile=True), cpu)
    assert not train_mod.will_compile(dataclasses.replace(long_run, compile=False), cpu)
    parser = train_mod.build_parser()
    assert [vars(parser.parse_args(["--compile", v]))["compile"]
            for v in ("auto", "TRUE", "off")] == ["auto", True, False]
    with pytest.raises(ValueError, match="compile must be true, false or auto"):
        train_mod.check_config(get_config("ci", compile="sometimes"))


@pytest.mark.slow
def test_compiled_training_resumes_exactly(corpus, tmp_path):
    # Compiled code reduces in parallel in a varying order unless deterministic algorithms
    # are on, which train() turns on while it runs a compiled model (and restores after).
    from rwkv_lib.extension import ExtensionUnavailable, load_wkv_extension

    try:
        load_wkv_extension()
    except ExtensionUnavailable as err:
        pytest.skip(f"needs the C++ extension: {err}")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # one thread would be deterministic anyway
    try:
        kw = dict(compile=True, wkv_backend="auto")
        whole = train(tiny(corpus, tmp_path / "whole", **kw))
        split = tiny(corpus, tmp_path / "split", **kw)
        train(split, stop_after=3)
        second = train(split, resume=True)
    finally:
        torch.set_num_threads(threads)
    assert not torch.are_deterministic_algorithms_enabled()
    _weights_equal(load_checkpoint(whole["checkpoint"])["model"],
                   load_checkpoint(second["checkpoint"])["model"])


# --- never lose a good checkpoint -----------------------------------------------------------

def _poison_update(monkeypatch, at_call: int):
    """Make the optimizer's `at_call`-th step (1-based) leave a nan in the weights, although
    the loss of that step was finite."""
    real = train_mod.make_optimizer

    def make(model, config):
        optimizer = real(model, config)
        real_step, calls = optimizer.step, {"n": 0}

        def step(*args, **kwargs):
            out = real_step(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == at_call:
                with torch.no_grad():
                    model.head.weight[0, 0] = float("nan")
            return out

        optimizer.step = step
        return optimizer

    monkeypatch.setattr(train_mod, "make_optimizer", make)


def _assert_kept_good_checkpoint(out_dir, step: int) -> None:
    saved = load_checkpoint(out_dir / "ckpt.pt")
    assert saved["step"] == step
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_nonfinite_weights_are_never_checkpointed(corpus, tmp_path, monkeypatch):
    # Checkpoints at steps 2, 4, 6. The update of step 4 breaks the weights with a finite loss.
    _poison_update(monkeypatch, at_call=4)
    config = tiny(corpus, tmp_path, eval_interval=100)
    with pytest.raises(TrainingDiverged) as info:
        train(config)
    message = str(info.value)
    assert "step 4" in message and "not finite" in message
    assert "last good checkpoint" in message and "(step 2)" in message
    _assert_kept_good_checkpoint(tmp_path, step=2)


def test_a_huge_learning_rate_writes_no_checkpoint(corpus, tmp_path):
    # lr 1e20: the first update (its loss finite) leaves finite weights so large that the
    # next forward pass gives nan: a checkpoint of them would be no good checkpoint.
    config = tiny(corpus, tmp_path, lr_init=1e20, lr_final=1e20, lr_schedule="constant",
                  checkpoint_interval=1, eval_interval=100, grad_clip=None)
    with pytest.raises(TrainingDiverged, match="no checkpoint was written"):
        train(config)
    assert not (tmp_path / "ckpt.pt").exists()
    json.loads((tmp_path / "metrics.json").read_text())  # still valid JSON


def test_metrics_json_survives_a_full_disk(corpus, tmp_path, monkeypatch, capsys):
    import os
    import tempfile

    from rwkv_lib import cli

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full, where every write fails with ENOSPC")
    train(tiny(corpus, tmp_path, max_steps=3, eval_interval=3))
    before = (tmp_path / "metrics.json").read_text()
    real_mkstemp = tempfile.mkstemp

    def full_disk_for_metrics(*args, prefix="", **kwargs):
        # the temp file of metrics.json lands on a full disk: its writes fail with ENOSPC
        if prefix.startswith(".metrics.json."):
            return os.open("/dev/full", os.O_WRONLY), str(tmp_path / f"{prefix}x.tmp")
        return real_mkstemp(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", full_disk_for_metrics)
    capsys.readouterr()
    args = ["--out-dir", str(tmp_path), "--resume", "--max-steps", "6"]
    assert cli.run(main, args) == 1
    err = capsys.readouterr().err
    assert f"no space left on the device that holds {tmp_path}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "metrics.json").read_text() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_temp_files_of_interrupted_writes_are_removed(corpus, tmp_path):
    leftovers = [".ckpt.pt.a1b2c3d4.tmp", ".metrics.json.zz_9x8y7.tmp", ".config.json.q.tmp",
                 ".loss.png.r2d2c3po.tmp"]
    for name in leftovers:
        (tmp_path / name).write_bytes(b"half a file")
    (tmp_path / ".keep-me.tmp").write_bytes(b"not ours")
    train(tiny(corpus, tmp_path, max_steps=2))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".keep-me.tmp", "ckpt.pt", "config.json", "corpus.txt", "loss.png",
                    "metrics.json"]


def test_checkpoint_and_metrics_writes_are_atomic_and_durable(corpus, tmp_path, monkeypatch):
    import os
    import stat

    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    train(tiny(corpus, tmp_path, max_steps=2, checkpoint_interval=0))
    # ckpt.pt, config.json, metrics.json (twice: after the evaluation and at the end),
    # loss.png: each a synced file, then its synced folder
    assert synced.count(True) >= 5 and synced.count(False) >= 5


# --- say truthfully when there is nothing to do ------------------------------------------------

def test_max_steps_zero_does_nothing_and_says_so(corpus, tmp_path, capsys):
    result = train(tiny(corpus, tmp_path / "run", max_steps=0))
    out = capsys.readouterr().out
    assert "nothing to do" in out and "max_steps is 0" in out and "wrote" not in out
    assert result["checkpoint"] is None and result["step"] == 0
    assert not (tmp_path / "run").exists()


def test_resuming_a_finished_run_does_nothing_and_says_so(corpus, tmp_path, capsys):
    train(tiny(corpus, tmp_path, max_steps=4))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    for max_steps in (4, 2):
        result = train(tiny(corpus, tmp_path, max_steps=max_steps), resume=True)
        out = capsys.readouterr().out
        assert (f"nothing to do: the checkpoint {tmp_path / 'ckpt.pt'} is already at step 4 "
                f"of max_steps {max_steps}") in out
        assert "wrote" not in out and result["step"] == 4
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_stop_after_zero_is_refused(corpus, tmp_path, capsys):
    with pytest.raises(ValueError, match="stop_after must be >= 1"):
        train(tiny(corpus, tmp_path), stop_after=0)
    with pytest.raises(SystemExit) as info:
        main(["--out-dir", str(tmp_path), "--corpus", corpus, "--stop-after", "0"])
    assert info.value.code == 2 and "--stop-after" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "corpus.txt"]


# --- fine-tuning weights imported from RWKV-LM ---------------------------------------------

def _rwkv_lm_state(vocab_size: int) -> dict:
    """A state dict as RWKV-LM saves one: the same names, no rwkv_lib wrapping."""
    from rwkv_lib.model import RWKV, RWKVConfig

    return RWKV(RWKVConfig(vocab_size=vocab_size, n_layer=1, n_embd=16)).state_dict()


def test_fine_tuning_an_imported_checkpoint(corpus, tmp_path):
    from pathlib import Path

    from rwkv_lib import checkpoint as ckpt_mod

    torch.manual_seed(3)
    torch.save(_rwkv_lm_state(len(set(Path(corpus).read_bytes()))), tmp_path / "rwkv-lm.pth")
    assert ckpt_mod.main(["import", str(tmp_path / "rwkv-lm.pth"), str(tmp_path / "imported.pt"),
                          "--corpus", corpus]) == 0
    run = tmp_path / "fine"
    args = ["--out-dir", str(run), "--corpus", corpus, "--ctx-len", "16", "--batch-size", "4",
            "--max-steps", "4", "--eval-iters", "1", "--wkv-backend", "pytorch", "--device",
            "cpu", "--progress", "false"]
    result = main([*args, "--init-from", str(tmp_path / "imported.pt")])
    assert result["step"] == 4
    ckpt = load_checkpoint(run / "ckpt.pt")
    assert ckpt["model_config"]["n_embd"] == 16 and ckpt["train_config"]["n_layer"] == 1
    assert ckpt["metrics"]["init_from"]["path"] == str(tmp_path / "imported.pt")
    # and the fine-tuned run resumes like any other
    assert main(["--out-dir", str(run), "--resume", "--max-steps", "6"])["step"] == 6
    # --resume on the imported file itself explains what to do instead
    imported_dir = tmp_path / "imp"
    imported_dir.mkdir()
    (imported_dir / "ckpt.pt").write_bytes((tmp_path / "imported.pt").read_bytes())
    with pytest.raises(CheckpointError, match="--init-from"):
        main(["--out-dir", str(imported_dir), "--resume"])


def test_init_from_starts_at_the_imported_weights(corpus, tmp_path):
    from rwkv_lib.checkpoint import import_rwkv_lm, save_checkpoint
    from rwkv_lib.data import ByteVocab, load_corpus

    vocab = ByteVocab(range(256))  # a model that knows every byte fine-tunes on any corpus
    torch.manual_seed(5)
    model = import_rwkv_lm(_rwkv_lm_state(vocab.size))
    save_checkpoint(tmp_path / "start.pt", model=model, optimizer=None, step=0,
                    train_config={"corpus": None, "n_layer": 1, "n_embd": 16}, vocab=vocab)
    config = tiny(corpus, tmp_path / "run", max_steps=1, eval_iters=1)
    result = train(config, init_from=tmp_path / "start.pt")
    first_val = load_checkpoint(result["checkpoint"])["metrics"]["val"][0]["loss"]
    val = train_mod.split_corpus(load_corpus(corpus))["val"]
    windows = train_mod.WindowDataset(val, 16, 4, seed=train_mod.EVAL_SEED, vocab=vocab)
    batches = list(train_mod.DataLoader(windows, batch_size=4))
    assert first_val == pytest.approx(train_mod.estimate_loss(
        model, batches, torch.device("cpu"), train_mod.contextlib.nullcontext()), rel=1e-5)
    with pytest.raises(CheckpointError, match="n_embd: checkpoint 16, config 32"):
        train(tiny(corpus, tmp_path / "other", n_embd=32), init_from=tmp_path / "start.pt")
    assert not (tmp_path / "other").exists()


# --- configuration checks ----------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("eps", 0.0), ("eps", -1e-8), ("eps", float("nan")), ("lr_init", float("nan")),
    ("lr_init", float("inf")), ("lr_init", 1e39), ("lr_final", float("inf")),
    ("lr_final", -1.0),
    ("weight_decay", -0.1), ("weight_decay", float("nan")), ("seed", -1),
    ("grad_clip", float("nan")), ("betas", (1.0, 0.99)), ("betas", (0.9, -0.1)),
    ("device", "tpu"), ("checkpoint_minutes", -1.0), ("checkpoint_minutes", float("nan")),
])
def test_each_bad_field_is_named(tmp_path, field, value):
    config = get_config("ci", out_dir=str(tmp_path / "run"), **{field: value})
    with pytest.raises(ValueError, match=rf"\b{field} must"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_seed_message_names_only_seed(tmp_path):
    with pytest.raises(ValueError) as info:
        train_mod.check_config(get_config("ci", seed=-1))
    assert str(info.value) == "invalid TrainConfig: seed must be >= 0, got -1"


def test_a_data_dir_typo_creates_no_folders(tmp_path):
    typo = tmp_path / "no-such-place" / "data"
    config = get_config("ci", out_dir=str(tmp_path / "run"), data_dir=str(typo))
    with pytest.raises(FileNotFoundError, match="no-such-place"):
        train(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_corpus_too_small_for_the_context_says_what_to_do(tmp_path):
    small = tmp_path / "small.txt"
    small.write_bytes(b"just a few hundred bytes of text. " * 10)
    config = get_config("ci", corpus=str(small), out_dir=str(tmp_path / "run"), ctx_len=64)
    with pytest.raises(ValueError, match=r"validation split .* 17 bytes.*ctx_len 64.*--ctx-len"):
        train(config)
    assert not (tmp_path / "run").exists()


# --- the optimizer's parameter groups ------------------------------------------------------

def test_weight_decay_applies_to_the_linear_layers_only():
    from rwkv_lib.model import RWKV, RWKVConfig

    model = RWKV(RWKVConfig(vocab_size=11, n_layer=2, n_embd=8))
    optimizer = train_mod.make_optimizer(model, get_config("ci", weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0
                     for p in g["params"])
    linear = sorted(f"{n}.weight" for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear))
    assert decayed == linear and "head.weight" in decayed
    assert not any("time_mix" in n or "emb" in n or "ln" in n for n in decayed)
    every = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(every) == len(set(map(id, every))) == len(list(model.parameters()))


def test_the_optimizer_is_torchs_fused_adamw_on_the_cpu():
    from rwkv_lib.model import RWKV, RWKVConfig

    model = RWKV(RWKVConfig(vocab_size=11, n_layer=2, n_embd=8))
    optimizer = train_mod.make_optimizer(model, get_config("ci"))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(g["fused"] is True for g in optimizer.param_groups)


def test_a_checkpoint_of_the_per_tensor_adamw_resumes_fused():
    """A checkpoint written by an older rwkv_lib (AdamW without fused) resumes with the
    fused optimizer and the saved moments, and takes steps."""
    from rwkv_lib.model import RWKV, RWKVConfig

    torch.manual_seed(0)
    model = RWKV(RWKVConfig(vocab_size=11, n_layer=2, n_embd=8))
    old = train_mod.make_optimizer(model, get_config("ci"))
    for g in old.param_groups:
        g["fused"] = None  # as before: torch's default, one tensor at a time
    x = torch.randint(0, 11, (2, 5))
    for _ in range(2):
        old.zero_grad()
        model(x).square().mean().backward()
        old.step()
    saved = old.state_dict()
    resumed = train_mod.make_optimizer(model, get_config("ci"))
    train_mod.load_optimizer_state(resumed, saved)
    assert all(g["fused"] is True for g in resumed.param_groups)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(resumed.state[p][key], old.state[p][key])
        assert resumed.state[p]["step"].item() == 2
    resumed.zero_grad()
    model(x).square().mean().backward()
    resumed.step()
    assert all(resumed.state[p]["step"].item() == 3 for p in model.parameters())


# --- the laptop preset, time-based checkpoints, the end-of-run test evaluation ---------

def test_laptop_preset_is_the_chosen_sweep_point():
    laptop = PRESETS["laptop"]
    assert laptop.corpus == "stdlib" and laptop.test_eval and laptop.checkpoint_minutes > 0
    assert laptop.max_steps > 0 and laptop.wkv_backend == "auto" and not laptop.compile
    assert laptop.checkpoint_minutes and not any(p.test_eval for n, p in PRESETS.items()
                                                  if n != "laptop")
    results = json.loads((Path(train_mod.__file__).parent.parent / "benchmarks" / "results"
                          / "cpu" / "laptop_sweep.json").read_text())
    [chosen] = [p for p in results["points"] if p["name"] == results["chosen"]]
    for field in ("n_layer", "n_embd", "ctx_len", "batch_size", "lr_init", "lr_final",
                  "warmup_steps", "lr_schedule", "seed"):
        assert getattr(laptop, field) == chosen["config"][field], field
    assert laptop.max_steps == chosen["steps"]
    # the chosen point is the best test result measured
    assert chosen["test_bpb"] == min(p["test_bpb"] for p in results["points"])


def test_laptop_preset_parses_and_passes_the_checks():
    train_mod.check_config(PRESETS["laptop"])
    args = vars(train_mod.build_parser().parse_args(["--preset", "laptop", "--max_steps", "3"]))
    assert args["preset"] == "laptop" and args["max_steps"] == 3
    assert not train_mod.will_compile(PRESETS["laptop"], torch.device("cpu"))  # as measured


def test_laptop_preset_runs_on_another_corpus(corpus, tmp_path):
    # its model, schedule and checkpoints; a small batch, to be quick
    config = get_config("laptop", corpus=corpus, out_dir=str(tmp_path / "run"), device="cpu",
                        progress=False, eval_iters=1, batch_size=2)
    result = train(config, stop_after=2)
    assert result["step"] == 2 and "test" not in result  # unfinished: no test evaluation
    saved = load_checkpoint(result["checkpoint"])
    assert saved["step"] == 2 and saved["train_config"]["preset"] == "laptop"
    assert (saved["model_config"]["n_layer"], saved["model_config"]["n_embd"]) == (
        config.n_layer, config.n_embd)


def _a_minute_per_step(monkeypatch) -> None:
    """A fake clock for the time-based checkpoints: every training step takes a minute."""
    now = {"t": 1000.0}
    monkeypatch.setattr(train_mod, "_clock", lambda: now["t"])
    real_l2wrap = train_mod.l2wrap

    def a_minute_per_step(loss, logits):
        now["t"] += 60.0
        return real_l2wrap(loss, logits)

    monkeypatch.setattr(train_mod, "l2wrap", a_minute_per_step)
    monkeypatch.setattr(train_mod, "save_loss_plot", lambda metrics, path: path)  # not tested


def test_checkpoints_also_follow_the_clock(corpus, tmp_path, monkeypatch):
    _a_minute_per_step(monkeypatch)
    saved_at = []
    real_save = train_mod.save_checkpoint

    def recording_save(path, **kwargs):
        saved_at.append(kwargs["step"])
        return real_save(path, **kwargs)

    monkeypatch.setattr(train_mod, "save_checkpoint", recording_save)
    train(tiny(corpus, tmp_path / "both", max_steps=8, checkpoint_interval=5,
               checkpoint_minutes=2.5))
    # 2.5 minutes after the start (3), by steps (5), the end (8); not at 6, 2.5 minutes
    # after the save at 3: the clock restarts at every save
    assert saved_at == [3, 5, 8]
    # test_eval is off by default: no test record
    assert "test" not in json.loads((tmp_path / "both" / "metrics.json").read_text())
    with pytest.raises(ValueError, match="checkpoint_minutes must be >= 0"):
        train(tiny(corpus, tmp_path / "bad", checkpoint_minutes=-1.0))


def test_a_checkpoint_by_the_clock_never_keeps_broken_weights(corpus, tmp_path, monkeypatch):
    # By the clock at steps 3 and 6; the update of step 6 leaves a nan, its loss finite.
    _a_minute_per_step(monkeypatch)
    _poison_update(monkeypatch, at_call=6)
    config = tiny(corpus, tmp_path, max_steps=8, checkpoint_interval=0, eval_interval=100,
                  checkpoint_minutes=2.5)
    with pytest.raises(TrainingDiverged) as info:
        train(config)
    message = str(info.value)
    assert "not finite" in message and "no checkpoint was written at step 6" in message
    assert "last good checkpoint" in message and "(step 3)" in message
    _assert_kept_good_checkpoint(tmp_path, step=3)


def test_finished_run_reports_the_test_split_next_to_xz(corpus, tmp_path, capsys):
    config = tiny(corpus, tmp_path / "run", max_steps=6, test_eval=True,
                  data_dir=str(tmp_path / "data"))
    result = train(config)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    test = metrics["test"]
    assert result["test"] == test == metrics["final"]["test"]

    raw = bytes(split_corpus(load_corpus(corpus))["test"])
    xz = len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    assert test["bytes"] == len(raw) and test["xz_bytes"] == xz
    assert test["xz_bpb"] == pytest.approx(8 * xz / len(raw))
    assert test["unigram_entropy_bits"] == pytest.approx(unigram_entropy_bits(raw))
    model, vocab, _ = load_model(result["checkpoint"])
    expected = evaluate_bpb(model, vocab.encode(raw), chunk_len=1024,
                            batch_size=train_mod.TEST_STREAMS)
    assert test["bpb"] == pytest.approx(expected["bpb"], rel=1e-5)
    assert test["predicted"] == expected["predicted"] and test["streams"] == 16
    assert test["bpb_over_xz"] == pytest.approx(test["bpb"] / test["xz_bpb"])
    printed = capsys.readouterr().out
    [line] = [t for t in printed.splitlines() if t.startswith("test split, ")]
    assert line.startswith(f"test split, {len(raw):,} bytes: model {test['bpb']:.3f} bits per")
    assert line.endswith(f"| unigram entropy {test['unigram_entropy_bits']:.3f}")
    assert f"model {test['bpb']:.3f} bits per byte" in printed
    assert f"xz -9e {test['xz_bpb']:.3f}" in printed
    assert any(p.name.startswith("baselines-") for p in (tmp_path / "data").iterdir())
    assert metrics["corpus"] == {"name": corpus, "bytes": Path(corpus).stat().st_size}


def test_stdlib_runs_record_what_the_corpus_is_made_of(tmp_path, monkeypatch, capsys):
    root = tmp_path / "stdlib"
    rng = np.random.default_rng(0)
    for i in range(3):
        (root / f"m{i}.py").parent.mkdir(parents=True, exist_ok=True)
        lines = [f"def f{j}(x):\n    return x + {int(rng.integers(100))}\n" for j in range(100)]
        (root / f"m{i}.py").write_text("".join(lines))
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(root)})
    config = tiny("stdlib", tmp_path / "run", data_dir=str(tmp_path / "data"), max_steps=2)
    train(config)
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["corpus"]
    assert recorded["name"] == "stdlib" and recorded["files"] == 3
    assert recorded["python_version"] == platform.python_version()
    assert recorded["bytes"] == sum((root / f"m{i}.py").stat().st_size for i in range(3))
    assert len(recorded["sha256"]) == 64
    assert f"sha256 {recorded['sha256']}" in capsys.readouterr().out


class _RecordingBar(train_mod.tqdm):
    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.made.append(self)

    def close(self):
        self.final = dict(self.format_dict)
        super().close()


def test_progress_bar_counts_this_call_only_on_resume(corpus, tmp_path, monkeypatch):
    _RecordingBar.made = []
    monkeypatch.setattr(train_mod, "tqdm", _RecordingBar)
    monkeypatch.setattr(train_mod, "save_loss_plot", lambda metrics, path: path)  # not tested
    config = tiny(corpus, tmp_path, max_steps=10, progress=True)
    train(config, stop_after=4)
    train(config, resume=True, stop_after=3)
    first, second = (bar.final for bar in _RecordingBar.made)
    # total: where this call stops; initial: where it started, so tqdm's rate (hence the
    # ETA) counts only steps made in this call
    assert (first["initial"], first["n"], first["total"]) == (0, 4, 4)
    assert (second["initial"], second["n"], second["total"]) == (4, 7, 7)
    meter = train_mod.tqdm.format_meter(**{**second, "n": 5, "elapsed": 10.0, "rate": None})
    assert "00:10<00:20" in meter  # 1 step in 10 s, 2 steps to go: 20 s left
