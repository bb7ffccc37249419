"""Backend-neutral maths of sequential Monte Carlo, on NumPy arrays.

Both backends' tempered SMC runners run the same algorithm, and its maths and
tuning rules are written here once:

* weighing, resampling, the evidence and the choice of temperatures: the Pyro
  runner (probdyn/pyro/engines/smc.py) calls these functions; the NumPyro runner
  (probdyn/numpyro/engines/smc.py) runs the same steps in its compiled stage
  (probdyn/numpyro/engines/smc_program.py, with BlackJAX's systematic resampling);
* tuning of the move kernels: the target acceptance rates, the first step size,
  the step-size adaptation and its per-particle jitter, the preconditioner's
  variance floor and the stage limit. Both runners read these constants and
  rules from here (the NumPyro runner re-states those of its compiled stage in
  jax.numpy); no moves at temperature 0 (exact prior draws), then `keep_moving`'s.

It is longer than 500 lines because both halves are one algorithm's rules, each read
by both runners and pinned by one test module (tests/test_smc_math.py); most of the
length is the docstrings' statements of each rule and its source.

Everything is written for log weights: a weight is only ever exponentiated after
its maximum has been subtracted.

Conventions:

* ``log_weights`` need not be normalised; ``-inf`` is a zero weight and NaN is
  treated as ``-inf`` (a particle whose likelihood could not be computed).
* Randomness comes from an explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "FINAL_CORRELATION",
    "FINAL_MOVES_FACTOR",
    "MAX_STAGES",
    "MIN_MOVES",
    "MIN_VARIANCE",
    "MOVE_DISTANCE_GAIN",
    "STEP_ADAPT_GAIN",
    "STEP_JITTER",
    "TARGET_ACCEPTANCE",
    "TARGET_ACCEPTANCE_RW_1D",
    "adapt_step_size",
    "check_stage_limit",
    "ess",
    "final_max_moves",
    "initial_step_size",
    "keep_moving",
    "log_evidence_increment",
    "log_mean_exp",
    "multinomial_resample",
    "next_temperature",
    "normalize_log_weights",
    "start_correlation",
    "step_adapt_gain",
    "stratified_resample",
    "systematic_resample",
    "target_acceptance",
    "weighted_variance",
]

# The tuning constants below are the only copy; both runners read them from here.
# Acceptance rates the step size is steered towards, per move kernel: the
# asymptotically optimal rates for a random walk (0.234, Roberts, Gelman and Gilks
# 1997) and MALA (0.574, Roberts and Rosenthal 1998), and the 0.65 of HMC
# (Beskos et al. 2013). A random walk in one dimension aims at
# TARGET_ACCEPTANCE_RW_1D instead (see `target_acceptance`).
TARGET_ACCEPTANCE: dict[str, float] = {"hmc": 0.65, "mala": 0.574, "rw": 0.234}

# The optimal acceptance rate of a one-dimensional random walk (Gelman, Roberts and
# Gilks 1996); 0.234 is its limit as the dimension grows.
TARGET_ACCEPTANCE_RW_1D = 0.44

# The step follows h * exp(gain * (acceptance - target)) from one stage to the next
# (`adapt_step_size`), with gain STEP_ADAPT_GAIN for a step that is a length (HMC,
# random walk) and twice that for MALA's h, a squared length (`step_adapt_gain`).
# BlackJAX's update_scale_from_acceptance_rate is this rule with gain 1, which shrinks
# the step by at most e**-0.65 per stage: slower than a mode narrows under tempering
# (on a bimodal test model the acceptance stayed below 0.02 for five stages); gain 2
# keeps up, gain 3 oscillates.
STEP_ADAPT_GAIN = 2.0

# Each particle's step size in a move is the stage's shared one times
# exp(U(-STEP_JITTER, STEP_JITTER)), drawn afresh for every move (for MALA this
# multiplies h, so the proposal length varies by exp(U(-STEP_JITTER / 2,
# STEP_JITTER / 2))). Without it, a stage whose shared step has just crossed the
# leapfrog stability limit moves no particle at all (seen on the linear-regression
# reference); with it, some particles still move. Drawn once per stage instead, a
# particle whose HMC trajectory length came out near a multiple of a half-period of a
# Gaussian direction returns to (or mirrors) its start at every move: on a
# near-Gaussian whitened target a tenth of the particles stayed correlated with their
# start and the last stage ran to its move cap. A random step drawn independently of
# the particle leaves every kernel's invariance intact.
STEP_JITTER = 1.0

# Floor of the preconditioner's per-coordinate variance (`weighted_variance`): a
# coordinate on which the particles have collapsed must still be able to move.
MIN_VARIANCE = 1e-12

# Moves per stage (`keep_moving`): until the particles' mean squared distance from the
# stage's start (in units of the preconditioner) grows by less than MOVE_DISTANCE_GAIN
# over a move, at least MIN_MOVES, at most ``num_mcmc_steps``. It levels off near twice
# the dimension once the particles have forgotten their resampled starting points;
# a distance growing linearly in the moves k gains 1 / (k - 1), so slow moves run to
# the cap. As `particles`' AdaptiveMCMCSequence (Chopin and Papaspiliopoulos, 2020).
MOVE_DISTANCE_GAIN = 0.1
MIN_MOVES = 2

# The last stage (at temperature 1, whose particles are the returned draws) moves on
# until the particles have decorrelated from the stage's resampled starting points:
# until every coordinate's correlation across the particles between position and
# start (`start_correlation`) is at most FINAL_CORRELATION, at least MIN_MOVES, at
# most FINAL_MOVES_FACTOR * ``num_mcmc_steps`` moves (`final_max_moves`). A draw still
# correlated with its start is correlated with its resampled siblings and carries the
# error of the cloud before it: on the posteriordb Lotka-Volterra posterior
# (benchmarks/smc_lv.py, 1000 particles, key 2) the distance rule stopped the last
# stage after 7 moves with correlations 0.57 to 0.82 left (0.33 to 0.86 after the
# earlier stages; 17 distinct ancestors of the prior draws survived), and the
# quantiles of four correlated parameters were off by 3 times their error for
# independent draws. The noise of an estimated correlation is about
# 1 / sqrt(num_particles) (0.03 at 1000 particles), well below the threshold.
FINAL_CORRELATION = 0.1
FINAL_MOVES_FACTOR = 10

# A tempered run whose temperature is still below 1 after this many stages stops
# with an error (`check_stage_limit`): the likelihood is too sharp for the target
# ESS and particle count.
MAX_STAGES = 1000


def _clean(log_weights: np.ndarray) -> np.ndarray:
    out = np.asarray(log_weights, dtype=float).reshape(-1)
    return np.where(np.isnan(out), -np.inf, out)


def normalize_log_weights(log_weights: np.ndarray) -> np.ndarray:
    """Log weights shifted so that their exponentials sum to one.

    Args:
        log_weights: ``(N,)`` unnormalised log weights.

    Returns:
        ``(N,)`` normalised log weights (``-inf`` where the weight is zero).

    Raises:
        ValueError: if every weight is zero (all ``-inf`` or NaN).

    Example:
        >>> import numpy as np
        >>> np.exp(normalize_log_weights(np.log([1.0, 3.0])))
        array([0.25, 0.75])
    """
    lw = _clean(log_weights)
    top = lw.max(initial=-np.inf)
    if not np.isfinite(top):
        raise ValueError(
            f"normalize_log_weights: all {lw.size} weights are zero (log weight -inf or NaN): "
            "every particle has an impossible or non-finite likelihood. Check the model at "
            "its prior draws."
        )
    return lw - (top + np.log(np.exp(lw - top).sum()))


def ess(log_weights: np.ndarray) -> float:
    """Effective sample size ``1 / sum(w_i**2)`` of the normalised weights.

    ``N`` for equal weights, 1 when one particle holds all the weight.

    Example:
        >>> import numpy as np
        >>> ess(np.zeros(8))
        8.0
    """
    lw = normalize_log_weights(log_weights)
    # (sum w)^2 / sum w^2 on weights scaled to a maximum of 1: exact for equal weights.
    w = np.exp(lw - lw.max())
    return float(np.sum(w) ** 2 / np.sum(w**2))


def log_mean_exp(values: np.ndarray) -> float:
    """``log(mean(exp(values)))``, computed without overflow.

    Example:
        >>> import numpy as np
        >>> round(log_mean_exp(np.log([1.0, 3.0])), 12)
        0.69314718056
    """
    x = _clean(values)
    top = x.max(initial=-np.inf)
    if not np.isfinite(top):
        return -math.inf
    return float(top + np.log(np.mean(np.exp(x - top))))


def log_evidence_increment(log_weights: np.ndarray, incremental: np.ndarray) -> float:
    """One stage's factor of the evidence: ``log sum_i W_i exp(incremental_i)``.

    ``W`` are the normalised previous weights; after a resampling they are
    uniform and this is `log_mean_exp` of the incremental log weights. The sum
    over stages estimates ``log p(y)`` (unbiased on the ``p(y)`` scale).

    Args:
        log_weights: ``(N,)`` previous (unnormalised) log weights.
        incremental: ``(N,)`` incremental log weights, ``(beta' - beta) * loglik``.

    Example:
        >>> import numpy as np
        >>> round(log_evidence_increment(np.zeros(2), np.log([1.0, 3.0])), 12)
        0.69314718056
    """
    prev = normalize_log_weights(log_weights)
    total = prev + _clean(incremental)
    top = total.max(initial=-np.inf)
    if not np.isfinite(top):
        return -math.inf
    return float(top + np.log(np.exp(total - top).sum()))


def systematic_resample(
    log_weights: np.ndarray, rng: np.random.Generator, num: int | None = None
) -> np.ndarray:
    """Systematic resampling: one uniform draw, ``num`` evenly spaced pointers.

    Particle ``i`` is copied ``floor(num * W_i)`` or ``ceil(num * W_i)`` times,
    so its expected count is exactly ``num * W_i`` with less variance than
    multinomial resampling (Douc, Cappé and Moulines 2005).

    Args:
        log_weights: ``(N,)`` unnormalised log weights.
        rng: the NumPy generator to draw from.
        num: how many indices (default ``N``).

    Returns:
        ``(num,)`` int64 indices into the particles, in increasing order.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> systematic_resample(np.array([0.0, -np.inf, 0.0]), rng).tolist()
        [0, 2, 2]
    """
    w = np.exp(normalize_log_weights(log_weights))
    n = w.size if num is None else int(num)
    pointers = (rng.uniform() + np.arange(n)) / n
    return _invert_cdf(w, pointers)


def stratified_resample(
    log_weights: np.ndarray, rng: np.random.Generator, num: int | None = None
) -> np.ndarray:
    """Stratified resampling: one uniform pointer in each of ``num`` equal strata.

    The resampling of the Feynman–Kac (minibatch) runners, as BlackJAX's
    ``stratified`` on the NumPyro backend. Returns ``(num,)`` int64 indices in
    increasing order (see `systematic_resample`).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> stratified_resample(np.array([0.0, -np.inf, 0.0]), rng).tolist()
        [0, 0, 2]
    """
    w = np.exp(normalize_log_weights(log_weights))
    n = w.size if num is None else int(num)
    return _invert_cdf(w, (np.arange(n) + rng.uniform(size=n)) / n)


def multinomial_resample(
    log_weights: np.ndarray, rng: np.random.Generator, num: int | None = None
) -> np.ndarray:
    """Multinomial resampling: ``num`` independent draws from the weights.

    Returns ``(num,)`` int64 indices in increasing order (see `systematic_resample`).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> multinomial_resample(np.array([-np.inf, 0.0]), rng, 3).tolist()
        [1, 1, 1]
    """
    w = np.exp(normalize_log_weights(log_weights))
    n = w.size if num is None else int(num)
    return _invert_cdf(w, np.sort(rng.uniform(size=n)))


def _invert_cdf(weights: np.ndarray, pointers: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights)
    cdf[-1] = 1.0  # rounding must not leave a pointer past the last particle
    # side="right": a pointer exactly on a boundary goes to the next particle,
    # so a zero-weight particle (a flat step of the cdf) is never chosen.
    idx = np.searchsorted(cdf, pointers, side="right")
    return np.minimum(idx, weights.size - 1).astype(np.int64)


def next_temperature(
    loglik: np.ndarray,
    beta: float,
    target_ess: float,
    log_weights: np.ndarray | None = None,
    *,
    tol: float = 1e-10,
    max_iter: int = 200,
) -> float:
    """The next tempering exponent, chosen by bisection to keep a target ESS.

    Finds ``beta' in (beta, 1]`` such that the weights ``W_i exp((beta' - beta)
    * loglik_i)`` have ``ess = target_ess * ess_0``, where ``ess_0`` is their
    limit as ``beta' -> beta`` (the ESS of the previous weights ``W`` over the
    particles with a finite ``loglik``; ``N`` after a resampling when every
    likelihood is finite). The ESS decreases with ``beta'``, so the root is
    unique; ``1.0`` is returned when ``beta' = 1`` keeps at least the target.

    Args:
        loglik: ``(N,)`` log likelihood of each particle (``-inf``/NaN allowed).
        beta: the current exponent, in ``[0, 1)``.
        target_ess: the fraction of ``ess_0`` to keep, in ``(0, 1)``.
        log_weights: ``(N,)`` previous log weights (default: equal weights).
        tol: bisection stops when the bracket on ``beta'`` is narrower than this.
        max_iter: at most this many bisection steps.

    Returns:
        The next exponent, ``> beta`` and ``<= 1``.

    Raises:
        ValueError: if ``beta`` is not in ``[0, 1)`` or ``target_ess`` not in ``(0, 1)``.

    Example:
        >>> import numpy as np
        >>> next_temperature(np.zeros(10), 0.0, 0.5)  # flat likelihood: straight to 1
        1.0
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"next_temperature(beta={beta!r}): beta must be in [0, 1).")
    if not 0.0 < target_ess < 1.0:
        raise ValueError(f"next_temperature(target_ess={target_ess!r}): must be in (0, 1).")
    ll = _clean(loglik)
    prev = np.zeros_like(ll) if log_weights is None else _clean(log_weights)
    if not np.isfinite(ll).any():
        raise ValueError(
            "next_temperature: every particle has a log likelihood of -inf or NaN; the "
            "tempered target cannot move. Check the model at its prior draws."
        )
    target = target_ess * ess(np.where(np.isfinite(ll), prev, -np.inf))

    def ess_at(delta: float) -> float:
        # -inf stays -inf for any delta > 0 (0 * -inf would be NaN).
        return ess(prev + np.where(np.isfinite(ll), delta * ll, -np.inf))

    if ess_at(1.0 - beta) >= target:
        return 1.0
    lo, hi = 0.0, 1.0 - beta
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        if ess_at(mid) >= target:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    # lo keeps ESS >= target; if rounding left it at 0, take the smallest step tried.
    return float(beta + (lo if lo > 0.0 else hi))


