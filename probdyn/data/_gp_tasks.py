"""1-D Gaussian-process regression tasks for neural processes, and their exact GP oracle.

The task distribution follows the protocol of juho-lee/bnp (``regression/data/gp.py``), which
BNP, TNP and MPNP also use (papers.md 5.2): per task, a kernel length scale ``U[0.1, 0.6]``,
an output scale ``U[0.1, 1.0]`` and (periodic kernel) a period ``U[0.1, 0.5]``; inputs
``x ~ U[-2, 2]``; ``n_c ~ U{3..46}`` context points and ``n_t ~ U{3..49 - n_c}`` new target
points (their upper bounds are exclusive, so ``n_c + n_t <= 49``); observations are the GP draw
plus Gaussian noise with sd 0.02. Unlike juho-lee/bnp, which shares ``n_c`` and ``n_t`` across
a batch of 16 tasks, every task here draws its own sizes and the batch is padded and masked.

NumPy only, so both backends can consume the same batches.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from probdyn.engines.keys import int_key

__all__ = ["GPPredictive", "GPTaskBatch", "gp_oracle", "gp_tasks", "mean_log_likelihood"]

Kernel = Literal["rbf", "matern52", "periodic"]
_KERNELS = ("rbf", "matern52", "periodic")


@dataclasses.dataclass(frozen=True)
class GPTaskBatch:
    """A padded, masked batch of 1-D function-regression tasks.

    The target set of every task **includes its context points** (the usual NP training
    protocol: Garnelo et al. 2018; juho-lee/bnp): target slots ``[0, num_context)`` repeat
    the context points in order, slots ``[num_context, num_context + n_t)`` hold the ``n_t``
    new points, and the rest is padding. Evaluation metrics ("target LL") use only the new
    points, `mask_new`; training by maximum likelihood uses all of `mask_target`. Padded
    entries are 0 (finite, so networks can run on them) and must be masked out.

    Attributes:
        x_context, y_context: ``(batch, max_context, 1)`` context inputs and observations.
        mask_context: ``(batch, max_context)`` bool, True for real context points.
        x_target, y_target: ``(batch, max_target, 1)`` target inputs and observations.
        mask_target: ``(batch, max_target)`` bool, True for real target points.
        num_context: ``(batch,)`` number of context points per task.
        kernel: ``"rbf"``, ``"matern52"`` or ``"periodic"``.
        length_scale: ``(batch,)`` kernel length scale per task.
        output_scale: ``(batch,)`` kernel output scale (sd, not variance) per task.
        period: ``(batch,)`` period per task (NaN unless ``kernel == "periodic"``).
        noise_sd: observation noise sd, shared by all tasks.
    """

    x_context: np.ndarray
    y_context: np.ndarray
    mask_context: np.ndarray
    x_target: np.ndarray
    y_target: np.ndarray
    mask_target: np.ndarray
    num_context: np.ndarray
    kernel: str
    length_scale: np.ndarray
    output_scale: np.ndarray
    period: np.ndarray
    noise_sd: float

    @property
    def batch_size(self) -> int:
        """Number of tasks."""
        return int(self.x_context.shape[0])

    @property
    def mask_new(self) -> np.ndarray:
        """``(batch, max_target)`` bool: target points that are not context points."""
        slot = np.arange(self.mask_target.shape[1])
        return self.mask_target & (slot[None, :] >= self.num_context[:, None])


@dataclasses.dataclass(frozen=True)
class GPPredictive:
    """Per-point Gaussian predictive of the target observations of a `GPTaskBatch`.

    Attributes:
        mean, sd: ``(batch, max_target)`` predictive mean and sd of each noisy target
            observation (noise included); 0 and 1 at padded slots.
        log_prob: ``(batch, max_target)`` log density of the observed ``y_target`` under
            that predictive; 0 at padded slots.
    """

    mean: np.ndarray
    sd: np.ndarray
    log_prob: np.ndarray


def _covariance(
    kernel: str,
    x1: np.ndarray,
    x2: np.ndarray,
    length_scale: np.ndarray,
    output_scale: np.ndarray,
    period: np.ndarray,
) -> np.ndarray:
    """Batched noise-free kernel matrix ``(batch, n1, n2)`` for ``x1 (batch, n1)``, ``x2``."""
    d = np.abs(x1[:, :, None] - x2[:, None, :])
    ell = length_scale[:, None, None]
    var = (output_scale**2)[:, None, None]
    if kernel == "rbf":
        return var * np.exp(-0.5 * (d / ell) ** 2)
    if kernel == "matern52":
        r = np.sqrt(5.0) * d / ell
        return var * (1.0 + r + r**2 / 3.0) * np.exp(-r)
    # Periodic (MacKay) kernel in the juho-lee/bnp parameterisation.
    s = np.sin(np.pi * d / period[:, None, None]) / ell
    return var * np.exp(-2.0 * s**2)


def _as_rng(key: int | np.random.Generator, arg: str = "key") -> np.random.Generator:
    """A NumPy generator from a data set's seed: a Generator is used (and advanced) as
    given; an int must follow probdyn's one rule for int keys (`probdyn.engines.keys`),
    in ``[0, 2**64)``, NumPy integers included, bools refused."""
    if isinstance(key, np.random.Generator):
        return key
    try:
        seed = int_key(key)
    except ValueError as err:
        raise ValueError(str(err).replace("key", arg)) from None
    if seed is None:
        raise TypeError(
            f"{arg}={key!r} is not a seed; pass an int or a numpy.random.Generator, "
            f"e.g. {arg}=0 or {arg}=np.random.default_rng(0)."
        )
    return np.random.default_rng(seed)


def _check_sizes(num_tasks: int, min_context: int, max_context: int, max_points: int) -> None:
    if not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
        raise ValueError(f"num_tasks={num_tasks!r} must be a positive int, e.g. num_tasks=16.")
    if not 1 <= min_context <= max_context:
        raise ValueError(
            f"min_context={min_context!r}, max_context={max_context!r}: need "
            "1 <= min_context <= max_context, e.g. min_context=3, max_context=46."
        )
    if max_points < max_context + 4:
        raise ValueError(
            f"max_points={max_points!r} leaves no room for 3 new targets after "
            f"max_context={max_context!r}; use max_points >= max_context + 4 (default 50)."
        )


def gp_tasks(
    num_tasks: int,
    *,
    key: int | np.random.Generator,
    kernel: Kernel = "rbf",
    min_context: int = 3,
    max_context: int = 46,
    max_points: int = 50,
    noise_sd: float = 0.02,
    x_range: tuple[float, float] = (-2.0, 2.0),
) -> GPTaskBatch:
    """Draw a batch of 1-D GP regression tasks (the juho-lee/bnp protocol).

    Per task: hyperparameters ``length_scale ~ U[0.1, 0.6]``, ``output_scale ~ U[0.1, 1.0]``
    and, for the periodic kernel, ``period ~ U[0.1, 0.5]``; ``n_c ~ U{min_context..max_context}``
    contexts and ``n_t ~ U{3..max_points - 1 - n_c}`` new targets, so
    ``n_c + n_t <= max_points - 1``; inputs i.i.d. ``U[x_range]``; ``y = f(x) + eps`` with
    ``f ~ GP(0, k)`` and ``eps ~ N(0, noise_sd^2)``. Kernels (``d = |x - x'|``, ``s`` the output
    scale, ``l`` the length scale, ``p`` the period): RBF ``s^2 exp(-d^2 / (2 l^2))``;
    Matérn-5/2 ``s^2 (1 + r + r^2/3) exp(-r)`` with ``r = sqrt(5) d / l``; periodic
    ``s^2 exp(-2 sin^2(pi d / p) / l^2)``.

    Args:
        num_tasks: number of tasks in the batch.
        key: an int seed or a ``numpy.random.Generator`` (advanced in place).
        kernel: ``"rbf"`` (the training distribution), ``"matern52"`` or ``"periodic"``.
        min_context: smallest number of context points.
        max_context: largest number of context points (inclusive).
        max_points: the target arrays have this many slots (``n_c + n_t < max_points``).
        noise_sd: observation noise sd.
        x_range: input interval.

    Returns:
        A `GPTaskBatch` with ``max_context`` context slots and ``max_points`` target slots;
        the target set includes the contexts (see `GPTaskBatch`).

    Raises:
        ValueError: for an unknown kernel or inconsistent sizes.
        TypeError: if ``key`` is neither an int nor a Generator.

    Example:
        >>> tasks = gp_tasks(8, key=0)
        >>> tasks.x_context.shape, tasks.x_target.shape
        ((8, 46, 1), (8, 50, 1))
        >>> bool((tasks.mask_new.sum(1) >= 3).all())
        True
    """
    if kernel not in _KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {_KERNELS}; e.g. kernel='rbf'.")
    _check_sizes(num_tasks, min_context, max_context, max_points)
    if not noise_sd > 0:
        raise ValueError(f"noise_sd={noise_sd!r} must be positive, e.g. noise_sd=0.02.")
    rng = _as_rng(key)
    b, m = int(num_tasks), int(max_points)
    n_c = rng.integers(min_context, max_context + 1, size=b)
    n_t = rng.integers(3, m - n_c)  # exclusive upper bound m - n_c, as in juho-lee/bnp
    length = rng.uniform(0.1, 0.6, size=b)
    scale = rng.uniform(0.1, 1.0, size=b)
    period = rng.uniform(0.1, 0.5, size=b) if kernel == "periodic" else np.full(b, np.nan)
    x = rng.uniform(x_range[0], x_range[1], size=(b, m))
    z = rng.standard_normal(size=(b, m))

    slot = np.arange(m)
    mask_t = slot[None, :] < (n_c + n_t)[:, None]
    x = np.where(mask_t, x, 0.0)
    cov = _covariance(kernel, x, x, length, scale, period) + noise_sd**2 * np.eye(m)
    # Padding: unit diagonal, no coupling, so the padded Cholesky factor is block-diagonal and
    # the real block is the real tasks' factor.
    pair = mask_t[:, :, None] & mask_t[:, None, :]
    cov = np.where(pair, cov, np.eye(m))
    y = np.where(mask_t, np.einsum("bij,bj->bi", np.linalg.cholesky(cov), z), 0.0)

    mask_c = np.arange(max_context)[None, :] < n_c[:, None]
    x_c = np.where(mask_c, x[:, :max_context], 0.0)
    y_c = np.where(mask_c, y[:, :max_context], 0.0)
    return GPTaskBatch(
        x_context=x_c[..., None],
        y_context=y_c[..., None],
        mask_context=mask_c,
        x_target=x[..., None],
        y_target=y[..., None],
        mask_target=mask_t,
        num_context=n_c,
        kernel=kernel,
        length_scale=length,
        output_scale=scale,
        period=period,
        noise_sd=float(noise_sd),
    )


def gp_oracle(tasks: GPTaskBatch) -> GPPredictive:
    """The exact GP predictive of every target point given the task's context points.

    Uses the task's own kernel, hyperparameters and noise: for a target input ``x*``,
    ``mean = k(x*, X_c) (K_cc + s_n^2 I)^{-1} y_c`` and
    ``var = k(x*, x*) + s_n^2 - k(x*, X_c) (K_cc + s_n^2 I)^{-1} k(X_c, x*)``, the predictive
    of a new noisy observation at ``x*`` (also at the context inputs, as an NP decoder is
    scored there). This is the best per-point Gaussian predictive in expectation, so it bounds
    every neural process from above.

    Args:
        tasks: a `GPTaskBatch` from `gp_tasks`.

    Returns:
        A `GPPredictive` over the ``(batch, max_target)`` target slots.

    Example:
        >>> tasks = gp_tasks(4, key=0)
        >>> pred = gp_oracle(tasks)
        >>> pred.mean.shape == tasks.mask_target.shape
        True
    """
    xc = tasks.x_context[..., 0]
    xt = tasks.x_target[..., 0]
    mc, mt = tasks.mask_context, tasks.mask_target
    args = (tasks.length_scale, tasks.output_scale, tasks.period)
    n = xc.shape[1]
    k_cc = _covariance(tasks.kernel, xc, xc, *args) + tasks.noise_sd**2 * np.eye(n)
    k_cc = np.where(mc[:, :, None] & mc[:, None, :], k_cc, np.eye(n))
    k_tc = np.where(mt[:, :, None] & mc[:, None, :], _covariance(tasks.kernel, xt, xc, *args), 0.0)
    chol = np.linalg.cholesky(k_cc)
    # Solve with the triangular factor: v = L^{-1} k_ct, w = L^{-1} y_c.
    v = np.linalg.solve(chol, np.swapaxes(k_tc, 1, 2))
    w = np.linalg.solve(chol, np.where(mc, tasks.y_context[..., 0], 0.0)[..., None])[..., 0]
    mean = np.einsum("bct,bc->bt", v, w)
    prior_var = tasks.output_scale[:, None] ** 2 + tasks.noise_sd**2
    var = np.maximum(prior_var - np.sum(v**2, axis=1), tasks.noise_sd**2)
    mean = np.where(mt, mean, 0.0)
    sd = np.where(mt, np.sqrt(var), 1.0)
    resid = (tasks.y_target[..., 0] - mean) / sd
    log_prob = np.where(mt, -0.5 * resid**2 - np.log(sd) - 0.5 * np.log(2 * np.pi), 0.0)
    return GPPredictive(mean=mean, sd=sd, log_prob=log_prob)


def mean_log_likelihood(log_prob: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Per-point log-likelihood averaged within each task, then across tasks, with its SE.

    This is the juho-lee/bnp "target LL" convention (each task weighs the same whatever its
    number of points) when ``mask`` is `GPTaskBatch.mask_new`; with ``mask_target`` it also
    counts the context points, and with the first ``num_context`` slots it is the "context LL".

    Args:
        log_prob: ``(batch, max_target)`` per-point log densities (e.g. `GPPredictive`).
        mask: ``(batch, max_target)`` bool, the points to score (at least one per task).

    Returns:
        ``(mean, standard_error)`` in nats per point; the SE is across tasks, which are
        independent (points within a task are not).

    Raises:
        ValueError: if the shapes differ or a task has no scored point.

    Example:
        >>> tasks = gp_tasks(16, key=0)
        >>> ll, se = mean_log_likelihood(gp_oracle(tasks).log_prob, tasks.mask_new)
        >>> se > 0
        True
    """
    log_prob, mask = np.asarray(log_prob), np.asarray(mask, dtype=bool)
    if log_prob.shape != mask.shape:
        raise ValueError(
            f"log_prob has shape {log_prob.shape} but mask has shape {mask.shape}; pass "
            "arrays of the same (batch, max_target) shape."
        )
    counts = mask.sum(axis=1)
    if np.any(counts == 0):
        raise ValueError(
            f"mask scores no point in tasks {np.flatnonzero(counts == 0).tolist()}; every task "
            "needs at least one scored point."
        )
    per_task = np.where(mask, log_prob, 0.0).sum(axis=1) / counts
    se = float(per_task.std(ddof=1) / np.sqrt(per_task.size)) if per_task.size > 1 else np.nan
    return float(per_task.mean()), se
