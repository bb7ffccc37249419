"""Variational inference runner for NumPyro models (SVI with an autoguide)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro import handlers
from numpyro.infer import (
    SVI,
    Predictive,
    Trace_ELBO,
    init_to_median,
    init_to_sample,
    init_to_value,
)
from numpyro.infer.autoguide import (
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoNormal,
)
from numpyro.optim import optax_to_numpyro
from tqdm.auto import tqdm

from probdyn.core.engines import VI
from probdyn.core.posterior import Posterior
from probdyn.engines.checks import check_guide_samples, check_vi_model
from probdyn.engines.losses import check_final_loss, learning_rate_fix
from probdyn.engines.mcmc import init_strategy
from probdyn.numpyro.bridge import as_key, check_observed, trace_model
from probdyn.numpyro.engines.map import map_estimate
from probdyn.numpyro.engines.timing import CompileTimer
from probdyn.numpyro.postprocess import build_posterior
from probdyn.numpyro.primitives.ode import reset_failed_solves

__all__ = ["run_vi"]


def _guide(engine: VI, model: Callable[..., Any], start: dict[str, Any] | None) -> Any:
    """The autoguide ``engine.guide`` names, started at ``start`` if given."""
    init = init_strategy(engine.init, init_to_sample, init_to_median, start, init_to_value)
    if engine.guide == "normal":
        return AutoNormal(model, init_loc_fn=init)
    if engine.guide == "lowrank":
        kw = {} if engine.rank is None else {"rank": engine.rank}
        return AutoLowRankMultivariateNormal(model, init_loc_fn=init, **kw)
    return AutoIAFNormal(model, num_flows=2, init_loc_fn=init)


def _check_custom_guide(
    guide: Callable[..., Any],
    latent: list[str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: jax.Array,
) -> list[str]:
    """The guide's own ``param`` sites; raise if it misses a latent site of the model."""
    found: dict[str, str] = {}

    def probe() -> int:
        tr = handlers.trace(handlers.seed(guide, key)).get_trace(*args, **kwargs)
        found.update({n: s["type"] for n, s in tr.items()})
        return 0

    jax.eval_shape(probe)  # shapes and site names only: nothing is compiled or run
    return check_guide_samples(guide, latent, found)


def _custom_draws(
    guide: Callable[..., Any],
    params: dict[str, Any],
    latent: list[str],
    num: int,
    key: jax.Array,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    predictive = Predictive(guide, params=params, num_samples=num, return_sites=latent)
    return dict(predictive(key, *args, **kwargs))


def _optimise(
    svi: SVI, state: Any, engine: VI, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, np.ndarray]:
    # Steps run in compiled blocks (lax.scan); the progress bar advances per block.
    block = max(1, engine.num_steps // 50)

    @jax.jit
    def run_block(state: Any) -> tuple[Any, jax.Array]:
        def body(s: Any, _: None) -> tuple[Any, jax.Array]:
            s, loss = svi.stable_update(s, *args, **kwargs)
            return s, loss

        return jax.lax.scan(body, state, None, length=block)

    losses = []
    done = 0
    with tqdm(total=engine.num_steps, disable=not engine.progress_bar, desc="VI") as bar:
        while done < engine.num_steps:
            state, loss = run_block(state)
            losses.append(np.asarray(loss))
            done += block
            bar.update(block)
            bar.set_postfix(loss=f"{float(loss[-1]):.4g}")
    return state, np.concatenate(losses)[: engine.num_steps]


def run_vi(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: VI,
    key: int | jax.Array,
) -> Posterior:
    """Fit an autoguide (or the user's guide function) by SVI; its draws form one
    chain of ``num_draws`` draws. (A `TaskStream` argument is
    trained by `run_vi_stream`, registered as the ``"stream"`` variant.)"""
    rng = as_key(key)
    trace = trace_model(model, args, kwargs, rng)
    observed = check_observed(trace)
    latent = [n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]]
    model_params = [n for n, s in trace.items() if s["type"] == "param"]
    check_vi_model(
        engine, latent, model_params, sum(int(np.size(trace[n]["value"])) for n in latent)
    )
    custom = callable(engine.guide)
    guide_params: list[str] = []
    if callable(engine.guide):
        guide_params = _check_custom_guide(engine.guide, latent, args, kwargs, rng)
    centre = None
    if engine.init == "map":
        centre, _ = map_estimate(model, args, kwargs, jax.random.fold_in(rng, 2))
    guide: Any = engine.guide if custom else _guide(engine, model, centre)
    schedule = optax.exponential_decay(
        engine.learning_rate, engine.num_steps, engine.final_learning_rate_fraction
    )
    optim = optax_to_numpyro(optax.adam(schedule))
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=engine.num_particles))
    k_init, k_draw = jax.random.split(rng)
    reset_failed_solves()
    start = time.perf_counter()
    with CompileTimer() as timer:
        state = svi.init(k_init, *args, **kwargs)
        state, losses = _optimise(svi, state, engine, args, kwargs)
        check_final_loss(losses, *learning_rate_fix(engine))
        fitted = svi.get_params(state)
        if custom:
            draws = _custom_draws(guide, fitted, latent, engine.num_draws, k_draw, args, kwargs)
        else:
            draws = guide.sample_posterior(k_draw, fitted, sample_shape=(engine.num_draws,))
        draws = jax.block_until_ready(draws)
    wall = time.perf_counter() - start
    return build_posterior(
        model=model,
        args=args,
        kwargs=kwargs,
        engine=engine,
        key=key,
        latent={k: jnp.expand_dims(draws[k], 0) for k in latent},
        params={k: fitted[k] for k in [*model_params, *guide_params]},
        observed=observed,
        traces={"loss": losses},
        wall_time=wall,
        compile_time=timer.seconds,
    )
