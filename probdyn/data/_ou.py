"""An Ornstein–Uhlenbeck series with points dropped at random and its exact predictive (NumPy).

The process is ``dX = theta (mu - X) dt + sigma dW`` with ``X(0) = x0`` (issue #5:
``theta = 0.2, mu = 0, sigma = 0.1, x0 = 1`` on ``[0, 10]``). With a fixed start it
is a Gaussian process: mean ``mu + (x0 - mu) e^{-theta t}`` and covariance
``sigma**2 / (2 theta) (e^{-theta |t - s|} - e^{-theta (t + s)})``. So the
predictive of the dropped points given the kept ones is Gaussian in closed form
(`ou_oracle`), the best any model can do, and a yardstick for fitted SDEs.

NumPy only, so both backends can consume the same data.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import numpy as np

from probdyn.data._gp_tasks import _as_rng

__all__ = ["OUData", "OUPredictive", "ou_dataset", "ou_oracle"]


@dataclasses.dataclass(frozen=True)
class OUData:
    """An Ornstein–Uhlenbeck series observed on a regular grid, split into kept and dropped points.

    Observations are the exact process values plus independent Gaussian noise with
    sd ``noise_sd`` (exact values when ``noise_sd == 0``). The split is by index
    into ``times``; ``train_index`` and ``test_index`` are sorted and together
    hold every index once.

    Attributes:
        times: ``(num_points,)`` all observation times, ``t_k = k t_max / num_points``
            for ``k = 1..num_points`` (``x0`` is the known state at ``t = 0``).
        path: ``(num_points,)`` the process values at ``times`` (noise-free).
        y: ``(num_points,)`` the observations at ``times``.
        train_index, test_index: indices of the kept and the dropped points.
        theta, mu, sigma, x0: the process parameters.
        noise_sd: observation noise sd.
        drop: the fraction of points dropped, as requested.
    """

    times: np.ndarray
    path: np.ndarray
    y: np.ndarray
    train_index: np.ndarray
    test_index: np.ndarray
    theta: float
    mu: float
    sigma: float
    x0: float
    noise_sd: float
    drop: float

    @property
    def t_train(self) -> np.ndarray:
        """Times of the kept points."""
        return self.times[self.train_index]

    @property
    def y_train(self) -> np.ndarray:
        """Observations at the kept points."""
        return self.y[self.train_index]

    @property
    def t_test(self) -> np.ndarray:
        """Times of the dropped (held-out) points."""
        return self.times[self.test_index]

    @property
    def y_test(self) -> np.ndarray:
        """Observations at the dropped (held-out) points."""
        return self.y[self.test_index]

    @property
    def train_mask(self) -> np.ndarray:
        """``(num_points,)`` bool, True at the kept points."""
        mask = np.zeros(self.times.shape, dtype=bool)
        mask[self.train_index] = True
        return mask


@dataclasses.dataclass(frozen=True)
class OUPredictive:
    """The exact Gaussian predictive of the held-out observations given the kept ones.

    Attributes:
        mean: ``(n_test,)`` predictive mean of each held-out observation.
        cov: ``(n_test, n_test)`` joint predictive covariance (observation noise
            included on the diagonal).
        log_prob: ``(n_test,)`` log density of each held-out observation under its
            predictive marginal ``N(mean_i, cov_ii)``.
        crps: ``(n_test,)`` closed-form CRPS of each held-out observation under its
            predictive marginal.
        inside: ``(n_test,)`` bool, the observation lies in the central interval at
            ``level``.
        level: the interval's level.
    """

    mean: np.ndarray
    cov: np.ndarray
    log_prob: np.ndarray
    crps: np.ndarray
    inside: np.ndarray
    level: float

    @property
    def sd(self) -> np.ndarray:
        """``(n_test,)`` predictive sd of each held-out observation."""
        return np.sqrt(np.diag(self.cov))

    @property
    def nlpd(self) -> float:
        """Held-out negative log predictive density per point (mean of ``-log_prob``)."""
        return float(-np.mean(self.log_prob))

    @property
    def mean_crps(self) -> float:
        """Mean CRPS over the held-out points."""
        return float(np.mean(self.crps))

    @property
    def coverage(self) -> float:
        """Fraction of held-out observations inside their central interval at ``level``."""
        return float(np.mean(self.inside))


def _check_positive(name: str, value: float, example: str) -> float:
    if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)):
        raise ValueError(f"{name}={value!r} must be a finite number, e.g. {name}={example}.")
    if not value > 0:
        raise ValueError(f"{name}={value!r} must be positive, e.g. {name}={example}.")
    return float(value)


def _mean_cov(
    times: np.ndarray, *, theta: float, mu: float, sigma: float, x0: float
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the OU process started at ``X(0) = x0``, at ``times``."""
    t = np.asarray(times, dtype=np.float64)
    mean = mu + (x0 - mu) * np.exp(-theta * t)
    s, u = t[:, None], t[None, :]
    cov = sigma**2 / (2 * theta) * (np.exp(-theta * np.abs(s - u)) - np.exp(-theta * (s + u)))
    return mean, cov


