"""Calibration of predictive draws against held-out observations (NumPy only).

Every function takes predictive draws in the posterior layout, ``(chain, draw,
*shape)`` (set ``sample_dims=1`` for ``(draw, *shape)``), and observations of
``shape``, e.g. ``post.predict(x_test, sites=["y"])["y"]`` and ``y_test``.

Conventions shared by all functions:

- ``reduce=True`` (default) averages over all observation elements and returns a
  float; ``reduce=False`` returns one value per element (an array of ``shape``).
- ``axis`` (an int or a tuple of axes of ``observed``) keeps those axes and
  averages over the others, e.g. ``axis=-1`` gives one value per output dimension
  and ``axis=0`` one per time point of a ``(time, dim)`` trajectory.
- Missing observations are NaN in ``observed``: they are left out of every mean
  (and are NaN in per-element results). Draws must not contain NaN.
- Lower is better for `crps`, `nlpd` and `rmse`; `coverage` should equal the
  nominal level and `pit` values should be uniform on [0, 1].

The guide ``docs/calibration.md`` explains how to read each metric and plot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "calibration_table",
    "coverage",
    "crps",
    "interval",
    "interval_width",
    "nlpd",
    "pit",
    "pit_test",
    "plot_pit",
    "plot_reliability",
    "rmse",
]

_KINDS = ("central", "hdi")
_Axis = int | tuple[int, ...] | None


# -- input checks and shared helpers ---------------------------------------------------------
def _check_sample_dims(sample_dims: int) -> None:
    if sample_dims not in (1, 2) or isinstance(sample_dims, bool):
        raise ValueError(
            f"sample_dims={sample_dims!r}: must be 1 (draws are (draw, *shape)) or "
            "2 (draws are (chain, draw, *shape))."
        )


def _as_draws(draws: Any, sample_dims: int, name: str = "draws") -> np.ndarray:
    """``(chain, draw, *shape)`` -> ``(chain * draw, *shape)``, checked."""
    _check_sample_dims(sample_dims)
    arr = np.asarray(draws, dtype=float)
    if arr.ndim < sample_dims:
        raise ValueError(
            f"{name} has shape {arr.shape} but sample_dims={sample_dims} leading sample "
            "dimensions are expected; pass (chain, draw, *shape) or set sample_dims=1."
        )
    flat = arr.reshape((-1, *arr.shape[sample_dims:]))
    if flat.shape[0] == 0:
        raise ValueError(f"{name} has shape {arr.shape}: it holds no draws.")
    if np.isnan(flat).any():
        raise ValueError(
            f"{name} contain {int(np.isnan(flat).sum())} NaN values; drop the failed draws "
            "(or the affected elements) before scoring."
        )
    return flat


def _prepare(
    draws: Any, observed: Any, sample_dims: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattened draws, observations and the mask of observed (non-NaN) elements."""
    flat = _as_draws(draws, sample_dims)
    obs = np.asarray(observed, dtype=float)
    if flat.shape[1:] != obs.shape:
        raise ValueError(
            f"draws have event shape {flat.shape[1:]} but observed has shape {obs.shape}; "
            f"they must match (draws are (chain, draw, *shape) with sample_dims={sample_dims})."
        )
    return flat, obs, ~np.isnan(obs)


def _check_level(level: Any) -> float:
    value = float(level)
    if not 0 < value < 1:
        raise ValueError(f"level={level!r}: must be in (0, 1), e.g. 0.9 for a 90 % interval.")
    return value


def _levels(levels: float | Sequence[float]) -> tuple[float, ...]:
    values = (levels,) if np.ndim(levels) == 0 else tuple(np.asarray(levels).ravel())
    if not values:
        raise ValueError("levels=(): give at least one level in (0, 1), e.g. (0.5, 0.9).")
    bad = [float(v) for v in values if not 0 < float(v) < 1]
    if bad:
        raise ValueError(f"levels={levels!r}: {bad} outside (0, 1); use e.g. (0.5, 0.9, 0.95).")
    return tuple(float(v) for v in values)


def _check_kind(kind: str) -> str:
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r}: must be 'central' (equal tails) or 'hdi' (shortest).")
    return kind


