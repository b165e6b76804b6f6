"""Every mistake a user can make on a command line gets one line on stderr, not a traceback.

Each case runs `python -m rwkv_lib.<cli> ...` in a subprocess, as a user would, and checks
the exit status (2 for usage errors, argparse's convention; 1 for the rest), that stderr is
a single line naming the problem, and that no traceback appears anywhere.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkv_lib.checkpoint import save_checkpoint
from rwkv_lib.data import ByteVocab
from rwkv_lib.model import RWKV, RWKVConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--device", "cpu", "--wkv-backend", "pytorch", "--progress", "false", "--n-layer", "1",
        "--n-embd", "8", "--ctx-len", "8", "--batch-size", "2", "--max-steps", "1",
        "--eval-iters", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The things the cases point at: good and bad checkpoints, corpora, files, folders."""
    tmp = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    words = [b"the", b"cat", b"sat", b"on", b"a", b"mat"]
    text = b" ".join(words[i] for i in rng.integers(0, len(words), 800))
    (tmp / "corpus.txt").write_bytes(text)
    (tmp / "small.txt").write_bytes(text[:300])
    (tmp / "tiny.txt").write_bytes(b"ten bytes!")
    (tmp / "foreign.txt").write_bytes("ünïcödé bytes the model never saw ".encode() * 20)
    (tmp / "file").write_bytes(b"a regular file, not a folder")
    (tmp / "folder").mkdir()
    (tmp / "junk.pt").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    torch.save({"obj": ByteVocab([1, 2])}, tmp / "evil.pt")

    vocab = ByteVocab.from_data(text)
    torch.manual_seed(0)
    model = RWKV(RWKVConfig(vocab_size=vocab.size, n_layer=1, n_embd=8, ctx_len=8,
                            wkv_backend="pytorch"))
    optimizer = torch.optim.AdamW(model.parameters())
    train_config = {"preset": "ci", "corpus": str(tmp / "corpus.txt"), "n_layer": 1,
                    "n_embd": 8, "ctx_len": 8}
    for name in ("ckpt.pt", "victim.pt"):
        save_checkpoint(tmp / name, model=model, optimizer=optimizer, step=1,
                        train_config=train_config, vocab=vocab, metrics={"train": [], "val": []})
    save_checkpoint(tmp / "nameless.pt", model=model, optimizer=None, step=0,
                    train_config={"corpus": None, "n_layer": 1, "n_embd": 8}, vocab=vocab)
    torch.save(model.state_dict(), tmp / "rwkv-lm.pth")
    (tmp / "run-exists").mkdir()
    (tmp / "run-exists" / "ckpt.pt").write_bytes((tmp / "ckpt.pt").read_bytes())
    (tmp / "run-junk").mkdir()
    (tmp / "run-junk" / "ckpt.pt").write_bytes((tmp / "junk.pt").read_bytes())
    return {"tmp": str(tmp), **{p.stem.replace("-", "_"): str(p) for p in tmp.iterdir()}}


T, E, G, C, D = "train", "evaluate", "generate", "checkpoint", "data"
NO_GPU = not torch.cuda.is_available()

