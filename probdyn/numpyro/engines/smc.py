"""Likelihood-tempered SMC for NumPyro models, on BlackJAX's SMC kernels.

The model becomes two log densities of one flat vector ``u`` of the latent sites
in unconstrained space, ``logprior(u)`` (with ``log |det J|``) and ``loglik(u)``
(observed and ``factor`` sites, tempered), in `probdyn.numpyro.logdensity`. A
non-finite log likelihood becomes a huge negative number, so that such a particle
gets weight zero (and never NaN) and MCMC moves leave it. The run stops with an
error if every prior draw has a non-finite log likelihood (one likelihood pass
over the initial particles) or if after some stage every particle has: read off
that stage's log-likelihood increment, which is then ``delta`` times the huge
negative number, so the stages make no likelihood pass of their own; only a stage
whose temperature stalls (as the adaptive bisection does when every weight is
equal) counts the valid particles, to say which of the two errors it is.

BlackJAX's ``adaptive_tempered_smc`` (``temperatures="adaptive"``: the next
temperature by bisection on the ESS of the incremental weights) or
``tempered_smc`` (a given schedule) makes one stage: resample systematically,
move ``num_mcmc_steps`` times at the current temperature, reweight to the next
one. ``inner_kernel_tuning`` adapts the move kernel between stages, by the rules
and constants of `probdyn.engines.smc_math` that the Pyro runner uses too:

* preconditioner: the weighted variance of the particle cloud per coordinate
  (`_smc_math.weighted_variance`), as HMC's diagonal inverse mass matrix, or its
  square root as the per-coordinate scale of the MALA and random-walk proposals
  (MALA runs in coordinates divided by that scale);
* step size: first `_smc_math.initial_step_size`, then ``step * exp(gain *
  (acceptance - target))`` from the previous stage's mean acceptance rate
  (`_smc_math.adapt_step_size` with gain `_smc_math.step_adapt_gain`, which
  explains the choice), steered towards `_smc_math.target_acceptance` (0.65 HMC,
  0.574 MALA, 0.234 random walk, 0.44 in one dimension). Every particle moves
  with the shared step times its own factor ``exp(U(-j, j))``, ``j =
  _smc_math.STEP_JITTER``, drawn afresh each stage, so that some particles still
  move when the shared step is off.

The two formulas that run inside the compiled stage, the step update and the
weighted variance, are re-stated here in jax.numpy; their constants come from
`probdyn.engines.smc_math`.

When the temperature reaches 1, one more stage at temperature 1 resamples and
moves the particles, so the returned draws are an unweighted sample (uniform
``log_weight``). A run still below temperature 1 after `_smc_math.MAX_STAGES`
stages stops with an error. Stages run in a Python loop over one compiled step;
compiled programs are cached by model, data (by value) and engine settings, so a
second fit of the same model and data (another key, say) compiles nothing.

On a CPU the particles move in cache-sized batches, not all in one ``jax.vmap``
(`particle_batch_size`, BlackJAX's ``batch_size``): on networks fitted to thousands
of rows that is several times faster.
"""

from __future__ import annotations

import collections
import hashlib
import time
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
from blackjax.mcmc import random_walk
from blackjax.mcmc.mala import MALAState
from blackjax.smc import inner_kernel_tuning, resampling
from blackjax.smc.inner_kernel_tuning import StateWithParameterOverride
from blackjax.smc.tempered import TemperedSMCState
from tqdm.auto import tqdm

from probdyn.core.engines import SMC
from probdyn.core.posterior import Posterior
from probdyn.engines import smc_math as _smc_math
from probdyn.numpyro.bridge import as_key, check_observed, trace_model
from probdyn.numpyro.engines.batching import batch_size
from probdyn.numpyro.engines.shard import num_devices_of, shard_leading
from probdyn.numpyro.engines.timing import CompileTimer
from probdyn.numpyro.logdensity import FlatModel, flat_model, loglik_floor
from probdyn.numpyro.postprocess import build_posterior
from probdyn.numpyro.primitives.ode import reset_failed_solves

__all__ = ["SMCResult", "run_smc", "sample_smc"]

_CACHE_SIZE = 8
_CACHE: collections.OrderedDict[Any, _Program] = collections.OrderedDict()


# ----------------------------------------------------------------------------- kernels


