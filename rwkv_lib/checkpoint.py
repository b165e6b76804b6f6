"""Checkpoints: save, load, resume, and move weights to and from RWKV-LM (notebook 08).

A checkpoint is one `torch.save` file holding only plain Python values and tensors, so it
loads with `torch.load(..., weights_only=True)`: opening a file never runs code from it.

    format, version      what the file is, to give a clear error on anything else
    step, data_position  optimizer steps taken, training windows consumed
    model, model_config  the state dict (RWKV-LM's names) and the RWKVConfig as a dict
    optimizer            the optimizer's state dict (None for imported weights)
    train_config         the TrainConfig as a dict
    vocab                the ByteVocab as a dict
    rng_state            torch CPU (and CUDA) generator states
    metrics              the loss history so far

Writing is atomic (rwkv_lib.atomic): the file is written next to its destination, flushed
to disk, renamed over it, and the folder flushed, so neither a crash nor a power loss
mid-write harms the previous checkpoint.

The WKV backend is a choice of the machine that runs the model, not part of the model:
load_model takes it as an argument (default "auto") whatever the checkpoint was trained with.

    python -m rwkv_lib.checkpoint export runs/ci/ckpt.pt rwkv-lm.pth
    python -m rwkv_lib.checkpoint import rwkv-lm.pth imported.pt --corpus enwik8
    python -m rwkv_lib.train --init-from imported.pt --out-dir runs/fine-tune   # fine-tune it

Neither command replaces an existing file unless given --force, and never its own input.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import cli
from .atomic import remove_stale_temps, write_atomically
from .data import ByteVocab, load_corpus
from .model import RWKV, RWKVConfig, state_dict_names
from .wkv import BACKENDS

FORMAT = "rwkv_lib.checkpoint"
VERSION = 1
# The fields that decide the shapes of the weights; resuming with others cannot work.
MODEL_FIELDS = ("n_layer", "n_embd")
REQUIRED = ("step", "model", "model_config", "train_config", "vocab")
OPTIONAL = {"optimizer": None, "data_position": 0, "rng_state": None, "metrics": {}}


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint, with the file and the reason."""


def _as_dict(config: Any) -> dict:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return dict(config)


def _plain(value: Any) -> Any:
    # Tuples become lists, as in config.json, so the two copies of a config compare equal.
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def capture_rng_state() -> dict[str, Any]:
    """The random generators' states as tensors (CPU, and every CUDA device if any)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU of the machine that saved it; resumed where fewer are visible
        # (fewer processes, CUDA_VISIBLE_DEVICES), set those that exist.
        for index, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


def _atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda f: torch.save(obj, f))


def save_checkpoint(
    path: str | os.PathLike, *, model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None, step: int, train_config: Any, vocab: ByteVocab,
    rng_state: Mapping[str, Any] | None = None, data_position: int = 0,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically; returns its path. `rng_state` defaults to now's."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper saves its model
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "data_position": int(data_position),
        "model": {k: v.detach() for k, v in model.state_dict().items()},
        "model_config": model.config.to_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "train_config": _plain(_as_dict(train_config)),
        "vocab": _plain(vocab.to_dict()),
        "rng_state": dict(capture_rng_state() if rng_state is None else rng_state),
        "metrics": _plain(dict(metrics or {})),
    }
    return _atomic_torch_save(ckpt, path)


def _torch_load(path: Path, map_location: Any) -> Any:
    """torch.load with weights_only=True, its many exceptions turned into one clear one."""
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "a folder, not a checkpoint", str(path))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols say nothing here
            return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: {_load_problem(path, str(err))}") from err


def _load_problem(path: Path, said: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    zip_archive = head == b"PK\x03\x04"  # what torch.save writes
    pickle_stream = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if "weights only load failed" in said.lower() and (zip_archive or pickle_stream):
        # torch's message runs to a page of ways to load the file anyway; the one fact worth
        # passing on is which object it refused
        refused = re.search(r"unsupported global:\s*(?:GLOBAL\s+)?([\w.]+)", said, re.I)
        named = f" (unsupported global {refused.group(1)})" if refused else ""
        return (f"it holds Python objects that safe loading (weights_only=True) refuses to "
                f"unpickle{named}. rwkv_lib's checkpoints hold only tensors and plain values, "
                "so save_checkpoint did not write this file, and loading it any other way "
                "could run code hidden in it")
    if not zip_archive:
        return "not a torch.save zip archive (is it a checkpoint at all?)"
    first = said.strip().splitlines()[0] if said.strip() else "no reason given"
    return f"truncated or corrupted (a copy cut short?); torch.load said: {first}"


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint`, checking that it is one."""
    path = Path(path)
    ckpt = _torch_load(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        hint = ""
        if isinstance(ckpt, dict) and "emb.weight" in ckpt:
            hint = ("; it looks like an RWKV-LM state dict: convert it with `python -m "
                    "rwkv_lib.checkpoint import FILE OUT --corpus CORPUS` (import_rwkv_lm)")
        raise CheckpointError(f"{path}: a torch file, but not an rwkv_lib checkpoint "
                              f"(no format tag {FORMAT!r}){hint}")
    if not isinstance(ckpt.get("version"), int) or ckpt["version"] > VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {ckpt.get('version')!r} is "
                              f"not one this rwkv_lib understands ({VERSION} or older); update "
                              "rwkv_lib")
    missing = [key for key in REQUIRED if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: an rwkv_lib checkpoint, but it is missing {missing}: "
                              "damaged, or not written by save_checkpoint")
    for key, default in OPTIONAL.items():
        ckpt.setdefault(key, default)
    return ckpt


