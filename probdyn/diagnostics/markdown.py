"""Tables as GitHub-flavoured markdown (`Comparison.to_markdown`, the CLI's tables)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


def format_markdown(table: pd.DataFrame, *, digits: int = 3) -> str:
    """A DataFrame as a GitHub-flavoured markdown table, index first (headed by its name).

    NaN prints as ``n/a``, infinities as ``inf`` and ``-inf``.

    Example:
        >>> import pandas as pd
        >>> table = pd.DataFrame({"a": [1.23456, float("nan")]}, index=["x", "y"])
        >>> print(format_markdown(table), end="")
        |  | a |
        | --- | ---: |
        | x | 1.23 |
        | y | n/a |
    """
    header = [str(table.index.name or ""), *map(str, table.columns)]
    numeric = [table[c].dtype.kind in "iufb" for c in table.columns]
    # A float column whose values are all whole numbers (draws, divergences, with
    # NaN for undefined rows) prints as integers; others with `digits` digits.
    integral = [n and _all_whole(table[c].to_numpy()) for n, c in zip(numeric, table.columns)]
    lines = [
        "| " + " | ".join(_escape(h) for h in header) + " |",
        "| --- | " + " | ".join("---:" if n else "---" for n in numeric) + " |",
    ]
    for name, values in zip(table.index, table.itertuples(index=False)):
        cells = [_escape(str(name))]
        cells += [_cell(v, digits, whole) for v, whole in zip(values, integral)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _all_whole(values: np.ndarray) -> bool:
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    return bool(np.all(finite == np.round(finite)))


def _cell(value: Any, digits: int, whole: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, float, np.integer, np.floating)):
        if math.isnan(float(value)):
            return "n/a"
        if whole and math.isfinite(float(value)):
            return str(int(value))
        return _number(float(value), digits)
    return _escape(str(value))


def _number(value: float, digits: int) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude < -3:
        return f"{value:.{max(digits - 1, 0)}e}"
    return f"{value:.{max(digits - 1 - magnitude, 0)}f}"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