def target_acceptance(kernel: str, dim: int) -> float:
    """The acceptance rate the step size of ``kernel`` is steered towards.

    `TARGET_ACCEPTANCE`, except for a random walk in one dimension:
    `TARGET_ACCEPTANCE_RW_1D`.

    Example:
        >>> target_acceptance("rw", 1), target_acceptance("rw", 5)
        (0.44, 0.234)
    """
    _check_kernel("target_acceptance", kernel)
    if kernel == "rw" and int(dim) == 1:
        return TARGET_ACCEPTANCE_RW_1D
    return TARGET_ACCEPTANCE[kernel]


def initial_step_size(kernel: str, dim: int) -> float:
    """A first step size for a move kernel in ``dim`` dimensions, before adaptation.

    Steps are in units of the preconditioner ``s`` (the particles' standard
    deviation per coordinate), with the usual dimension scalings:

    * ``"rw"``: ``u' = u + h s xi``, ``h = 2.38 / sqrt(d)``;
    * ``"mala"``: ``u' = u + h s**2 grad + sqrt(2 h) s xi`` (BlackJAX's
      parametrisation), ``h = d**(-1/3)``;
    * ``"hmc"``: leapfrog step ``h = d**(-1/4)`` with inverse mass matrix ``s**2``.

    Example:
        >>> round(initial_step_size("rw", 4), 2)
        1.19
    """
    _check_kernel("initial_step_size", kernel)
    d = max(int(dim), 1)
    if kernel == "rw":
        return 2.38 / math.sqrt(d)
    if kernel == "mala":
        return float(d ** (-1.0 / 3.0))
    return float(d ** (-0.25))


