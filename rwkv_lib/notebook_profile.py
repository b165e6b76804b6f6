"""The notebooks' three profiles, and the trained model each of them shows.

- `ci` (the default): the generated stand-in corpus and tiny models trained in seconds on
  the CPU. The stored outputs of the notebooks, and what their tests compare, are this
  profile's.
- `laptop`: real text, by default the running Python's standard library ("stdlib", on
  every machine, no download). Notebook 08 trains the `laptop` preset into
  `runs/laptop/` once (about 7 minutes on two free CPU cores, at most 15), with a progress
  bar; later runs of 08 and 09 reuse the finished run, and an interrupted one is resumed.
- `full`: enwik8 and RWKV-4's recipe. No cell trains: that run takes GPU hours, so it is
  started from a terminal (`python -m rwkv_lib.train --preset enwik8 --out-dir
  runs/enwik8`), and the notebooks load `runs/enwik8/ckpt.pt` when it exists.

Read from the environment, so that Jupyter (or a test) started with them sets them:

- RWKV_NOTEBOOK_PROFILE: ci, laptop or full.
- RWKV_NOTEBOOK_CORPUS: another corpus than the profile's (a name such as "enwik8", or a
  file's path), for the laptop and full profiles.
- RWKV_NOTEBOOK_RUNS: the folder that holds `laptop/` and `enwik8/` (default: `runs/` in
  the repository's root).
- RWKV_NOTEBOOK_MAX_STEPS: a cap on the laptop run's steps (a quick look; the tests use it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

from .checkpoint import load_checkpoint
from .train import TrainConfig, get_config, train

PROFILES = {"ci": "sample", "laptop": "stdlib", "full": "enwik8"}  # and their corpora
RUN_FOLDERS = {"laptop": "laptop", "full": "enwik8"}  # where each profile's run lives
# a prompt that starts something typical of each corpus (the start of a page, a function)
PROMPTS = {"sample": "<page>\n    <title>", "enwik8": "<page>\n    <title>", "stdlib": "\ndef "}
REPO = Path(__file__).resolve().parent.parent
# what a reused laptop run must share with the one asked for
SAME_RUN_FIELDS = ("corpus", "n_layer", "n_embd", "ctx_len", "batch_size", "max_steps", "seed")


class ProfileError(ValueError):
    """A profile setting that cannot be used; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class NotebookProfile:
    name: str
    corpus: str
    runs_dir: Path
    max_steps: int | None = None

    @property
    def run_dir(self) -> Path | None:
        """Where this profile's trained model lives (the ci profile trains in a temp folder)."""
        folder = RUN_FOLDERS.get(self.name)
        return None if folder is None else self.runs_dir / folder

    @property
    def checkpoint(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "ckpt.pt"

    @property
    def prompt(self) -> str:
        """A prompt for text like this profile's corpus (a line break for a corpus file)."""
        return PROMPTS.get(self.corpus, "\n")

    def shown(self, path: Path) -> str:
        """A path as a reader would type it: relative to the repository when inside it."""
        path = Path(path)
        return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def notebook_profile(name: str | None = None,
                     environ: Mapping[str, str] | None = None) -> NotebookProfile:
    """The profile `name`, or the one the environment asks for (see the module's docstring),
    with its corpus, runs folder and step cap from the environment."""
    env = os.environ if environ is None else environ
    if name is None:
        name = env.get("RWKV_NOTEBOOK_PROFILE", "")
    name = name.strip() or "ci"
    if name not in PROFILES:
        raise ProfileError(f"{name!r} is not a notebook profile (RWKV_NOTEBOOK_PROFILE); use one "
                           f"of {', '.join(PROFILES)}")
    corpus = env.get("RWKV_NOTEBOOK_CORPUS", "").strip() or PROFILES[name]
    runs = env.get("RWKV_NOTEBOOK_RUNS", "").strip()
    runs_dir = Path(runs).expanduser() if runs else REPO / "runs"
    max_steps = None
    text = env.get("RWKV_NOTEBOOK_MAX_STEPS", "").strip()
    if text:
        try:
            max_steps = int(text)
        except ValueError:
            max_steps = 0
        if max_steps < 1:
            raise ProfileError(f"RWKV_NOTEBOOK_MAX_STEPS={text!r} must be a whole number of "
                               f"steps >= 1 (or unset, for the preset's)")
    return NotebookProfile(name, corpus, runs_dir, max_steps)


def laptop_config(profile: NotebookProfile, **overrides) -> TrainConfig:
    """The laptop preset as this profile runs it: its corpus, its folder, its step cap."""
    if profile.run_dir is None:
        raise ProfileError(f"the {profile.name!r} profile has no laptop run")
    capped = {} if profile.max_steps is None else {"max_steps": profile.max_steps}
    return get_config("laptop", corpus=profile.corpus, out_dir=str(profile.run_dir),
                      **capped, **overrides)


def _run_record(ckpt_path: Path, ckpt: dict) -> dict:
    """What train() returns about a finished run, read back from its files."""
    metrics_path = ckpt_path.parent / "metrics.json"
    final = json.loads(metrics_path.read_text())["final"] if metrics_path.is_file() else {}
    config = ckpt["train_config"]
    val = ckpt["metrics"].get("val") or [{"bpb": float("nan")}]
    return {"val_bpb": val[-1]["bpb"], **final, "step": ckpt["step"], "checkpoint": str(ckpt_path),
            "metrics_path": str(metrics_path),
            "tokens": ckpt["step"] * config["batch_size"] * config["ctx_len"], "reused": True}


def laptop_run(profile: NotebookProfile, **overrides) -> dict:
    """The laptop run of this profile: trained when its folder has none, resumed when it
    was interrupted, reused (not retrained) when finished. Returns train()'s record."""
    config = laptop_config(profile, **overrides)
    ckpt_path = profile.checkpoint
    if not ckpt_path.is_file():
        return {**train(config), "reused": False}
    saved = load_checkpoint(ckpt_path)
    differ = [f for f in SAME_RUN_FIELDS if saved["train_config"].get(f) != getattr(config, f)]
    if differ:
        raise ProfileError(
            f"{profile.run_dir} holds a run with other settings ({', '.join(differ)}); move it "
            f"away, or set RWKV_NOTEBOOK_RUNS to another folder, and run the cell again")
    if saved["step"] < config.max_steps:
        print(f"resuming the interrupted run in {profile.run_dir} at step {saved['step']:,}")
        return {**train(config, resume=True), "reused": False}
    return _run_record(ckpt_path, saved)


def full_run(profile: NotebookProfile) -> dict:
    """The enwik8 run trained from a terminal, read back; a clear error when it is missing
    or was trained on another corpus than the profile's."""
    ckpt_path = profile.checkpoint
    if ckpt_path is None or profile.name != "full":
        raise ProfileError(f"the {profile.name!r} profile has no enwik8 run")
    if not ckpt_path.is_file():
        raise FileNotFoundError(
            f"{ckpt_path} not found: train it first, from the repository's root, with "
            f"python -m rwkv_lib.train --preset enwik8 --out-dir runs/enwik8 (notebook 08, "
            f"section 6), then run this notebook again")
    saved = load_checkpoint(ckpt_path)
    trained_on = saved["train_config"].get("corpus")
    if trained_on != profile.corpus:
        raise ProfileError(
            f"{ckpt_path} was trained on {trained_on!r}, but this profile reads "
            f"{profile.corpus!r}; set RWKV_NOTEBOOK_CORPUS={trained_on} to score it on its "
            f"own corpus")
    return _run_record(ckpt_path, saved)
