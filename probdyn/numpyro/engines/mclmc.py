"""Microcanonical Langevin Monte Carlo for NumPyro models, on BlackJAX's kernel and tuner.

The target is the model's log joint density in unconstrained space (NumPyro's
``potential_energy``, Jacobians included, as NUTS sees it), as a function of one flat
vector ``x`` of the latent sites (``ravel_pytree`` order). Fixed ``param`` values (from a
MAP or `Posterior` start) are substituted into the model first.

A chain (`MCLMC`):

1. starts at its own point (`probdyn.numpyro.engines.starts.chain_starts`, or NumPyro's
   ``initialize_model`` under the ``"median"`` / ``"sample"`` init strategy, which also
   retries until the density is finite);
2. tunes its step size and momentum decoherence length ``L`` with
   ``blackjax.mclmc_find_L_and_step_size`` over ``num_warmup`` steps, split 80 / 10 /
   10 % as in MILE (with ``diagonal_preconditioning``, BlackJAX adds ``num_warmup / 30``
   steps to re-tune the step size after measuring the variances), starting from a
   step size found at the chain's start (``_initial_step_size``: BlackJAX's guess
   ``sqrt(dim) / 4``, halved until one trial step's energy error is within the
   target; without it, chains started at a network's MAP on power-plant jumped out of
   their basin on the first tuning step and froze there). ``L`` comes from the
   autocorrelation of the last phase's ``num_warmup / 10`` steps, so it grows with
   them: on a 1x50 network (UCI yacht, energy) 2000 tuning steps gave ``L`` of about
   22 step sizes and chains that random-walked, 20000 gave about 180;
3. takes ``num_samples * thinning`` steps of ``blackjax.mcmc.mclmc.build_kernel()`` with
   the tuned values, keeping every ``thinning``-th position.

Tuning is per chain, not shared: MILE tunes each ensemble-started chain on its own
(one per device), because chains started from different ensemble members sit in
different basins of a network's posterior, whose local scales (and so step sizes)
differ; and chains that share nothing stay independent, so R-hat compares them
honestly. All chains are one ``jax.vmap``: tuning is one compiled program, sampling
another, run in at most 50 blocks of draws (the progress bar advances per block;
without a bar, all draws are one call). The key of draw ``i`` is ``fold_in(chain
key, i)``, so the blocks do not change the draws.

MCLMC needs at least two dimensions (its velocity lives on the unit sphere); a model
with one latent dimension is sampled jointly with an independent standard-normal
auxiliary coordinate, which is then dropped: the joint density factorises, so the
model's marginal is unchanged.

Sample stats per kept draw: ``lp`` (the log density there, as NUTS's), ``energy_change``
and ``kinetic_change`` (BlackJAX's ``MCLMCInfo`` for the step that produced the draw),
``diverging`` (a step since the previous draw was reverted because the state became
non-finite) and ``step_size`` (the chain's tuned value). ``attrs`` holds each chain's
tuned ``L``, ``tuning_steps`` (BlackJAX's count of integrator steps spent tuning),
``initial_step_size`` (where its tuning started) and ``energy_variance_per_dim``, the
realised variance of ``energy_change`` per dimension while sampling, to compare with
``desired_energy_variance``; with
``diagonal_preconditioning``, ``traces["inverse_mass_matrix"]`` is ``(chain, dim)``.
A chain whose kept draws never move (its tuning collapsed) is named in a
``RuntimeWarning``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
from blackjax.adaptation.mclmc_adaptation import MCLMCAdaptationState
from blackjax.mcmc.mclmc import MCLMCInfo
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.infer import init_to_median, init_to_sample
from numpyro.infer.util import constrain_fn, initialize_model, potential_energy
from tqdm.auto import tqdm

from probdyn.core.engines import MCLMC
from probdyn.core.posterior import Posterior
from probdyn.engines.checks import check_has_latent
from probdyn.engines.mcmc import failed_solve_names, init_failure_error, init_strategy
from probdyn.numpyro.bridge import as_key, check_observed, site_trace
from probdyn.numpyro.engines.starts import chain_starts
from probdyn.numpyro.engines.timing import CompileTimer
from probdyn.numpyro.postprocess import build_posterior
from probdyn.numpyro.primitives.ode import reset_failed_solves

__all__ = ["run_mclmc"]

# The tuner's phases, as fractions of num_warmup: MILE's phase_ratio (0.8, 0.1, 0.1)
# (src/training/warmup.py, custom_mclmc_warmup), and its num_effective_samples (the
# memory of the step-size average; BlackJAX's default is 150).
_PHASES = (0.8, 0.1, 0.1)
_NUM_EFFECTIVE_SAMPLES = 100
_MAX_BLOCKS = 50
# Halvings of BlackJAX's first step size guess before the tuner starts (2^-40 ~ 1e-12).
_MAX_HALVINGS = 40


class _Target(NamedTuple):
    """The flat target: its log density, the chains' starts and the way back."""

    logdensity: Callable[[jax.Array], jax.Array]
    starts: jax.Array  # (num_chains, dim + pad)
    dim: int  # the model's unconstrained dimension
    unravel: Callable[[jax.Array], dict[str, jax.Array]]