class _MoveKernel(NamedTuple):
    """A BlackJAX move kernel and how its preconditioner follows the particle cloud."""

    init: Callable[..., Any]
    step: Callable[..., Any]
    preconditioner: str  # name of the per-coordinate parameter
    from_variance: Callable[[jax.Array], jax.Array]


def _hmc_step(
    rng_key: jax.Array,
    state: Any,
    logdensity_fn: Callable[[jax.Array], jax.Array],
    step_size: jax.Array,
    jitter: jax.Array,
    inverse_mass_matrix: jax.Array,
    *,
    num_integration_steps: int,
) -> tuple[Any, Any]:
    """BlackJAX's HMC with a diagonal inverse mass matrix and a jittered step size."""
    return blackjax.hmc.build_kernel()(
        rng_key,
        state,
        logdensity_fn,
        step_size * jitter,
        inverse_mass_matrix,
        num_integration_steps,
    )


def _mala_step(
    rng_key: jax.Array,
    state: MALAState,
    logdensity_fn: Callable[[jax.Array], jax.Array],
    step_size: jax.Array,
    jitter: jax.Array,
    scale: jax.Array,
) -> tuple[MALAState, Any]:
    """BlackJAX's MALA in the coordinates ``z = u / scale`` (diagonal preconditioning).

    The map is linear, so its Jacobian is a constant that the Metropolis ratio
    ignores; the chain on ``z`` mapped back leaves the target of ``u`` invariant.
    """
    scaled = MALAState(state.position / scale, state.logdensity, state.logdensity_grad * scale)
    new, info = blackjax.mala.build_kernel()(
        rng_key, scaled, lambda z: logdensity_fn(z * scale), step_size * jitter
    )
    return MALAState(new.position * scale, new.logdensity, new.logdensity_grad / scale), info


def _rw_step(
    rng_key: jax.Array,
    state: Any,
    logdensity_fn: Callable[[jax.Array], jax.Array],
    step_size: jax.Array,
    jitter: jax.Array,
    scale: jax.Array,
) -> tuple[Any, Any]:
    """BlackJAX's additive random walk, Gaussian steps of sd ``step_size * jitter * scale``."""
    kernel = blackjax.additive_step_random_walk.build_kernel()
    step = random_walk.normal(step_size * jitter * scale)
    return kernel(rng_key, state, logdensity_fn, step)


def _move_kernel(engine: SMC) -> _MoveKernel:
    if engine.kernel == "hmc":
        step = partial(_hmc_step, num_integration_steps=engine.num_leapfrog_steps)
        return _MoveKernel(blackjax.hmc.init, step, "inverse_mass_matrix", lambda v: v)
    if engine.kernel == "mala":
        return _MoveKernel(blackjax.mala.init, _mala_step, "scale", jnp.sqrt)
    return _MoveKernel(blackjax.additive_step_random_walk.init, _rw_step, "scale", jnp.sqrt)


# ----------------------------------------------------------------------------- program


class _Program(NamedTuple):
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


def _all_invalid(log_increment: jax.Array, delta: jax.Array) -> jax.Array:
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
) -> _Program:
    n = engine.num_particles
    move = _move_kernel(engine)
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
        # (A stage learns the same from the weights it computes, see _all_invalid.)
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
            "all_invalid": _all_invalid(
                info.log_likelihood_increment,
                smc_state.tempering_param - state.sampler_state.tempering_param,
            ),
        }
        return new, stats

    def count_valid(particles: jax.Array) -> jax.Array:
        return jnp.sum(jnp.isfinite(jax.vmap(fm.raw_loglik)(particles)))

    return _Program(
        jax.jit(init),
        jax.jit(step),
        jax.jit(fm.constrain),
        jax.jit(count_valid),
        per_batch or engine.num_particles,
    )


def _leaf_key(leaf: Any) -> Any:
    if isinstance(leaf, (np.ndarray, jax.Array, np.generic)):
        a = np.ascontiguousarray(np.asarray(leaf))
        return ("array", a.shape, a.dtype.str, hashlib.sha1(a.tobytes()).hexdigest())
    return ("object", type(leaf), leaf)  # the type too: 1 == 1.0 == True


def _program(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    latent: list[str],
    likelihood_sites: set[str],
    engine: SMC,
) -> _Program:
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


# ----------------------------------------------------------------------------- runner


