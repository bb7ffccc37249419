"""The docs: the site builds strictly, every public name is documented, and the
README's quick example runs."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
PUBLIC_MODULES = [
    "probdyn",
    "probdyn.numpyro",
    "probdyn.calibration",
    "probdyn.data",
    "probdyn.testing",
]
if importlib.util.find_spec("torch") is not None:
    PUBLIC_MODULES.append("probdyn.pyro")


def _docs_text() -> str:
    return "\n".join(p.read_text() for p in DOCS.rglob("*.md"))


def _public_names() -> list[tuple[str, str]]:
    names = []
    for module in PUBLIC_MODULES:
        mod = importlib.import_module(module)
        names += [(module, n) for n in mod.__all__ if not n.startswith("__")]
    return names


@pytest.mark.parametrize("module, name", _public_names(), ids=lambda v: str(v))
def test_public_name_is_documented(module: str, name: str) -> None:
    text = _docs_text()
    # Either the name has its own directive, or its module is rendered with members.
    own = re.search(rf"^::: {re.escape(module)}\.{re.escape(name)}\s*$", text, re.M)
    whole = re.search(rf"^::: {re.escape(module)}\s*\n\s+options:\s*\n\s+members: true", text, re.M)
    assert own or whole, f"{module}.{name} appears on no page under docs/"
    obj = getattr(importlib.import_module(module), name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert inspect.getdoc(obj), f"{module}.{name} has no docstring"


def test_every_nav_page_exists() -> None:
    nav = re.findall(r":\s*([\w/]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    missing = [p for p in nav if not (DOCS / p).is_file()]
    assert nav and not missing, missing


def test_mkdocs_builds_strictly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "index.html").is_file()
    assert "probdyn.fit" in (tmp_path / "api" / "core" / "index.html").read_text()


def test_readme_quick_example_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README.md has no python example"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, "-c", blocks[0]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(1, 1000, 20)" in result.stdout  # the shape the README promises
    # 1000 draws give every summary row 100 effective draws or more: no warning.
    assert "few effective draws" not in result.stderr and "unconverged" not in result.stderr
    assert (tmp_path / "decay.nc").stat().st_size > 0


def test_readme_starts_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text().split("---")[0]
    assert "probdyn demo" in head and "python -m pytest" in head
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = next(line.strip() for line in head.splitlines() if "python -m pytest" in line)
    assert test_cmd in ci, "'.ci/run' must call exactly the README's test command"
