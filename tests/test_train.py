import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from rwkv_lib import train as train_mod
from rwkv_lib.checkpoint import CheckpointError, load_checkpoint
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