def _check_continuous(trace: dict[str, Any], latent: list[str]) -> None:
    discrete = [n for n in latent if trace[n]["fn"].support.is_discrete]
    if discrete:
        raise ValueError(
            f"MCLMC: latent site(s) {discrete} are discrete; MCLMC moves continuous latent "
            "sites only. Marginalise them out of the model, or use NUTS (which enumerates "
            "discrete sites)."
        )


def _unconstrained_starts(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: MCLMC,
    starts: Any,
    key: jax.Array,
) -> dict[str, jax.Array]:
    """The chains' starts, stacked on a leading chain axis (also for one chain).

    For ``"median"`` / ``"sample"``, NumPyro's ``initialize_model`` runs inside one
    ``jit`` (measured on the benchmark network: 12 s of compiling against 30 s for
    its eager, op-by-op run), so its own validity check is made here afterwards.
    """
    if starts is not None:
        return starts if engine.num_chains > 1 else jax.tree.map(lambda x: x[None], starts)
    strategy = init_strategy(engine.init, init_to_sample, init_to_median)
    keys = jax.random.split(key, engine.num_chains)

    def init(keys: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
        info = initialize_model(
            keys, model, init_strategy=strategy, model_args=args, model_kwargs=kwargs
        )
        return info.param_info.z, info.param_info.potential_energy

    z, energy = jax.jit(init)(keys)
    if not np.all(np.isfinite(np.asarray(energy))):
        failed = _failed_solves(model, args, kwargs, strategy, keys[0])
        if failed:
            raise init_failure_error("MCLMC", failed)
        raise RuntimeError(
            f"MCLMC(init={engine.init!r}) could not find valid initial parameters in 100 "
            "tries: the log density is not finite there. Check the model and its priors, "
            "or start elsewhere (init='map', or init=<a Posterior of the same model>)."
        )
    return z


def _failed_solves(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    strategy: Any,
    key: jax.Array,
) -> list[str]:
    """The ODE/SDE primitives whose solves fail at the init strategy's point."""
    seeded = handlers.substitute(handlers.seed(model, key), substitute_fn=strategy)
    try:
        tr = handlers.trace(seeded).get_trace(*args, **kwargs)
    except Exception:  # the model fails outright: NumPyro's own error says more
        return []
    return failed_solve_names(
        {n: s["fn"].log_prob(s["value"]) for n, s in tr.items() if s["type"] == "sample"}
    )


def _target(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    z: dict[str, jax.Array],
    key: jax.Array,
) -> _Target:
    """The flat log density and starts; one dimension is padded to two (module doc)."""
    flat = jax.vmap(lambda v: ravel_pytree(v)[0])(z)
    unravel = ravel_pytree(jax.tree.map(lambda x: x[0], z))[1]
    dim = flat.shape[1]
    potential = partial(potential_energy, model, args, kwargs)
    if dim >= 2:
        return _Target(lambda x: -potential(unravel(x)), flat, dim, unravel)

    def padded(x: jax.Array) -> jax.Array:
        return -potential(unravel(x[:dim])) - 0.5 * x[dim] ** 2

    aux = jax.random.normal(key, (flat.shape[0], 1), flat.dtype)
    return _Target(padded, jnp.concatenate([flat, aux], axis=1), dim, unravel)


def _initial_step_size(target: _Target, engine: MCLMC, state: Any, key: jax.Array) -> jax.Array:
    """The step size the tuner starts from: BlackJAX's first guess ``sqrt(dim) / 4``,
    halved until one trial step from the start has a squared energy error of at most
    ``dim * desired_energy_variance`` (the tuner's target) and stays finite.

    The trial steps are not taken: the chain stays at its start. BlackJAX's first
    guess is scale-free, and on a concentrated posterior (a network fitted to
    thousands of rows, started at a MAP) its first tuning step jumps far out of the
    basin; there the log density is so large (1e8 on power-plant) that float32
    rounding makes the energy errors noise, the tuner drives the step size to 0 and
    the chain freezes where it landed. MILE avoids the jump with a small fixed first
    step size (``step_size_init``, 0.001 in its UCI runs); this search finds one on
    the target's own scale.
    """
    kernel = blackjax.mcmc.mclmc.build_kernel()
    dim = state.position.shape[0]
    bound = dim * engine.desired_energy_variance
    ones = jnp.ones(dim, state.position.dtype)

    def fits(step_size: jax.Array) -> jax.Array:
        _, info = kernel(key, state, target.logdensity, ones, jnp.sqrt(dim), step_size)
        change = info.energy_change
        return info.nonans & jnp.isfinite(change) & (jnp.square(change) <= bound)

    def halve(carry: tuple[jax.Array, jax.Array, jax.Array]) -> Any:
        step_size, i, _ = carry
        return step_size / 2, i + 1, fits(step_size / 2)

    first = jnp.asarray(jnp.sqrt(dim) * 0.25, state.position.dtype)
    step_size, _, _ = jax.lax.while_loop(
        lambda c: ~c[2] & (c[1] < _MAX_HALVINGS), halve, (first, jnp.asarray(0), fits(first))
    )
    return step_size


def _tuner(target: _Target, engine: MCLMC) -> Callable[[jax.Array, jax.Array], Any]:
    """One chain's tuning: ``(start, key) -> (log density at the start, first step
    size, state, MCLMCAdaptationState, steps)``."""
    kernel = blackjax.mcmc.mclmc.build_kernel()

    def tune(x0: jax.Array, key: jax.Array) -> Any:
        k_init, k_probe, k_tune = jax.random.split(key, 3)
        state = blackjax.mcmc.mclmc.init(x0, target.logdensity, k_init)
        dim = x0.shape[0]
        first = _initial_step_size(target, engine, state, k_probe)
        params = MCLMCAdaptationState(
            L=jnp.asarray(jnp.sqrt(dim), x0.dtype),
            step_size=first,
            inverse_mass_matrix=jnp.ones(dim, x0.dtype),
        )
        return (
            state.logdensity,
            first,
            *blackjax.mclmc_find_L_and_step_size(
                mclmc_kernel=kernel,
                num_steps=engine.num_warmup,
                state=state,
                rng_key=k_tune,
                logdensity_fn=target.logdensity,
                frac_tune1=_PHASES[0],
                frac_tune2=_PHASES[1],
                frac_tune3=_PHASES[2],
                desired_energy_var=engine.desired_energy_variance,
                num_effective_samples=_NUM_EFFECTIVE_SAMPLES,
                diagonal_preconditioning=engine.diagonal_preconditioning,
                params=params,
            ),
        )

    return tune


def _block(target: _Target, engine: MCLMC, size: int) -> Callable[..., Any]:
    """One chain's ``size`` kept draws from draw ``first`` on, ``thinning`` steps each."""
    kernel = blackjax.mcmc.mclmc.build_kernel()

    def block(state: Any, params: Any, key: jax.Array, first: jax.Array) -> Any:
        def one_step(carry: Any, k: jax.Array) -> Any:
            state, _, reverted = carry
            state, info = kernel(
                k,
                state,
                logdensity_fn=target.logdensity,
                inverse_mass_matrix=params.inverse_mass_matrix,
                L=params.L,
                step_size=params.step_size,
            )
            return (state, info, reverted | ~info.nonans), None

        def one_draw(state: Any, i: jax.Array) -> Any:
            keys = jax.random.split(jax.random.fold_in(key, i), engine.thinning)
            zero = jnp.zeros_like(state.logdensity)
            info0 = MCLMCInfo(state.logdensity, zero, zero, jnp.ones((), bool))
            init = (state, info0, jnp.zeros((), bool))
            (state, info, reverted), _ = jax.lax.scan(one_step, init, keys)
            x = state.position
            lp = info.logdensity
            if x.shape[0] > target.dim:  # the auxiliary coordinate's term is not the model's
                lp = lp + 0.5 * x[-1] ** 2
            out = {
                "x": x[: target.dim],
                "lp": lp,
                "energy_change": info.energy_change,
                "kinetic_change": info.kinetic_change,
                "diverging": reverted,
            }
            return state, out

        return jax.lax.scan(one_draw, state, first + jnp.arange(size))

    return block


def _check_starts(logdensity: np.ndarray) -> None:
    """Raise if a chain started where the density is not finite (a `Posterior` or MAP
    start: the init strategies retry until it is finite)."""
    bad = np.flatnonzero(~np.isfinite(logdensity))
    if bad.size:
        raise ValueError(
            f"MCLMC: the log density is not finite at the start of chain(s) {bad.tolist()} "
            "(from init=Posterior or 'map'); start from another posterior or init='median'."
        )


def _warn_frozen(flat: np.ndarray, step_size: np.ndarray) -> None:
    """Warn about chains whose kept draws never moved (their tuning collapsed)."""
    if flat.shape[1] < 2:
        return
    frozen = np.flatnonzero(np.all(flat == flat[:, :1], axis=(1, 2)))
    if frozen.size:
        warnings.warn(
            f"MCLMC: chain(s) {frozen.tolist()} did not move while sampling (tuned step "
            f"size {step_size[frozen].tolist()}): their tuning collapsed, so their draws "
            "are one point, not a posterior sample. Start them elsewhere, or tune longer "
            "or with a smaller desired_energy_variance.",
            RuntimeWarning,
            stacklevel=4,
        )


def _sample(
    target: _Target, engine: MCLMC, key: jax.Array
) -> tuple[dict[str, np.ndarray], Any, int]:
    """Tune every chain, then sample them; draws ``(chain, draw, dim)`` and stats."""
    n_chains, n_draws = engine.num_chains, engine.num_samples
    # Blocks only feed the progress bar; without one, all draws are one program call.
    size = -(-n_draws // _MAX_BLOCKS) if engine.progress_bar else n_draws
    k_tune, k_draw = jax.random.split(key)
    total = engine.num_warmup + n_draws * engine.thinning
    with tqdm(total=total, disable=not engine.progress_bar, desc="MCLMC") as bar:
        bar.set_postfix(phase="tuning")
        tune = jax.jit(jax.vmap(_tuner(target, engine)))
        start, initial, state, params, steps = tune(
            target.starts, jax.random.split(k_tune, n_chains)
        )
        _check_starts(np.asarray(start))
        bar.update(engine.num_warmup)
        bar.set_postfix(step_size=f"{float(jnp.mean(params.step_size)):.3g}")
        block = jax.jit(jax.vmap(_block(target, engine, size), in_axes=(0, 0, 0, None)))
        chain_keys = jax.random.split(k_draw, n_chains)
        out = []
        for first in range(0, n_draws, size):
            state, draws = block(state, params, chain_keys, jnp.asarray(first))
            out.append(jax.device_get(draws))
            bar.update(min(size, n_draws - first) * engine.thinning)
    stats = {k: np.concatenate([o[k] for o in out], axis=1)[:, :n_draws] for k in out[0]}
    stats["initial_step_size"] = np.asarray(initial)
    return stats, jax.device_get(params), int(np.max(steps))


def run_mclmc(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: MCLMC,
    key: int | jax.Array,
) -> Posterior:
    """Run MCLMC (see the module docstring) and return a `Posterior` (chains x draws).

    Raises:
        ValueError: a discrete latent site, or a start where the density is not finite.
        RuntimeError: no valid initial point because every solve of an ODE/SDE failed
            there (`init_failure_error`).
    """
    rng = as_key(key)
    trace = site_trace(model, args, kwargs, rng)
    observed = check_observed(trace)
    latent = [n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]]
    param_sites = [n for n, s in trace.items() if s["type"] == "param"]
    params = {n: trace[n]["value"] for n in param_sites}
    check_has_latent(latent)
    _check_continuous(trace, latent)
    run_model, starts, fixed = chain_starts(
        engine.init,
        model,
        args,
        kwargs,
        latent,
        param_sites,
        engine.num_chains,
        jax.random.fold_in(rng, 2),
    )
    params = {**params, **fixed}
    reset_failed_solves()
    start = time.perf_counter()
    with CompileTimer() as timer:
        k_start, k_pad, k_run = jax.random.split(jax.random.fold_in(rng, 3), 3)
        z = _unconstrained_starts(run_model, args, kwargs, engine, starts, k_start)
        target = _target(run_model, args, kwargs, z, k_pad)
        stats, tuned, tuning_steps = _sample(target, engine, k_run)
        flat = stats.pop("x")
        initial = stats.pop("initial_step_size")
        constrain = jax.jit(
            jax.vmap(jax.vmap(lambda x: constrain_fn(run_model, args, kwargs, target.unravel(x))))
        )
        draws = jax.block_until_ready(constrain(flat))
    wall = time.perf_counter() - start
    step_size = np.asarray(tuned.step_size)
    _warn_frozen(flat, step_size)
    energy = stats["energy_change"]
    traces = {}
    if engine.diagonal_preconditioning:
        traces["inverse_mass_matrix"] = np.asarray(tuned.inverse_mass_matrix)[:, : target.dim]
    return build_posterior(
        model=model,
        args=args,
        kwargs=kwargs,
        engine=engine,
        key=key,
        latent={k: draws[k] for k in latent},
        params=params,
        observed=observed,
        sample_stats={
            **stats,
            "step_size": np.broadcast_to(step_size[:, None], energy.shape).copy(),
        },
        traces=traces,
        wall_time=wall,
        compile_time=timer.seconds,
        extra_attrs={
            "L": np.asarray(tuned.L).tolist(),
            "initial_step_size": initial.tolist(),
            "tuning_steps": tuning_steps,
            "energy_variance_per_dim": (np.var(energy, axis=1) / target.starts.shape[1]).tolist(),
        },
    )
