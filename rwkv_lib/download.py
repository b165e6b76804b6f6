"""Download enwik8 once, resumably, and check it before anyone trains on it (notebook 01_data).

The zip is fetched into `enwik8.zip.part`; an interrupted download resumes from where it
stopped (HTTP Range request). The unzipped bytes are checked against the known size, md5
and sha256 before they are moved into place, so a damaged download never sits where
`rwkv_lib.data` looks for enwik8. An archive is never trusted with the disk: a member that
declares another size than enwik8's is refused before anything is unpacked, and unpacking
stops at enwik8's size whatever the archive claims (a "zip bomb" cannot fill the disk).

This module knows nothing of rwkv_lib.data (which imports it): the caller names the folder.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from rwkv_lib.atomic import fsync_folder, make_folder, remove_stale_temps

ENWIK8_URL = "https://mattmahoney.net/dc/enwik8.zip"
ENWIK8_SIZE = 100_000_000
ENWIK8_MD5 = "a1fa5ffddb56f4953e226637dabbb36a"
ENWIK8_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"
_CHUNK = 1 << 20


class DownloadError(ConnectionError):
    """The download failed for lack of a (working) connection; the message says what to do."""


def _hashes(path: Path) -> tuple[int, str, str]:
    """(size, md5, sha256) of a file, read in chunks so 100 MB never sit in memory."""
    md5, sha256, size = hashlib.md5(), hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            md5.update(chunk)
            sha256.update(chunk)
            size += len(chunk)
    return size, md5.hexdigest(), sha256.hexdigest()


def verify_file(path: str | os.PathLike[str], size: int, md5: str, sha256: str) -> None:
    """Raise ValueError unless the file has exactly this size, md5 and sha256."""
    path = Path(path)
    actual_size = path.stat().st_size
    if actual_size != size:  # cheap check first: no need to hash a file of the wrong size
        raise ValueError(f"{path}: expected {size:,} bytes, got {actual_size:,}")
    _, actual_md5, actual_sha256 = _hashes(path)
    if (actual_md5, actual_sha256) != (md5.lower(), sha256.lower()):
        raise ValueError(
            f"{path}: checksum mismatch: expected md5 {md5}, sha256 {sha256}; "
            f"got md5 {actual_md5}, sha256 {actual_sha256}"
        )


def _manual_help(url: str, dest: Path, md5: str, member: str) -> str:
    return (
        f"To fetch it by hand: download {url}, unzip it and put the file `{member}` into "
        f"{dest}/ (md5 of the unzipped file: {md5}). Everything also runs offline on the "
        'built-in stand-in corpus: corpus="sample".'
    )


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Download `url` into `part`, continuing an earlier partial download if there is one.

    Raises OSError (socket errors, timeouts, an incomplete body) for the caller to wrap.
    """
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "rwkv-notebooks"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the .part is already complete
            return
        raise
    with response:
        resumed = have > 0 and response.status == 206
        if resumed and not response.headers.get("Content-Range", "").startswith(
                f"bytes {have}-"):
            # Some other piece of the file: not safe to append. Fetch it all afresh.
            response.close()
            part.unlink()
            return _fetch(url, part, timeout, progress)
        if not resumed:  # a fresh download, or the server ignored Range: start over
            have = 0
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        received = 0
        with open(part, "ab" if resumed else "wb") as f, tqdm(
            total=None if expected is None else have + expected, initial=have, unit="B",
            unit_scale=True, unit_divisor=1024, desc=part.name, disable=not progress,
        ) as bar:
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if expected is not None and received < expected:
        # http.client returns a short body without complaint when the server hangs up.
        raise http.client.IncompleteRead(b"", expected - received)