def step_adapt_gain(kernel: str) -> float:
    """The gain of `adapt_step_size` for ``kernel``'s step size.

    `STEP_ADAPT_GAIN` for HMC's leapfrog step and the random walk's scale, which
    are lengths; twice that for MALA's ``h``, a squared length (the proposal's
    noise is ``sqrt(2 h)``), so that the proposal length changes at the same rate
    for every kernel.

    Example:
        >>> step_adapt_gain("hmc"), step_adapt_gain("mala")
        (2.0, 4.0)
    """
    _check_kernel("step_adapt_gain", kernel)
    return 2.0 * STEP_ADAPT_GAIN if kernel == "mala" else STEP_ADAPT_GAIN


def adapt_step_size(
    step_size: float, acceptance_rate: float, target: float, *, gain: float = STEP_ADAPT_GAIN
) -> float:
    """The step size for the next stage, from the acceptance rate of this one.

    Rule: ``h' = h * exp(gain * (a - target))``. A stage that accepts too little
    shrinks the step, by at most ``exp(-gain * target)``; one that accepts too
    much grows it, by at most ``exp(gain * (1 - target))``; at ``a = target`` the
    step is kept; so is it after a stage without moves (NaN rate). (BlackJAX's
    ``update_scale_from_acceptance_rate`` is this rule with ``gain=1``; see
    `STEP_ADAPT_GAIN` for why the default is 2.)

    Args:
        step_size: this stage's step size.
        acceptance_rate: this stage's mean acceptance probability.
        target: the rate aimed at (`target_acceptance`).
        gain: how fast to adapt (`step_adapt_gain` of the kernel).

    Example:
        >>> adapt_step_size(0.5, 0.65, 0.65)
        0.5
    """
    a = float(acceptance_rate)
    return float(step_size * math.exp(gain * (a - target))) if np.isfinite(a) else float(step_size)


