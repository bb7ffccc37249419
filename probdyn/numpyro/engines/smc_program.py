"""The compiled program of the NumPyro tempered SMC runner, and its cache.

One `Program` holds the jitted pieces of a run: the prior draws, one stage (BlackJAX's
``adaptive_tempered_smc`` or ``tempered_smc`` inside ``inner_kernel_tuning``, which
adapts the move kernel of `probdyn.numpyro.engines.smc_kernels` between stages by the
rules of `probdyn.engines.smc_math`), the map back to constrained values and the count
of valid particles. Programs are cached by model, data (by value) and engine settings
(`compiled_program`), so a second fit of the same model and data compiles nothing.

On a CPU the particles move in cache-sized batches, not all in one ``jax.vmap``
(`particle_batch_size`, BlackJAX's ``batch_size``): on networks fitted to thousands of
rows that is several times faster.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
from blackjax.smc import inner_kernel_tuning, resampling
from blackjax.smc.inner_kernel_tuning import StateWithParameterOverride
from blackjax.smc.tempered import TemperedSMCState

from probdyn.core.engines import SMC
from probdyn.engines import smc_math as _smc_math
from probdyn.numpyro.engines.batching import batch_size
from probdyn.numpyro.engines.smc_kernels import move_kernel
from probdyn.numpyro.logdensity import FlatModel, flat_model, loglik_floor

__all__ = ["Program", "all_invalid", "clear_cache", "compiled_program", "particle_batch_size"]

_CACHE_SIZE = 8
_CACHE: collections.OrderedDict[Any, Program] = collections.OrderedDict()


class Program(NamedTuple):
    """The compiled pieces of one run, reused across stages and across calls."""

    init: Callable[[jax.Array], Any]
    step: Callable[..., Any]
    constrain: Callable[[jax.Array], dict[str, jax.Array]]
    # Particles -> how many have a finite log likelihood. Called (and so compiled)
    # only when a stage stalls, to tell "all particles invalid" from a degenerate
    # temperature step; a stage that advances reads it off its weights instead.
    count_valid: Callable[[jax.Array], jax.Array]
    particles_per_batch: int  # particles moved at once (`particle_batch_size`)


def _weighted_variance(particles: jax.Array, weights: jax.Array) -> jax.Array:
    """`_smc_math.weighted_variance` in jax.numpy, from normalised weights."""
    mean = weights @ particles
    var = weights @ (particles - mean) ** 2
    return jnp.maximum(var, _smc_math.MIN_VARIANCE)


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
    """How many particles one vectorised move takes: BlackJAX's ``batch_size`` (0: all).

    ``engine.particles_per_batch`` when given, else `_batching.batch_size` of one
    particle's gradient (cache-sized batches on a CPU, all particles elsewhere).

    Example:
        >>> import probdyn
        >>> from probdyn.numpyro.logdensity import flat_model
        >>> from probdyn.testing import normal_data, normal_model
        >>> fm = flat_model(normal_model, normal_data().args, {}, ["mu"], {"y"})
        >>> particle_batch_size(fm, probdyn.SMC(num_particles=100, particles_per_batch=10))
        10
    """
    grad = jax.grad(lambda u: fm.logprior(u) + fm.loglik(u))
    example = (jnp.zeros(fm.dim, jnp.result_type(float)),)
    return batch_size(grad, example, engine.num_particles, engine.particles_per_batch)


def _build_program(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    latent: list[str],
    likelihood_sites: set[str],
    engine: SMC,
) -> Program:
    """Compile one run's stage: BlackJAX's (adaptive) tempered SMC inside
    ``inner_kernel_tuning``, whose ``tune`` applies `probdyn.engines.smc_math`'s step
    rule and preconditioner between stages."""
    n = engine.num_particles
    move = move_kernel(engine)
    adaptive = engine.temperatures == "adaptive"
    fm = flat_model(model, args, kwargs, latent, likelihood_sites)
    per_batch = particle_batch_size(fm, engine)
    target = _smc_math.target_acceptance(engine.kernel, fm.dim)
    gain = _smc_math.step_adapt_gain(engine.kernel)
    jitter_width = _smc_math.STEP_JITTER

    def parameters(key: jax.Array, step: jax.Array, var: jax.Array) -> dict[str, jax.Array]:
        jitter = jnp.exp(jax.random.uniform(key, (n,), var.dtype, -jitter_width, jitter_width))
        return {
            "step_size": step,
            "jitter": jitter,
            move.preconditioner: move.from_variance(var)[None],
        }

    def tune(
        old: dict[str, jax.Array], key: jax.Array, state: TemperedSMCState, info: Any
    ) -> dict[str, jax.Array]:
        # _smc_math.adapt_step_size, in jax.numpy: a NaN rate (no move) counts as 0.
        rates = jnp.nan_to_num(info.update_info.acceptance_rate, nan=0.0)
        step = old["step_size"] * jnp.exp(gain * (jnp.mean(rates) - target))
        return parameters(key, step, _weighted_variance(state.particles, state.weights))

    def init(key: jax.Array) -> tuple[StateWithParameterOverride, jax.Array]:
        particles = jax.vmap(fm.prior_draw)(jax.random.split(key, n))
        weights = jnp.full(n, 1.0 / n, particles.dtype)
        var = _weighted_variance(particles, weights)
        first = _smc_math.initial_step_size(engine.kernel, fm.dim)
        step = jnp.full((1,), first, particles.dtype)
        params = parameters(jax.random.fold_in(key, 1), step, var)
        state = TemperedSMCState(particles, weights, jnp.zeros((), particles.dtype))
        # The one likelihood pass outside the stages: are the prior draws all invalid?
        # (A stage learns the same from the weights it computes, see all_invalid.)
        valid = jnp.sum(jnp.isfinite(jax.vmap(fm.raw_loglik)(particles)))
        return StateWithParameterOverride(state, params), valid

    def step(
        key: jax.Array, state: StateWithParameterOverride, temperature: jax.Array
    ) -> tuple[StateWithParameterOverride, dict[str, jax.Array]]:
        kernel = inner_kernel_tuning.build_kernel(
            blackjax.adaptive_tempered_smc if adaptive else blackjax.tempered_smc,
            fm.logprior,
            fm.loglik,
            move.step,
            move.init,
            resampling.systematic,
            partial(tune, state.parameter_override),
            num_mcmc_steps=engine.num_mcmc_steps,
            batch_size=per_batch,
            **({"target_ess": engine.target_ess} if adaptive else {}),
        )
        new, info = kernel(key, state, **({} if adaptive else {"tempering_param": temperature}))
        smc_state = new.sampler_state
        rates = jnp.nan_to_num(info.update_info.acceptance_rate, nan=0.0)
        stats = {
            "temperature": smc_state.tempering_param,
            "acceptance_rate": jnp.mean(rates),
            "step_size": state.parameter_override["step_size"][0],
            "log_increment": info.log_likelihood_increment,
            "ess": 1.0 / jnp.sum(smc_state.weights**2),
            "all_invalid": all_invalid(
                info.log_likelihood_increment,
                smc_state.tempering_param - state.sampler_state.tempering_param,
            ),
        }
        return new, stats

    def count_valid(particles: jax.Array) -> jax.Array:
        return jnp.sum(jnp.isfinite(jax.vmap(fm.raw_loglik)(particles)))

    return Program(
        jax.jit(init),
        jax.jit(step),
        jax.jit(fm.constrain),
        jax.jit(count_valid),
        per_batch or engine.num_particles,
    )


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