def check_compatible(ckpt: Mapping[str, Any], config: Any, vocab: ByteVocab | None = None) -> None:
    """Raise CheckpointError when `config` (a TrainConfig or dict) builds a model with other
    shapes than the checkpoint's, listing every differing field. Fields such as max_steps,
    lr or ctx_len may change on resume (the data and schedule then follow the new values)."""
    saved, wanted = ckpt["model_config"], _as_dict(config)
    diffs = [f"{name}: checkpoint {saved[name]}, config {wanted[name]}"
             for name in MODEL_FIELDS if saved[name] != wanted[name]]
    if vocab is not None and ByteVocab.from_dict(ckpt["vocab"]) != vocab:
        diffs.append(f"vocabulary: checkpoint {saved['vocab_size']} byte values, "
                     f"corpus {vocab.size}")
    if diffs:
        raise CheckpointError("the checkpoint was made with another model configuration: "
                              + "; ".join(diffs))


def load_model(
    path: str | os.PathLike, device: torch.device | str = "cpu", wkv_backend: str = "auto",
) -> tuple[RWKV, ByteVocab, dict]:
    """The trained model (in eval mode, on `device`), its vocabulary and its train config.
    The model computes WKV with `wkv_backend` (see rwkv_lib.wkv), whichever backend it was
    trained with: a model trained on a GPU with "cuda" runs on a CPU too."""
    if wkv_backend not in BACKENDS:
        raise ValueError(f"wkv_backend must be one of {BACKENDS}, got {wkv_backend!r}")
    ckpt = load_checkpoint(path)
    model = RWKV(RWKVConfig(**{**ckpt["model_config"], "wkv_backend": wkv_backend}))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ByteVocab.from_dict(ckpt["vocab"]), ckpt["train_config"]


# --- RWKV-LM's format: a bare state dict with the same parameter names ---

def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (through links, `..` or another spelling)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def export_rwkv_lm(ckpt_path: str | os.PathLike, out_path: str | os.PathLike, *,
                   overwrite: bool = False) -> Path:
    """Write the weights as RWKV-LM stores them: a plain {name: float tensor} dict, raw
    time_decay (before -exp). Our names are RWKV-LM's, so nothing is renamed. An existing
    `out_path` is replaced only with `overwrite`, and never when it is the checkpoint itself
    (that would turn a training checkpoint into bare weights)."""
    if same_file(ckpt_path, out_path):
        raise ValueError(f"{out_path} is the input file {ckpt_path}: exporting there would "
                         "replace the checkpoint with bare weights; choose another output")
    if Path(out_path).exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass overwrite=True to replace it")
    ckpt = load_checkpoint(ckpt_path)
    state = {k: v.float().contiguous() for k, v in ckpt["model"].items()}
    return _atomic_torch_save(state, out_path)


def _infer_config(state: Mapping[str, torch.Tensor]) -> RWKVConfig:
    if "emb.weight" not in state:
        raise CheckpointError("not an RWKV-4 state dict: there is no 'emb.weight'")
    vocab_size, n_embd = state["emb.weight"].shape
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not layers:
        raise CheckpointError("not an RWKV-4 state dict: there are no 'blocks.N.' weights")
    return RWKVConfig(vocab_size=int(vocab_size), n_layer=max(layers) + 1, n_embd=int(n_embd))


