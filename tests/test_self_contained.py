"""Nothing the repository tracks may point at places outside it.

A reader's copy holds only what `git ls-files` lists, so a reference to a folder that exists
only on the machine where a file was written is a dead end. The rule, exactly:

1. The design folder outside the repository that once held the model's specification, by
   any of its names: a relative path climbing into a sibling `shared` folder, a
   `shared`-then-`design` path, or the file names of the documents kept there. The
   repository's own design note is `docs/rwkv4.md`; cite it instead.
2. Citations of that old document by its nickname ("the spec", "spec, section N",
   "(spec, ..."): write "docs/rwkv4.md, section N".
3. Absolute paths into one machine's private areas: home directories (root's, and any
   in the home or Users folder, or a Windows user folder), working and scratch areas (the
   work, scratch and mnt folders at the root) and temporary files (a named entry in the
   root's tmp folder, or macOS's var/folders). The placeholder TMPPATH under /tmp that notebooks/sanitize.cfg writes
   is allowed, and so is that file's regex (a bracket follows the slash there, not a name).
   System locations that are the same on every machine (/usr/bin/c++, /proc/cpuinfo,
   /dev/null, /bin/false, ...) are allowed: they document where a tool or a kernel file is
   found. Paths inside URLs are allowed (the segment before them is a host or a word), and
   so are schematic examples: a path written with an ellipsis or a <placeholder> in it.
4. One exception, for stored notebook outputs only: a cell tagged `nbval-ignore-output`
   reports the machine that last ran it, and may show the default location of torch's
   extension cache in that user's home (a `.cache/torch_extensions` folder).

Scanned: every file `git ls-files` lists that is UTF-8 text (files with NUL bytes or
invalid UTF-8 are skipped). A notebook is read as JSON, cell by cell: sources, text outputs
(streams, text/* and JSON results, errors) and metadata; embedded images are not text.
This file itself is not scanned: it has to spell out the patterns it forbids.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()

# A path starts at the beginning of a word: not right after a letter, digit, '_', '.', '~'
# or '-' (which would make it part of a URL's path or of a relative path), and runs to the
# next space, quote, bracket or comma.
def _p(*parts: str) -> str:
    """Join with '/': the examples and patterns below are spelled in pieces so that this
    file does not itself contain the references it looks for."""
    return "/".join(parts)


PATH_TOKEN = re.compile(r"(?<![\w.~-])(?:/|[A-Za-z]:[\\/])[^\s`'\"()\[\]{},;|]*")
EXAMPLE_MARKERS = ("...", "\u2026", "<")  # "C:\\Users\\Name\\...", "/home/<user>"
MACHINE_PATHS: dict[str, re.Pattern[str]] = {
    "home directory": re.compile(
        r"/ro" r"ot/|/ho" r"me/[\w.-]|/Us" r"ers/[\w.-]|[A-Za-z]:[\\/]+Users[\\/]+\w"),
    "working or scratch area": re.compile(r"/(?:wo" r"rk|scr" r"atch|m" r"nt)/"),
    "temporary file": re.compile(r"/tmp/(?!TMPPATH\b)[\w.-]|(?:/private)?/var/folders/"),
}
TEXT_RULES: dict[str, re.Pattern[str]] = {
    "design folder outside the repository": re.compile(
        r"\.\./+sha" r"red\b|\bsha" r"red[/\\]+des" r"ign\b|rwkv-v4" r"-spec|notebook" r"-style\.md"),
    "citation of the old specification": re.compile(
        r"\bthe spec\b|\bspec(?:'s)?,?\s+section\b|\(spec,", re.IGNORECASE),
}
# Rule 4: what an nbval-ignore-output cell may show of the machine that ran it.
IGNORED_OUTPUT_ALLOWED = re.compile(
    r"(?:/ro" r"ot|/ho" r"me/[\w.-]+|/Us" r"ers/[\w.-]+)/\.cache/torch_extensions(?:/|$)")
TEXT_OUTPUT_KEYS = ("text/plain", "text/markdown", "text/html", "text/latex",
                    "application/json")


def find_outside_references(text: str, allowed: re.Pattern[str] | None = None
                            ) -> list[tuple[int, str, str]]:
    """(line number, rule, matched text) for every place in `text` the rules forbid."""
    hits = []
    for number, line in enumerate(text.splitlines(), start=1):
        for rule, pattern in TEXT_RULES.items():
            hits += [(number, rule, m.group(0)) for m in pattern.finditer(line)]
        for token in PATH_TOKEN.findall(line):
            if any(marker in token for marker in EXAMPLE_MARKERS):
                continue
            if allowed is not None and allowed.match(token):
                continue
            hits += [(number, rule, token) for rule, pattern in MACHINE_PATHS.items()
                     if pattern.match(token)]
    return hits


def _text(value: str | list[str]) -> str:
    return value if isinstance(value, str) else "".join(value)


def _output_text(output: dict) -> str:
    if output.get("output_type") == "stream":
        return _text(output.get("text", ""))
    if output.get("output_type") == "error":
        return "\n".join([output.get("ename", ""), output.get("evalue", ""),
                          *output.get("traceback", [])])
    data = output.get("data", {})
    parts = []
    for key in TEXT_OUTPUT_KEYS:
        if key in data:
            value = data[key]
            parts.append(json.dumps(value) if key == "application/json" else _text(value))
    return "\n".join(parts)


def notebook_parts(notebook: dict) -> Iterator[tuple[str, str, re.Pattern[str] | None]]:
    """(where, text, allowed) for each piece of a notebook that the rules apply to."""
    yield "metadata", json.dumps(notebook.get("metadata", {}), indent=1), None
    for i, cell in enumerate(notebook.get("cells", [])):
        yield f"cell {i} source", _text(cell.get("source", "")), None
        yield f"cell {i} metadata", json.dumps(cell.get("metadata", {}), indent=1), None
        tags = cell.get("metadata", {}).get("tags", [])
        allowed = IGNORED_OUTPUT_ALLOWED if "nbval-ignore-output" in tags else None
        for j, output in enumerate(cell.get("outputs", [])):
            yield f"cell {i} output {j}", _output_text(output), allowed


def scan_file(relative: str, data: bytes) -> list[str]:
    """Problems in one tracked file, as 'path: where line N: rule: text' strings."""
    if b"\0" in data:
        return []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return []
    if relative.endswith(".ipynb"):
        parts = list(notebook_parts(json.loads(text)))
    else:
        parts = [("", text, None)]
    problems = []
    for where, part, allowed in parts:
        for line, rule, found in find_outside_references(part, allowed):
            place = f"{where} line {line}" if where else f"line {line}"
            problems.append(f"{relative}: {place}: {rule}: {found!r}")
    return problems


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    listing = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], check=True,
                             capture_output=True).stdout
    return [name for name in listing.decode("utf-8").split("\0") if name]


def test_no_tracked_file_points_outside_the_repository():
    problems = []
    for relative in tracked_files():
        path = ROOT / relative
        if relative == THIS_FILE or not path.is_file():  # deleted but not yet staged
            continue
        problems += scan_file(relative, path.read_bytes())
    assert not problems, (
        "tracked files name places outside the repository (cite docs/rwkv4.md, use a path "
        "relative to the repository, or an example such as ~/data):\n  " + "\n  ".join(problems))


@pytest.mark.parametrize("text", [
    "see " + _p("..", "shared", "design", "x.md"),
    "the model is specified in " + _p("shared", "design"),
    "the rwkv-v4" + "-spec document",
    "as in the spec.",
    "The spec's section 4",
    "(spec, section 3)",
    "open('" + _p("", "work", "main", "data") + "')",
    "cd " + _p("", "root", ".cache", "pip"),
    _p("", "home", "alice", "enwik8"),
    _p("", "Users", "bob", "enwik8"),
    r"C:\Users\carol\enwik8",
    "written to " + _p("", "tmp", "pytest-of-root", "x"),
    _p("", "var", "folders", "xy", "T", "abc"),
    "mounted at " + _p("", "mnt", "disk"),
])
def test_rules_flag_outside_references(text):
    assert find_outside_references(text), f"{text!r} should be flagged"


@pytest.mark.parametrize("text", [
    "compiler   /usr/bin/c++",
    "with open('/proc/cpuinfo') as f:",
    "nvcc       /usr/local/bin/nvcc",
    "cmd = ['/bin/false']",
    "regex: /tmp/[A-Za-z0-9_./-]+",
    "replace: /tmp/TMPPATH",
    "https://mattmahoney.net/dc/enwik8.zip",
    "https://github.com/BlinkDL/RWKV-LM/blob/main/RWKV-v4/train.py",
    "module = importlib.util.module_from_spec(spec)",
    "def test_presets_follow_the_spec():",
    "torch's cache in ~/.cache/torch_extensions",
    "data/enwik8 and runs/ci/ckpt.pt",
    "docs/rwkv4.md, section 7",
    "a build folder under `C:\\Users\\Jörg\\...` that fails",
    "enwik8 in /home/<user>/data",
])
def test_rules_allow_ordinary_text(text):
    assert find_outside_references(text) == []


def _notebook(output_text: str, tags: list[str]) -> bytes:
    cell = {"cell_type": "code", "metadata": {"tags": tags}, "source": "print(status)",
            "outputs": [{"output_type": "stream", "name": "stdout", "text": [output_text]}]}
    return json.dumps({"cells": [cell], "metadata": {}}).encode()


def test_ignored_output_cells_may_show_only_the_extension_cache():
    cache = "cache_dir  " + _p("", "root", ".cache", "torch_extensions", "rwkv_notebooks\n")
    assert scan_file("n.ipynb", _notebook(cache, ["nbval-ignore-output"])) == []
    assert scan_file("n.ipynb", _notebook(cache, []))  # a compared output may not
    other = "data in " + _p("", "work", "main", "data\n")
    assert scan_file("n.ipynb", _notebook(other, ["nbval-ignore-output"]))


def test_notebook_images_are_not_text():
    image = {"output_type": "display_data", "metadata": {},
             "data": {"image/png": "iVBORw0KGgo" + _p("", "root", "work", "tmp", "abc"), "text/plain": ["<Figure>"]}}
    cell = {"cell_type": "code", "metadata": {}, "source": "", "outputs": [image]}
    assert scan_file("n.ipynb", json.dumps({"cells": [cell], "metadata": {}}).encode()) == []