def _keep_axes(axis: _Axis, ndim: int) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis or ())
    if axes and ndim == 0:
        raise ValueError(f"axis={axis!r}: the observations are scalars; drop axis.")
    out = []
    for a in axes:
        if not -ndim <= int(a) < ndim:
            raise ValueError(
                f"axis={axis!r}: axis {a} is out of range for observations with {ndim} "
                f"dimensions; use axes in [-{ndim}, {ndim - 1}]."
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis={axis!r}: repeated axis; give each axis once.")
    return tuple(sorted(out))


def _summarise(values: np.ndarray, valid: np.ndarray, reduce: bool, axis: _Axis) -> Any:
    """Per-element values -> mean over valid elements (all, or all but ``axis``)."""
    if not reduce:
        if axis is not None:
            raise ValueError(
                f"axis={axis!r} with reduce=False: axis selects the dimensions kept by the "
                "mean, so it needs reduce=True (reduce=False returns every element)."
            )
        return np.where(valid, values, np.nan)
    keep = _keep_axes(axis, values.ndim) if axis is not None else ()
    over = tuple(a for a in range(values.ndim) if a not in keep)
    total = np.where(valid, values, 0.0).sum(axis=over)
    count = np.sum(valid, axis=over)
    # No "mean of empty slice" warning: a slice with no observation is NaN.
    mean = np.divide(total, count, out=np.full(np.shape(total), np.nan), where=count > 0)
    return float(mean) if axis is None else mean


def _logmeanexp(values: np.ndarray) -> np.ndarray:
    """``log mean_s exp(values[s])`` over axis 0, stable for very negative values."""
    top = np.max(values, axis=0)
    shift = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):  # all -inf -> log(0) = -inf, intended
        return np.log(np.mean(np.exp(values - shift), axis=0)) + shift


def _rng(key: Any) -> np.random.Generator:
    if key is None:
        return np.random.default_rng(0)
    if isinstance(key, np.random.Generator):
        return key
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return np.random.default_rng(int(key))
    raise TypeError(f"key={key!r}: pass an int seed or a numpy.random.Generator.")


# -- intervals and coverage ------------------------------------------------------------------
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


# -- probability integral transform --------------------------------------------------------
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


# -- scores ----------------------------------------------------------------------------------
def rmse(
    draws: Any, observed: Any, *, sample_dims: int = 2, axis: int | tuple[int, ...] | None = None
) -> Any:
    """Root-mean-square error of the predictive mean.

    Args:
        draws: predictive draws ``(chain, draw, *shape)``.
        observed: held-out observations of ``shape``; NaN marks a missing one.
        sample_dims: 2 for ``(chain, draw, ...)``, 1 for ``(draw, ...)``.
        axis: axes of ``observed`` to keep (the mean square is taken over the others).

    Returns:
        A float, or an array of the kept axes.

    Example:
        >>> rmse(np.zeros((1, 10, 3)), np.array([3.0, 0.0, 0.0]))
        1.7320508075688772
    """
    flat, obs, valid = _prepare(draws, observed, sample_dims)
    mse = _summarise((flat.mean(axis=0) - obs) ** 2, valid, True, axis)
    return math.sqrt(mse) if axis is None else np.sqrt(mse)


