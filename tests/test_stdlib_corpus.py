"""rwkv_lib.stdlib_corpus: the Python standard library as a corpus, on a small fake one."""

import hashlib
import json
import platform
import sysconfig

import pytest

from rwkv_lib import stdlib_corpus
from rwkv_lib.data import load_corpus, resolve_corpus
from rwkv_lib.stdlib_corpus import (
    build_stdlib_corpus,
    describe,
    read_metadata,
    stdlib_root,
    stdlib_sources,
)

FILES = {
    "zipfile.py": b"# last by name\n",
    "abc.py": b"def f():\n    return 1\n",
    "pkg/__init__.py": b"",
    "pkg/sub/deep.py": b"x = 'd\xc3\xa9j\xc3\xa0'\n",
    "pkg_tools.py": b"# '_' sorts after '/'\n",
    "pkg/notes.txt": b"not python\n",
    "site-packages/installed.py": b"import numpy\n",
    "dist-packages/debian.py": b"import apt\n",
    "pkg/site-packages/nested.py": b"also installed\n",
    "lib2/__pycache__/abc.cpython-311.pyc": b"\x00bytecode",
}
EXPECTED_ORDER = ["abc.py", "pkg/__init__.py", "pkg/sub/deep.py", "pkg_tools.py", "zipfile.py"]


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    root = tmp_path / "lib" / "python3.x"
    for rel, content in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(root)})
    return root


def test_sources_are_sorted_and_exclude_installed_packages(fake_stdlib):
    assert stdlib_root() == fake_stdlib
    assert stdlib_sources() == EXPECTED_ORDER


def test_corpus_is_the_concatenation_named_after_its_contents(fake_stdlib, tmp_path):
    data_dir = tmp_path / "data"
    path = resolve_corpus("stdlib", data_dir)
    expected = b"".join(FILES[name] for name in EXPECTED_ORDER)
    assert path.read_bytes() == expected
    assert bytes(load_corpus("stdlib", data_dir)) == expected
    sha = hashlib.sha256(expected).hexdigest()
    version = platform.python_version()
    assert path.name == f"stdlib-py{version}-5files-{len(expected)}-{sha[:12]}.txt"
    meta = read_metadata(path)
    assert meta == {"python_version": version, "files": 5, "bytes": len(expected), "sha256": sha}
    assert json.loads(path.with_suffix(".json").read_text()) == meta
    assert f"{len(expected):,} bytes" in describe(meta) and sha in describe(meta)
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([path.name, path.stem + ".json"])


def test_build_is_deterministic_and_reuses_its_file(fake_stdlib, tmp_path, monkeypatch):
    first = build_stdlib_corpus(tmp_path / "a")
    again = build_stdlib_corpus(tmp_path / "b")
    assert first.name == again.name and first.read_bytes() == again.read_bytes()

    def must_not_write(*args):
        raise AssertionError("an existing corpus file is reused, not written again")

    monkeypatch.setattr(stdlib_corpus, "write_bytes_atomically", must_not_write)
    assert build_stdlib_corpus(tmp_path / "a") == first


def test_another_stdlib_gives_another_file(fake_stdlib, tmp_path):
    before = build_stdlib_corpus(tmp_path)
    (fake_stdlib / "abc.py").write_bytes(b"def f():\n    return 2\n")  # same size, new text
    after = build_stdlib_corpus(tmp_path)
    assert after != before and before.is_file()
    assert read_metadata(after)["sha256"] != read_metadata(before)["sha256"]
    assert build_stdlib_corpus(tmp_path, python_version="9.9.9").name.startswith("stdlib-py9.9.9-")


def test_corpus_is_written_atomically(fake_stdlib, tmp_path, monkeypatch):
    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(stdlib_corpus.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        resolve_corpus("stdlib", tmp_path / "data")
    assert list((tmp_path / "data").iterdir()) == []  # no half-written corpus, no temp file


def test_other_files_have_no_metadata(tmp_path):
    other = tmp_path / "corpus.txt"
    other.write_bytes(b"text")
    assert read_metadata(other) is None


def test_missing_or_empty_stdlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(tmp_path / "no")})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_corpus("stdlib", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.py files"):
        build_stdlib_corpus(tmp_path, root=tmp_path / "empty")
