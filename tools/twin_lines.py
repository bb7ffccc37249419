"""Count the code lines the two backend folders share verbatim.

For every module that exists under both ``probdyn/numpyro/`` and ``probdyn/pyro/`` at
the same relative path, the two files' code lines (stripped; blank lines, comments,
imports and docstring text left out) are aligned with `difflib` and the lines of every
identical run of at least ``MIN_RUN`` consecutive lines are counted. Function
signatures and ``__all__`` lists are left out too: the parity tests require them to be
identical. A run that short
is noise (``return out``, ``)``); a longer one is logic written twice.

Usage: ``python tools/twin_lines.py`` prints the count per file pair and the total.
"""

from __future__ import annotations

import ast
import difflib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIN_RUN = 6


def code_lines(path: Path) -> list[str]:
    """The file's code lines, stripped, without blanks, comments, imports or docstrings."""
    source = path.read_text()
    doc_lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            doc_lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
        # Public signatures and export lists must be identical (tests/test_parity.py and
        # tests/test_np_parity.py compare them): declarations, not logic written twice.
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            doc_lines.update(range(node.lineno, node.body[0].lineno))
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets
        ):
            doc_lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                doc_lines.update(range(body[0].lineno, (body[0].end_lineno or 0) + 1))
    out = []
    for number, line in enumerate(source.splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#") or number in doc_lines:
            continue
        out.append(text)
    return out


def shared_lines(a: Path, b: Path, min_run: int = MIN_RUN) -> int:
    """Lines in identical runs of at least ``min_run`` code lines between ``a`` and ``b``."""
    la, lb = code_lines(a), code_lines(b)
    matcher = difflib.SequenceMatcher(None, la, lb, autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks() if block.size >= min_run)


def twin_report(root: Path = ROOT) -> dict[str, int]:
    """Relative path -> shared lines, for every module both backend folders have."""
    left, right = root / "probdyn" / "numpyro", root / "probdyn" / "pyro"
    report = {}
    for a in sorted(left.rglob("*.py")):
        rel = a.relative_to(left)
        b = right / rel
        if b.is_file():
            report[str(rel)] = shared_lines(a, b)
    return report


def main() -> int:
    report = twin_report()
    for rel, count in sorted(report.items(), key=lambda kv: -kv[1]):
        print(f"{count:5d}  {rel}")
    print(f"{sum(report.values()):5d}  total (runs of >= {MIN_RUN} identical code lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
