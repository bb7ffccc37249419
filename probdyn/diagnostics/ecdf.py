"""The simultaneous ECDF uniformity test of Säilynoja, Bürkner and Vehtari (2022),
used by `probdyn.sbc` on fractional ranks: the test, its band, and a name for the
dominant departure from uniform."""

from __future__ import annotations

import functools
import math

import numpy as np

_NULL_REPLICATES = 10_000


def _grid_size(n: int) -> int:
    """Evaluation points of the ECDF test: ``z_i = i / K`` with ``K = min(n, 100)``."""
    return max(2, min(n, 100))


def _ecdf_counts(u: np.ndarray, k: int) -> np.ndarray:
    """``n * ECDF(z_i)`` at ``z_i = i / k``, ``i = 0..k``."""
    bins = np.minimum((np.asarray(u) * k).astype(int), k - 1)
    return np.concatenate([[0], np.cumsum(np.bincount(bins, minlength=k))])


@functools.lru_cache(maxsize=32)
def _pointwise_table(n: int, k: int) -> np.ndarray:
    """Two-sided binomial tail probability of every count ``c = 0..n`` at every
    interior grid point ``z_i``: ``2 min(P(C <= c), P(C >= c))``, ``C ~ Bin(n, z_i)``."""
    from scipy import stats

    z = (np.arange(1, k) / k)[:, None]
    c = np.arange(n + 1)[None, :]
    return np.minimum(1.0, 2 * np.minimum(stats.binom.cdf(c, n, z), stats.binom.sf(c - 1, n, z)))


@functools.lru_cache(maxsize=32)
def _null_gamma(n: int, k: int) -> np.ndarray:
    """Sorted statistics of ``_NULL_REPLICATES`` uniform samples of size ``n``.

    The ECDF of a uniform sample at an even grid is a cumulative multinomial count,
    so the null is simulated from bin counts directly (fixed seed: reproducible).
    """
    rng = np.random.default_rng(20220304)
    counts = np.cumsum(rng.multinomial(n, np.full(k, 1 / k), size=_NULL_REPLICATES), axis=1)
    table = _pointwise_table(n, k)
    return np.sort(table[np.arange(k - 1), counts[:, :-1]].min(axis=1))


def ecdf_test(u: np.ndarray) -> tuple[float, float]:
    """Simultaneous ECDF uniformity test of fractional ranks ``u`` in (0, 1).

    Statistic ``gamma``: the smallest two-sided binomial tail probability of the
    ECDF counts on the grid ``z_i = i / K`` (Säilynoja et al., 2022). Its p-value
    ``P(gamma_0 <= gamma)`` under uniformity is estimated from 10,000 simulated
    uniform samples of the same size (resolution ``1e-4``).
    """
    n = len(u)
    k = _grid_size(n)
    counts = _ecdf_counts(u, k)[1:-1]
    gamma = float(_pointwise_table(n, k)[np.arange(k - 1), counts].min())
    null = _null_gamma(n, k)
    p_value = (1 + np.searchsorted(null, gamma, side="right")) / (len(null) + 1)
    return gamma, float(p_value)


def ecdf_band(n: int, k: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Simultaneous ``level`` band of ``n * ECDF(z_i)``, ``i = 0..k``, for a uniform
    sample of size ``n``: the counts whose pointwise tail probability is at least
    the ``1 - level`` quantile of the null ``gamma``."""
    null = _null_gamma(n, k)
    cut = null[int(np.floor((1 - level) * len(null)))]
    ok = _pointwise_table(n, k) >= cut
    lo = np.concatenate([[0], ok.argmax(axis=1), [n]])
    hi = np.concatenate([[0], n - ok[:, ::-1].argmax(axis=1), [n]])
    return lo.astype(float), hi.astype(float)


def _pattern(u: np.ndarray) -> str:
    """Which departure from uniform dominates, in standard errors under uniformity:
    the mean (``var = 1/12``) or the variance (``var((u - 1/2)**2) = 1/180``).
    Neither beyond 2 standard errors: a local departure the plots show."""
    n = len(u)
    z_mean = (u.mean() - 0.5) / math.sqrt(1 / (12 * n))
    z_var = (np.mean((u - 0.5) ** 2) - 1 / 12) / math.sqrt(1 / (180 * n))
    if max(abs(z_mean), abs(z_var)) < 2:
        return "other (see plot_ecdf)"
    if abs(z_mean) >= abs(z_var):
        return "biased low" if z_mean > 0 else "biased high"
    return "too narrow" if z_var > 0 else "too wide"
