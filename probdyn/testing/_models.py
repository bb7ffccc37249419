"""Reference models whose posteriors are known exactly (Gaussian conjugacy).

Each model exists in NumPyro and in Pyro (``*_pyro``), with the same sites, the same
data and so the same exact posterior; `reference_model` picks one by backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "REFERENCE_MODELS",
    "ReferenceProblem",
    "linear_regression_data",
    "linear_regression_model",
    "linear_regression_model_pyro",
    "normal_data",
    "normal_model",
    "normal_model_pyro",
    "reference_model",
]


@dataclasses.dataclass(frozen=True)
class ReferenceProblem:
    """Data for a reference model and its exact posterior.

    Attributes:
        args: the model's positional arguments (data included).
        site: the latent site with the exact posterior.
        mean: exact posterior mean of ``site``.
        cov: exact posterior covariance (a scalar variance for scalar sites).
        log_evidence: exact log marginal likelihood ``log p(y)`` of the data.
    """

    args: tuple[Any, ...]
    site: str
    mean: np.ndarray
    cov: np.ndarray
    log_evidence: float = float("nan")

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


def normal_model_pyro(
    y: Any, prior_loc: float = 0.0, prior_scale: float = 2.0, noise: float = 1.0
) -> None:
    """`normal_model` in Pyro (same sites ``mu`` and ``y``)."""
    import pyro
    import pyro.distributions as dist
    import torch

    y = torch.as_tensor(y, dtype=torch.get_default_dtype())
    mu = pyro.sample("mu", dist.Normal(prior_loc, prior_scale))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, noise), obs=y)


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
    marginal_cov = noise**2 * np.eye(n) + prior_scale**2 * np.ones((n, n))
    return ReferenceProblem(
        args=(y, prior_loc, prior_scale, noise),
        site="mu",
        mean=np.asarray(mean),
        cov=np.asarray(1 / precision),
        log_evidence=_gaussian_logpdf(y, np.full(n, prior_loc), marginal_cov),
    )


def linear_regression_model(x: Any, y: Any, prior_scale: float = 1.0, noise: float = 0.5) -> None:
    """``w ~ Normal(0, prior_scale I)``, ``y = x @ w + Normal(0, noise)`` (NumPyro)."""
    import numpyro
    import numpyro.distributions as dist

    w = numpyro.sample("w", dist.Normal(0.0, prior_scale).expand([x.shape[1]]).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w, noise), obs=y)


def linear_regression_model_pyro(
    x: Any, y: Any, prior_scale: float = 1.0, noise: float = 0.5
) -> None:
    """`linear_regression_model` in Pyro (same sites ``w`` and ``y``).

    The mean is written ``(x * w).sum(-1)`` rather than ``x @ w`` so that it
    broadcasts over leading batch dimensions of ``w``: Pyro's VI can then
    vectorise its ELBO particles.
    """
    import pyro
    import pyro.distributions as dist
    import torch

    x = torch.as_tensor(x, dtype=torch.get_default_dtype())
    y = torch.as_tensor(y, dtype=torch.get_default_dtype())
    w = pyro.sample("w", dist.Normal(0.0, prior_scale).expand([x.shape[1]]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w).sum(-1), noise), obs=y)


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
    marginal_cov = noise**2 * np.eye(n) + prior_scale**2 * x @ x.T
    return ReferenceProblem(
        args=(x, y, prior_scale, noise),
        site="w",
        mean=mean,
        cov=cov,
        log_evidence=_gaussian_logpdf(y, np.zeros(n), marginal_cov),
    )


def _gaussian_logpdf(y: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> float:
    """``log N(y; mean, cov)``: the evidence of a linear-Gaussian model, exactly."""
    chol = np.linalg.cholesky(cov)
    white = np.linalg.solve(chol, y - mean)
    logdet = 2 * np.log(np.diag(chol)).sum()
    return float(-0.5 * (white @ white + logdet + len(y) * np.log(2 * np.pi)))


REFERENCE_MODELS: dict[str, dict[str, Callable[..., None]]] = {
    "normal": {"numpyro": normal_model, "pyro": normal_model_pyro},
    "linear_regression": {
        "numpyro": linear_regression_model,
        "pyro": linear_regression_model_pyro,
    },
}


def reference_model(name: str, backend: str) -> Callable[..., None]:
    """The reference model ``name`` written for ``backend``.

    Args:
        name: ``"normal"`` (data: `normal_data`) or ``"linear_regression"``
            (data: `linear_regression_data`).
        backend: ``"numpyro"`` or ``"pyro"``.

    Raises:
        ValueError: for an unknown name or backend.

    Example:
        >>> reference_model("normal", "pyro").__name__
        'normal_model_pyro'
    """
    if name not in REFERENCE_MODELS:
        raise ValueError(
            f"reference_model(name={name!r}): choose one of {', '.join(REFERENCE_MODELS)}."
        )
    models = REFERENCE_MODELS[name]
    if backend not in models:
        raise ValueError(
            f"reference_model(backend={backend!r}): choose one of {', '.join(models)}."
        )
    return models[backend]
