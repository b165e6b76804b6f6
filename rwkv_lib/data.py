"""Byte-level data for RWKV-4: the corpus, the vocabulary, the splits and the training windows.

This is the finished code of notebook 01_data, which builds each piece step by step.

- Tokens are bytes (0..255), not Unicode characters; the vocabulary is the sorted set of
  byte values that occur in the corpus.
- Corpora: "enwik8" (the first 10^8 bytes of a Wikipedia XML dump, downloaded once with
  `python -m rwkv_lib.data download`), "sample" (a made-up stand-in in the same format,
  generated offline, see `rwkv_lib.sample_corpus`), "stdlib" (the running Python's
  standard library, real text on every machine, see `rwkv_lib.stdlib_corpus`), or the
  path of any file.
- Splits: the standard 90/5/5 train/validation/test split of enwik8, in proportion.
- A training sample is a window of ctx_len + 1 bytes: x = the first ctx_len, y = the same
  shifted by one (the next byte at every position).

Command line: `python -m rwkv_lib.data download` and `python -m rwkv_lib.data info CORPUS`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from rwkv_lib import cli
from rwkv_lib.atomic import make_folder, remove_stale_temps, write_bytes_atomically
from rwkv_lib.download import ENWIK8_MD5, ENWIK8_SIZE, ENWIK8_URL, download_enwik8
from rwkv_lib.sample_corpus import SAMPLE_SHA256, SAMPLE_SIZE, generate_sample_corpus
from rwkv_lib.stdlib_corpus import build_stdlib_corpus

DATA_DIR = Path(
    os.environ.get("RWKV_DATA_DIR") or Path(__file__).resolve().parent.parent / "data"
)
CORPORA = ("enwik8", "sample", "stdlib")
SPLITS = ("train", "val", "test")
SAMPLE_FILE = "sample_corpus.txt"
_CHUNK = 1 << 24  # bytes per step when scanning a large corpus, to bound memory


def _as_bytes_array(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """View raw bytes (or an integer array of byte values) as a flat uint8 array."""
    if isinstance(data, bytes | bytearray | memoryview):
        return np.frombuffer(data, dtype=np.uint8)
    array = np.asarray(data)
    if array.dtype == np.uint8:
        return array.reshape(-1)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"expected bytes or an integer array, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError("byte values must lie in 0..255")
    return array.reshape(-1).astype(np.uint8)


class ByteVocab:
    """Maps the byte values that occur in a corpus to token ids 0..size-1, in sorted order."""

    def __init__(self, byte_values: Sequence[int]) -> None:
        values = [int(b) for b in byte_values]
        if not values:
            raise ValueError("a vocabulary needs at least one byte value")
        if values != sorted(set(values)) or values[0] < 0 or values[-1] > 255:
            raise ValueError("byte_values must be distinct, sorted, and within 0..255")
        self.byte_values: list[int] = values
        # Lookup tables make encode/decode one numpy indexing operation each.
        self.byte_to_id = np.full(256, -1, dtype=np.int64)
        self.byte_to_id[values] = np.arange(len(values))
        self.byte_to_id.setflags(write=False)
        self.id_to_byte = np.array(values, dtype=np.uint8)
        self.id_to_byte.setflags(write=False)

    @classmethod
    def from_data(cls, data: bytes | np.ndarray) -> ByteVocab:
        """The vocabulary of `data`: its distinct byte values, deduplicated and sorted."""
        return cls(np.flatnonzero(byte_histogram(data)).tolist())

    @property
    def size(self) -> int:
        return len(self.byte_values)

    def __len__(self) -> int:
        return self.size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteVocab) and self.byte_values == other.byte_values

    def __hash__(self) -> int:
        return hash(tuple(self.byte_values))

    def __repr__(self) -> str:
        return f"ByteVocab(size={self.size})"

    def _unknown_byte_error(self, byte: int, position: int) -> ValueError:
        return ValueError(
            f"byte {byte} (0x{byte:02x}) at position {position} is not in this vocabulary of "
            f"{self.size} byte values. Build the vocabulary from data that contains it "
            "(ByteVocab.from_data), or use ByteVocab(range(256)) to cover every byte."
        )

    def encode(self, data: bytes | np.ndarray | str) -> np.ndarray:
        """Token ids (int64) of raw bytes; a str is encoded as UTF-8 first."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        raw = _as_bytes_array(data)
        ids = self.byte_to_id[raw]
        if ids.size and ids.min() < 0:
            position = int(np.argmax(ids < 0))
            raise self._unknown_byte_error(int(raw[position]), position)
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> bytes:
        """The bytes that token ids stand for."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        array = np.asarray(ids).reshape(-1)
        if array.size == 0:
            return b""
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {array.dtype}")
        bad = (array < 0) | (array >= self.size)
        if bad.any():
            position = int(np.argmax(bad))
            raise ValueError(
                f"token id {int(array[position])} at position {position} is out of range: "
                f"this vocabulary has ids 0..{self.size - 1}"
            )
        return self.id_to_byte[array].tobytes()

    def decode_text(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        # Generated bytes can stop in the middle of a multi-byte UTF-8 character.
        return self.decode(ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "bytes", "byte_values": list(self.byte_values)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ByteVocab:
        if d.get("kind", "bytes") != "bytes" or "byte_values" not in d:
            raise ValueError(f"not a ByteVocab dictionary: {sorted(d)}")
        return cls(d["byte_values"])


def _sample_is_current(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size != SAMPLE_SIZE:
        return False
    return hashlib.sha256(path.read_bytes()).hexdigest() == SAMPLE_SHA256


def resolve_corpus(corpus: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None
                   ) -> Path:
    """The file behind a corpus name or path.

    "enwik8", "sample" and "stdlib" name files in `data_dir` (default DATA_DIR); the
    sample and stdlib (see rwkv_lib.stdlib_corpus) are made there on first use (the folder
    is created if its parent exists). Anything
    else (including a Path) is a file path.
    """
    folder = Path(data_dir) if data_dir is not None else DATA_DIR
    if corpus == "enwik8":
        path = folder / "enwik8"
        if not path.is_file():
            raise FileNotFoundError(
                f"enwik8 is not in {folder}. Run `python -m rwkv_lib.data download`, or "
                f"download {ENWIK8_URL} by hand and unzip it into {folder}/ "
                f"(md5 of the unzipped file: {ENWIK8_MD5}). Without it, corpus=\"sample\" "
                "works offline."
            )
        if path.stat().st_size != ENWIK8_SIZE:
            raise ValueError(
                f"{path} has {path.stat().st_size:,} bytes, not {ENWIK8_SIZE:,}: it is "
                "damaged; delete it and run `python -m rwkv_lib.data download` again"
            )
        return path
    if corpus == "sample":
        make_folder(folder, "data folder")
        remove_stale_temps(folder, [SAMPLE_FILE])  # left by an interrupted generation
        path = folder / SAMPLE_FILE
        if not _sample_is_current(path):  # absent, or from another version: (re)generate
            write_bytes_atomically(path, generate_sample_corpus(), mode=0o644)
        return path
    if corpus == "stdlib":
        return build_stdlib_corpus(folder)
    path = Path(corpus).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"corpus file not found: {path} (the corpus names are {', '.join(CORPORA)})"
        )
    if not path.is_file():
        raise ValueError(f"corpus must be a file, but {path} is not")
    if path.stat().st_size == 0:
        raise ValueError(f"corpus file {path} is empty")
    return path


def load_corpus(corpus: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None
                ) -> np.ndarray:
    """The corpus as a read-only uint8 array, memory-mapped: 100 MB cost no RAM up front."""
    return np.memmap(resolve_corpus(corpus, data_dir), dtype=np.uint8, mode="r")


def split_corpus(data: np.ndarray) -> dict[str, np.ndarray]:
    """Train/val/test = first 90%, next 5%, rest, as views (no copies).

    For enwik8's 10^8 bytes: [0, 90M), [90M, 95M), [95M, 100M).
    """
    n = len(data)
    n_train, n_val = n * 90 // 100, n * 5 // 100
    if n_val == 0:
        raise ValueError(f"need at least 20 bytes to split 90/5/5, got {n}")
    return {
        "train": data[:n_train],
        "val": data[n_train:n_train + n_val],
        "test": data[n_train + n_val:],
    }


class WindowDataset(Dataset):
    """Random windows of a token sequence: item i is (x, y) with y = x shifted by one.

    The start of window i depends only on (seed, i), so a DataLoader gives the same
    batches whatever its worker count. `tokens` holds token ids; or, with `vocab`, raw
    bytes that are mapped to ids window by window (no need to encode 90 MB up front).
    """

    def __init__(self, tokens: np.ndarray, ctx_len: int, num_samples: int, seed: int = 0,
                 vocab: ByteVocab | None = None) -> None:
        tokens = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens must be a 1-D integer array, got {tokens.dtype} "
                            f"with shape {tokens.shape}")
        if ctx_len < 1 or num_samples < 0 or seed < 0:
            raise ValueError("need ctx_len >= 1, num_samples >= 0 and seed >= 0")
        if len(tokens) < ctx_len + 1:
            raise ValueError(
                f"data too short: a window of ctx_len={ctx_len} needs at least "
                f"{ctx_len + 1} tokens (x and the next-token targets y), got {len(tokens)}"
            )
        self.tokens, self.ctx_len, self.num_samples = tokens, ctx_len, num_samples
        self.seed, self.vocab = seed, vocab

    def __len__(self) -> int:
        return self.num_samples

    def start(self, i: int) -> int:
        """Where window i begins: uniform over every start that leaves room for y."""
        rng = np.random.default_rng([self.seed, i])
        return int(rng.integers(0, len(self.tokens) - self.ctx_len))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"window {i} out of range for {self.num_samples} samples")
        s = self.start(i)
        chunk = np.asarray(self.tokens[s:s + self.ctx_len + 1])
        if self.vocab is not None:
            ids = self.vocab.byte_to_id[chunk]
            if ids.min() < 0:
                j = int(np.argmax(ids < 0))
                raise self.vocab._unknown_byte_error(int(chunk[j]), s + j)
        else:
            ids = chunk.astype(np.int64)
        window = torch.from_numpy(ids)
        return window[:-1], window[1:]


def byte_histogram(data: bytes | np.ndarray) -> np.ndarray:
    """How often each byte value 0..255 occurs (int64, length 256)."""
    raw = _as_bytes_array(data)
    counts = np.zeros(256, dtype=np.int64)
    for lo in range(0, len(raw), _CHUNK):  # bincount widens to int64: go chunk by chunk
        counts += np.bincount(raw[lo:lo + _CHUNK], minlength=256)
    return counts


def unigram_entropy_bits(tokens_or_bytes: bytes | np.ndarray) -> float:
    """Entropy of the byte frequencies in bits per byte: the bpb of the best model that
    ignores context, the first baseline to beat."""
    counts = byte_histogram(tokens_or_bytes)
    total = int(counts.sum())
    if total == 0:
        raise ValueError("cannot compute the entropy of empty data")
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def _info(corpus: str, data_dir: str | None) -> None:
    path = resolve_corpus(corpus, data_dir)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    print(f"corpus: {corpus} ({path})")
    print(f"size: {len(data):,} bytes")
    print(f"vocab size: {ByteVocab.from_data(data).size} distinct byte values")
    print(f"unigram entropy: {unigram_entropy_bits(data):.4f} bits/byte")
    offset = 0
    for name, part in split_corpus(data).items():
        print(f"{name}: {len(part):,} bytes [{offset:,}, {offset + len(part):,})")
        offset += len(part)


def _main(argv: Sequence[str] | None) -> int:
    parser = cli.ArgumentParser(prog="python -m rwkv_lib.data",
                                description="Get enwik8, or describe a corpus.")
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser("download", help="download and verify enwik8")
    download.add_argument("--dest", default=None, help=f"target folder (default {DATA_DIR})")
    download.add_argument("--no-progress", action="store_true", help="no progress bar")
    info = commands.add_parser("info", help="print size, vocabulary, entropy and splits")
    info.add_argument("corpus", help="enwik8, sample, or the path of a file")
    info.add_argument("--data-dir", default=None, help=f"default {DATA_DIR}")
    args = parser.parse_args(argv)
    if args.command == "download":
        dest = DATA_DIR if args.dest is None else Path(args.dest)
        path = download_enwik8(dest, progress=not args.no_progress)
        print(f"enwik8 is ready: {path}")
    else:
        _info(args.corpus, args.data_dir)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (a mistake is one line on stderr)."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
