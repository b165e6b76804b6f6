"""rwkv_lib.baselines: xz -9e and the unigram entropy of the same bytes, cached."""

import json
import lzma

import numpy as np
import pytest

from rwkv_lib import baselines
from rwkv_lib.baselines import compression_baselines
from rwkv_lib.data import unigram_entropy_bits

TEXT = b"def add(a, b):\n    return a + b\n" * 200 + bytes(range(256))


def test_numbers_are_xz_extreme_and_the_unigram_entropy(tmp_path):
    result = compression_baselines(np.frombuffer(TEXT, dtype=np.uint8), cache_dir=tmp_path)
    xz = lzma.compress(TEXT, preset=9 | lzma.PRESET_EXTREME)
    assert xz[:6] == b"\xfd7zXZ\x00"  # the .xz container, as the xz tool writes
    assert result["xz_bytes"] == len(xz) and result["bytes"] == len(TEXT)
    assert result["xz_bpb"] == pytest.approx(8 * len(xz) / len(TEXT))
    assert result["unigram_entropy_bits"] == pytest.approx(unigram_entropy_bits(TEXT))
    assert result["xz_bpb"] < result["unigram_entropy_bits"]  # xz sees the repetition


def test_cached_by_content(tmp_path, monkeypatch):
    first = compression_baselines(TEXT, cache_dir=tmp_path)
    [cache] = tmp_path.iterdir()
    assert cache.name.startswith("baselines-") and json.loads(cache.read_text()) == first

    def no_xz(data):
        raise AssertionError("cached: xz must not run again")

    monkeypatch.setattr(baselines, "xz_size", no_xz)
    assert compression_baselines(TEXT, cache_dir=tmp_path) == first
    with pytest.raises(AssertionError, match="must not run"):  # other bytes: not cached
        compression_baselines(TEXT + b"!", cache_dir=tmp_path)


def test_damaged_cache_is_recomputed(tmp_path):
    first = compression_baselines(TEXT, cache_dir=tmp_path)
    [cache] = tmp_path.iterdir()
    cache.write_text("{not json")
    assert compression_baselines(TEXT, cache_dir=tmp_path) == first
    assert json.loads(cache.read_text()) == first


def test_empty_data_is_refused():
    with pytest.raises(ValueError, match="empty"):
        compression_baselines(b"")
