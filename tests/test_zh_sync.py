"""tools/zh_sync.py: the Chinese edition follows the English one, and drifting apart fails."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("zh_sync", ROOT / "tools" / "zh_sync.py")
zh_sync = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zh_sync)


def md(cid, text):
    return {"cell_type": "markdown", "id": cid, "metadata": {}, "source": text}


def code(cid, src, out="", tags=None):
    meta = {"tags": tags} if tags else {}
    outputs = [{"output_type": "stream", "name": "stdout", "text": out}] if out else []
    return {"cell_type": "code", "id": cid, "metadata": meta, "source": src,
            "execution_count": 1, "outputs": outputs}


def notebook(*cells):
    return {"cells": list(cells), "metadata": {"kernelspec": {"name": "python3"}},
            "nbformat": 4, "nbformat_minor": 5}


EN = notebook(
    md("a1", "# 01 · Data\n\nThe corpus is read as bytes, not characters."),
    code("b2", "n = 3  # three layers\nprint(f\"{n} layers, loss {0.5:.3f}\")",
         "3 layers, loss 0.500\n"),
    md("c3", "$$y = x^2$$"),
    code("d4", "import time\nprint(time.time())", "1764633600.1\n", ["nbval-ignore-output"]),
)


def translate(en):
    zh, _ = zh_sync.sync_notebook(en, None)
    zh["cells"][0]["source"] = "# 01 · 数据\n\n语料按字节读取，而不是按字符。"
    zh["cells"][1]["source"] = "n = 3  # 三层\nprint(f\"{n} 层，损失 {0.5:.3f}\")"
    zh["cells"][1]["outputs"] = [{"output_type": "stream", "name": "stdout",
                                  "text": "3 层，损失 0.500\n"}]
    zh["cells"][3]["outputs"] = [{"output_type": "stream", "name": "stdout",
                                  "text": "1764633999.9\n"}]
    zh_sync.stamp_notebook(en, zh, force=True)
    return zh


def test_a_faithful_translation_passes():
    assert zh_sync.check_notebook("01.ipynb", EN, translate(EN)) == []


def test_sync_inserts_untranslated_cells_and_check_names_them():
    zh, notes = zh_sync.sync_notebook(EN, None)
    assert len(notes) == 4 and all("to translate" in n for n in notes)
    problems = zh_sync.check_notebook("01.ipynb", EN, zh)
    assert len(problems) == 4 and all("not translated yet" in p for p in problems)


def test_an_edited_english_markdown_cell_makes_the_translation_stale():
    zh = translate(EN)
    en = copy.deepcopy(EN)
    en["cells"][0]["source"] += " A new sentence."
    problems = zh_sync.check_notebook("01.ipynb", en, zh)
    assert len(problems) == 1 and "cell 0 (a1): stale" in problems[0]
    # sync keeps the old translation but the cell stays stale until it is revised and stamped
    zh, notes = zh_sync.sync_notebook(en, zh)
    assert notes == ["cell a1: the English changed, revise the translation"]
    assert zh_sync.stamp_notebook(en, zh) == []  # untouched translation: not stamped
    zh["cells"][0]["source"] += "新的一句。"
    assert zh_sync.stamp_notebook(en, zh) == ["stamped a1"]
    assert zh_sync.check_notebook("01.ipynb", en, zh) == []


@pytest.mark.parametrize("changed, message", [
    ("n = 4  # 三层\nprint(f\"{n} 层，损失 {0.5:.3f}\")", "the code differs"),
    ("n = 3  # 三层\nprint(f\"{n} 层，损失 {0.5:.2f}\")", "not a translation"),
    ("n = 3  # 三层\nprint(f\"层，损失 {0.5:.3f}\")", "the code differs"),
    ("n = 3\nprint(f\"{n} layers, loss {0.5:.3f}\", end='')", "the code differs"),
])
def test_code_that_computes_something_else_fails(changed, message):
    zh = translate(EN)
    zh["cells"][1]["source"] = changed
    zh_sync.stamp_notebook(EN, zh, force=True)
    problems = zh_sync.check_notebook("01.ipynb", EN, zh)
    assert any(message in p for p in problems), problems


def test_comments_and_translated_strings_may_differ_but_plain_strings_may_not():
    assert zh_sync.compare_code("x = 'sample'  # the corpus", "x = 'sample'  # 语料") is None
    assert "not a translation" in zh_sync.compare_code("x = 'sample'", "x = 'enwik8'")
    assert zh_sync.compare_code('"""Doc."""\nf(1)', '"""文档。"""\nf(1)') is None
    assert zh_sync.compare_code("%matplotlib inline\nf(1)", "%matplotlib inline\nf(1)") is None


def test_other_numbers_in_the_outputs_fail_unless_nbval_ignores_them():
    zh = translate(EN)
    zh["cells"][1]["outputs"][0]["text"] = "3 层，损失 0.501\n"
    problems = zh_sync.check_notebook("01.ipynb", EN, zh)
    assert len(problems) == 1 and "other numbers" in problems[0]


def test_reordered_or_missing_cells_fail():
    zh = translate(EN)
    zh["cells"][0], zh["cells"][1] = zh["cells"][1], zh["cells"][0]
    assert "count, order, id or type" in zh_sync.check_notebook("01.ipynb", EN, zh)[0]
    zh = translate(EN)
    del zh["cells"][2]
    assert "count, order, id or type" in zh_sync.check_notebook("01.ipynb", EN, zh)[0]
    assert "is missing" in zh_sync.check_notebook("01.ipynb", EN, None)[0]


def test_a_markdown_cell_left_in_english_fails():
    zh = translate(EN)
    zh["cells"][0]["source"] = EN["cells"][0]["source"] + " "
    zh_sync.stamp_notebook(EN, zh, force=True)
    assert "no Chinese" in zh_sync.check_notebook("01.ipynb", EN, zh)[0]


def test_sync_drops_cells_the_english_no_longer_has(tmp_path):
    zh = translate(EN)
    en = copy.deepcopy(EN)
    del en["cells"][2]
    zh, notes = zh_sync.sync_notebook(en, zh)
    assert notes == ["dropped cell c3: no longer in the English notebook"]
    assert [c["id"] for c in zh["cells"]] == ["a1", "b2", "d4"]
    # the command line writes the files and its check exits 1 on problems
    en_dir, zh_dir = tmp_path / "en", tmp_path / "zh"
    en_dir.mkdir()
    (en_dir / "01_data.ipynb").write_text(json.dumps(EN))
    args = ["--en-dir", str(en_dir), "--zh-dir", str(zh_dir)]
    assert zh_sync.main(["check", *args]) == 1
    assert zh_sync.main(["sync", *args]) == 0 and (zh_dir / "01_data.ipynb").exists()
    assert zh_sync.main(["check", *args]) == 1


# --- the edition in the repository -----------------------------------------------------------

def test_the_chinese_edition_is_complete_and_in_step_with_the_english():
    problems = zh_sync.check()
    assert not problems, "\n".join(problems[:20])


def test_editing_a_real_english_markdown_cell_makes_its_translation_stale(tmp_path):
    name = "06_wkv.ipynb"
    en = zh_sync.load(zh_sync.EN_DIR / name)
    zh = zh_sync.load(zh_sync.ZH_DIR / name)
    assert zh_sync.check_notebook(name, en, zh) == []
    index = next(i for i, c in enumerate(en["cells"]) if c["cell_type"] == "markdown")
    en["cells"][index]["source"] = zh_sync.source_of(en["cells"][index]) + "\nOne more sentence."
    problems = zh_sync.check_notebook(name, en, zh)
    assert len(problems) == 1 and f"cell {index} " in problems[0] and "stale" in problems[0]