def crps(
    draws: Any,
    observed: Any,
    *,
    sample_dims: int = 2,
    reduce: bool = True,
    axis: int | tuple[int, ...] | None = None,
) -> Any:
    """Continuous ranked probability score, unbiased sample estimator (lower is better).

    ``CRPS = E|X - y| - E|X - X'| / 2`` with the second expectation over distinct
    pairs of draws, computed in O(n log n) per element from sorted draws. It is in the
    units of the data and rewards both calibration and sharpness; for a point
    prediction it reduces to the absolute error.

    Args:
        draws: predictive draws ``(chain, draw, *shape)``, at least two.
        observed: held-out observations of ``shape``; NaN marks a missing one.
        sample_dims: 2 for ``(chain, draw, ...)``, 1 for ``(draw, ...)``.
        reduce: mean over elements (True) or the score per element (False).
        axis: axes of ``observed`` to keep.

    Returns:
        A float, or an array with ``axis`` or ``reduce=False``.

    Raises:
        ValueError: with fewer than two draws, or mismatched shapes.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> score = crps(rng.normal(size=(1, 4000, 100)), np.zeros(100))
        >>> bool(abs(score - (np.sqrt(2) - 1) / np.sqrt(np.pi)) < 0.01)
        True
    """
    flat, obs, valid = _prepare(draws, observed, sample_dims)
    n = flat.shape[0]
    if n < 2:
        raise ValueError(f"crps needs at least two draws; draws hold {n}.")
    term1 = np.abs(flat - obs).mean(axis=0)
    x = np.sort(flat, axis=0)
    # sum_{i<j} (x_j - x_i) = sum_k (2k - n + 1) x_k for sorted x (k = 0..n-1)
    weights = (2 * np.arange(n) - n + 1).reshape((n,) + (1,) * (x.ndim - 1))
    pair_mean = 2 * (weights * x).sum(axis=0) / (n * (n - 1))
    return _summarise(term1 - pair_mean / 2, valid, reduce, axis)


def _silverman(flat: np.ndarray) -> np.ndarray:
    """Silverman's rule ``0.9 * min(sd, IQR / 1.349) * n^(-1/5)`` per element."""
    sd = flat.std(axis=0, ddof=1)
    q25, q75 = np.quantile(flat, [0.25, 0.75], axis=0)
    iqr = q75 - q25
    # A zero IQR (more than half the draws equal) would give a zero bandwidth: use sd.
    spread = np.where(iqr > 0, np.minimum(sd, iqr / 1.349), sd)
    return 0.9 * spread * flat.shape[0] ** -0.2


def _nlpd_kde(flat: np.ndarray, obs: np.ndarray, bandwidth: Any) -> np.ndarray:
    if flat.shape[0] < 2:
        raise ValueError("nlpd without log_likelihood needs at least two draws for a density.")
    if bandwidth is None:
        h = _silverman(flat)
    else:
        h = np.broadcast_to(np.asarray(bandwidth, dtype=float), obs.shape)
        if not np.all(np.isfinite(h) & (h > 0)):
            raise ValueError(f"bandwidth={bandwidth!r}: must be positive and finite.")
    degenerate = h <= 0  # all draws equal: a point mass has no density
    h_safe = np.where(degenerate, 1.0, h)
    log_kernel = -0.5 * ((obs - flat) / h_safe) ** 2
    log_density = _logmeanexp(log_kernel) - np.log(h_safe) - 0.5 * math.log(2 * math.pi)
    return np.where(degenerate, np.inf, -log_density)


def _nlpd_exact(
    draws: Any, observed: Any, log_likelihood: Any, sample_dims: int
) -> tuple[np.ndarray, np.ndarray]:
    ll = _as_draws(log_likelihood, sample_dims, name="log_likelihood")
    obs = np.asarray(observed, dtype=float)
    event = ll.shape[1:]
    if obs.shape[: len(event)] != event:
        raise ValueError(
            f"log_likelihood has event shape {event} but observed has shape {obs.shape}; "
            "they must match, or the log likelihood's shape must be the leading part of "
            "observed's (when the model sums trailing event dimensions)."
        )
    if draws is not None:
        flat, _, _ = _prepare(draws, observed, sample_dims)
        if flat.shape[0] != ll.shape[0]:
            raise ValueError(
                f"draws hold {flat.shape[0]} draws but log_likelihood holds {ll.shape[0]}; "
                "compute both from the same posterior draws."
            )
    missing = np.isnan(obs)
    if obs.ndim > len(event):
        missing = missing.all(axis=tuple(range(len(event), obs.ndim)))
    return -_logmeanexp(ll), ~missing