# (cli, arguments, exit status, words the one line must contain)
CASES = {
    # --- train: values argparse rejects
    "train-not-a-number": (T, ["--max-steps", "many"], 2, "max_steps"),
    "train-bad-choice": (T, ["--dtype", "fp16"], 2, "dtype"),
    "train-unknown-option": (T, ["--learning-rate", "1"], 2, "--learning-rate"),
    "train-one-beta": (T, ["--betas", "0.9"], 2, "betas"),
    "train-resume-and-overwrite": (T, ["--resume", "--overwrite"], 2, "--overwrite"),
    "train-stop-after-zero": (T, ["--stop-after", "0"], 2, "--stop-after"),
    # --- train: values check_config rejects, each naming its field
    "train-negative-seed": (T, ["--seed", "-1"], 2, "seed must be >= 0"),
    "train-zero-eps": (T, ["--eps", "0"], 2, "eps must be"),
    "train-nan-lr": (T, ["--lr-init", "nan"], 2, "lr_init must be"),
    "train-inf-lr": (T, ["--lr-final", "inf"], 2, "lr_final must be"),
    "train-negative-decay": (T, ["--weight-decay", "-0.1"], 2, "weight_decay must be"),
    "train-beta-of-one": (T, ["--betas", "1.0", "0.99"], 2, "betas must be"),
    "train-zero-batch": (T, ["--batch-size", "0"], 2, "batch_size must be"),
    "train-tpu": (T, ["--device", "tpu"], 2, "device must be"),
    # --- train: files and folders
    "train-no-gpu": (T, ["--device", "cuda"], 1, "no CUDA GPU"),
    "train-missing-corpus": (T, ["--corpus", "{tmp}/nope.txt"], 1, "corpus file not found"),
    "train-corpus-is-a-folder": (T, ["--corpus", "{folder}"], 1, "must be a file"),
    "train-corpus-too-small": (T, ["--corpus", "{small}", "--ctx-len", "64"], 1, "--ctx-len"),
    "train-out-dir-under-a-file": (T, ["--out-dir", "{file}/run"], 1, "not a folder"),
    "train-out-dir-is-a-file": (T, ["--out-dir", "{file}"], 1, "not a folder"),
    "train-data-dir-typo": (T, ["--corpus", "sample", "--data-dir", "{tmp}/dtaa/data"], 1,
                            "does not exist"),
    "train-resume-nothing": (T, ["--resume", "--out-dir", "{tmp}/empty"], 1,
                             "no checkpoint to resume"),
    "train-resume-junk": (T, ["--resume", "--out-dir", "{run_junk}"], 1, "not a torch.save"),
    "train-resume-other-shape": (T, ["--resume", "--out-dir", "{run_exists}", "--n-embd", "16"],
                                 1, "n_embd: checkpoint 8, config 16"),
    "train-would-clobber": (T, ["--out-dir", "{run_exists}"], 2, "--resume"),
    "train-init-from-missing": (T, ["--init-from", "{tmp}/nope.pt"], 1, "not found"),
    "train-init-from-junk": (T, ["--init-from", "{junk}"], 1, "not a torch.save"),
    "train-init-and-resume": (T, ["--init-from", "{ckpt}", "--resume"], 2, "--init-from"),
    # --- evaluate
    "evaluate-missing": (E, ["{tmp}/nope.pt"], 1, "not found"),
    "evaluate-a-folder": (E, ["{folder}"], 1, "is a folder"),
    "evaluate-junk": (E, ["{junk}"], 1, "not a torch.save zip archive"),
    "evaluate-rwkv-lm-file": (E, ["{rwkv_lm}"], 1, "python -m rwkv_lib.checkpoint import"),
    "evaluate-pickled-code": (E, ["{evil}"], 1, "unsupported global rwkv_lib.data.ByteVocab"),
    "evaluate-tpu": (E, ["{ckpt}", "--device", "tpu"], 2, "--device"),
    "evaluate-no-gpu": (E, ["{ckpt}", "--device", "cuda"], 1, "no CUDA GPU"),
    "evaluate-bad-backend": (E, ["{ckpt}", "--wkv-backend", "fast"], 2, "--wkv-backend"),
    "evaluate-zero-chunk": (E, ["{ckpt}", "--chunk-len", "0"], 2, "--chunk-len"),
    "evaluate-zero-batch": (E, ["{ckpt}", "--batch-size", "0"], 2, "--batch-size"),
    "evaluate-too-few-bytes": (E, ["{ckpt}", "--max-bytes", "1", "--split", "val"], 1, "too few"),
    "evaluate-missing-corpus": (E, ["{ckpt}", "--corpus", "{tmp}/nope.txt"], 1, "not found"),
    "evaluate-nameless-corpus": (E, ["{nameless}"], 2, "--corpus"),
    "evaluate-foreign-bytes": (E, ["{ckpt}", "--corpus", "{foreign}"], 1, "not in this vocab"),
    # --- generate
    "generate-missing": (G, ["{tmp}/nope.pt"], 1, "not found"),
    "generate-junk": (G, ["{junk}"], 1, "not a torch.save zip archive"),
    "generate-negative-temperature": (G, ["{ckpt}", "--temperature", "-1"], 2, "--temperature"),
    "generate-top-p-above-one": (G, ["{ckpt}", "--top-p", "2"], 2, "--top-p"),
    "generate-negative-tokens": (G, ["{ckpt}", "--tokens", "-1"], 2, "--tokens"),
    "generate-empty-prompt": (G, ["{ckpt}", "--prompt", ""], 1, "prompt is empty"),
    "generate-foreign-prompt": (G, ["{ckpt}", "--prompt", "é"], 1, "not in this vocabulary"),
    "generate-tpu": (G, ["{ckpt}", "--device", "tpu"], 2, "--device"),
    # --- checkpoint
    "checkpoint-no-command": (C, [], 2, "command"),
    "checkpoint-export-onto-itself": (C, ["export", "{victim}", "{victim}"], 1, "input file"),
    "checkpoint-export-onto-itself-by-another-path": (
        C, ["export", "{victim}", "{folder}/../victim.pt", "--force"], 1, "input file"),
    "checkpoint-export-over-a-file": (C, ["export", "{ckpt}", "{file}"], 1, "--force"),
    "checkpoint-export-missing": (C, ["export", "{tmp}/nope.pt", "{tmp}/out.pth"], 1,
                                  "not found"),
    "checkpoint-export-under-a-file": (C, ["export", "{ckpt}", "{file}/out.pth"], 1,
                                       "not a folder"),
    "checkpoint-import-over-a-file": (C, ["import", "{rwkv_lm}", "{file}", "--corpus",
                                          "{corpus}"], 1, "--force"),
    "checkpoint-import-junk": (C, ["import", "{junk}", "{tmp}/out.pt"], 1, "not a torch.save"),
    "checkpoint-import-a-checkpoint": (C, ["import", "{ckpt}", "{tmp}/out.pt"], 1,
                                       "already an rwkv_lib checkpoint"),
    "checkpoint-import-without-corpus": (C, ["import", "{rwkv_lm}", "{tmp}/out.pt"], 1,
                                         "--corpus"),
    "checkpoint-import-missing-corpus": (C, ["import", "{rwkv_lm}", "{tmp}/out.pt", "--corpus",
                                             "{tmp}/nope.txt"], 1, "not found"),
    # --- data
    "data-no-command": (D, [], 2, "command"),
    "data-info-missing": (D, ["info", "{tmp}/nope.txt"], 1, "not found"),
    "data-info-folder": (D, ["info", "{folder}"], 1, "must be a file"),
    "data-info-ten-bytes": (D, ["info", "{tiny}"], 1, "at least 20 bytes"),
    "data-info-no-enwik8": (D, ["info", "enwik8", "--data-dir", "{folder}"], 1,
                            "python -m rwkv_lib.data download"),
    "data-info-data-dir-typo": (D, ["info", "sample", "--data-dir", "{tmp}/dtaa/data"], 1,
                                "does not exist"),
    "data-download-under-a-file": (D, ["download", "--dest", "{file}/data"], 1, "not a folder"),
}
NEEDS_NO_GPU = {"train-no-gpu", "evaluate-no-gpu"}


