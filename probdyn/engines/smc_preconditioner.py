"""The preconditioner of the tempered SMC moves: the particles' covariance.

Both backends' runners move the particles with kernels (HMC, MALA, a random walk)
whose geometry is a linear map ``L`` with ``L L^T`` the weighted covariance of the
cloud before resampling: a proposal moves ``u`` by ``L`` times a move in whitened
coordinates (HMC's inverse mass matrix, MALA's and the random walk's proposal
covariance are ``L L^T``). ``L`` is either

* diagonal: the per-coordinate standard deviation (`probdyn.engines.smc_math.weighted_variance`),
  stored as a ``(D,)`` vector; or
* dense: the lower Cholesky factor ``(D, D)`` of the weighted covariance, shrunk
  towards its diagonal (`shrunk_covariance`).

A diagonal preconditioner leaves a posterior with strongly correlated coordinates
(the Lotka-Volterra ODE posterior, whose four rate parameters are correlated up to
0.9) as narrow as its smallest principal axis in every direction: HMC at the
stable step size crawls along the ridge, and the last stage of
benchmarks/smc_lv.py ran 100 moves (its cap) before the particles had forgotten
their resampled starts. With the covariance the target is near-isotropic in the
whitened coordinates. A dense factor costs ``O(N D**2)`` per move and ``O(D**3)``
per stage, and a covariance is only worth estimating from many particles per
dimension, so ``"auto"`` (`use_dense`) picks it for small models only.

The NumPyro runner re-states `factor` in jax.numpy inside its compiled stage; the
Pyro runner calls it as written here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from probdyn.engines.smc_math import MIN_VARIANCE, normalize_log_weights, weighted_variance

__all__ = [
    "DENSE_MAX_DIM",
    "DENSE_PARTICLES_PER_DIM",
    "factor",
    "shrinkage",
    "shrunk_covariance",
    "use_dense",
]

# ``preconditioner="auto"`` is dense up to this many dimensions ...
DENSE_MAX_DIM = 100
# ... and when there are at least this many particles per dimension to estimate the
# D (D + 1) / 2 entries of the covariance from.
DENSE_PARTICLES_PER_DIM = 10


def use_dense(choice: str, dim: int, num_particles: int) -> bool:
    """Whether the moves are preconditioned by a dense covariance.

    ``choice`` is `probdyn.SMC`'s ``preconditioner`` (checked there): ``"dense"`` and
    ``"diagonal"`` say so; ``"auto"`` is dense when ``dim`` is at most
    `DENSE_MAX_DIM` and there are at least `DENSE_PARTICLES_PER_DIM` particles per
    dimension.

    Example:
        >>> use_dense("auto", 8, 1000), use_dense("auto", 301, 1000), use_dense("dense", 301, 50)
        (True, False, True)
    """
    if choice != "auto":
        return choice == "dense"
    return dim <= DENSE_MAX_DIM and num_particles >= DENSE_PARTICLES_PER_DIM * dim


def shrinkage(dim: int, ess: Any) -> Any:
    """The weight ``lambda = D / (D + ESS)`` of the diagonal in `shrunk_covariance`.

    A sample covariance from ``ESS`` effective draws in ``D`` dimensions has relative
    errors of order ``sqrt(D / ESS)`` in its small eigenvalues; mixing in ``lambda``
    of the diagonal keeps it positive definite (its eigenvalues are at least
    ``lambda`` times the smallest variance) and vanishes as the particles grow.

    Example:
        >>> shrinkage(8, 992)
        0.008
    """
    return dim / (dim + ess)  # also on a traced array: the NumPyro runner's stage


def shrunk_covariance(particles: np.ndarray, log_weights: np.ndarray) -> np.ndarray:
    """The weighted covariance of the cloud, shrunk towards its diagonal.

    ``(1 - lambda) C + lambda diag(C)`` with ``C`` the weighted covariance (its
    diagonal floored at `probdyn.engines.smc_math.MIN_VARIANCE`, as the diagonal
    preconditioner's) and ``lambda`` `shrinkage` of the weights' ESS.

    Args:
        particles: ``(N, D)`` particles.
        log_weights: ``(N,)`` unnormalised log weights.

    Returns:
        ``(D, D)`` covariance.

    Example:
        >>> import numpy as np
        >>> x = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
        >>> shrunk_covariance(x, np.zeros(4))  # lambda = 2 / 6
        array([[1.25      , 0.83333333],
               [0.83333333, 1.25      ]])
    """
    w = np.exp(normalize_log_weights(log_weights))
    x = np.asarray(particles, dtype=float)
    xc = x - w @ x
    cov = (w[:, None] * xc).T @ xc
    var = np.maximum(np.diag(cov), MIN_VARIANCE)
    lam = shrinkage(x.shape[1], 1.0 / float(np.sum(w**2)))
    out = (1.0 - lam) * cov
    out[np.diag_indices_from(out)] = var
    return out


def factor(particles: np.ndarray, log_weights: np.ndarray, dense: bool) -> np.ndarray:
    """The preconditioner's ``L``: ``(D,)`` standard deviations, or with ``dense`` the
    ``(D, D)`` lower Cholesky factor of `shrunk_covariance` (its diagonal's square
    root, as a matrix, should the factorisation fail in floating point).

    Example:
        >>> import numpy as np
        >>> x = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
        >>> factor(x, np.zeros(4), dense=False)
        array([1.11803399, 1.11803399])
        >>> L = factor(x, np.zeros(4), dense=True)
        >>> bool(np.allclose(L @ L.T, shrunk_covariance(x, np.zeros(4))))
        True
    """
    if not dense:
        return np.sqrt(weighted_variance(particles, log_weights))
    cov = shrunk_covariance(particles, log_weights)
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:  # not positive definite in floating point
        return np.diag(np.sqrt(np.diag(cov)))