def _check_model(trace: dict[str, Any]) -> list[str]:
    params = [n for n, s in trace.items() if s["type"] == "param"]
    if params:
        raise ValueError(
            f"SMC(stream='tempered') cannot fit a model with param sites {params}: tempering "
            "needs every unknown to have a prior. Use SMC(stream='minibatch', batch_size=...) "
            "(it learns param sites by gradient), give those sites priors, or use another "
            "engine (NUTS, VI, Ensemble)."
        )
    latent = [n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]]
    if not latent:
        raise ValueError("fit: the model has no latent sample sites; nothing to infer.")
    discrete = [n for n in latent if trace[n]["fn"].support.is_discrete]
    if discrete:
        raise ValueError(
            f"SMC(stream='tempered'): latent site(s) {discrete} are discrete; the move kernels "
            "need continuous latent sites. Marginalise them out of the model."
        )
    return latent


def _run_stages(
    program: _Program, engine: SMC, rng: jax.Array
) -> tuple[StateWithParameterOverride, dict[str, list[float]]]:
    """Stages until the temperature reaches 1, then one rejuvenation stage at 1.

    Stage ``i`` moves the particles at temperature ``beta_i`` and reweights them to
    ``beta_{i+1}``; the recorded traces are indexed by the temperature the particles
    were moved at, ``beta_0 = 0, ..., beta_K = 1``.
    """
    state, valid = program.init(jax.random.fold_in(rng, 2))
    # The particle axis is the parallel axis: with several devices it is split
    # across them (see `shard_leading`) and the compiled stages follow.
    state = StateWithParameterOverride(shard_leading(state.sampler_state), state.parameter_override)
    n = engine.num_particles
    if int(valid) == 0:
        raise RuntimeError(
            f"SMC: all {n} prior draws have a non-finite log likelihood; check the model "
            "(a failed ODE solve, a NaN in the likelihood) or its priors."
        )
    schedule = None if engine.temperatures == "adaptive" else tuple(engine.temperatures)
    traces: dict[str, list[float]] = {
        "temperature": [0.0],
        "ess": [float(n)],
        "log_evidence": [0.0],
        "acceptance_rate": [],
        "step_size": [],
    }
    step_key = jax.random.fold_in(rng, 3)
    bar_format = "{desc}: {percentage:3.0f}%|{bar}| temperature {n:.3g}/1 [{elapsed}{postfix}]"
    with tqdm(total=1.0, desc="SMC", disable=not engine.progress_bar, bar_format=bar_format) as bar:
        stage = 0
        while True:
            beta = 1.0 if schedule is None or stage >= len(schedule) else schedule[stage]
            temperature = jnp.asarray(beta, state.sampler_state.weights.dtype)
            state, stats = program.step(jax.random.fold_in(step_key, stage), state, temperature)
            # Resampling gathers across the whole axis, and XLA may hand the result
            # back replicated: put the particles back on their devices every stage.
            state = StateWithParameterOverride(
                shard_leading(state.sampler_state), state.parameter_override
            )
            stats = {k: float(v) for k, v in jax.device_get(stats).items()}
            traces["acceptance_rate"].append(stats["acceptance_rate"])
            traces["step_size"].append(stats["step_size"])
            previous = traces["temperature"][-1]
            if previous >= 1.0:  # that was the rejuvenation stage
                traces["log_evidence"][-1] += stats["log_increment"]
                break
            count_valid = partial(program.count_valid, state.sampler_state.particles)
            _check_stage(stats, previous, stage, n, engine, count_valid)
            traces["temperature"].append(stats["temperature"])
            traces["ess"].append(stats["ess"])
            traces["log_evidence"].append(traces["log_evidence"][-1] + stats["log_increment"])
            stage += 1
            bar.update(stats["temperature"] - previous)
            bar.set_postfix(stage=stage, acceptance=f"{stats['acceptance_rate']:.2f}")
    return state, traces


def _check_stage(
    stats: dict[str, float],
    previous: float,
    stage: int,
    n: int,
    engine: SMC,
    count_valid: Callable[[], jax.Array],
) -> None:
    """Raise if the stage found every particle invalid or the temperature stalled.

    A stage that raised the temperature tells from its own weights whether every
    particle is invalid (`_all_invalid`); a stalled one (the ESS bisection returns 0
    when all weights are equal, as they are when every particle is invalid) says
    nothing, so then, and only then, ``count_valid`` evaluates the likelihood.
    """
    beta = stats["temperature"]
    stalled = not np.isfinite(beta) or not np.isfinite(stats["log_increment"]) or beta <= previous
    if stats["all_invalid"] or (stalled and int(count_valid()) == 0):
        raise RuntimeError(
            f"SMC: at temperature {beta:.4g} (stage {stage + 1}) all {n} particles have a "
            "non-finite log likelihood; check the model (failed ODE solves, NaN)."
        )
    if stalled:
        raise RuntimeError(
            f"SMC: the temperature stopped increasing at {previous:.4g} (stage {stage + 1}, "
            f"next {beta!r}); the incremental weights are degenerate. Try more particles "
            f"(num_particles={n}) or a lower target_ess ({engine.target_ess})."
        )
    _smc_math.check_stage_limit(stage + 1, beta, engine.target_ess, n)