def keep_moving(
    num_moves: int,
    distance: float,
    previous: float,
    max_moves: int,
    *,
    adaptive: bool = True,
    correlation: float | None = None,
) -> bool:
    """Whether a stage moves its particles once more, after ``num_moves`` moves.

    With ``adaptive``: while fewer than ``max_moves`` moves were made and either fewer
    than `MIN_MOVES`, or the last move grew the mean squared distance from the stage's
    starting points by at least `MOVE_DISTANCE_GAIN` (``distance >= (1 + gain) *
    previous``); in the last stage (``correlation`` given) instead while the largest
    correlation with the starting points is above `FINAL_CORRELATION`. Without:
    while fewer than ``max_moves``.

    ``distance``: the particles' mean squared distance from where the stage started,
    in units of the preconditioner's variance, after the last move; ``previous``: the
    same after the move before; ``max_moves``: ``num_mcmc_steps`` (the last stage's
    `final_max_moves`); ``correlation``: in the last stage, the largest over the
    coordinates of `start_correlation` after the last move, else None.

    Example:
        >>> keep_moving(2, 8.0, 4.0, 10), keep_moving(3, 8.4, 8.0, 10)
        (True, False)
        >>> keep_moving(3, 8.4, 8.0, 100, correlation=0.3)
        True
    """
    if num_moves >= max_moves:
        return False
    if not adaptive or num_moves < MIN_MOVES:
        return True
    if correlation is not None:
        return bool(correlation > FINAL_CORRELATION)
    return bool(distance >= (1.0 + MOVE_DISTANCE_GAIN) * previous)


