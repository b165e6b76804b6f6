"""Files that are written whole or not at all (checkpoints, metrics, corpora), and the
folders they go into.

A file is written to a temporary file next to its destination, flushed to disk, renamed
over the destination, and then the folder itself is flushed, so that the new name survives
a power loss too. A crash at any point leaves the previous file as it was, and at worst a
temporary file named `.<name>.<random>.tmp`, which `remove_stale_temps` deletes on the next
run in that folder.

A full disk is reported in words: "no space left on the device that holds <folder>".
`make_folder` creates a missing folder but not its missing parents: a path whose parent is
missing too is more likely a typo than a wish, and a typo should not leave folders behind.
"""

from __future__ import annotations

import errno
import glob
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"


def _temp_prefix(name: str) -> str:
    return f".{name}."


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries to disk: a rename is durable only once its folder is."""
    if os.name == "nt":  # folders cannot be opened there; NTFS journals renames itself
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def no_space_error(path: Path) -> OSError:
    return OSError(errno.ENOSPC, f"no space left on the device that holds {path.parent}: "
                   f"{path.name} was not written (an earlier {path.name} is unchanged); free "
                   "some space or write elsewhere")


def write_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], object],
                     mode: int | None = None) -> Path:
    """Create or replace `path` with what `write(file)` writes, atomically and durably.
    `mode` sets the permissions (mkstemp's default, 0o600, keeps the file private)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=TEMP_SUFFIX,
                               dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise no_space_error(path) from err
        raise
    fsync_folder(path.parent)
    return path


def write_bytes_atomically(path: str | os.PathLike[str], data: bytes,
                           mode: int | None = 0o644) -> Path:
    return write_atomically(path, lambda f: f.write(data), mode)


def write_text_atomically(path: str | os.PathLike[str], text: str,
                          mode: int | None = 0o644) -> Path:
    return write_bytes_atomically(path, text.encode("utf-8"), mode)


def remove_stale_temps(folder: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """Delete the temporary files that interrupted writes of `names` left in `folder`;
    returns what was deleted."""
    removed = []
    for name in names:
        pattern = glob.escape(str(Path(folder) / _temp_prefix(name))) + "*" + TEMP_SUFFIX
        for stale in map(Path, glob.glob(pattern)):
            if stale.is_file() and not stale.is_symlink():
                stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed


def make_folder(folder: str | os.PathLike[str], what: str = "folder") -> Path:
    """Create `folder` unless it exists; its parent must exist already. Raises
    FileNotFoundError (parent missing) or NotADirectoryError (a file in the way)."""
    folder = Path(folder)
    if folder.is_dir():
        return folder
    for existing in (folder, *folder.parents):
        if existing.exists():
            break
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"not a folder, so it cannot hold the {what}",
                                 str(existing))
    if existing != folder.parent:
        raise FileNotFoundError(f"the {what} {folder} does not exist, nor does {folder.parent}: "
                                "fix the path, or create the folder first")
    folder.mkdir(exist_ok=True)
    return folder