def nlpd(
    draws: Any,
    observed: Any,
    *,
    log_likelihood: Any = None,
    sample_dims: int = 2,
    reduce: bool = True,
    axis: int | tuple[int, ...] | None = None,
    bandwidth: Any = None,
) -> Any:
    """Negative log predictive density of the observations (lower is better).

    With ``log_likelihood`` (per draw ``s``, the log density ``ll_s`` of each
    observation under the model's observation distribution, e.g. from
    ``post.log_likelihood_at(x_test, y_test)``) the posterior predictive density is
    the mean over draws, so the score is exact up to Monte-Carlo error:

    ``NLPD = -log( (1/S) sum_s exp(ll_s) )``, computed with a log-sum-exp shift, so
    very negative log likelihoods do not underflow.

    Without ``log_likelihood`` the density is estimated from the predictive draws by a
    Gaussian kernel density estimate per element, with Silverman's bandwidth
    ``h = 0.9 * min(sd, IQR / 1.349) * S^(-1/5)`` (``sd`` with ``ddof=1``; the IQR is
    skipped when zero). It smooths the predictive (adds ``h^2`` to its variance) and is
    less accurate in the tails and for discrete data; prefer the exact form. An
    element whose draws are all equal has no density: its NLPD is ``inf``.

    Args:
        draws: predictive draws ``(chain, draw, *shape)``; with ``log_likelihood`` only
            used to check shapes (may be None).
        observed: held-out observations of ``shape``; NaN marks a missing one.
        log_likelihood: pointwise log likelihood ``(chain, draw, *shape)``; its shape
            may be a leading part of ``shape`` when the model sums event dimensions
            (the result then has that shape).
        sample_dims: 2 for ``(chain, draw, ...)``, 1 for ``(draw, ...)``.
        reduce: mean over elements (True) or the score per element (False).
        axis: axes of the per-element result to keep.
        bandwidth: kernel bandwidth (a float, or an array broadcastable to ``shape``) for
            the kernel estimate instead of Silverman's rule.

    Returns:
        A float, or an array with ``axis`` or ``reduce=False``.

    Raises:
        ValueError: for mismatched shapes, NaN in ``log_likelihood``, a non-positive
            ``bandwidth``, or ``bandwidth`` together with ``log_likelihood``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> y = rng.normal(size=200)
        >>> theta = rng.normal(0.0, 0.1, size=(1, 1000, 1))  # posterior draws of a mean
        >>> ll = -0.5 * (y - theta) ** 2 - 0.5 * np.log(2 * np.pi)  # y ~ N(theta, 1)
        >>> exact = nlpd(None, y, log_likelihood=ll)
        >>> kde = nlpd(theta + rng.normal(size=(1, 1000, 200)), y)  # predictive draws
        >>> abs(exact - kde) < 0.05
        True
    """
    if log_likelihood is not None:
        if bandwidth is not None:
            raise ValueError(
                f"bandwidth={bandwidth!r} with log_likelihood: the bandwidth is for the kernel "
                "density estimate used without log_likelihood; drop one of them."
            )
        values, valid = _nlpd_exact(draws, observed, log_likelihood, sample_dims)
    else:
        if draws is None:
            raise ValueError("draws=None: pass predictive draws, or log_likelihood.")
        flat, obs, valid = _prepare(draws, observed, sample_dims)
        values = _nlpd_kde(flat, obs, bandwidth)
    return _summarise(values, valid, reduce, axis)


# -- table -----------------------------------------------------------------------------------
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


# -- plots -----------------------------------------------------------------------------------
def _new_axes(ax: Axes | None) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(4.5, 4))[1]


def _check_band(band: float) -> float:
    if not 0 < float(band) < 1:
        raise ValueError(f"band={band!r}: must be in (0, 1), e.g. 0.95.")
    return float(band)


