"""The notebooks' profiles: what the environment selects, the laptop run (trained once,
resumed, reused, never mixed up with another), the full run's clear errors, and notebooks 08
and 09 executed top to bottom in the laptop and full profiles, so those paths cannot rot.

The stored outputs are the ci profile's (nbval checks them); here the other two profiles run
on the stand-in corpus with a small step cap, checked for running, not for their numbers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rwkv_lib.checkpoint import load_checkpoint
from rwkv_lib.notebook_profile import (
    REPO,
    ProfileError,
    full_run,
    laptop_config,
    laptop_run,
    notebook_profile,
)
from rwkv_lib.train import PRESETS, get_config, train

NOTEBOOKS = REPO / "notebooks"


def _env(tmp_path: Path, profile: str, **more: str) -> dict[str, str]:
    return {"RWKV_NOTEBOOK_PROFILE": profile, "RWKV_NOTEBOOK_RUNS": str(tmp_path),
            "RWKV_NOTEBOOK_CORPUS": "sample", **more}


def test_the_default_is_the_ci_profile_on_the_stand_in_corpus():
    p = notebook_profile(environ={})
    assert (p.name, p.corpus, p.max_steps, p.run_dir) == ("ci", "sample", None, None)
    assert p.runs_dir == REPO / "runs"


@pytest.mark.parametrize("name, corpus, folder", [("laptop", "stdlib", "laptop"),
                                                  ("full", "enwik8", "enwik8")])
def test_each_profile_has_its_corpus_and_run_folder(name, corpus, folder):
    p = notebook_profile(environ={"RWKV_NOTEBOOK_PROFILE": name})
    assert (p.corpus, p.checkpoint) == (corpus, REPO / "runs" / folder / "ckpt.pt")
    assert p.shown(p.checkpoint) == f"runs/{folder}/ckpt.pt"


def test_corpus_runs_and_step_cap_come_from_the_environment(tmp_path):
    p = notebook_profile(environ=_env(tmp_path, "laptop", RWKV_NOTEBOOK_MAX_STEPS="7"))
    assert (p.corpus, p.run_dir, p.max_steps) == ("sample", tmp_path / "laptop", 7)
    config = laptop_config(p)
    assert (config.corpus, config.out_dir, config.max_steps) == ("sample", str(tmp_path / "laptop"), 7)
    assert config.n_embd == PRESETS["laptop"].n_embd
    assert p.shown(p.run_dir) == str(tmp_path / "laptop")


@pytest.mark.parametrize("env, words", [
    ({"RWKV_NOTEBOOK_PROFILE": "gpu"}, "'gpu' is not a notebook profile (RWKV_NOTEBOOK_PROFILE); use one of ci, laptop, full"),
    ({"RWKV_NOTEBOOK_MAX_STEPS": "ten"}, "RWKV_NOTEBOOK_MAX_STEPS='ten' must be a whole number"),
    ({"RWKV_NOTEBOOK_MAX_STEPS": "0"}, "must be a whole number of steps >= 1"),
])
def test_a_bad_setting_is_one_clear_error(env, words):
    with pytest.raises(ProfileError, match=re.escape(words)):
        notebook_profile(environ=env)


def test_a_name_given_in_the_cell_wins_over_the_environment(tmp_path):
    p = notebook_profile("laptop", environ={"RWKV_NOTEBOOK_PROFILE": "full",
                                            "RWKV_NOTEBOOK_RUNS": str(tmp_path)})
    assert (p.name, p.corpus, p.run_dir) == ("laptop", "stdlib", tmp_path / "laptop")


def test_the_prompt_suits_the_corpus():
    assert notebook_profile(environ={}).prompt == "<page>\n    <title>"
    assert notebook_profile("laptop", environ={}).prompt == "\ndef "
    assert notebook_profile(environ={"RWKV_NOTEBOOK_CORPUS": "my.txt"}).prompt == "\n"


def _small(**more):
    # the laptop run, made tiny: the tests check the bookkeeping, not the preset's learning
    return {"n_layer": 1, "n_embd": 16, "ctx_len": 16, "batch_size": 2, "eval_iters": 1,
            "eval_interval": 4, "log_interval": 2, "progress": False, "device": "cpu", **more}


def test_the_laptop_run_is_trained_once_then_reused(tmp_path, capsys):
    p = notebook_profile(environ=_env(tmp_path, "laptop", RWKV_NOTEBOOK_MAX_STEPS="4"))
    first = laptop_run(p, **_small())
    assert not first["reused"] and first["step"] == 4 and "test" in first
    weights = load_checkpoint(p.checkpoint)["model"]
    mtime = p.checkpoint.stat().st_mtime_ns
    again = laptop_run(p, **_small())
    assert again["reused"] and p.checkpoint.stat().st_mtime_ns == mtime  # not retrained
    assert again["test"] == first["test"] and again["tokens"] == first["tokens"] == 4 * 2 * 16
    assert again["metrics_path"] == first["metrics_path"]
    reloaded = load_checkpoint(p.checkpoint)["model"]
    assert all((weights[k] == reloaded[k]).all() for k in weights)


def test_an_interrupted_laptop_run_is_resumed_to_the_same_weights(tmp_path, capsys):
    whole = notebook_profile(environ=_env(tmp_path / "a", "laptop", RWKV_NOTEBOOK_MAX_STEPS="6"))
    laptop_run(whole, **_small())
    cut = notebook_profile(environ=_env(tmp_path / "b", "laptop", RWKV_NOTEBOOK_MAX_STEPS="6"))
    train(laptop_config(cut, **_small()), stop_after=3)  # an interruption after 3 steps
    resumed = laptop_run(cut, **_small())
    assert "resuming the interrupted run" in capsys.readouterr().out
    assert not resumed["reused"] and resumed["step"] == 6
    a, b = load_checkpoint(whole.checkpoint)["model"], load_checkpoint(cut.checkpoint)["model"]
    assert all((a[k] == b[k]).all() for k in a)


def test_a_laptop_folder_holding_another_run_is_refused_and_kept(tmp_path):
    p = notebook_profile(environ=_env(tmp_path, "laptop", RWKV_NOTEBOOK_MAX_STEPS="4"))
    laptop_run(p, **_small())
    before = p.checkpoint.read_bytes()
    with pytest.raises(ProfileError, match="holds a run with other settings \\(n_embd\\); move it"):
        laptop_run(p, **_small(n_embd=32))
    assert p.checkpoint.read_bytes() == before


def test_the_full_profile_explains_a_missing_or_mismatched_run(tmp_path):
    p = notebook_profile(environ=_env(tmp_path, "full"))
    with pytest.raises(FileNotFoundError, match="python -m rwkv_lib.train --preset enwik8"):
        full_run(p)
    train(get_config("ci", out_dir=str(tmp_path / "enwik8"), max_steps=2, progress=False,
                     device="cpu", n_layer=1, n_embd=16, ctx_len=16, eval_iters=1))
    run = full_run(p)
    assert run["step"] == 2 and Path(run["metrics_path"]).is_file()
    other = notebook_profile(environ={**_env(tmp_path, "full"), "RWKV_NOTEBOOK_CORPUS": "enwik8"})
    with pytest.raises(ProfileError, match="trained on 'sample'.*RWKV_NOTEBOOK_CORPUS=sample"):
        full_run(other)


def _execute(notebook: Path, env: dict[str, str], monkeypatch) -> None:
    """Run a notebook top to bottom in a fresh kernel that sees `env` (not stored)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    nb = nbformat.read(notebook, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert f"profile {env['RWKV_NOTEBOOK_PROFILE']!r}" in printed


@pytest.mark.slow
def test_notebooks_08_and_09_run_in_the_laptop_profile(tmp_path, monkeypatch):
    # enough steps for notebook 08's own check that the model ends far below the unigram line
    env = _env(tmp_path, "laptop", RWKV_NOTEBOOK_MAX_STEPS="60")
    _execute(NOTEBOOKS / "08_training.ipynb", env, monkeypatch)  # trains runs/laptop
    ckpt = load_checkpoint(tmp_path / "laptop" / "ckpt.pt")
    assert ckpt["step"] == 60 and ckpt["train_config"]["preset"] == "laptop"
    metrics = json.loads((tmp_path / "laptop" / "metrics.json").read_text())
    assert "test" in metrics["final"]  # the whole test split, next to xz
    _execute(NOTEBOOKS / "09_generation.ipynb", env, monkeypatch)  # reuses it


@pytest.mark.slow
def test_notebooks_08_and_09_run_in_the_full_profile(tmp_path, monkeypatch):
    # a small stand-in for the enwik8 run, where the full profile looks for it
    train(get_config("ci", out_dir=str(tmp_path / "enwik8"), max_steps=200, progress=False,
                     device="cpu"))
    env = _env(tmp_path, "full")
    for name in ("08_training.ipynb", "09_generation.ipynb"):
        _execute(NOTEBOOKS / name, env, monkeypatch)
