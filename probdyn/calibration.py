"""Calibration of predictive draws against held-out observations (NumPy only).

Every function takes predictive draws in the posterior layout, ``(chain, draw,
*shape)`` (set ``sample_dims=1`` for ``(draw, *shape)``), and observations of
``shape``. Results are averaged over all observation elements unless
``reduce=False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["calibration_table", "coverage", "crps", "interval", "rmse"]


def _flatten(draws: Any, observed: Any, sample_dims: int) -> tuple[np.ndarray, np.ndarray]:
    draws = np.asarray(draws, dtype=float)
    observed = np.asarray(observed, dtype=float)
    if sample_dims not in (1, 2):
        raise ValueError(f"sample_dims={sample_dims!r}: must be 1 (draw) or 2 (chain, draw).")
    flat = draws.reshape((-1, *draws.shape[sample_dims:]))
    if flat.shape[1:] != observed.shape:
        raise ValueError(
            f"draws have event shape {flat.shape[1:]} but observed has shape {observed.shape}; "
            "they must match (draws are (chain, draw, *shape))."
        )
    return flat, observed


def interval(
    draws: Any, level: float = 0.9, *, sample_dims: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Central credible interval of the draws at ``level`` (per element).

    Example:
        >>> lo, hi = interval(np.random.default_rng(0).normal(size=(2, 500, 3)), 0.9)
        >>> lo.shape
        (3,)
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level!r}: must be in (0, 1).")
    draws = np.asarray(draws, dtype=float)
    flat = draws.reshape((-1, *draws.shape[sample_dims:]))
    lo, hi = np.quantile(flat, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return lo, hi


def coverage(
    draws: Any,
    observed: Any,
    levels: Sequence[float] = (0.5, 0.9),
    *,
    sample_dims: int = 2,
    reduce: bool = True,
) -> dict[float, Any]:
    """Fraction of observations inside the central interval, for each level.

    For calibrated predictions the coverage equals the nominal level up to
    binomial error.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> cov = coverage(rng.normal(size=(1, 4000, 500)), rng.normal(size=500))
        >>> abs(cov[0.9] - 0.9) < 0.05
        True
    """
    flat, obs = _flatten(draws, observed, sample_dims)
    out = {}
    for level in levels:
        lo, hi = interval(flat, level, sample_dims=1)
        inside = (obs >= lo) & (obs <= hi)
        out[float(level)] = float(inside.mean()) if reduce else inside
    return out


def rmse(draws: Any, observed: Any, *, sample_dims: int = 2) -> float:
    """Root-mean-square error of the predictive mean."""
    flat, obs = _flatten(draws, observed, sample_dims)
    return float(np.sqrt(np.mean((flat.mean(axis=0) - obs) ** 2)))


def crps(draws: Any, observed: Any, *, sample_dims: int = 2, reduce: bool = True) -> Any:
    """Continuous ranked probability score, unbiased sample estimator (lower is better).

    ``CRPS = E|X - y| - E|X - X'| / 2`` with the second expectation over distinct
    pairs of draws, computed in O(n log n) per element from sorted draws.
    """
    flat, obs = _flatten(draws, observed, sample_dims)
    n = flat.shape[0]
    if n < 2:
        raise ValueError("crps needs at least two draws.")
    term1 = np.abs(flat - obs).mean(axis=0)
    x = np.sort(flat, axis=0)
    # sum_{i<j} (x_j - x_i) = sum_k (2k - n + 1) x_k for sorted x (k = 0..n-1)
    weights = (2 * np.arange(n) - n + 1).reshape((n,) + (1,) * (x.ndim - 1))
    pair_mean = 2 * (weights * x).sum(axis=0) / (n * (n - 1))
    score = term1 - pair_mean / 2
    return float(score.mean()) if reduce else score


def calibration_table(
    draws: Any, observed: Any, levels: Sequence[float] = (0.5, 0.9), *, sample_dims: int = 2
):  # type: ignore[no-untyped-def]
    """A table (pandas DataFrame) of coverage and mean interval width per level,
    with RMSE and CRPS of the same draws.

    Example:
        >>> rng = np.random.default_rng(1)
        >>> calibration_table(rng.normal(size=(1, 1000, 50)), rng.normal(size=50)).shape
        (2, 5)
    """
    import pandas as pd

    flat, obs = _flatten(draws, observed, sample_dims)
    cov = coverage(flat, obs, levels, sample_dims=1)
    rows = []
    for level in levels:
        lo, hi = interval(flat, level, sample_dims=1)
        rows.append(
            {
                "nominal": float(level),
                "coverage": cov[float(level)],
                "mean_width": float(np.mean(hi - lo)),
                "n": int(obs.size),
                "rmse": rmse(flat, obs, sample_dims=1),
                "crps": crps(flat, obs, sample_dims=1),
            }
        )
    return pd.DataFrame(rows).set_index("nominal")
