"""The set-up is declared in several places; these tests keep them saying the same thing."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (pyproject's dev extra installs it)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"<!-- {marker} -->\s*```(?:bash|sh)?\n(.+?)\n```", text, re.S)
    assert match, f"README.md has no fenced command after <!-- {marker} -->"
    lines = [line for line in match.group(1).splitlines() if line.strip()]
    assert len(lines) == 1, f"the README's {marker} must be one command, got {lines}"
    return lines[0].strip()


def _ci_lines() -> list[str]:
    return [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]


def test_ci_runs_the_readme_setup_and_test_commands():
    ci = _ci_lines()
    assert _readme_command("setup-command") in ci
    assert _readme_command("test-command") in ci


def test_setup_pins_the_torch_the_notebooks_were_run_with():
    assert '"torch==2.13.0"' in _readme_command("setup-command")


# The conda files and the pip options each may add: the CPU file adds PyTorch's CPU index.
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
ENVIRONMENT_FILES = {"environment.yml": [], "environment-cpu.yml": [f"--extra-index-url {CPU_INDEX}"]}


@pytest.mark.parametrize("name", ENVIRONMENT_FILES)
def test_environment_files_install_from_pyproject_only(name):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = {re.split(r"[<>=!~ \[]", d)[0].lower() for d in pyproject["project"]["dependencies"]}
    env = (ROOT / name).read_text().splitlines()
    items = [line.strip()[2:].strip() for line in env if line.strip().startswith("- ")]
    options = [i for i in items if i.startswith("--")]
    assert options == ENVIRONMENT_FILES[name], f"{name}: pip options {options}"
    conda = [i for i in items if i not in ("pip:",) and not i.startswith(("-e", "torch", "--"))]
    assert all(re.fullmatch(r"python=3\.\d+|pip|conda-forge", i) for i in conda), conda
    assert "-e .[dev]" in items, f"{name} must install the project with its dev extra"
    pins = [i for i in items if i.startswith("torch")]
    for pin in pins:  # a pin may only narrow a dependency pyproject already declares
        assert re.split(r"[<>=!~ ]", pin)[0] in deps
    assert pins == ["torch==2.13.0"], f"{name} and the README pin the same torch"
    python = next(i for i in conda if i.startswith("python="))
    minimum = pyproject["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, python[7:].split("."))) >= tuple(map(int, minimum.split(".")))


def test_the_readme_says_how_to_get_each_pytorch_build():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ENVIRONMENT_FILES:
        assert f"conda env create -f {name}" in readme, f"README.md does not mention {name}"
    setup = _readme_command("setup-command")
    cpu = f'python -m pip install "torch==2.13.0" --index-url {CPU_INDEX} && {setup}'
    assert cpu in readme, "README.md gives no one-command install of the CPU build"


def test_the_portability_script_runs_the_readme_commands():
    spec = importlib.util.spec_from_file_location("portability", ROOT / "tools" / "portability.py")
    portability = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("portability", portability)  # dataclasses look their module up
    spec.loader.exec_module(portability)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for marker in ("setup-command", "test-command"):
        assert portability.readme_command(readme, marker) == _readme_command(marker)
    assert "python tools/portability.py" in readme, "README.md: the supported configurations' command"


def test_every_notebook_is_listed_in_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    for name in notebooks:
        assert name in readme, f"README.md does not list {name}"


def test_the_readme_python_examples_run():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.+?)```", readme, re.S)
    assert blocks, "README.md has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_the_tests_can_read_toml_on_every_supported_python():
    # tomllib is new in Python 3.11; on 3.10 these tests read TOML with tomli, from the dev extra
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    minimum = tuple(map(int, pyproject["project"]["requires-python"].removeprefix(">=").split(".")))
    if minimum >= (3, 11):
        return
    dev = [d.replace(" ", "").replace('"', "'") for d in pyproject["project"]["optional-dependencies"]["dev"]]
    assert any(d.startswith("tomli") and "python_version<'3.11'" in d for d in dev), (
        "requires-python admits Python 3.10, so the dev extra needs tomli (python_version < '3.11')"
    )
