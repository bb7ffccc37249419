"""Proper scores of predictive draws against observations (lower is better): `rmse`,
`crps` and `nlpd`, exact from a log likelihood or from a kernel density estimate (NumPy only)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from probdyn.diagnostics.calibration.checks import _as_draws, _logmeanexp, _prepare, _summarise


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