def _extract(part: Path, member: str, dest: Path, size: int, md5: str, sha256: str) -> Path:
    """Unzip `member` of `part` to a temp file in `dest`, hashing as it goes; verify it.

    At most size + 1 bytes are ever unpacked: one more than enough to know it is too many.
    The CRC of the member is checked by zipfile as the last byte is read."""
    try:
        with zipfile.ZipFile(part) as archive:
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise zipfile.BadZipFile(f"no member {member!r} in {archive.namelist()}") \
                    from None
            if info.file_size != size:
                part.unlink(missing_ok=True)
                raise ValueError(
                    f"the downloaded archive's {member!r} declares {info.file_size:,} bytes, "
                    f"expected {size:,} bytes: it is not the expected file. Nothing was "
                    "unpacked; the download was deleted, run it again.")
            fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{member}.", suffix=".tmp")
            tmp = Path(tmp_name)
            digests, got_size = (hashlib.md5(), hashlib.sha256()), 0
            try:
                with archive.open(info) as src, os.fdopen(fd, "wb") as out:
                    while chunk := src.read(min(_CHUNK, size + 1 - got_size)):
                        got_size += len(chunk)
                        if got_size > size:
                            raise ValueError(f"the downloaded archive's {member!r} unpacks to "
                                             f"more than the expected {size:,} bytes")
                        out.write(chunk)
                        for d in digests:
                            d.update(chunk)
            except BaseException as e:
                tmp.unlink(missing_ok=True)
                if isinstance(e, ValueError):
                    part.unlink(missing_ok=True)
                    raise ValueError(f"{e}: it is not the expected file. The download was "
                                     "deleted; run it again.") from None
                raise
    except zipfile.BadZipFile as e:
        part.unlink(missing_ok=True)
        raise ValueError(f"the downloaded archive {part} is damaged ({e}); it was deleted, "
                         "run the download again") from e
    got_md5, got_sha256 = (d.hexdigest() for d in digests)
    if (got_size, got_md5, got_sha256) != (size, md5.lower(), sha256.lower()):
        tmp.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
        raise ValueError(
            f"the unzipped {member} is not the expected file: expected {size:,} bytes, md5 "
            f"{md5}, sha256 {sha256}; got {got_size:,} bytes, md5 {got_md5}, sha256 "
            f"{got_sha256}. The download was deleted; run it again."
        )
    return tmp


def download_enwik8(
    dest_dir: str | os.PathLike[str],
    url: str = ENWIK8_URL,
    member: str = "enwik8",
    size: int = ENWIK8_SIZE,
    md5: str = ENWIK8_MD5,
    sha256: str = ENWIK8_SHA256,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Make sure `dest_dir/member` holds the verified enwik8 and return its path.

    An existing good file is returned without touching the network. Otherwise the zip is
    downloaded (resuming a previous partial download), checked, unzipped and verified.
    `dest_dir` is created if its parent exists (rwkv_lib.data.DATA_DIR is the usual one).
    Raises DownloadError (a ConnectionError) when the server cannot be reached, and
    ValueError when what arrived is damaged (the bad download is deleted).
    """
    dest = make_folder(dest_dir, "download folder")
    remove_stale_temps(dest, [member])  # left by an interrupted unzip
    target = dest / member
    if target.is_file():
        try:
            verify_file(target, size, md5, sha256)
            return target
        except ValueError:
            pass  # a damaged or foreign file: download a good one to replace it
    part = dest / (Path(urlparse(url).path).name or member + ".zip")
    part = part.with_name(part.name + ".part")
    try:
        _fetch(url, part, timeout, progress)
    except (OSError, http.client.HTTPException) as e:
        reason = f"{type(e).__name__}: {e}"
        if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
            reason = f"{e.reason}"
        resume = (f" Run the download again to resume the partial file {part}."
                  if part.exists() and part.stat().st_size else "")
        raise DownloadError(f"could not download {url} ({reason}).{resume} "
                            + _manual_help(url, dest, md5, member)) from e
    tmp = _extract(part, member, dest, size, md5, sha256)
    os.chmod(tmp, 0o644)  # mkstemp makes files private; the corpus is ordinary data
    os.replace(tmp, target)
    fsync_folder(dest)
    part.unlink(missing_ok=True)
    return target

