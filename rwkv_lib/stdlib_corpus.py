"""The "stdlib" corpus: the running Python's standard library, as one file of real text.

Every machine that runs this project has it, no download is needed, and no one here
wrote it: some 30 MB of code, comments and docstrings, a real test for a byte-level model
(the "sample" stand-in is generated from templates and compresses far better).

- The files: every `.py` file under `sysconfig.get_paths()["stdlib"]`, recursively,
  except those inside a `site-packages` or `dist-packages` folder (installed packages,
  different on every machine), in the order of their paths relative to that root
  (as POSIX strings), concatenated as they are.
- The corpus file is named after what it is made of (Python version, file count, size
  and the start of its sha256), so another Python gives another file, never a stale one.
  It is written atomically into the data folder on first use, with a JSON file beside it
  holding the same facts in full (read by `read_metadata`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig
from pathlib import Path

from .atomic import make_folder, write_bytes_atomically, write_text_atomically

EXCLUDED_DIRS = ("site-packages", "dist-packages")


def stdlib_root() -> Path:
    """The folder of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: str | os.PathLike[str] | None = None) -> list[str]:
    """The `.py` files of the corpus, as sorted POSIX paths relative to `root`."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library folder {root} does not exist")
    found = []
    for folder, subdirs, names in os.walk(root):  # does not follow links to folders
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS]
        rel = Path(folder).relative_to(root)
        found += [(rel / n).as_posix() for n in names if n.endswith(".py")]
    return sorted(found)


def _concatenate(root: Path, sources: list[str]) -> bytes:
    return b"".join((root / s).read_bytes() for s in sources)


def corpus_file_name(metadata: dict) -> str:
    return (f"stdlib-py{metadata['python_version']}-{metadata['files']}files-"
            f"{metadata['bytes']}-{metadata['sha256'][:12]}.txt")


def build_stdlib_corpus(folder: str | os.PathLike[str], root: str | os.PathLike[str] | None = None,
                        python_version: str | None = None) -> Path:
    """The corpus file in `folder`, written there if it is not there yet.

    Reading the sources (about 0.3 s for CPython's) is needed anyway to know the name;
    the file is written only when no file of that name and size exists.
    """
    root = Path(root) if root is not None else stdlib_root()
    sources = stdlib_sources(root)
    if not sources:
        raise FileNotFoundError(f"no .py files under {root}: is it a Python standard library?")
    payload = _concatenate(root, sources)
    metadata = {
        "python_version": python_version or platform.python_version(),
        "files": len(sources),
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    folder = Path(folder)
    path = folder / corpus_file_name(metadata)
    if not (path.is_file() and path.stat().st_size == len(payload)
            and _metadata_path(path).is_file()):
        make_folder(folder, "data folder")
        write_bytes_atomically(path, payload, mode=0o644)
        # The metadata goes last: a file with metadata is complete.
        write_text_atomically(_metadata_path(path), json.dumps(metadata, indent=1) + "\n",
                              mode=0o644)
    return path


def _metadata_path(corpus_path: Path) -> Path:
    return corpus_path.with_suffix(".json")


def read_metadata(corpus_path: str | os.PathLike[str]) -> dict | None:
    """{"python_version", "files", "bytes", "sha256"} of a corpus file written by
    build_stdlib_corpus; None for any other file."""
    meta = _metadata_path(Path(corpus_path))
    if not (Path(corpus_path).name.startswith("stdlib-") and meta.is_file()):
        return None
    return json.loads(meta.read_text())


def describe(metadata: dict) -> str:
    return (f"Python {metadata['python_version']} standard library: {metadata['files']:,} .py "
            f"files, {metadata['bytes']:,} bytes, sha256 {metadata['sha256']}")