def import_rwkv_lm(
    state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike,
    vocab: ByteVocab | None = None,
) -> RWKV:
    """Build an RWKV from an RWKV-LM RWKV-4 state dict (or the path of one), inferring
    n_layer, n_embd and vocab_size from the names and shapes. Half-precision weights
    become float32. Loading is strict: any missing or extra name is an error."""
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state = _torch_load(Path(state_dict_or_path), "cpu")
        if not isinstance(state, dict):
            raise CheckpointError(f"{state_dict_or_path}: expected a state dict, "
                                  f"got {type(state).__name__}")
        if state.get("format") == FORMAT:
            raise CheckpointError(f"{state_dict_or_path} is already an rwkv_lib checkpoint: "
                                  "use it as it is (evaluate, generate, train --init-from)")
    else:
        state = dict(state_dict_or_path)
    config = _infer_config(state)
    if vocab is not None and vocab.size != config.vocab_size:
        raise CheckpointError(f"the weights have a vocabulary of {config.vocab_size} tokens, "
                              f"the given ByteVocab has {vocab.size}")
    expected = set(state_dict_names(config))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"not a plain RWKV-4 state dict (L{config.n_layer} "
                              f"C{config.n_embd}): missing {missing}, unexpected {unexpected}")
    model = RWKV(config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def _check_output(source: Path, out: Path, force: bool) -> None:
    """Refuse, before any work, to write where the result would destroy something."""
    if same_file(source, out):
        raise ValueError(f"{out} is the input file {source}: writing there would replace it; "
                         "choose another output path")
    if out.is_dir():
        raise IsADirectoryError(errno.EISDIR, "a folder, not a file", str(out))
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists: pass --force to replace it, or choose another "
                              "output path")
    if not out.parent.is_dir():
        if out.parent.exists():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(out.parent))
        raise FileNotFoundError(f"the folder {out.parent} does not exist; create it first or "
                                "choose another output path")


def _main(argv: Sequence[str] | None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m rwkv_lib.checkpoint",
        description="Move weights between rwkv_lib checkpoints and RWKV-LM's plain state "
                    "dicts (the parameter names are the same). Neither command replaces an "
                    "existing file without --force, nor ever its own input.")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="rwkv_lib checkpoint -> RWKV-LM .pth")
    exp.add_argument("checkpoint")
    exp.add_argument("out")
    exp.add_argument("--force", action="store_true", help="replace an existing output file")
    imp = sub.add_parser("import", help="RWKV-LM .pth -> rwkv_lib checkpoint (fine-tune it "
                                        "with python -m rwkv_lib.train --init-from OUT)")
    imp.add_argument("rwkv_lm_pth")
    imp.add_argument("out")
    imp.add_argument("--corpus", default=None,
                     help="corpus whose byte vocabulary the weights were trained with "
                          "(needed unless the model has all 256 byte values)")
    imp.add_argument("--data-dir", default=None)
    imp.add_argument("--force", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    out = Path(args.out)

    if args.command == "export":
        _check_output(Path(args.checkpoint), out, args.force)
        remove_stale_temps(out.parent, [out.name])
        export_rwkv_lm(args.checkpoint, out, overwrite=args.force)
        print(f"wrote {out}")
        return 0
    _check_output(Path(args.rwkv_lm_pth), out, args.force)
    if args.corpus is not None:
        vocab = ByteVocab.from_data(load_corpus(args.corpus, data_dir=args.data_dir))
    else:
        vocab = ByteVocab.from_data(np.arange(256, dtype=np.uint8))
    try:
        model = import_rwkv_lm(args.rwkv_lm_pth, vocab=vocab)
    except CheckpointError as err:
        if args.corpus or "vocabulary" not in str(err):
            raise
        raise CheckpointError(f"{err}; pass --corpus to name the corpus it was trained on") \
            from err
    c = model.config
    train_config = {"corpus": args.corpus, "n_layer": c.n_layer, "n_embd": c.n_embd,
                    "ctx_len": c.ctx_len, "imported_from": str(args.rwkv_lm_pth)}
    remove_stale_temps(out.parent, [out.name])
    save_checkpoint(out, model=model, optimizer=None, step=0, train_config=train_config,
                    vocab=vocab)
    print(f"wrote {out} (L{c.n_layer} C{c.n_embd} V{c.vocab_size})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (a mistake is one line on stderr)."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