def plot_reliability(
    draws: Any,
    observed: Any,
    levels: float | Sequence[float] | None = None,
    *,
    kind: str = "central",
    sample_dims: int = 2,
    band: float = 0.95,
    ax: Axes | None = None,
) -> Axes:
    """Reliability diagram: empirical coverage against nominal level.

    A calibrated predictive lies on the diagonal. The shaded band is where the
    coverage of a calibrated predictive falls with probability ``band`` at each level
    (pointwise): the central ``band`` range of ``Binomial(n, level) / n`` for the ``n``
    observed elements, assuming independent observations (dependent ones, e.g. along
    a trajectory, scatter more). Points below the band: intervals too narrow
    (overconfident); above: too wide.

    Args:
        draws: predictive draws ``(chain, draw, *shape)``.
        observed: held-out observations of ``shape``; NaN marks a missing one.
        levels: nominal levels (default 0.05, 0.10, ..., 0.95).
        kind: ``"central"`` or ``"hdi"`` intervals.
        sample_dims: 2 for ``(chain, draw, ...)``, 1 for ``(draw, ...)``.
        band: probability of the binomial band.
        ax: matplotlib Axes to draw into (default: a new figure).

    Returns:
        The matplotlib Axes.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> ax = plot_reliability(rng.normal(size=(1, 1000, 300)), rng.normal(size=300))
        >>> ax.get_xlabel()
        'nominal level'
    """
    from scipy import stats

    band = _check_band(band)
    default = tuple(round(k / 20, 2) for k in range(1, 20))  # 0.05, 0.10, ..., 0.95
    grid = _levels(default if levels is None else levels)
    cov = coverage(draws, observed, grid, kind=kind, sample_dims=sample_dims)
    n = int(np.sum(~np.isnan(np.asarray(observed, dtype=float))))
    nominal = np.array(grid)
    order = np.argsort(nominal)
    nominal = nominal[order]
    empirical = np.array([cov[level] for level in grid])[order]
    tail = (1 - band) / 2
    lo = stats.binom.ppf(tail, n, nominal) / n
    hi = stats.binom.ppf(1 - tail, n, nominal) / n
    ax = _new_axes(ax)
    ax.fill_between(nominal, lo, hi, color="0.85", label=f"{band:.0%} band if calibrated (n={n})")
    ax.plot([0, 1], [0, 1], color="0.4", lw=1, ls="--")
    ax.plot(nominal, empirical, "o-", color="C0", label=f"{kind} intervals")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="nominal level", ylabel="empirical coverage")
    ax.set_title("Reliability")
    ax.legend(loc="upper left", fontsize="small")
    return ax


def plot_pit(
    pit_values: Any, bins: int = 20, *, band: float = 0.95, ax: Axes | None = None
) -> Axes:
    """Histogram of PIT values with a simultaneous band for uniform counts.

    Under calibration each bin count is ``Binomial(N, 1 / bins)`` for ``N`` PIT
    values. The band is simultaneous over the bins by a Bonferroni correction: each
    bin's limits are its ``(1 - band) / (2 * bins)`` and ``1 - (1 - band) / (2 * bins)``
    binomial quantiles, so all bins of a calibrated predictive lie inside with
    probability at least ``band`` (for independent values). U shape: too narrow
    predictions; hump: too wide; slope: biased. NaN values are dropped.

    Args:
        pit_values: PIT values from `pit`, any shape.
        bins: number of equal-width bins on [0, 1].
        band: simultaneous probability of the band.
        ax: matplotlib Axes to draw into (default: a new figure).

    Returns:
        The matplotlib Axes.

    Raises:
        ValueError: for no values, values outside [0, 1], ``bins < 1`` or a band
            outside (0, 1).

    Example:
        >>> ax = plot_pit(np.random.default_rng(0).uniform(size=500), bins=10)
        >>> len(ax.patches) >= 10
        True
    """
    from scipy import stats

    band = _check_band(band)
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins={bins!r}: must be a positive integer, e.g. 20.")
    values = np.asarray(pit_values, dtype=float).ravel()
    values = values[~np.isnan(values)]
    if values.size == 0 or values.min() < 0 or values.max() > 1:
        raise ValueError("pit_values must hold at least one value, all in [0, 1] (see pit()).")
    n = values.size
    counts, edges = np.histogram(values, bins=int(bins), range=(0.0, 1.0))
    tail = (1 - band) / (2 * bins)
    lo, hi = stats.binom.ppf([tail, 1 - tail], n, 1 / bins)
    ax = _new_axes(ax)
    ax.axhspan(lo, hi, color="0.85", label=f"{band:.0%} simultaneous band")
    ax.axhline(n / bins, color="0.4", lw=1, ls="--")
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="C0", alpha=0.8)
    ax.set(xlim=(0, 1), xlabel="PIT value", ylabel="count")
    ax.set_title(f"PIT histogram (N={n})")
    ax.legend(loc="upper center", fontsize="small")
    return ax
