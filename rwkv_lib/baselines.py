"""What a model's bits per byte should be compared with: xz and the unigram entropy.

- xz: `lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)`, the same bytes as the file
  `xz -9e` writes (container included), times 8, divided by the length. A general-purpose
  compressor that sees the whole text; a language model that does worse has learned little.
- The unigram entropy: the bits per byte of the best model that ignores context.

xz at its strongest setting takes a few seconds a megabyte, so the numbers are kept in a
small JSON file per piece of data, named after the sha256 of those bytes.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import tempfile
from pathlib import Path

import numpy as np

from .data import unigram_entropy_bits

XZ_PRESET = 9 | lzma.PRESET_EXTREME
XZ_METHOD = "lzma.compress(preset=9 | PRESET_EXTREME), as xz -9e"


def _raw(data: bytes | np.ndarray) -> bytes:
    return bytes(data) if isinstance(data, bytes | bytearray | memoryview) else \
        np.asarray(data, dtype=np.uint8).tobytes()


def xz_size(data: bytes | np.ndarray) -> int:
    """Bytes of `data` compressed as `xz -9e` does."""
    return len(lzma.compress(_raw(data), preset=XZ_PRESET))


def compression_baselines(data: bytes | np.ndarray,
                          cache_dir: str | os.PathLike[str] | None = None) -> dict:
    """{"bytes", "sha256", "xz_bytes", "xz_bpb", "unigram_entropy_bits", "xz_method"} of
    `data`, read from or written to `cache_dir` when one is given."""
    raw = _raw(data)
    if not raw:
        raise ValueError("compression_baselines: the data is empty")
    digest = hashlib.sha256(raw).hexdigest()
    cache = Path(cache_dir) / f"baselines-{digest[:16]}.json" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
        except (OSError, ValueError):
            cached = None  # unreadable: compute it again and write it afresh
        if (isinstance(cached, dict) and cached.get("sha256") == digest
                and cached.get("xz_method") == XZ_METHOD):
            return cached
    compressed = xz_size(raw)
    result = {"bytes": len(raw), "sha256": digest, "xz_bytes": compressed,
              "xz_bpb": 8 * compressed / len(raw),
              "unigram_entropy_bits": unigram_entropy_bits(raw), "xz_method": XZ_METHOD}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, cache)
    return result
