"""``Posterior.summary``: ArviZ's summary, with large sites folded into one row, rows
that look unconverged flagged, and a printout that explains itself."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from probdyn.core.posterior import Posterior

__all__ = ["RHAT_LIMIT", "SummaryTable", "ess_limit", "summarize"]

_MIN_COLS = ("ess_bulk", "ess_tail")
_MAX_COLS = ("r_hat", "mcse_mean", "mcse_sd")

#: R-hat above this flags a row: the chains (or halves of one chain) disagree.
RHAT_LIMIT = 1.05
_ESS_FLOOR = 100
_ESS_FRACTION = 0.1

# Engines whose draws are independent (not a Markov chain): R-hat says nothing about
# whether they converged, and their ESS is close to the number of draws by design.
_INDEPENDENT_DRAWS = frozenset({"VI", "Ensemble", "SMC"})


def ess_limit(num_draws: int) -> float:
    """The ESS below which a row is flagged: 100, or 10 % of all draws if that is more.

    100 effective draws give a Monte-Carlo error of a tenth of a posterior sd for a
    mean; fewer than 10 % of the draws means the chains are strongly autocorrelated.

    Example:
        >>> ess_limit(400), ess_limit(4000)
        (100, 400.0)
    """
    return max(_ESS_FLOOR, _ESS_FRACTION * num_draws)


class SummaryTable(pd.DataFrame):
    """The `pandas.DataFrame` that `Posterior.summary` returns.

    A plain DataFrame in every respect (index, columns, ``to_csv``, ``loc``) except
    that printing it shows every column (no ``...``), a missing value as ``—``, and
    the notes that say how to read it (``table.notes``).
    """

    _metadata: ClassVar[list[str]] = ["notes"]
    notes: list[str]

    @property
    def _constructor(self) -> type[SummaryTable]:
        return SummaryTable

    def __repr__(self) -> str:
        text = self.to_string(formatters={c: _formatter(c) for c in self.columns}, na_rep="—")
        notes = getattr(self, "notes", None) or []
        return text + "".join(f"\n{note}" for note in notes)


def _formatter(column: Any) -> Any:
    digits = {"ess_bulk": ".0f", "ess_tail": ".0f", "r_hat": ".2f"}.get(str(column), ".3g")

    def fmt(value: Any) -> str:
        if isinstance(value, str):
            return value
        return "—" if value is None or np.isnan(value) else format(value, digits)

    return fmt


def summarize(post: Posterior, *, max_elements: int | None = 10, **kwargs: Any) -> SummaryTable:
    """The table behind `Posterior.summary` (see there); warns about flagged rows."""
    from probdyn.core.arviz import diagnostics_data, import_arviz

    az = import_arviz()
    if not post.samples:
        raise ValueError(
            "summary: this posterior is amortised (trained on a TaskStream) and has no draws "
            "to summarise; see posterior.traces['loss'], or predict on a task with "
            "posterior.predict(x_target, context=(x_c, y_c))."
        )
    idata = diagnostics_data(post)
    small = [n for n, v in post.samples.items() if _size(v) <= (max_elements or np.inf)]
    large = [n for n in post.samples if n not in small]
    frames = []
    if small:
        frames.append(az.summary(idata, var_names=small, **kwargs))
    for name in large:
        frames.append(_fold(az.summary(idata, var_names=[name], **kwargs), name, post))
    table = SummaryTable(pd.concat(frames) if frames else pd.DataFrame())
    engine = str(post.attrs.get("engine", {}).get("engine", ""))
    markov = engine not in _INDEPENDENT_DRAWS
    if not markov and "r_hat" in table:
        table["r_hat"] = np.nan
    num_draws = int(np.prod(np.shape(next(iter(post.samples.values())))[:2]))
    if markov and not table.empty:
        table["flag"] = _flags(table, num_draws)
    table.notes = _notes(table, post, engine, markov, large, num_draws)
    problems = _problems(table)
    if problems:
        warnings.warn(problems, UserWarning, stacklevel=3)
    return table


def _fold(table: pd.DataFrame, name: str, post: Posterior) -> pd.DataFrame:
    """One row for a large site: means of the estimates, the worst diagnostics."""
    row = {}
    for col in table.columns:
        if col in _MIN_COLS:
            row[col] = table[col].min()
        elif col in _MAX_COLS:
            row[col] = table[col].max()
        else:
            row[col] = table[col].mean()
    label = f"{name} ({_size(post.samples[name])} elements, worst)"
    return pd.DataFrame([row], index=[label])


def _flags(table: pd.DataFrame, num_draws: int) -> list[str]:
    limit = ess_limit(num_draws)
    flags = []
    for _, row in table.iterrows():
        found = []
        if "r_hat" in row and row["r_hat"] > RHAT_LIMIT:
            found.append(f"r_hat > {RHAT_LIMIT}")
        ess = min(row.get("ess_bulk", np.inf), row.get("ess_tail", np.inf))
        if ess < limit:
            found.append(f"ess < {limit:g}")
        flags.append(", ".join(found))
    return flags


def _notes(
    table: pd.DataFrame,
    post: Posterior,
    engine: str,
    markov: bool,
    large: list[str],
    num_draws: int,
) -> list[str]:
    notes = []
    if large:
        notes.append(
            "(n elements, worst): a large site in one row; mean, sd and HDI are averages "
            "over its elements, ess the smallest and r_hat the largest of them."
        )
    chains = int(np.shape(next(iter(post.samples.values())))[0])
    if not markov:
        notes.append(
            f"r_hat —: {engine} draws are independent, not a Markov chain, so R-hat does "
            "not apply; judge the fit by its held-out calibration (and VI by "
            "posterior.traces['loss'])."
        )
    elif chains == 1 and "r_hat" in table and table["r_hat"].notna().any():
        notes.append(
            "r_hat: one chain, so R-hat compares parts of it (split R-hat); run "
            "num_chains >= 2 for the check across chains."
        )
    if "flag" in table and (table["flag"] != "").any():
        notes.append(_flag_note(num_draws))
    return notes


def _flag_note(num_draws: int) -> str:
    """The footnote under a table with flagged rows, in words that fit ``num_draws``."""
    limit = ess_limit(num_draws)
    if limit > _ESS_FLOOR:
        why = (
            f"ess < {limit:g} means fewer than {limit:g} effective draws, a tenth of the "
            f"{num_draws} drawn: the draws are strongly autocorrelated"
        )
    else:
        why = (
            f"ess < {limit:g} means fewer than {limit:g} effective draws, too few for "
            "reliable estimates"
        )
    return (
        f"flag: r_hat > {RHAT_LIMIT} means the chains, or the parts of one chain, disagree "
        f"(not converged); {why}. "
        "Run longer or more chains before trusting these rows."
    )


def _problems(table: pd.DataFrame) -> str:
    """A plain-words warning naming the flagged rows, or ``""``."""
    if "flag" not in table:
        return ""
    flagged = table.index[table["flag"] != ""]
    if len(flagged) == 0:
        return ""
    more = f" and {len(flagged) - 4} more" if len(flagged) > 4 else ""
    names = ", ".join(map(str, flagged[:4])) + more
    ess_cols = [c for c in ("ess_bulk", "ess_tail") if c in table]
    ess = f"smallest ess {table[ess_cols].min(axis=1).min():.0f}" if ess_cols else ""
    rows = f"{len(flagged)} of {len(table)} summary rows"
    if "r_hat" in table and table["r_hat"].max() > RHAT_LIMIT:
        worst = "; ".join(filter(None, [f"largest r_hat {table['r_hat'].max():.2f}", ess]))
        return (
            f"{rows} look unconverged ({worst}): {names}. Estimates from these draws are "
            "unreliable: run more warm-up and draws, or more chains; see the 'flag' column "
            "of the summary."
        )
    return (
        f"{rows} have few effective draws ({ess}): {names}. Their estimates carry a large "
        "Monte-Carlo error: draw more (num_samples) or run more chains; see the 'flag' "
        "column of the summary."
    )


def _size(value: np.ndarray) -> int:
    return int(np.prod(np.shape(value)[2:], dtype=int))
