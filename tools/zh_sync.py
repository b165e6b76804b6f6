"""Keep the Chinese edition (notebooks/zh/) in step with the English notebooks.

The English notebooks are the source of truth. Each zh notebook has the same cells, in the
same order, with the same cell ids; a zh cell translates the English cell of the same id and
records, in its metadata, the sha256 of the English source it translates:

    "metadata": {"zh": {"en_sha256": "...", "zh_sha256": "..."}}

zh_sha256 is the hash of the translation when it was stamped, so the tool can tell a cell
whose translation was revised from one that was not touched.

    python tools/zh_sync.py sync      # rebuild the zh notebooks' structure from the English
    python tools/zh_sync.py stamp     # record the hashes of cells whose translation changed
    python tools/zh_sync.py check     # list every problem; exit status 1 if there is any

`sync` keeps every translation whose English cell still exists, drops cells the English
notebook no longer has, and inserts new English cells untranslated (their en_sha256 is
null). `check` fails when:

- a zh notebook is missing, or its cells differ from the English in count, order, id or type;
- a cell is untranslated, or stale: its English source changed after the translation was
  stamped (the hash differs);
- a translated markdown cell has no Chinese in it;
- a code cell computes something else: the two sources must have the same syntax tree once
  comments are dropped, where a string may differ only if the zh string contains Chinese
  (a printed explanation, a figure label), and f-strings keep their placeholders in order;
- the stored outputs differ in their numbers (the sequence of numbers printed by each code
  cell, for cells whose output nbval compares).
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
EN_DIR = ROOT / "notebooks"
ZH_DIR = EN_DIR / "zh"
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\u3000-\u303f\uff00-\uffef]")
NUMBER = re.compile(r"(?<![A-Za-z_])[-+]?\d+(?:[.,]\d+)*(?:[eE][-+]?\d+)?")
IGNORE_OUTPUT_TAGS = {"nbval-ignore-output", "nbval-skip", "raises-exception"}


def source_of(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def save(path: Path, nb: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(nb, ensure_ascii=False, indent=1) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def zh_meta(cell: dict) -> dict:
    return cell.setdefault("metadata", {}).setdefault("zh", {})


# --- sync and stamp -----------------------------------------------------------------------

def untranslated_copy(en_cell: dict) -> dict:
    cell = copy.deepcopy(en_cell)
    if cell["cell_type"] == "code":
        cell["outputs"], cell["execution_count"] = [], None
    zh_meta(cell).update(en_sha256=None, zh_sha256=None)
    return cell


def sync_notebook(en: dict, zh: dict | None) -> tuple[dict, list[str]]:
    """The zh notebook rebuilt on the English structure, and what changed."""
    old = {c.get("id"): c for c in (zh or {}).get("cells", [])}
    cells, notes = [], []
    for en_cell in en["cells"]:
        cell = old.pop(en_cell["id"], None)
        if cell is None or cell["cell_type"] != en_cell["cell_type"]:
            notes.append(f"new cell {en_cell['id']} ({en_cell['cell_type']}): to translate")
            cell = untranslated_copy(en_cell)
        elif zh_meta(cell).get("en_sha256") != sha256(source_of(en_cell)):
            notes.append(f"cell {en_cell['id']}: the English changed, revise the translation")
        cells.append(cell)
    notes += [f"dropped cell {cid}: no longer in the English notebook" for cid in old]
    out = copy.deepcopy(en)
    out["cells"] = cells
    if zh is not None:
        out["metadata"] = {**en.get("metadata", {}), **zh.get("metadata", {})}
    out["metadata"]["language_info"] = en.get("metadata", {}).get("language_info", {})
    return out, notes


def stamp_notebook(en: dict, zh: dict, force: bool = False) -> list[str]:
    """Record en/zh hashes for cells whose translation was revised (or all, with force)."""
    en_by_id = {c["id"]: c for c in en["cells"]}
    notes = []
    for cell in zh["cells"]:
        en_cell = en_by_id.get(cell.get("id"))
        if en_cell is None:
            continue
        meta = zh_meta(cell)
        en_hash, zh_hash = sha256(source_of(en_cell)), sha256(source_of(cell))
        if meta.get("en_sha256") == en_hash and meta.get("zh_sha256") == zh_hash:
            continue
        revised = meta.get("zh_sha256") != zh_hash
        if en_cell["cell_type"] == "markdown" and source_of(cell) == source_of(en_cell):
            revised = False  # still the English text: nothing was translated
        if revised or force:
            meta.update(en_sha256=en_hash, zh_sha256=zh_hash)
            notes.append(f"stamped {cell['id']}")
    return notes


# --- check ---------------------------------------------------------------------------------

def _strip_magics(src: str) -> str:
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                     for line in src.splitlines())


class _Shape(ast.NodeTransformer):
    """Replace the free text of a syntax tree by placeholders, collecting it in order."""

    def __init__(self) -> None:
        self.strings: list[str] = []

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.AST:
        # f-string: its literal parts are free text; its placeholders must stay as they are
        self.strings.append("".join(v.value for v in node.values
                                    if isinstance(v, ast.Constant)))
        holes = [self.generic_visit(v) for v in node.values
                 if isinstance(v, ast.FormattedValue)]
        return ast.JoinedStr(values=holes)

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if isinstance(node.value, str):
            self.strings.append(node.value)
            return ast.Constant(value="<str>")
        return node


def code_shape(src: str) -> tuple[str, list[str]]:
    shaper = _Shape()
    tree = shaper.visit(ast.parse(_strip_magics(src)))
    return ast.dump(tree, include_attributes=False), shaper.strings


def compare_code(en_src: str, zh_src: str) -> str | None:
    """None when the two cells compute the same thing, else what differs."""
    try:
        en_tree, en_strings = code_shape(en_src)
        zh_tree, zh_strings = code_shape(zh_src)
    except SyntaxError as err:
        return f"does not parse ({err.msg}, line {err.lineno})"
    if en_tree != zh_tree:
        return "the code differs (not only in comments and translated strings)"
    for en_s, zh_s in zip(en_strings, zh_strings, strict=True):
        if en_s != zh_s and not CJK.search(zh_s):
            return f"string {en_s!r} became {zh_s!r}, which is not a translation"
    return None


def output_numbers(cell: dict) -> list[str]:
    numbers = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            text = out.get("text", "")
        else:
            text = out.get("data", {}).get("text/plain", "")
            if isinstance(text, list):
                text = "".join(text)
            if text.startswith("<Figure size"):
                continue
        numbers += NUMBER.findall("".join(text) if isinstance(text, list) else text)
    return numbers


def _words(text: str) -> int:
    text = re.sub(r"\$\$.*?\$\$|\$[^$]*\$|`[^`]*`", " ", text, flags=re.S)
    return len(re.findall(r"[A-Za-z]{3,}", text))


def check_notebook(name: str, en: dict, zh: dict | None) -> list[str]:
    if zh is None:
        return [f"{name}: notebooks/zh/{name} is missing (run tools/zh_sync.py sync)"]
    problems = []
    en_ids = [(c["id"], c["cell_type"]) for c in en["cells"]]
    zh_ids = [(c.get("id"), c["cell_type"]) for c in zh["cells"]]
    if en_ids != zh_ids:
        return [f"{name}: the cells differ from the English notebook in count, order, id or "
                f"type ({len(en_ids)} English, {len(zh_ids)} zh cells); run "
                "tools/zh_sync.py sync"]
    for i, (en_cell, cell) in enumerate(zip(en["cells"], zh["cells"], strict=True)):
        where = f"{name} cell {i} ({cell['id']})"
        meta = cell.get("metadata", {}).get("zh", {})
        if meta.get("en_sha256") is None:
            problems.append(f"{where}: not translated yet")
            continue
        if meta["en_sha256"] != sha256(source_of(en_cell)):
            problems.append(f"{where}: stale: the English cell changed after it was "
                            "translated; revise the translation, then run tools/zh_sync.py "
                            "stamp")
        if cell["cell_type"] == "markdown":
            if _words(source_of(en_cell)) >= 3 and not CJK.search(source_of(cell)):
                problems.append(f"{where}: has no Chinese text")
            continue
        if cell["cell_type"] != "code":
            continue
        differs = compare_code(source_of(en_cell), source_of(cell))
        if differs:
            problems.append(f"{where}: {differs}")
        tags = set(en_cell.get("metadata", {}).get("tags", []))
        if not tags & IGNORE_OUTPUT_TAGS and output_numbers(en_cell) != output_numbers(cell):
            problems.append(f"{where}: its stored output shows other numbers than the "
                            "English cell's; re-execute both")
    return problems


class Pair(NamedTuple):
    name: str
    en_path: Path
    zh_path: Path


def pairs(en_dir: Path, zh_dir: Path, names: list[str] | None = None) -> list[Pair]:
    found = sorted(p.name for p in en_dir.glob("[0-9][0-9]_*.ipynb"))
    if names:
        found = [n for n in found if any(n.startswith(x) for x in names)]
    return [Pair(n, en_dir / n, zh_dir / n) for n in found]


def check(en_dir: Path = EN_DIR, zh_dir: Path = ZH_DIR) -> list[str]:
    problems = []
    for pair in pairs(en_dir, zh_dir):
        zh = load(pair.zh_path) if pair.zh_path.exists() else None
        problems += check_notebook(pair.name, load(pair.en_path), zh)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/zh_sync.py", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("command", choices=("sync", "stamp", "check"))
    parser.add_argument("notebooks", nargs="*", help="notebook numbers or names (default all)")
    parser.add_argument("--force", action="store_true",
                        help="stamp: accept every cell as translated as it stands")
    parser.add_argument("--en-dir", type=Path, default=EN_DIR)
    parser.add_argument("--zh-dir", type=Path, default=ZH_DIR)
    args = parser.parse_args(argv)
    if args.command == "check":
        problems = check(args.en_dir, args.zh_dir)
        for line in problems:
            print(line)
        print(f"{len(problems)} problem(s)" if problems else "the zh edition is in sync")
        return 1 if problems else 0
    for pair in pairs(args.en_dir, args.zh_dir, args.notebooks):
        en = load(pair.en_path)
        zh = load(pair.zh_path) if pair.zh_path.exists() else None
        if args.command == "sync":
            zh, notes = sync_notebook(en, zh)
        else:
            if zh is None:
                print(f"{pair.name}: no zh notebook; run sync first", file=sys.stderr)
                return 1
            notes = stamp_notebook(en, zh, args.force)
        if notes:
            save(pair.zh_path, zh)
        for note in notes:
            print(f"{pair.name}: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
