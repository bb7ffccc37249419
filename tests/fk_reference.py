"""Exact targets of Feynman–Kac SMC on conjugate models (shared by the backends' tests).

Jittering the particles by a Gaussian random walk of variance ``RW_VARIANCE``
before each batch makes the cloud a particle filter of the state-space model
``phi_t = phi_{t-1} + N(0, RW_VARIANCE)`` observed through the batches; for
conjugate Gaussian models that filter is a Kalman filter, fed the same batches
(``traces["batch_index"]``), so it gives the exact mean and sd the cloud estimates.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

RW_VARIANCE = 1e-2  # SMC().jitter ** 2, the default


def kalman_normal(
    y: np.ndarray, batches: np.ndarray, variance: float = RW_VARIANCE
) -> tuple[float, float]:
    """Mean and sd after filtering ``batches`` of ``y``, prior N(0, 2^2), noise 1."""
    m, v = 0.0, 4.0
    for idx in batches:
        v = v + variance
        precision = 1 / v + len(idx)
        m, v = (m / v + y[idx].sum()) / precision, 1 / precision
    return m, float(np.sqrt(v))


def kalman_blr(
    x: np.ndarray, y: np.ndarray, batches: np.ndarray, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """`kalman_normal` for the linear regression: prior N(0, I), weights random-walk."""
    m, cov = np.zeros(x.shape[1]), np.eye(x.shape[1])
    for idx in batches:
        cov = cov + RW_VARIANCE * np.eye(len(m))
        xb = x[idx]
        new = np.linalg.inv(np.linalg.inv(cov) + xb.T @ xb / noise**2)
        m, cov = new @ (np.linalg.solve(cov, m) + xb.T @ y[idx] / noise**2), new
    return m, np.sqrt(np.diag(cov))


# -- the 1-D partial-BNN toy problem of Zhao et al. ------------------------------------
def toy_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-6.0, 6.0, n)
    return x, x * np.sin(x * np.tanh(x)) + rng.standard_normal(n)


def gaussian_nlpd(means: np.ndarray, y: np.ndarray) -> float:
    """Monte-Carlo NLPD: mean over points of -log mean over draws of N(y; f, 1)."""
    means = means.reshape(-1, len(y))
    lp = -0.5 * np.log(2 * np.pi) - 0.5 * (y - means) ** 2
    return float(-np.mean(logsumexp(lp, axis=0) - np.log(len(means))))
