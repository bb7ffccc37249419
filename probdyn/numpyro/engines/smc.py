"""Likelihood-tempered SMC for NumPyro models: the stages, their checks, the result.

The model becomes one function of a flat vector ``u`` of the latent sites in
unconstrained space, ``(logprior(u), loglik(u))`` from one run of the model
(`probdyn.numpyro.logdensity`): the log prior with ``log |det J|``, and the observed
and ``factor`` sites, tempered. A non-finite log likelihood becomes a huge negative
number, so that such a particle gets weight zero (and never NaN) and MCMC moves
leave it.

Each stage is one compiled function (`probdyn.numpyro.engines.smc_program`): it
resamples systematically, moves the particles at the current temperature with the
kernels of `probdyn.numpyro.engines.smc_kernels` (none at temperature 0, where they
are exact prior draws; then as many moves as `_smc_math.keep_moving` asks for, at
most ``num_mcmc_steps``), and reweights them to the next temperature (bisection on
the ESS of the incremental weights, ``temperatures="adaptive"``, or the given
schedule). The kernels' tuning follows `probdyn.engines.smc_math`, which the Pyro
runner reads too:

* preconditioner: the weighted variance of the particle cloud per coordinate
  (`_smc_math.weighted_variance`), as HMC's diagonal inverse mass matrix, or its
  square root as the per-coordinate scale of the MALA and random-walk proposals;
* step size: first `_smc_math.initial_step_size`, then ``step * exp(gain *
  (acceptance - target))`` from the previous stage's mean acceptance rate
  (`_smc_math.adapt_step_size` with gain `_smc_math.step_adapt_gain`), steered
  towards `_smc_math.target_acceptance` (0.65 HMC, 0.574 MALA, 0.234 random walk,
  0.44 in one dimension); a stage without moves keeps it. Every particle moves
  with the shared step times its own factor ``exp(U(-j, j))``, ``j =
  _smc_math.STEP_JITTER``, drawn afresh each stage, so that some particles still
  move when the shared step is off.

The first stage evaluates the prior draws; the run stops with an error if all of
them have a non-finite log likelihood, or if after some stage every particle has
(the stage counts the valid particles from the log likelihoods it holds).

When the temperature reaches 1, one more stage at temperature 1 resamples and
moves the particles, so the returned draws are an unweighted sample (uniform
``log_weight``). A run still below temperature 1 after `_smc_math.MAX_STAGES`
stages stops with an error. Stages run in a Python loop over one compiled step;
compiled programs are cached by model, data (by value) and engine settings, so a
second fit of the same model and data (another key, say) compiles nothing.

On a CPU the model is evaluated over cache-sized batches of particles, not all in
one ``jax.vmap`` (`smc_program.particle_batch_size`): on networks fitted to
thousands of rows that is several times faster; a model with a loop (an ODE solve)
is evaluated at least `batching.LOOP_MIN_BATCH` particles at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from tqdm.auto import tqdm

from probdyn.core.engines import SMC
from probdyn.core.posterior import Posterior
from probdyn.engines import smc_math as _smc_math
from probdyn.engines.checks import check_has_latent
from probdyn.engines.smc_traces import BAR_FORMAT, StageTraces, tempered_attrs
from probdyn.numpyro.bridge import as_key, check_observed, trace_model
from probdyn.numpyro.engines.shard import num_devices_of, shard_leading
from probdyn.numpyro.engines.smc_program import Program, StageState, compiled_program
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


def _run_stages(program: Program, engine: SMC, rng: jax.Array) -> tuple[StageState, StageTraces]:
    """Stages until the temperature reaches 1, then one rejuvenation stage at 1.

    Stage ``i`` moves the particles at temperature ``beta_i`` (not at ``beta_0 = 0``)
    and reweights them to ``beta_{i+1}``; the recorded traces are indexed by the
    temperature the particles were moved at, ``beta_0 = 0, ..., beta_K = 1``.
    """
    state = _shard(program.init(jax.random.fold_in(rng, 2)))
    n = engine.num_particles
    schedule = None if engine.temperatures == "adaptive" else tuple(engine.temperatures)
    traces = StageTraces(n)
    step_key = jax.random.fold_in(rng, 3)
    with tqdm(total=1.0, desc="SMC", disable=not engine.progress_bar, bar_format=BAR_FORMAT) as bar:
        stage = 0
        while True:
            beta = 1.0 if schedule is None or stage >= len(schedule) else schedule[stage]
            temperature = jnp.asarray(beta, state.weights.dtype)
            state, out = program.step(jax.random.fold_in(step_key, stage), state, temperature)
            # Resampling gathers across the whole axis, and XLA may hand the result
            # back replicated: put the particles back on their devices every stage.
            state = _shard(state)
            stats = {k: float(v) for k, v in jax.device_get(out).items()}
            traces.moved(stats["acceptance_rate"], stats["step_size"], int(stats["num_moves"]))
            previous = traces.temperature
            if previous >= 1.0:  # that was the rejuvenation stage
                traces.add_evidence(stats["log_increment"])
                break
            _check_stage(stats, previous, stage, n, engine)
            traces.reweighted(stats["temperature"], stats["ess"], stats["log_increment"])
            stage += 1
            bar.update(stats["temperature"] - previous)
            bar.set_postfix(stage=stage, moves=int(stats["num_moves"]))
    return state, traces


def _shard(state: StageState) -> StageState:
    """The particle axis is the parallel axis: with several devices it is split across
    them (see `shard_leading`) and the compiled stages follow."""
    return state._replace(cloud=shard_leading(state.cloud), weights=shard_leading(state.weights))


def _check_stage(stats: dict[str, float], previous: float, stage: int, n: int, engine: SMC) -> None:
    """Raise if the prior draws or, after a stage, all particles are invalid, or if the
    temperature stalled.

    The stage counts the particles with a finite log likelihood from the values its
    moves computed (``num_valid``); a stage that raised the temperature also tells it
    from its own weights (`smc_program.all_invalid`).
    """
    beta = stats["temperature"]
    if stage == 0 and stats["num_valid"] == 0:
        raise RuntimeError(
            f"SMC: all {n} prior draws have a non-finite log likelihood; check the model "
            "(a failed ODE solve, a NaN in the likelihood) or its priors."
        )
    stalled = not np.isfinite(beta) or not np.isfinite(stats["log_increment"]) or beta <= previous
    if stats["all_invalid"] or stats["num_valid"] == 0:
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
            ``step_size``, ``num_moves``, ``ess``, ``log_evidence``), each
            ``(num_stages + 1,)``; no move at temperature 0 (``num_moves`` 0,
            ``acceptance_rate`` NaN).
        num_devices: how many devices held the particles.
        particles_per_batch: how many particles each vectorised evaluation took.
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
    draws = jax.block_until_ready(program.constrain(state.cloud.u))
    return SMCResult(
        draws={k: np.asarray(draws[k]) for k in latent},
        log_weight=np.log(np.asarray(state.weights)),
        log_evidence=traces.log_evidence,
        traces=traces.arrays(),
        num_devices=num_devices_of(state.cloud.u),
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
    # The sites' structure only: a prior draw whose ODE solve fails (the solver
    # returns zeros, whose log is -inf) must not stop the fit here; the stages give
    # such draws weight zero.
    with numpyro.validation_enabled(False):
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