class SMCResult(NamedTuple):
    """What one tempered SMC run returns, before the `Posterior` is assembled.

    Attributes:
        draws: constrained particles per latent site, ``(num_particles, *event)``.
        log_weight: normalised log weights of the particles, ``(num_particles,)``.
        log_evidence: the estimate of ``log p(y)``.
        traces: per-temperature curves (``temperature``, ``acceptance_rate``,
            ``step_size``, ``ess``, ``log_evidence``), each ``(num_stages + 1,)``.
        num_devices: how many devices held the particles.
        particles_per_batch: how many particles each vectorised move took.
    """

    draws: dict[str, np.ndarray]
    log_weight: np.ndarray
    log_evidence: float
    traces: dict[str, np.ndarray]
    num_devices: int = 1
    particles_per_batch: int = 0


def sample_smc(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: SMC,
    key: Any,
    *,
    trace: dict[str, Any] | None = None,
) -> SMCResult:
    """Run tempered SMC and return the particles, their weights and the evidence.

    `run_smc` is this plus the `Posterior`'s post-processing (deterministic sites,
    log likelihood, predictive draws); repeated runs that only need the particles
    or the evidence (for example to measure Monte-Carlo error) can call it directly.

    Example:
        >>> import numpy as np, probdyn
        >>> from probdyn.testing import normal_data, normal_model
        >>> res = sample_smc(normal_model, normal_data().args, {},
        ...                  probdyn.SMC(num_particles=100, progress_bar=False), 0)
        >>> res.draws["mu"].shape, float(res.traces["temperature"][-1])
        ((100,), 1.0)
    """
    rng = as_key(key)
    trace = trace_model(model, args, kwargs, rng) if trace is None else trace
    latent = _check_model(trace)
    likelihood_sites = {n for n, s in trace.items() if s["type"] == "sample" and s["is_observed"]}
    program = _program(model, args, kwargs, latent, likelihood_sites, engine)
    state, traces = _run_stages(program, engine, rng)
    draws = jax.block_until_ready(program.constrain(state.sampler_state.particles))
    return SMCResult(
        draws={k: np.asarray(draws[k]) for k in latent},
        log_weight=np.log(np.asarray(state.sampler_state.weights)),
        log_evidence=traces["log_evidence"][-1],
        traces={k: np.asarray(v) for k, v in traces.items()},
        num_devices=num_devices_of(state.sampler_state.particles),
        particles_per_batch=program.particles_per_batch,
    )


def run_smc(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: SMC,
    key: Any,
) -> Posterior:
    """Tempered SMC for a NumPyro model (``stream="minibatch"`` is `run_fksmc`'s).

    Returns a `Posterior` whose ``num_particles`` particles are the draws of one chain
    (``(1, num_particles, *event)``), with ``attrs["log_evidence"]`` the estimate of
    ``log p(y)`` and ``traces`` indexed by temperature (see `SMC`).
    """
    trace = trace_model(model, args, kwargs, as_key(key))
    observed = check_observed(trace)
    reset_failed_solves()
    start = time.perf_counter()
    with CompileTimer() as timer:
        result = sample_smc(model, args, kwargs, engine, key, trace=trace)
    wall = time.perf_counter() - start
    return build_posterior(
        model=model,
        args=args,
        kwargs=kwargs,
        engine=engine,
        key=key,
        latent={k: v[None] for k, v in result.draws.items()},
        params={},
        observed=observed,
        sample_stats={"log_weight": result.log_weight[None]},
        traces=result.traces,
        wall_time=wall,
        compile_time=timer.seconds,
        extra_attrs={
            "log_evidence": result.log_evidence,
            "num_stages": len(result.traces["temperature"]) - 1,
            "num_devices": result.num_devices,
            "particles_per_batch": result.particles_per_batch,
        },
    )
