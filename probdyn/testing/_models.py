"""Reference models whose posteriors are known exactly (Gaussian conjugacy)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = [
    "ReferenceProblem",
    "linear_regression_data",
    "linear_regression_model",
    "normal_data",
    "normal_model",
]


@dataclasses.dataclass(frozen=True)
class ReferenceProblem:
    """Data for a reference model and its exact posterior.

    Attributes:
        args: the model's positional arguments (data included).
        site: the latent site with the exact posterior.
        mean: exact posterior mean of ``site``.
        cov: exact posterior covariance (a scalar variance for scalar sites).
    """

    args: tuple[Any, ...]
    site: str
    mean: np.ndarray
    cov: np.ndarray

    @property
    def sd(self) -> np.ndarray:
        """Exact posterior standard deviations (per element)."""
        cov = np.asarray(self.cov)
        return np.sqrt(np.diag(cov)) if cov.ndim == 2 else np.sqrt(cov)

    @property
    def exact(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, sd)``, the arguments `check_accuracy` takes."""
        return np.asarray(self.mean), self.sd


def normal_model(
    y: Any, prior_loc: float = 0.0, prior_scale: float = 2.0, noise: float = 1.0
) -> None:
    """``mu ~ Normal(prior_loc, prior_scale)``, ``y_i ~ Normal(mu, noise)`` (NumPyro)."""
    import numpyro
    import numpyro.distributions as dist

    mu = numpyro.sample("mu", dist.Normal(prior_loc, prior_scale))
    with numpyro.plate("data", len(y)):
        numpyro.sample("y", dist.Normal(mu, noise), obs=y)


def normal_data(
    n: int = 20,
    *,
    seed: int = 0,
    prior_loc: float = 0.0,
    prior_scale: float = 2.0,
    noise: float = 1.0,
) -> ReferenceProblem:
    """Data for `normal_model` and the exact conjugate posterior of ``mu``.

    Example:
        >>> problem = normal_data()
        >>> float(problem.sd) < 1.0
        True
    """
    y = np.random.default_rng(seed).normal(1.5, noise, n)
    precision = 1 / prior_scale**2 + n / noise**2
    mean = (prior_loc / prior_scale**2 + y.sum() / noise**2) / precision
    return ReferenceProblem(
        args=(y, prior_loc, prior_scale, noise),
        site="mu",
        mean=np.asarray(mean),
        cov=np.asarray(1 / precision),
    )


def linear_regression_model(x: Any, y: Any, prior_scale: float = 1.0, noise: float = 0.5) -> None:
    """``w ~ Normal(0, prior_scale I)``, ``y = x @ w + Normal(0, noise)`` (NumPyro)."""
    import numpyro
    import numpyro.distributions as dist

    w = numpyro.sample("w", dist.Normal(0.0, prior_scale).expand([x.shape[1]]).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w, noise), obs=y)


def linear_regression_data(
    n: int = 30, d: int = 3, *, seed: int = 0, prior_scale: float = 1.0, noise: float = 0.5
) -> ReferenceProblem:
    """Correlated design, data and the exact Gaussian posterior of ``w``.

    Example:
        >>> linear_regression_data().mean.shape
        (3,)
    """
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, d))
    x = base + 0.6 * base[:, :1]  # correlated columns -> correlated posterior
    w_true = rng.normal(size=d)
    y = x @ w_true + rng.normal(0.0, noise, n)
    cov = np.linalg.inv(x.T @ x / noise**2 + np.eye(d) / prior_scale**2)
    mean = cov @ x.T @ y / noise**2
    return ReferenceProblem(args=(x, y, prior_scale, noise), site="w", mean=mean, cov=cov)
