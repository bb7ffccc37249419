"""Known answers for the NeuralSDE tests (NumPy only, shared by the backends' tests).

The closed forms (geometric Brownian motion, Ornstein–Uhlenbeck) the solvers are
checked against, the least-squares log-log slope that estimates a strong order with
its Monte-Carlo standard error, and the small pieces the strong-order and
weak-moment tests of both backends share.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from probdyn.primitives.sde import time_grid


def gbm_solution(z0: Any, mu: float, sigma: float, t: Any, w: Any) -> np.ndarray:
    """Geometric Brownian motion ``dZ = mu Z dt + sigma Z dW`` driven by the path ``w``.

    ``Z(t) = z0 exp((mu - sigma**2 / 2) t + sigma W(t))`` (Itô), with ``W(t) = w``
    (``W(0) = 0``), element by element.

    Example:
        >>> float(gbm_solution(1.0, 0.5, 0.0, 2.0, 0.0))  # e^(0.5 * 2)
        2.718281828459045
    """
    t, w = np.asarray(t, dtype=np.float64), np.asarray(w, dtype=np.float64)
    return np.asarray(z0) * np.exp((mu - 0.5 * sigma**2) * t + sigma * w)


def ou_mean_cov(
    times: Any, x0: float, theta: float, mu: float, sigma: float, t0: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the Ornstein–Uhlenbeck process at ``times``.

    ``dX = theta (mu - X) dt + sigma dW`` with ``X(t0) = x0`` is Gaussian, with
    mean ``mu + (x0 - mu) e^{-theta (t - t0)}`` and covariance
    ``sigma**2 / (2 theta) (e^{-theta |t - s|} - e^{-theta (t + s - 2 t0)})``.

    Example:
        >>> m, c = ou_mean_cov([1.0], x0=1.0, theta=1.0, mu=0.0, sigma=1.0)
        >>> round(float(m[0]), 6), round(float(c[0, 0]), 6)
        (0.367879, 0.432332)
    """
    t = np.asarray(times, dtype=np.float64) - t0
    mean = mu + (x0 - mu) * np.exp(-theta * t)
    s, u = t[:, None], t[None, :]
    cov = sigma**2 / (2 * theta) * (np.exp(-theta * np.abs(s - u)) - np.exp(-theta * (s + u)))
    return mean, cov


def log_log_slope(errors: Any, steps: Any) -> tuple[float, float]:
    """The least-squares slope of ``log mean(errors)`` against ``log steps``, and its
    Monte-Carlo standard error.

    The strong error at step ``h`` is estimated by the mean over paths of
    ``|Z_h(T) - Z(T)|``. The slope is a linear combination ``sum_j w_j log m_j`` of
    the log means; by the delta method its variance is ``g' C g / n`` with
    ``g_j = w_j / m_j`` and ``C`` the covariance of one path's errors across the
    step sizes (the same Brownian path drives every step size, so the errors are
    strongly correlated, which the covariance accounts for).

    Args:
        errors: ``(paths, len(steps))`` absolute errors, one column per step size.
        steps: the step sizes.

    Returns:
        ``(slope, standard_error)``.

    Example:
        >>> import numpy as np
        >>> h = np.array([0.1, 0.05, 0.025])
        >>> slope, se = log_log_slope(np.outer(np.linspace(1, 2, 50), h), h)
        >>> round(slope, 6), round(se, 6)
        (1.0, 0.0)
    """
    errors = np.asarray(errors, dtype=np.float64)
    x = np.log(np.asarray(steps, dtype=np.float64))
    weights = (x - x.mean()) / np.sum((x - x.mean()) ** 2)
    means = errors.mean(axis=0)
    slope = float(np.sum(weights * np.log(means)))
    grad = weights / means
    cov = np.cov(errors, rowvar=False) / errors.shape[0]
    return slope, float(np.sqrt(max(grad @ cov @ grad, 0.0)))


def coarsen(w: np.ndarray, u: np.ndarray, h_fine: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fine (W, U) -> standard normals of the coarse steps' W and Lévy area H.

    ``U_{s,t} = int_s^t (W_r - W_s) dr`` adds up as ``U_{s,t} = U_{s,u} + U_{u,t}
    + (t - u) W_{s,u}``; ``H = U / h - W / 2`` has variance ``h / 12``.

    Args:
        w: ``(steps, paths)`` fine Brownian increments.
        u: ``(steps, paths)`` their space-time integrals ``U``.
        h_fine: the fine step.
        k: fine steps per coarse step.
    """
    n = w.shape[0] // k
    wb, ub = w.reshape(n, k, -1), u.reshape(n, k, -1)
    after = h_fine * np.arange(k - 1, -1, -1)[None, :, None]  # time left in the block
    W = wb.sum(axis=1)
    U = ub.sum(axis=1) + (after * wb).sum(axis=1)
    h = h_fine * k
    return W / np.sqrt(h), (U / h - 0.5 * W) / np.sqrt(h / 12)


def ou_euler_chain_moments(
    times: np.ndarray, dt: float, x0: float, theta: float, mu: float, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and variance of the Euler chain of Ornstein–Uhlenbeck on probdyn's grid.

    Args:
        times: the output times (the chain starts at ``t0 = 0``).
        dt: the grid's largest step.
        x0: the start.
        theta: the rate of mean reversion.
        mu: the long-run mean.
        sigma: the volatility.
    """
    grid, index = time_grid(0.0, times, dt, 10_000)
    mean, var, means, variances = x0, 0.0, [x0], [0.0]
    for h in np.diff(grid):
        mean = mean + theta * (mu - mean) * h
        var = (1 - theta * h) ** 2 * var + sigma**2 * h
        means.append(mean)
        variances.append(var)
    return np.array(means)[index], np.array(variances)[index]