def ou_dataset(
    *,
    theta: float = 0.2,
    mu: float = 0.0,
    sigma: float = 0.1,
    x0: float = 1.0,
    t_max: float = 10.0,
    num_points: int = 100,
    drop: float = 0.3,
    noise_sd: float = 0.02,
    key: int | np.random.Generator = 0,
) -> OUData:
    """Simulate an OU series on a regular grid and drop a fraction of its points at random.

    The process ``dX = theta (mu - X) dt + sigma dW``, ``X(0) = x0``, is simulated
    exactly (its Gaussian transition, no discretisation error) at the
    ``num_points`` times ``t_k = k t_max / num_points``, ``k = 1..num_points``;
    each observation is ``X(t_k) + noise_sd * N(0, 1)``. Then
    ``round(drop * num_points)`` points, chosen uniformly at random, are held out.

    The defaults are issue #5's setting (``theta = 0.2, mu = 0, sigma = 0.1,
    x0 = 1, T = 10``), 100 points 0.1 apart, and a small observation noise
    (``noise_sd = 0.02``, below the process's own spread of 0.03 over one grid
    step and far below its stationary sd ``sigma / sqrt(2 theta) = 0.16``), so that
    predicting a dropped point is about the dynamics, not the noise.

    The path, the noise and the order in which points are dropped come from
    ``key`` in that order, independently of ``drop``: the same key gives the same
    series at every ``drop``, and the held-out sets are nested (the points dropped
    at 30 % are among those dropped at 50 %).

    Args:
        theta: mean-reversion rate (positive).
        mu: long-run mean.
        sigma: diffusion coefficient (positive).
        x0: the known state at ``t = 0``.
        t_max: the last observation time (positive).
        num_points: the number of observation times (at least 2).
        drop: the fraction of points held out, in (0, 1); at least one point is
            kept and at least one dropped.
        noise_sd: observation noise sd (0 for exact process values).
        key: an int seed or a ``numpy.random.Generator`` (advanced in place).

    Returns:
        An `OUData`.

    Raises:
        ValueError: for a non-positive ``theta``, ``sigma`` or ``t_max``, fewer than
            two points, ``drop`` outside (0, 1) or leaving no kept or no dropped
            point, or a negative ``noise_sd``.
        TypeError: if ``key`` is neither an int nor a Generator.

    Example:
        >>> data = ou_dataset(drop=0.3, key=0)
        >>> data.t_train.shape, data.t_test.shape
        ((70,), (30,))
        >>> bool(np.all(ou_dataset(drop=0.5, key=0).path == data.path))
        True
    """
    theta = _check_positive("theta", theta, "0.2")
    sigma = _check_positive("sigma", sigma, "0.1")
    t_max = _check_positive("t_max", t_max, "10.0")
    if (
        not isinstance(num_points, (int, np.integer))
        or isinstance(num_points, bool)
        or num_points < 2
    ):
        raise ValueError(f"num_points={num_points!r} must be an int >= 2, e.g. num_points=100.")
    if not (isinstance(drop, (int, float, np.floating)) and 0.0 < drop < 1.0):
        raise ValueError(f"drop={drop!r} must be a fraction in (0, 1), e.g. drop=0.3.")
    num_drop = round(drop * num_points)
    if not 1 <= num_drop <= num_points - 1:
        raise ValueError(
            f"drop={drop!r} with num_points={num_points} drops {num_drop} of {num_points} "
            "points; at least one must be kept and one dropped: use more points or a drop "
            "fraction further from 0 and 1."
        )
    if not (isinstance(noise_sd, (int, float, np.floating)) and 0.0 <= noise_sd < math.inf):
        raise ValueError(f"noise_sd={noise_sd!r} must be a finite number >= 0, e.g. noise_sd=0.02.")
    for name, value in (("mu", mu), ("x0", x0)):
        if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)):
            raise ValueError(f"{name}={value!r} must be a finite number.")
    rng = _as_rng(key)
    n = int(num_points)
    times = np.arange(1, n + 1) * (t_max / n)
    step = t_max / n
    decay = math.exp(-theta * step)
    spread = sigma * math.sqrt((1 - decay**2) / (2 * theta))
    xi = rng.standard_normal(n)
    path = np.empty(n)
    x = float(x0)
    for k in range(n):
        x = mu + (x - mu) * decay + spread * xi[k]
        path[k] = x
    y = path + float(noise_sd) * rng.standard_normal(n)
    order = rng.permutation(n)
    test_index = np.sort(order[:num_drop])
    train_index = np.sort(order[num_drop:])
    return OUData(
        times=times,
        path=path,
        y=y,
        train_index=train_index,
        test_index=test_index,
        theta=theta,
        mu=float(mu),
        sigma=sigma,
        x0=float(x0),
        noise_sd=float(noise_sd),
        drop=float(drop),
    )


