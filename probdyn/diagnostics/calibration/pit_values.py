"""The probability integral transform of observations under predictive draws, and
its Kolmogorov–Smirnov uniformity test: `pit`, `pit_test` (NumPy; scipy imported lazily)."""

from __future__ import annotations

from typing import Any

import numpy as np

from probdyn.diagnostics.calibration.checks import _prepare, _rng


def pit(draws: Any, observed: Any, *, sample_dims: int = 2, key: Any = None) -> np.ndarray:
    """Probability integral transform: the predictive CDF at each observation.

    ``PIT = (#{x_s < y} + U * #{x_s = y}) / n`` with ``U ~ Uniform(0, 1)``: the
    empirical CDF of the ``n`` draws at ``y``, randomised between its left and right
    limits where draws tie with the observation (discrete predictives, rounded data).
    Without ties ``U`` is unused and the result is deterministic. For calibrated
    predictions the values are uniform on [0, 1]: a U-shaped histogram means too
    narrow predictions, a hump too wide ones, a slope a biased mean (see `plot_pit`).

    Args:
        draws: predictive draws ``(chain, draw, *shape)``.
        observed: held-out observations of ``shape``; NaN marks a missing one.
        sample_dims: 2 for ``(chain, draw, ...)``, 1 for ``(draw, ...)``.
        key: int seed or ``numpy.random.Generator`` for ``U`` (None: seed 0, so the
            result is reproducible).

    Returns:
        PIT values, an array of ``shape`` in [0, 1] (NaN for missing observations).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> u = pit(rng.normal(size=(1, 1000, 200)), rng.normal(size=200))
        >>> u.shape, bool(0 <= u.min() and u.max() <= 1)
        ((200,), True)
    """
    flat, obs, valid = _prepare(draws, observed, sample_dims)
    rng = _rng(key)
    below = np.sum(flat < obs, axis=0).astype(float)
    ties = np.sum(flat == obs, axis=0)
    if np.any(ties):
        below = below + rng.uniform(size=obs.shape) * ties
    return np.where(valid, below / flat.shape[0], np.nan)


def pit_test(pit_values: Any) -> tuple[float, float]:
    """Kolmogorov–Smirnov test of PIT values against Uniform(0, 1).

    Uses `scipy.stats.kstest`. NaN values (missing observations) are dropped. The
    p-value assumes independent PIT values: along a trajectory, PIT values of
    neighbouring time points (and of the output dimensions of one time point) are
    dependent, so the p-value is then too small; test one time point per trajectory
    or treat the p-value as a descriptive score. With ``n`` draws the PIT takes values
    on a grid of step ``1 / n``, which makes the test slightly conservative.

    Args:
        pit_values: PIT values from `pit`, any shape.

    Returns:
        ``(statistic, p_value)``: the largest distance between the empirical CDF of the
        values and the uniform CDF, and its p-value (small: not uniform).

    Raises:
        ValueError: if there is no PIT value or a value lies outside [0, 1].

    Example:
        >>> stat, p = pit_test(np.random.default_rng(0).uniform(size=500))
        >>> p > 0.01
        True
    """
    from scipy import stats

    values = np.asarray(pit_values, dtype=float).ravel()
    values = values[~np.isnan(values)]
    if values.size == 0:
        raise ValueError("pit_values holds no (non-NaN) value; pass the output of pit().")
    if values.min() < 0 or values.max() > 1:
        raise ValueError(
            f"pit_values range from {values.min()} to {values.max()}; PIT values lie in "
            "[0, 1] (pass the output of pit())."
        )
    result = stats.kstest(values, "uniform")
    return float(result.statistic), float(result.pvalue)