def final_max_moves(num_mcmc_steps: int, adaptive: bool) -> int:
    """The most moves of the last stage, at temperature 1: `FINAL_MOVES_FACTOR` times
    ``num_mcmc_steps`` with ``adaptive_moves`` (it stops once decorrelated, see
    `keep_moving`), else ``num_mcmc_steps``.

    Example:
        >>> final_max_moves(10, True), final_max_moves(10, False)
        (100, 10)
    """
    return FINAL_MOVES_FACTOR * num_mcmc_steps if adaptive else num_mcmc_steps


def start_correlation(particles: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Per coordinate, the correlation across the particles between their positions and
    the points the stage started them from (1 where either does not vary).

    Args:
        particles: ``(N, D)`` positions after some moves.
        start: ``(N, D)`` the same particles at the stage's start (after resampling).

    Returns:
        ``(D,)`` correlations.

    Example:
        >>> import numpy as np
        >>> x = np.array([[0.0], [1.0], [2.0]])
        >>> start_correlation(x, x), start_correlation(x, x[::-1])
        (array([1.]), array([-1.]))
    """
    x = np.asarray(particles, dtype=float)
    s = np.asarray(start, dtype=float)
    xc, sc = x - x.mean(0), s - s.mean(0)
    denom = np.sqrt((xc**2).sum(0) * (sc**2).sum(0))
    return np.where(denom > 0, (xc * sc).sum(0) / np.where(denom > 0, denom, 1.0), 1.0)


def weighted_variance(particles: np.ndarray, log_weights: np.ndarray) -> np.ndarray:
    """The per-coordinate variance of a weighted particle cloud, floored at `MIN_VARIANCE`.

    The move kernels' preconditioner: HMC's diagonal inverse mass matrix, and the
    square of the per-coordinate scale of the MALA and random-walk proposals.
    It is taken from the reweighted cloud before resampling, which estimates the
    new target's variance with less noise than the resampled copies.

    Args:
        particles: ``(N, D)`` particles.
        log_weights: ``(N,)`` unnormalised log weights.

    Returns:
        ``(D,)`` variances.

    Example:
        >>> import numpy as np
        >>> weighted_variance(np.array([[0.0, 1.0], [2.0, 1.0]]), np.zeros(2))
        array([1.e+00, 1.e-12])
    """
    w = np.exp(normalize_log_weights(log_weights))
    x = np.asarray(particles, dtype=float)
    mean = w @ x
    return np.maximum(w @ (x - mean) ** 2, MIN_VARIANCE)


def check_stage_limit(num_stages: int, beta: float, target_ess: float, num_particles: int) -> None:
    """Stop a run whose temperature is still below 1 after `MAX_STAGES` stages.

    Args:
        num_stages: the tempering stages done so far (reweightings).
        beta: the temperature they reached.
        target_ess: the engine's ``target_ess`` (named in the error).
        num_particles: the engine's ``num_particles`` (named in the error).

    Raises:
        RuntimeError: if ``beta < 1`` and ``num_stages >= MAX_STAGES``.

    Example:
        >>> check_stage_limit(3, 1.0, 0.5, 100)  # temperature 1 reached: fine
    """
    if beta < 1.0 and num_stages >= MAX_STAGES:
        raise RuntimeError(
            f"SMC: the temperature reached only {beta:.4g} after {MAX_STAGES} stages. The "
            f"likelihood is too sharp for target_ess={target_ess} with "
            f"num_particles={num_particles}: lower target_ess, give temperatures=[...] "
            "explicitly, or use another engine."
        )


def _check_kernel(where: str, kernel: str) -> None:
    if kernel not in TARGET_ACCEPTANCE:
        raise ValueError(f"{where}(kernel={kernel!r}): choose 'hmc', 'mala' or 'rw'.")
