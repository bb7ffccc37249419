"""The compiled program of the NumPyro tempered SMC runner, and its cache.

One `Program` holds the jitted pieces of a run: the prior draws, one stage, and the
map back to constrained values. A stage is one compiled function of the particle
state and the temperature, reused by every stage of every run with the same model,
data and engine settings (`compiled_program` caches it):

1. the preconditioner: the weighted covariance of the cloud, dense or per coordinate
   (`probdyn.engines.smc_preconditioner`, re-stated in jax.numpy);
2. systematic resampling (BlackJAX's ``resampling.systematic``);
3. the moves at the current temperature (`smc_kernels.move`): none at temperature 0,
   where the particles are exact prior draws (only their evaluation), then up to
   ``num_mcmc_steps`` moves, as many as `_smc_math.keep_moving` asks for with
   ``adaptive_moves`` (in the last stage, at temperature 1, up to
   `_smc_math.final_max_moves`, until the particles have decorrelated from their
   start); every move of the cloud is one vectorised evaluation of the
   model per leapfrog step, and the stage holds that evaluation once;
4. the next temperature, by bisection on the ESS of the incremental weights
   (`_smc_math.next_temperature`, re-stated in jax.numpy), or the given one; the
   reweighting reads the log likelihoods the moves computed, and evaluates nothing;
5. the step size of the next stage (`_smc_math.adapt_step_size`).

On a CPU the model is evaluated over cache-sized batches of particles, not all in one
``jax.vmap`` (`particle_batch_size`); for a model with a loop (an adaptive ODE solve)
the batch holds at least `batching.LOOP_MIN_BATCH` particles unless the user fixes it.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from blackjax.smc import resampling

from probdyn.core.engines import SMC
from probdyn.engines import smc_math as _smc_math
from probdyn.engines import smc_preconditioner as _precond
from probdyn.numpyro.engines.batching import batch_size
from probdyn.numpyro.engines.smc_kernels import Cloud, evaluator, move
from probdyn.numpyro.logdensity import FlatModel, flat_model, loglik_floor

__all__ = [
    "Program",
    "StageState",
    "all_invalid",
    "clear_cache",
    "compiled_program",
    "particle_batch_size",
]

_CACHE_SIZE = 8
_CACHE: collections.OrderedDict[Any, Program] = collections.OrderedDict()
_BISECTION_STEPS = 64  # halvings of the temperature bracket: below float64 resolution


class StageState(NamedTuple):
    """The particles between stages.

    Attributes:
        cloud: the particles and their last evaluation (`smc_kernels.Cloud`).
        weights: ``(N,)`` normalised weights.
        temperature: the temperature the weights are at.
        step_size: the shared step size of the next stage's moves.
        fresh: whether ``cloud`` was evaluated at ``temperature`` (its gradient).
    """

    cloud: Cloud
    weights: jax.Array
    temperature: jax.Array
    step_size: jax.Array
    fresh: jax.Array


class Program(NamedTuple):
    """The compiled pieces of one run, reused across stages and across calls."""

    init: Callable[[jax.Array], StageState]
    step: Callable[..., tuple[StageState, dict[str, jax.Array]]]
    constrain: Callable[[jax.Array], dict[str, jax.Array]]
    particles_per_batch: int  # particles evaluated at once (`particle_batch_size`)


def _preconditioner(particles: jax.Array, weights: jax.Array, dense: bool) -> jax.Array:
    """`probdyn.engines.smc_preconditioner.factor` in jax.numpy, from normalised weights.

    Should the Cholesky factorisation fail in floating point (NaN), the diagonal
    factor is used for that stage instead.
    """
    xc = particles - weights @ particles
    var = jnp.maximum(weights @ xc**2, _smc_math.MIN_VARIANCE)
    if not dense:
        return jnp.sqrt(var)
    lam = _precond.shrinkage(particles.shape[1], 1.0 / jnp.sum(weights**2))
    cov = (1.0 - lam) * ((weights[:, None] * xc).T @ xc)
    cov = cov.at[jnp.diag_indices(particles.shape[1])].set(var)
    chol = jnp.linalg.cholesky(cov)
    return jnp.where(jnp.all(jnp.isfinite(chol)), chol, jnp.diag(jnp.sqrt(var)))


def _next_temperature(
    loglik: jax.Array, valid: jax.Array, beta: jax.Array, target_ess: float
) -> jax.Array:
    """`_smc_math.next_temperature` in jax.numpy, after a resampling (equal weights).

    The largest ``beta' <= 1`` whose incremental weights ``exp((beta' - beta) *
    loglik)`` over the ``valid`` particles keep an ESS of ``target_ess`` times their
    number, by bisection; ``beta`` itself (a stall, which the runner reports) when no
    particle is valid.
    """
    target = target_ess * jnp.sum(valid)

    def ess_at(delta: jax.Array) -> jax.Array:
        lw = jnp.where(valid, delta * loglik, -jnp.inf)
        w = jnp.exp(lw - jnp.max(lw))
        return jnp.sum(w) ** 2 / jnp.sum(w**2)

    span = jnp.maximum(1.0 - beta, 0.0)

    def halve(_: int, bracket: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        ok = ess_at(mid) >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, halve, (jnp.zeros_like(span), span))
    reach_one = (beta >= 1.0) | (ess_at(span) >= target)
    new = jnp.where(reach_one, 1.0, beta + jnp.where(lo > 0, lo, hi))
    return jnp.where(jnp.any(valid), jnp.minimum(new, 1.0), beta)


def all_invalid(log_increment: jax.Array, delta: jax.Array) -> jax.Array:
    """Whether every particle reweighted by a stage had a non-finite log likelihood,
    from the stage's own log-likelihood increment, without evaluating the likelihood
    again.

    The stage reweights by ``delta * loglik`` with ``loglik = bad`` (`loglik_floor`,
    ``-finfo.max / 4``) where the likelihood is not finite, and reports
    ``log_increment = logsumexp(delta * loglik) - log N``. If every particle is
    invalid that is ``delta * bad``; if one particle has a finite ``ll`` it is at
    least ``delta * ll - log N``, far above ``delta * bad / 2`` for any ``delta >
    16 log N / finfo.max`` (1e-306 in float64, 1e-36 in float32). A stage with
    ``delta = 0`` (the rejuvenation stage, or a stalled one) says nothing.
    """
    bad = loglik_floor(log_increment.dtype)
    return (delta > 0) & (log_increment <= delta * bad / 2)


def particle_batch_size(fm: FlatModel, engine: SMC) -> int:
    """How many particles one vectorised evaluation of the model takes (0: all).

    ``engine.particles_per_batch`` when given, else `batching.batch_size` of one
    particle's gradient (cache-sized batches on a CPU, all particles elsewhere; at
    least `batching.LOOP_MIN_BATCH` for a model with a loop, such as an ODE solve).

    Example:
        >>> import probdyn
        >>> from probdyn.numpyro.logdensity import flat_model
        >>> from probdyn.testing import normal_data, normal_model
        >>> fm = flat_model(normal_model, normal_data().args, {}, ["mu"], {"y"})
        >>> particle_batch_size(fm, probdyn.SMC(num_particles=100, particles_per_batch=10))
        10
    """
    grad = jax.grad(lambda u: sum(fm.log_parts(u)))
    example = (jnp.zeros(fm.dim, jnp.result_type(float)),)
    return batch_size(
        grad, example, engine.num_particles, engine.particles_per_batch, what="SMC particles"
    )


def _build_program(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    latent: list[str],
    likelihood_sites: set[str],
    engine: SMC,
) -> Program:
    """Compile one run's stage (see the module docstring)."""
    n = engine.num_particles
    adaptive = engine.temperatures == "adaptive"
    fm = flat_model(model, args, kwargs, latent, likelihood_sites)
    per_batch = particle_batch_size(fm, engine)
    evaluate = evaluator(fm.log_parts, per_batch, needs_grad=engine.kernel != "rw")
    target = _smc_math.target_acceptance(engine.kernel, fm.dim)
    gain = _smc_math.step_adapt_gain(engine.kernel)
    dense = _precond.use_dense(engine.preconditioner, fm.dim, n)

    def init(key: jax.Array) -> StageState:
        particles = jax.vmap(fm.prior_draw)(jax.random.split(key, n))
        dtype = particles.dtype
        zeros = jnp.zeros(n, dtype)
        cloud = Cloud(particles, zeros, zeros, jnp.zeros_like(particles))
        return StageState(
            cloud,
            jnp.full(n, 1.0 / n, dtype),
            jnp.zeros((), dtype),
            jnp.asarray(_smc_math.initial_step_size(engine.kernel, fm.dim), dtype),
            jnp.zeros((), bool),  # not evaluated yet: the first stage does it
        )

    def step(
        key: jax.Array, state: StageState, temperature: jax.Array
    ) -> tuple[StageState, dict[str, jax.Array]]:
        k_resample, k_move = jax.random.split(key)
        cloud, beta = state.cloud, state.temperature
        dtype = cloud.u.dtype
        precond = _preconditioner(cloud.u, state.weights, dense)
        idx = resampling.systematic(k_resample, state.weights, n)
        cloud = jax.tree.map(lambda a: a[idx], cloud)
        # No move at temperature 0: the particles are exact prior draws; the last
        # stage, at 1, moves until decorrelated (_smc_math.final_max_moves).
        final = beta >= 1.0
        last_moves = _smc_math.final_max_moves(engine.num_mcmc_steps, engine.adaptive_moves)
        max_moves = jnp.where(final, last_moves, jnp.where(beta > 0, engine.num_mcmc_steps, 0))
        cloud, moved = move(
            k_move,
            cloud,
            state.fresh,
            evaluate,
            kernel=engine.kernel,
            num_leapfrog_steps=engine.num_leapfrog_steps,
            beta=beta,
            step=state.step_size,
            jitter=_smc_math.STEP_JITTER,
            precond=precond,
            max_moves=max_moves,
            adaptive=engine.adaptive_moves,
            final=final,
        )
        bad = loglik_floor(dtype)
        valid = cloud.loglik > bad / 2
        if adaptive:
            new_beta = _next_temperature(cloud.loglik, valid, beta, engine.target_ess)
        else:
            new_beta = jnp.maximum(temperature.astype(dtype), beta)
        delta = new_beta - beta
        log_w = jnp.where(delta > 0, delta * cloud.loglik, 0.0)
        log_increment = jax.nn.logsumexp(log_w) - jnp.log(n)
        weights = jax.nn.softmax(log_w)
        rate = moved.acceptance_rate
        # _smc_math.adapt_step_size: a stage without moves keeps its step.
        next_step = jnp.where(
            moved.num_moves > 0, state.step_size * jnp.exp(gain * (rate - target)), state.step_size
        )
        fresh = jnp.asarray(engine.kernel == "rw") | (delta == 0)
        stats = {
            "temperature": new_beta,
            "acceptance_rate": rate,
            "step_size": state.step_size,
            "log_increment": log_increment,
            "ess": 1.0 / jnp.sum(weights**2),
            "all_invalid": all_invalid(log_increment, delta),
            "num_valid": jnp.sum(valid),
            "num_moves": moved.num_moves,
            "num_evaluations": moved.num_evaluations,
            "correlation": moved.correlation,
        }
        return StageState(cloud, weights, new_beta, next_step, fresh), stats

    return Program(jax.jit(init), jax.jit(step), jax.jit(fm.constrain), per_batch or n)


