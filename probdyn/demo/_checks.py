"""The demo's checks in plain words: convergence (from `Posterior.summary`) and
held-out coverage against binomial error."""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Callable
from typing import Any

__all__ = [
    "COVERAGE_SE",
    "compare_checks",
    "coverage_checks",
    "coverage_tolerance",
    "failed_solve_checks",
    "format_checks",
    "summary_with_checks",
]

#: Coverage is flagged when it is this many binomial standard errors from nominal.
COVERAGE_SE = 3.0


def coverage_tolerance(nominal: float, n: int) -> float:
    """How far held-out coverage may fall from ``nominal`` before it is flagged.

    With ``n`` independent held-out points, the coverage of a calibrated predictive
    is ``Binomial(n, nominal) / n``: standard error ``sqrt(nominal (1 - nominal) / n)``.
    Three of them (a calibrated model strays further about 3 times in 1000, by the
    normal approximation) is the tolerance. Points along one trajectory are not
    independent, so the real scatter is larger: a flag is strong evidence, its
    absence weak.

    Example:
        >>> round(coverage_tolerance(0.9, 16), 3)
        0.225
    """
    return COVERAGE_SE * math.sqrt(nominal * (1.0 - nominal) / n)


def coverage_checks(table: Any, target: str = "held-out observations") -> list[str]:
    """One plain sentence per level whose coverage is further from nominal than
    `coverage_tolerance` allows (``table`` from `probdyn.calibration.calibration_table`,
    with a ``target`` column)."""
    rows = table[table["target"] == target] if "target" in table else table
    problems = []
    for nominal, row in rows.iterrows():
        n = int(row["n"])
        tol = coverage_tolerance(float(nominal), n)
        gap = float(row["coverage"]) - float(nominal)
        if abs(gap) > tol:
            way = "too narrow (over-confident)" if gap < 0 else "too wide (under-confident)"
            problems.append(
                f"{target}: {float(nominal):.0%} intervals cover {float(row['coverage']):.2f} of "
                f"{n} points, more than 3 binomial standard errors (±{tol:.2f}) from "
                f"{float(nominal):.2f}: the intervals are {way}."
            )
    return problems


def summary_with_checks(summarise: Callable[[], Any]) -> tuple[Any, list[str]]:
    """Run ``summarise`` (e.g. ``post.summary``) and return its table with the
    messages of the warnings it raised, so that the CLI can print them as sentences."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        table = summarise()
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    for w in caught:  # anything else goes on as it came
        if not issubclass(w.category, UserWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return table, messages


def failed_solve_checks(post: Any, who: str = "") -> list[str]:
    """One sentence if ODE/SDE solves failed during the fit (``posterior.attrs
    ['num_failed_solves']``), else none; ``who`` (e.g. ``"NUTS: "``) leads it."""
    n = int(post.attrs.get("num_failed_solves", 0) or 0)
    if not n:
        return []
    return [
        f"{who}{n} ODE/SDE solve(s) failed during the fit (max_steps reached or a "
        "non-finite state: those proposals were rejected; or a failed backward adjoint "
        "solve: that gradient was set to zero); see posterior.attrs['num_failed_solves']."
    ]


def compare_checks(result: Any) -> list[str]:
    """The demo's checks for each engine of a `probdyn.compare` result: its summary's
    convergence warnings (`summary_with_checks`), held-out coverage at each level
    (`coverage_checks`) and failed solves (`failed_solve_checks`), each sentence led
    by the engine's row name."""
    import pandas as pd

    n = int(result.observations.size)
    levels = [c for c in result.table.columns if str(c).startswith("coverage_")]
    messages = []
    for name, row in result.table.iterrows():
        post = result.posteriors.get(name)
        if post is None:  # a failed engine: its error is printed on its own
            continue
        _, found = summary_with_checks(post.summary)
        messages += [f"{name}: {m}" for m in found]
        coverage = pd.DataFrame(
            {"coverage": [float(row[c]) for c in levels], "n": n},
            index=pd.Index([int(str(c)[9:]) / 100 for c in levels], name="nominal"),
        ).dropna()
        messages += coverage_checks(coverage, target=f"{name}, held-out observations")
        messages += failed_solve_checks(post, f"{name}: ")
    return messages


def format_checks(checks: list[str], what: str = "convergence, held-out coverage") -> str:
    """The ``Checks:`` block the CLI prints: one wrapped bullet per sentence, or a line
    saying that nothing was flagged (and what was checked)."""
    if not checks:
        return f"Checks: none flagged ({what})."
    bullets = (
        textwrap.fill(m, 100, initial_indent="  - ", subsequent_indent="    ") for m in checks
    )
    return "Checks:\n" + "\n".join(bullets)