def _run(cli: str, args: list[str], files: dict[str, str]) -> subprocess.CompletedProcess:
    args = [a.format(**files) for a in args]
    if cli == "train" and not any(a in args for a in ("--resume",)):
        args = ["--corpus", files["corpus"], "--out-dir", f"{files['tmp']}/run", *TINY, *args]
    elif cli == "train":
        args = [*TINY, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RWKV_DATA_DIR": files["tmp"] + "/data"}
    return subprocess.run([sys.executable, "-m", f"rwkv_lib.{cli}", *args], cwd=files["tmp"],
                          env=env, capture_output=True, text=True, timeout=300)


def test_there_are_cases_for_every_command_line():
    assert len(CASES) >= 30
    assert {cli for cli, *_ in CASES.values()} == {T, E, G, C, D}


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_clear_line(name, files):
    if name in NEEDS_NO_GPU and not NO_GPU:
        pytest.skip("this machine has a GPU")
    cli, args, status, words = CASES[name]
    victim = Path(files["victim"]).read_bytes()
    before = sorted(os.listdir(files["tmp"]))
    done = _run(cli, args, files)
    said = done.stdout + done.stderr
    assert "Traceback" not in said, said
    assert done.returncode == status, said
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert words in lines[0], lines[0]
    assert "likely succeed" not in said
    # a failed command leaves no trace: no new files or folders, the checkpoint untouched
    assert sorted(os.listdir(files["tmp"])) == before
    assert Path(files["victim"]).read_bytes() == victim


# --- the pieces, in-process -----------------------------------------------------------------

@pytest.mark.parametrize("err, words", [
    (PermissionError(13, "Permission denied", "/data/x"), "/data/x: permission denied"),
    (OSError(30, "Read-only file system", "/ro/run"), "/ro/run: on a read-only file"),
    (NotADirectoryError(20, "Not a directory", "/a/file/run"), "/a/file/run: not a folder"),
    (IsADirectoryError(21, "Is a directory", "/a/dir"), "/a/dir: is a folder, not a file"),
    (OSError(28, "No space left on device"), "No space left on device"),
    (FileNotFoundError("checkpoint not found: x.pt"), "checkpoint not found: x.pt"),
    (ValueError("a bad value\nover two lines"), "a bad value over two lines"),
    (FloatingPointError("the loss is nan"), "the loss is nan"),
])
def test_each_user_error_is_one_line(capsys, err, words):
    from rwkv_lib import cli

    def main(argv):
        raise err

    assert cli.run(main, []) == 1
    out = capsys.readouterr().err
    assert out.count("\n") == 1 and out.startswith("error: ") and words in out


def test_a_bug_keeps_its_traceback_and_ctrl_c_is_quiet(capsys, monkeypatch):
    from rwkv_lib import cli

    def buggy(argv):
        raise TypeError("a bug, not a user's mistake")

    with pytest.raises(TypeError):
        cli.run(buggy, [])

    def interrupted(argv):
        raise KeyboardInterrupt

    assert cli.run(interrupted, []) == 130 and "interrupted" in capsys.readouterr().err
    monkeypatch.setenv("RWKV_TRACEBACK", "1")
    with pytest.raises(ValueError):
        cli.run(lambda argv: int("x"), [])
    assert cli.run(lambda argv: None, []) == 0 and cli.run(lambda argv: 3, []) == 3
