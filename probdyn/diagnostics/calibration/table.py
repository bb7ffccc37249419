"""`calibration_table`: coverage and interval width per level, central and HDI, with the
scores of the same draws, as one pandas DataFrame (pandas imported lazily)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from probdyn.diagnostics.calibration.checks import _levels, _prepare, _summarise
from probdyn.diagnostics.calibration.intervals import _interval
from probdyn.diagnostics.calibration.scores import crps, nlpd, rmse


def calibration_table(
    draws: Any,
    observed: Any,
    levels: Sequence[float] = (0.5, 0.9),
    *,
    sample_dims: int = 2,
    log_likelihood: Any = None,
) -> Any:
    """A table (pandas DataFrame) of coverage and mean interval width per level,
    with RMSE and CRPS of the same draws.

    One row per nominal level (the index). Columns: ``coverage`` and ``mean_width`` of
    central intervals, ``n`` (observations scored), ``rmse``, ``crps``,
    ``coverage_hdi`` and ``mean_width_hdi`` of highest-density intervals, and ``nlpd``
    (exact) when ``log_likelihood`` is given. Missing (NaN) observations are left out.
    ``n``, ``rmse``, ``crps`` and ``nlpd`` score the whole predictive, not an interval:
    they do not depend on the level and repeat on every row, so that each row (e.g.
    of a CSV) stands alone; print them once with
    ``table[["n", "rmse", "crps"]].iloc[0]``.

    Args:
        draws: predictive draws ``(chain, draw, *shape)``.
        observed: held-out observations of ``shape``.
        levels: nominal levels, each in (0, 1).
        sample_dims: 2 for ``(chain, draw, ...)``, 1 for ``(draw, ...)``.
        log_likelihood: pointwise log likelihood for an ``nlpd`` column (see `nlpd`).

    Returns:
        A ``pandas.DataFrame`` indexed by ``nominal``.

    Example:
        >>> rng = np.random.default_rng(1)
        >>> calibration_table(rng.normal(size=(1, 1000, 50)), rng.normal(size=50)).shape
        (2, 7)
    """
    import pandas as pd

    values = _levels(levels)
    flat, obs, valid = _prepare(draws, observed, sample_dims)
    ordered = np.sort(flat, axis=0)
    shared: dict[str, float] = {
        "n": int(valid.sum()),
        "rmse": rmse(flat, obs, sample_dims=1),
        "crps": crps(ordered, obs, sample_dims=1),
    }
    if log_likelihood is not None:
        shared["nlpd"] = nlpd(
            draws, observed, log_likelihood=log_likelihood, sample_dims=sample_dims
        )
    rows = []
    for level in values:
        row: dict[str, float] = {"nominal": level}
        for kind, suffix in (("central", ""), ("hdi", "_hdi")):
            lo, hi = _interval(ordered, level, kind)
            inside = ((obs >= lo) & (obs <= hi)).astype(float)
            row["coverage" + suffix] = _summarise(inside, valid, True, None)
            row["mean_width" + suffix] = _summarise(hi - lo, valid, True, None)
        rows.append({**row, **shared})
    columns = ["nominal", "coverage", "mean_width", "n", "rmse", "crps"]
    columns += ["coverage_hdi", "mean_width_hdi"] + (["nlpd"] if "nlpd" in shared else [])
    return pd.DataFrame(rows, columns=columns).set_index("nominal")