def _leaf_key(leaf: Any) -> Any:
    """A hashable key of one data leaf: an array by shape, dtype and a hash of its bytes."""
    if isinstance(leaf, (np.ndarray, jax.Array, np.generic)):
        a = np.ascontiguousarray(np.asarray(leaf))
        return ("array", a.shape, a.dtype.str, hashlib.sha1(a.tobytes()).hexdigest())
    return ("object", type(leaf), leaf)  # the type too: 1 == 1.0 == True


def compiled_program(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    latent: list[str],
    likelihood_sites: set[str],
    engine: SMC,
) -> Program:
    """The compiled program for this model, data (by value) and engine, from a small LRU
    cache; data arguments are closed over, as NumPyro's own samplers do."""
    leaves, treedef = jax.tree.flatten((args, kwargs))
    config = (
        engine.num_particles,
        engine.kernel,
        engine.num_mcmc_steps,
        engine.num_leapfrog_steps,
        engine.target_ess,
        engine.temperatures == "adaptive",
        engine.particles_per_batch,
        engine.adaptive_moves,
        engine.preconditioner,
        str(jnp.result_type(float)),  # float64 or float32 (jax_enable_x64)
    )
    key = (model, treedef, tuple(_leaf_key(x) for x in leaves), config)
    try:
        hash(key)
    except TypeError:  # an argument that cannot be hashed: compile for this call only
        return _build_program(model, args, kwargs, latent, likelihood_sites, engine)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    program = _build_program(model, args, kwargs, latent, likelihood_sites, engine)
    _CACHE[key] = program
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return program


def clear_cache() -> None:
    """Forget every compiled program (benchmarks time a first, compiling fit)."""
    _CACHE.clear()
