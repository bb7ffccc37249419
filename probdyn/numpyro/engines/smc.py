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
weighted variance, are re-stated in jax.numpy in `probdyn.numpyro.engines.smc_program`;
their constants come from `probdyn.engines.smc_math`.

The runner is three modules: this one runs the stages and checks them
(`sample_smc`, `run_smc`); `probdyn.numpyro.engines.smc_program` compiles and caches
the stage; `probdyn.numpyro.engines.smc_kernels` holds the move kernels.

When the temperature reaches 1, one more stage at temperature 1 resamples and
moves the particles, so the returned draws are an unweighted sample (uniform
``log_weight``). A run still below temperature 1 after `_smc_math.MAX_STAGES`
stages stops with an error. Stages run in a Python loop over one compiled step;
compiled programs are cached by model, data (by value) and engine settings, so a
second fit of the same model and data (another key, say) compiles nothing.

On a CPU the particles move in cache-sized batches, not all in one ``jax.vmap``
(`smc_program.particle_batch_size`, BlackJAX's ``batch_size``): on networks fitted to
thousands of rows that is several times faster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from blackjax.smc.inner_kernel_tuning import StateWithParameterOverride
from tqdm.auto import tqdm

from probdyn.core.engines import SMC
from probdyn.core.posterior import Posterior
from probdyn.engines import smc_math as _smc_math
from probdyn.engines.checks import check_has_latent
from probdyn.engines.smc_traces import BAR_FORMAT, StageTraces, tempered_attrs
from probdyn.numpyro.bridge import as_key, check_observed, trace_model
from probdyn.numpyro.engines.shard import num_devices_of, shard_leading
from probdyn.numpyro.engines.smc_program import Program, compiled_program
from probdyn.numpyro.engines.timing import CompileTimer
from probdyn.numpyro.postprocess import build_posterior
from probdyn.numpyro.primitives.ode import reset_failed_solves

__all__ = ["SMCResult", "run_smc", "sample_smc"]


def _check_model(trace: dict[str, Any]) -> list[str]:
    """The model's latent sites; raise if tempering cannot fit it."""
    params = [n for n, s in trace.items() if s["type"] == "param"]
    if params:
        raise ValueError(
            f"SMC(stream='tempered') cannot fit a model with param sites {params}: tempering "
            "needs every unknown to have a prior. Use SMC(stream='minibatch', batch_size=...) "
            "(it learns param sites by gradient), give those sites priors, or use another "
            "engine (NUTS, VI, Ensemble)."
        )
    latent = [n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]]
    check_has_latent(latent)
    discrete = [n for n in latent if trace[n]["fn"].support.is_discrete]
    if discrete:
        raise ValueError(
            f"SMC(stream='tempered'): latent site(s) {discrete} are discrete; the move kernels "
            "need continuous latent sites. Marginalise them out of the model."
        )
    return latent


def _run_stages(
    program: Program, engine: SMC, rng: jax.Array
) -> tuple[StateWithParameterOverride, StageTraces]:
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
    traces = StageTraces(n)
    step_key = jax.random.fold_in(rng, 3)
    with tqdm(total=1.0, desc="SMC", disable=not engine.progress_bar, bar_format=BAR_FORMAT) as bar:
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
            traces.moved(stats["acceptance_rate"], stats["step_size"])
            previous = traces.temperature
            if previous >= 1.0:  # that was the rejuvenation stage
                traces.add_evidence(stats["log_increment"])
                break
            count_valid = partial(program.count_valid, state.sampler_state.particles)
            _check_stage(stats, previous, stage, n, engine, count_valid)
            traces.reweighted(stats["temperature"], stats["ess"], stats["log_increment"])
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
    particle is invalid (`smc_program.all_invalid`); a stalled one (the ESS bisection returns 0
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
    key: int | jax.Array,
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
    program = compiled_program(model, args, kwargs, latent, likelihood_sites, engine)
    state, traces = _run_stages(program, engine, rng)
    draws = jax.block_until_ready(program.constrain(state.sampler_state.particles))
    return SMCResult(
        draws={k: np.asarray(draws[k]) for k in latent},
        log_weight=np.log(np.asarray(state.sampler_state.weights)),
        log_evidence=traces.log_evidence,
        traces=traces.arrays(),
        num_devices=num_devices_of(state.sampler_state.particles),
        particles_per_batch=program.particles_per_batch,
    )


def run_smc(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: SMC,
    key: int | jax.Array,
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
        extra_attrs=tempered_attrs(
            result.traces,
            num_devices=result.num_devices,
            particles_per_batch=result.particles_per_batch,
        ),
    )