def _gaussian_crps(y: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """``sd (z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi))`` with ``z = (y - mean) / sd``."""
    z = (y - mean) / sd
    cdf = 0.5 * (1.0 + np.array([math.erf(v / math.sqrt(2.0)) for v in z.ravel()]).reshape(z.shape))
    pdf = np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    return sd * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))


def ou_oracle(data: OUData, *, level: float = 0.9) -> OUPredictive:
    """The exact predictive of the held-out observations of ``data`` given its kept ones.

    The process values at all times and the observations are jointly Gaussian,
    with the true parameters of ``data``: observations have mean
    ``m(t) = mu + (x0 - mu) e^{-theta t}`` and covariance
    ``K(t, s) + noise_sd**2 [t = s]`` with
    ``K(t, s) = sigma**2 / (2 theta) (e^{-theta |t - s|} - e^{-theta (t + s)})``.
    Conditioning the held-out block on the kept one gives

    ``mean = m_* + K_*k (K_kk + s^2 I)^{-1} (y_k - m_k)``,
    ``cov = K_** + s^2 I - K_*k (K_kk + s^2 I)^{-1} K_k*``

    (Cholesky solves). The scores are per point, each held-out observation under
    its own predictive marginal ``N(mean_i, cov_ii)``: what a model's per-point
    scores (`probdyn.calibration.nlpd`, `crps`, `coverage`) estimate, so they
    compare directly.

    Args:
        data: an `OUData` (its true parameters are used).
        level: the level of the central predictive interval for ``inside``.

    Returns:
        An `OUPredictive`.

    Raises:
        ValueError: for ``level`` outside (0, 1).

    Example:
        >>> data = ou_dataset(drop=0.5, key=0)
        >>> oracle = ou_oracle(data)
        >>> oracle.mean.shape == data.y_test.shape
        True
        >>> bool(oracle.nlpd < 0)  # sd ~ 0.03: a density well above 1
        True
    """
    if not (isinstance(level, (int, float, np.floating)) and 0.0 < level < 1.0):
        raise ValueError(f"level={level!r} must be in (0, 1), e.g. level=0.9.")
    mean, cov = _mean_cov(data.times, theta=data.theta, mu=data.mu, sigma=data.sigma, x0=data.x0)
    cov = cov + data.noise_sd**2 * np.eye(len(data.times))
    k, s = data.train_index, data.test_index
    chol = np.linalg.cholesky(cov[np.ix_(k, k)])
    # A = L^{-1} K_k*, r = L^{-1} (y_k - m_k): mean_* = m_* + A^T r, cov_* = K_** - A^T A.
    a = np.linalg.solve(chol, cov[np.ix_(k, s)])
    r = np.linalg.solve(chol, data.y[k] - mean[k])
    pred_mean = mean[s] + a.T @ r
    pred_cov = cov[np.ix_(s, s)] - a.T @ a
    pred_cov = 0.5 * (pred_cov + pred_cov.T)
    sd = np.sqrt(np.diag(pred_cov))
    y = data.y[s]
    log_prob = -0.5 * ((y - pred_mean) / sd) ** 2 - np.log(sd) - 0.5 * math.log(2 * math.pi)
    half = statistics.NormalDist().inv_cdf(0.5 + level / 2) * sd
    inside = (y >= pred_mean - half) & (y <= pred_mean + half)
    return OUPredictive(
        mean=pred_mean,
        cov=pred_cov,
        log_prob=log_prob,
        crps=_gaussian_crps(y, pred_mean, sd),
        inside=inside,
        level=float(level),
    )
