"""Credible intervals of predictive draws, central or highest-density, and what they
cover: `interval`, `coverage`, `interval_width` (NumPy only)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from probdyn.diagnostics.calibration.checks import (
    _as_draws,
    _check_kind,
    _check_level,
    _levels,
    _prepare,
    _summarise,
)


def _hdi(sorted_draws: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    n = sorted_draws.shape[0]
    # Smallest number of draws holding at least ``level`` of them; the tolerance keeps
    # e.g. 0.7 * 10 = 7.000000000000001 from rounding up to 8.
    m = max(1, math.ceil(level * n - 1e-9))
    widths = sorted_draws[m - 1 :] - sorted_draws[: n - m + 1]
    start = np.argmin(widths, axis=0)[None]
    lo = np.take_along_axis(sorted_draws, start, axis=0)[0]
    hi = np.take_along_axis(sorted_draws, start + m - 1, axis=0)[0]
    return lo, hi


def _interval(flat: np.ndarray, level: float, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``flat`` must be sorted along axis 0 when ``kind == 'hdi'``."""
    if kind == "hdi":
        return _hdi(flat, level)
    lo, hi = np.quantile(flat, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return lo, hi


def interval(
    draws: Any, level: float = 0.9, *, kind: str = "central", sample_dims: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Credible interval of the draws at ``level``, per element.

    ``kind="central"``: the equal-tailed interval between the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles (linear interpolation, as `numpy.quantile`).
    ``kind="hdi"``: the highest-density interval, i.e. the shortest interval
    ``[x_(i), x_(i+m-1)]`` of the sorted draws that holds ``m = ceil(level * n)`` of the
    ``n`` draws. For a skewed or bounded predictive it is shorter than the central
    interval at the same level; for a multimodal one it still is a single interval.

    Args:
        draws: predictive draws ``(chain, draw, *shape)``.
        level: probability mass inside the interval, in (0, 1).
        kind: ``"central"`` or ``"hdi"``.
        sample_dims: 2 for ``(chain, draw, ...)``, 1 for ``(draw, ...)``.

    Returns:
        ``(lo, hi)``, two arrays of ``shape``.

    Raises:
        ValueError: for a level outside (0, 1), an unknown kind, NaN draws or a bad
            ``sample_dims``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> lo, hi = interval(rng.normal(size=(2, 500, 3)), 0.9)
        >>> lo.shape
        (3,)
        >>> x = rng.exponential(size=(1, 4000))  # skewed: the HDI is shorter
        >>> lo, hi = interval(x, 0.9, kind="hdi")
        >>> c_lo, c_hi = interval(x, 0.9)
        >>> bool(hi - lo < c_hi - c_lo)
        True
    """
    level = _check_level(level)
    kind = _check_kind(kind)
    flat = _as_draws(draws, sample_dims)
    if kind == "hdi":
        flat = np.sort(flat, axis=0)
    return _interval(flat, level, kind)


def coverage(
    draws: Any,
    observed: Any,
    levels: float | Sequence[float] = (0.5, 0.9, 0.95),
    *,
    kind: str = "central",
    sample_dims: int = 2,
    reduce: bool = True,
    axis: int | tuple[int, ...] | None = None,
) -> dict[float, Any]:
    """Fraction of observations inside the predictive interval, for each level.

    For calibrated predictions the coverage equals the nominal level up to binomial
    error, ``sqrt(level * (1 - level) / n)`` for ``n`` independent observations
    (observations along a trajectory are usually dependent, so the spread is larger).
    Coverage above the nominal level means too wide (underconfident) intervals, below
    means too narrow (overconfident) ones.

    Args:
        draws: predictive draws ``(chain, draw, *shape)``.
        observed: held-out observations of ``shape``; NaN marks a missing one.
        levels: one level or several, each in (0, 1).
        kind: ``"central"`` or ``"hdi"`` intervals (see `interval`).
        sample_dims: 2 for ``(chain, draw, ...)``, 1 for ``(draw, ...)``.
        reduce: average over elements (True) or return 1.0 / 0.0 per element (False;
            NaN for missing observations).
        axis: axes of ``observed`` to keep (e.g. ``-1``: per output dimension).

    Returns:
        ``{level: coverage}``, a float per level (an array with ``axis`` or
        ``reduce=False``).

    Raises:
        ValueError: for levels outside (0, 1), mismatched shapes, an unknown kind or a
            bad ``axis``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> cov = coverage(rng.normal(size=(1, 4000, 500)), rng.normal(size=500))
        >>> abs(cov[0.9] - 0.9) < 0.05
        True
    """
    kind = _check_kind(kind)
    values = _levels(levels)
    flat, obs, valid = _prepare(draws, observed, sample_dims)
    if kind == "hdi":
        flat = np.sort(flat, axis=0)
    out = {}
    for level in values:
        lo, hi = _interval(flat, level, kind)
        inside = ((obs >= lo) & (obs <= hi)).astype(float)
        out[level] = _summarise(inside, valid, reduce, axis)
    return out


def interval_width(
    draws: Any,
    level: float = 0.9,
    *,
    kind: str = "central",
    sample_dims: int = 2,
    reduce: bool = True,
    axis: int | tuple[int, ...] | None = None,
) -> Any:
    """Width ``hi - lo`` of the predictive interval at ``level`` (sharpness).

    Narrower is better only at the right coverage: compare widths of models whose
    `coverage` is close to nominal.

    Args:
        draws: predictive draws ``(chain, draw, *shape)``.
        level: probability mass inside the interval, in (0, 1).
        kind: ``"central"`` or ``"hdi"`` (see `interval`).
        sample_dims: 2 for ``(chain, draw, ...)``, 1 for ``(draw, ...)``.
        reduce: mean width over elements (True) or the width per element (False).
        axis: axes of the event shape to keep (e.g. ``-1``: per output dimension).

    Returns:
        The mean width (float), or an array with ``axis`` or ``reduce=False``.

    Example:
        >>> w = interval_width(np.random.default_rng(0).normal(size=(1, 20000, 2)), 0.9)
        >>> abs(w - 2 * 1.6449) < 0.1
        True
    """
    level = _check_level(level)
    kind = _check_kind(kind)
    flat = _as_draws(draws, sample_dims)
    if kind == "hdi":
        flat = np.sort(flat, axis=0)
    lo, hi = _interval(flat, level, kind)
    width = hi - lo
    return _summarise(width, np.ones(width.shape, dtype=bool), reduce, axis)
