"""rwkv_lib.data: vocabulary, corpora, splits, training windows, statistics and the CLI."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import rwkv_lib
from rwkv_lib import data
from rwkv_lib.data import (
    CORPORA,
    SPLITS,
    ByteVocab,
    WindowDataset,
    byte_histogram,
    load_corpus,
    main,
    resolve_corpus,
    split_corpus,
    unigram_entropy_bits,
)
from rwkv_lib.sample_corpus import SAMPLE_SHA256, SAMPLE_SIZE

TEXT = "Wikipedia, die freie Enzyklopädie — Ελληνικά, русский, 日本語\n".encode()


# --- ByteVocab ---------------------------------------------------------------------------

def test_vocab_is_the_sorted_distinct_bytes():
    vocab = ByteVocab.from_data(b"banana")
    assert vocab.byte_values == [ord("a"), ord("b"), ord("n")]
    assert vocab.size == len(vocab) == 3
    assert vocab.encode(b"banana").tolist() == [1, 0, 2, 0, 2, 0]
    assert ByteVocab.from_data(np.frombuffer(TEXT, dtype=np.uint8)) == ByteVocab.from_data(TEXT)
    assert ByteVocab.from_data(TEXT).size == len(set(TEXT))  # bytes, not characters


def test_round_trip_random_bytes():
    rng = np.random.default_rng(0)
    vocab = ByteVocab.from_data(TEXT)
    raw = rng.choice(np.array(vocab.byte_values, dtype=np.uint8), size=5000)
    ids = vocab.encode(raw)
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < vocab.size
    assert vocab.decode(ids) == raw.tobytes()
    assert vocab.decode(torch.from_numpy(ids)) == raw.tobytes()
    assert vocab.decode(ids.tolist()) == raw.tobytes()
    random_ids = rng.integers(0, vocab.size, size=5000)
    assert np.array_equal(vocab.encode(vocab.decode(random_ids)), random_ids)
    assert vocab.decode([]) == b""


def test_encode_text_and_decode_text():
    vocab = ByteVocab.from_data(TEXT)
    assert vocab.decode_text(vocab.encode(TEXT.decode())) == TEXT.decode()
    split_char = vocab.encode("ä".encode())[:1]  # half of a two-byte character
    assert vocab.decode_text(split_char) == "\ufffd"


def test_unknown_byte_names_value_and_position():
    vocab = ByteVocab.from_data(b"abc")
    with pytest.raises(ValueError, match=r"byte 120 \(0x78\) at position 2 .*from_data"):
        vocab.encode(b"abxc")


def test_decode_rejects_out_of_range_ids():
    vocab = ByteVocab.from_data(b"abc")
    with pytest.raises(ValueError, match="token id 3 at position 1 .* ids 0..2"):
        vocab.decode([0, 3])
    with pytest.raises(ValueError, match="token id -1"):
        vocab.decode(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integers"):
        vocab.decode(np.array([0.0, 1.0]))


@pytest.mark.parametrize("values", [[], [2, 1], [1, 1], [0, 256], [-1, 3]])
def test_vocab_rejects_bad_byte_values(values):
    with pytest.raises(ValueError):
        ByteVocab(values)


def test_vocab_serializes_to_json():
    vocab = ByteVocab.from_data(TEXT)
    restored = ByteVocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert restored == vocab and restored is not vocab
    assert restored != ByteVocab(range(256))
    with pytest.raises(ValueError):
        ByteVocab.from_dict({"chars": "abc"})


# --- corpora -------------------------------------------------------------------------------

def test_default_data_dir_is_the_repository_data_folder():
    if "RWKV_DATA_DIR" not in os.environ:
        assert data.DATA_DIR == Path(rwkv_lib.__file__).resolve().parent.parent / "data"
    assert CORPORA == ("enwik8", "sample", "stdlib")


def test_data_dir_follows_the_environment(tmp_path):
    env = {**os.environ, "RWKV_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", "from rwkv_lib.data import DATA_DIR; "
                          "print(DATA_DIR)"], env=env, capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == str(tmp_path)


def test_missing_enwik8_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        resolve_corpus("enwik8", tmp_path)
    message = str(info.value)
    assert "python -m rwkv_lib.data download" in message
    assert "https://mattmahoney.net/dc/enwik8.zip" in message
    assert str(tmp_path) in message and 'corpus="sample"' in message


def _sparse_file(path: Path, size: int, marks: dict[int, int]) -> Path:
    # Holes cost no disk space: a 10^8-byte corpus for the price of a few bytes.
    with open(path, "wb") as f:
        f.truncate(size)
        for position, value in marks.items():
            f.seek(position)
            f.write(bytes([value]))
    return path


def test_enwik8_found_and_size_checked(tmp_path):
    path = _sparse_file(tmp_path / "enwik8", 10**8, {})
    assert resolve_corpus("enwik8", tmp_path) == path
    path.write_bytes(b"too short")
    with pytest.raises(ValueError, match="damaged"):
        resolve_corpus("enwik8", tmp_path)


def test_any_file_can_be_a_corpus(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_bytes(TEXT)
    assert resolve_corpus(path) == path
    assert resolve_corpus(str(path)) == path
    tokens = load_corpus(path)
    assert tokens.dtype == np.uint8 and tokens.tobytes() == TEXT
    with pytest.raises(ValueError):
        tokens[0] = 1  # read-only: the corpus on disk is never modified


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-file"):
        resolve_corpus(tmp_path / "no-such-file")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        resolve_corpus(tmp_path / "empty")
    with pytest.raises(ValueError, match="must be a file"):
        resolve_corpus(tmp_path)


def test_sample_is_generated_on_first_use(tmp_path, monkeypatch):
    folder = tmp_path / "data"  # created: its parent exists
    path = resolve_corpus("sample", folder)
    assert path == folder / "sample_corpus.txt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SAMPLE_SHA256
    assert len(load_corpus("sample", folder)) == SAMPLE_SIZE

    def must_not_run(*args, **kwargs):
        raise AssertionError("a good sample file is reused, not regenerated")

    monkeypatch.setattr(data, "generate_sample_corpus", must_not_run)
    assert resolve_corpus("sample", folder) == path


def test_damaged_sample_is_regenerated(tmp_path):
    path = tmp_path / "sample_corpus.txt"
    path.write_bytes(b"x" * SAMPLE_SIZE)  # right size, wrong bytes
    resolve_corpus("sample", tmp_path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SAMPLE_SHA256


def test_sample_written_atomically(tmp_path, monkeypatch):
    def failing_generator(*args, **kwargs):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(data, "generate_sample_corpus", failing_generator)
    with pytest.raises(RuntimeError):
        resolve_corpus("sample", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_leaves_no_partial_file(tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(data.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        resolve_corpus("sample", tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- splits --------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [20, 101, 999, 123_457])
def test_split_sizes_and_order(n):
    tokens = np.arange(n)
    parts = split_corpus(tokens)
    assert tuple(parts) == SPLITS
    assert len(parts["train"]) == n * 90 // 100 and len(parts["val"]) == n * 5 // 100
    assert np.array_equal(np.concatenate([parts[s] for s in SPLITS]), tokens)
    for part in parts.values():
        assert part.base is tokens  # a view, not a copy


def test_enwik8_sized_split_boundaries(tmp_path):
    marks = {90_000_000 - 1: 1, 90_000_000: 2, 95_000_000 - 1: 3, 95_000_000: 4, 10**8 - 1: 5}
    raw = np.memmap(_sparse_file(tmp_path / "big", 10**8, marks), dtype=np.uint8, mode="r")
    parts = split_corpus(raw)
    assert [len(parts[s]) for s in SPLITS] == [90_000_000, 5_000_000, 5_000_000]
    assert (parts["train"][-1], parts["val"][0]) == (1, 2)
    assert (parts["val"][-1], parts["test"][0], parts["test"][-1]) == (3, 4, 5)
    assert all(np.shares_memory(parts[s], raw) for s in SPLITS)


def test_split_needs_enough_data():
    with pytest.raises(ValueError, match="at least 20"):
        split_corpus(np.arange(19))


# --- windows ---------------------------------------------------------------------------------

def test_windows_are_aligned_next_token_pairs():
    tokens = np.arange(1000, dtype=np.int64) * 3
    ds = WindowDataset(tokens, ctx_len=16, num_samples=50, seed=1)
    assert len(ds) == 50
    for i in range(len(ds)):
        x, y = ds[i]
        s = ds.start(i)
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (16,)
        assert torch.equal(y[:-1], x[1:])
        assert x.tolist() == tokens[s:s + 16].tolist()
        assert y.tolist() == tokens[s + 1:s + 17].tolist()


def test_every_start_is_reachable_and_none_overruns():
    ds = WindowDataset(np.arange(11), ctx_len=8, num_samples=200, seed=0)
    assert sorted({ds.start(i) for i in range(len(ds))}) == [0, 1, 2]
    assert WindowDataset(np.arange(9), 8, 5)[4][1].tolist() == list(range(1, 9))


def test_windows_are_deterministic():
    tokens = np.arange(5000)
    a = WindowDataset(tokens, 32, 20, seed=7)
    b = WindowDataset(tokens, 32, 20, seed=7)
    c = WindowDataset(tokens, 32, 20, seed=8)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(20))
    assert [a.start(i) for i in range(20)] != [c.start(i) for i in range(20)]
    assert torch.equal(a[-1][0], a[19][0])
    with pytest.raises(IndexError):
        a[20]


def test_dataloader_workers_do_not_change_the_batches():
    ds = WindowDataset(np.arange(3000), ctx_len=24, num_samples=24, seed=3)
    single = [x for x, _ in DataLoader(ds, batch_size=4, num_workers=0)]
    multi = [x for x, _ in DataLoader(ds, batch_size=4, num_workers=2)]
    assert len(single) == 6 and all(torch.equal(a, b) for a, b in zip(single, multi, strict=True))


def test_raw_bytes_with_vocab_match_encoded_tokens(tmp_path):
    path = tmp_path / "text"
    path.write_bytes(TEXT * 20)
    raw = load_corpus(path)
    vocab = ByteVocab.from_data(raw)
    lazy = WindowDataset(raw, 12, 30, seed=2, vocab=vocab)
    eager = WindowDataset(vocab.encode(raw), 12, 30, seed=2)
    for i in range(30):
        assert torch.equal(lazy[i][0], eager[i][0]) and torch.equal(lazy[i][1], eager[i][1])
    assert vocab.decode(lazy[0][0]) == raw[lazy.start(0):lazy.start(0) + 12].tobytes()


def test_raw_bytes_outside_the_vocab():
    raw = np.frombuffer(b"aaaaaaaaaz", dtype=np.uint8)
    ds = WindowDataset(raw, 9, 1, vocab=ByteVocab.from_data(b"a"))
    with pytest.raises(ValueError, match="byte 122 .* at position 9"):
        ds[0]


def test_too_short_data_says_how_long_it_must_be():
    with pytest.raises(ValueError, match="at least 9 tokens"):
        WindowDataset(np.arange(8), ctx_len=8, num_samples=1)
    with pytest.raises(TypeError):
        WindowDataset(np.linspace(0, 1, 100), ctx_len=8, num_samples=1)
    with pytest.raises(ValueError):
        WindowDataset(np.arange(100), ctx_len=0, num_samples=1)


# --- statistics --------------------------------------------------------------------------------

def test_histogram_and_entropy(monkeypatch):
    assert unigram_entropy_bits(bytes(range(256)) * 3) == pytest.approx(8.0)
    assert unigram_entropy_bits(b"aaaa") == 0.0
    assert unigram_entropy_bits(np.array([0, 1, 0, 1])) == pytest.approx(1.0)
    counts = byte_histogram(TEXT)
    assert counts.shape == (256,) and counts.sum() == len(TEXT)
    assert counts[ord("i")] == TEXT.count(b"i")
    p = counts[counts > 0] / len(TEXT)
    assert unigram_entropy_bits(TEXT) == pytest.approx(-(p * np.log2(p)).sum())
    monkeypatch.setattr(data, "_CHUNK", 7)  # the chunked count of large corpora agrees
    assert np.array_equal(byte_histogram(TEXT), counts)
    with pytest.raises(ValueError):
        unigram_entropy_bits(b"")


# --- command line ------------------------------------------------------------------------------

def test_cli_info_on_the_sample(tmp_path, capsys):
    assert main(["info", "sample", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"size: {SAMPLE_SIZE:,} bytes" in out
    vocab_size = ByteVocab.from_data(load_corpus("sample", tmp_path)).size
    assert f"vocab size: {vocab_size} distinct byte values" in out
    entropy = unigram_entropy_bits(load_corpus("sample", tmp_path))
    assert f"unigram entropy: {entropy:.4f} bits/byte" in out and 4 < entropy < 5.5
    assert "train: 1,080,000 bytes [0, 1,080,000)" in out
    assert "test: 60,000 bytes [1,140,000, 1,200,000)" in out


def test_cli_reports_errors(tmp_path, capsys):
    assert main(["info", "enwik8", "--data-dir", str(tmp_path)]) == 1
    assert "python -m rwkv_lib.data download" in capsys.readouterr().err


def test_cli_download_calls_the_downloader(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_download(dest, progress=True):
        calls.append((Path(dest), progress))
        return Path(dest) / "enwik8"

    monkeypatch.setattr(data, "download_enwik8", fake_download)
    assert main(["download", "--dest", str(tmp_path), "--no-progress"]) == 0
    assert calls == [(tmp_path, False)]
    assert "enwik8 is ready" in capsys.readouterr().out


def test_a_data_dir_typo_creates_no_folders(tmp_path, capsys):
    typo = tmp_path / "dtaa" / "data"
    with pytest.raises(FileNotFoundError, match=r"dtaa.*does not exist"):
        resolve_corpus("sample", typo)
    assert main(["info", "sample", "--data-dir", str(typo)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        resolve_corpus("sample", tmp_path / "file")


def test_temp_files_of_an_interrupted_sample_write_are_removed(tmp_path):
    (tmp_path / ".sample_corpus.txt.ab12cd34.tmp").write_bytes(b"a sample cut short")
    resolve_corpus("sample", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample_corpus.txt"]


def test_cli_download_uses_the_default_folder(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(data, "download_enwik8",
                        lambda dest, progress=True: calls.append(Path(dest)) or Path(dest))
    assert main(["download", "--no-progress"]) == 0
    assert calls == [data.DATA_DIR]
