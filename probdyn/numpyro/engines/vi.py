"""Variational inference runner for NumPyro models (SVI with an autoguide)."""

from __future__ import annotations

import functools
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
from probdyn.engines.vi_checkpoint import VICheckpoint, decode_tree, vi_fingerprint
from probdyn.numpyro.bridge import as_key, check_observed, seed_record, trace_model
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


def checkpoint_of(
    engine: VI, model: Callable[..., Any], key: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> VICheckpoint | None:
    """The fit's checkpoint file (`probdyn.engines.vi_checkpoint`), or None without one."""
    if engine.checkpoint is None:
        return None
    fingerprint = vi_fingerprint(
        backend="numpyro",
        model=model,
        engine=engine,
        key=seed_record(key),
        args=args,
        kwargs=kwargs,
    )
    return VICheckpoint(engine.checkpoint, engine.checkpoint_every, fingerprint)


def state_tree(state: Any) -> dict[str, Any]:
    """The SVI state (optimiser state, mutable state, random key) as a checkpoint tree."""
    leaves, treedef = jax.tree.flatten(state)
    return {"treedef": str(treedef), "leaves": [np.asarray(x) for x in leaves]}


def restore_state(state: Any, saved: dict[str, Any], path: str) -> Any:
    """``state`` (a fresh ``svi.init``) with the saved leaves; raises if they do not fit."""
    tree = decode_tree(*saved["state"])
    leaves, treedef = jax.tree.flatten(state)
    shapes = [(np.shape(x), np.dtype(x.dtype)) for x in leaves]
    stored = [(a.shape, a.dtype) for a in tree["leaves"]]
    if tree["treedef"] != str(treedef) or shapes != stored:
        raise ValueError(
            f"VI(checkpoint={path!r}): the saved optimiser state does not fit this fit's "
            f"(its structure, shapes or dtypes differ: saved {stored[:4]}..., here "
            f"{shapes[:4]}...; 64-bit mode changed?). Delete the file or pass another path."
        )
    return jax.tree.unflatten(treedef, [jnp.asarray(a) for a in tree["leaves"]])


def block_ends(done: int, num_steps: int, block: int) -> list[int]:
    """Where the compiled blocks after step ``done`` end: at the multiples of ``block``
    and at ``num_steps``, so that a fit resumed from a block's end runs the very blocks
    of an uninterrupted one.

    Example:
        >>> block_ends(0, 10, 4), block_ends(4, 10, 4), block_ends(10, 10, 4)
        ([4, 8, 10], [8, 10], [])
    """
    if done >= num_steps:
        return []
    return [*range((done // block + 1) * block, num_steps, block), num_steps]


def _optimise(
    svi: SVI,
    state: Any,
    engine: VI,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    ckpt: VICheckpoint | None,
) -> tuple[Any, np.ndarray]:
    # Steps run in compiled blocks (lax.scan); the progress bar advances per block.
    block = max(1, engine.num_steps // 50)

    @functools.partial(jax.jit, static_argnums=1)
    def run_block(state: Any, length: int) -> tuple[Any, jax.Array]:
        def body(s: Any, _: None) -> tuple[Any, jax.Array]:
            s, loss = svi.stable_update(s, *args, **kwargs)
            return s, loss

        return jax.lax.scan(body, state, None, length=length)

    saved = ckpt.load(engine.num_steps) if ckpt else None
    done, losses = 0, []
    if saved is not None:
        state = restore_state(state, saved, engine.checkpoint or "")
        done, losses = saved["step"], [saved["losses"]]
    last = (state, done, len(losses))  # the state after the last whole block
    # The bar starts once the first block has compiled and run: started before, its
    # rate (and so its time left) would count the compile as optimisation time.
    bar = None
    try:
        for end in block_ends(done, engine.num_steps, block):
            state, loss = run_block(state, end - done)
            losses.append(np.asarray(loss))
            if bar is None:
                bar = tqdm(
                    total=engine.num_steps,
                    initial=done,
                    disable=not engine.progress_bar,
                    desc="VI",
                )
            bar.update(end - done)
            bar.set_postfix(loss=f"{float(loss[-1]):.4g}")
            last, begun, done = (state, end, len(losses)), done, end
            if ckpt and ckpt.due(begun, end, engine.num_steps):
                ckpt.save(end, engine.num_steps, np.concatenate(losses), state_tree(state))
    except KeyboardInterrupt:
        if ckpt and last[1] > 0:
            trace = np.concatenate(losses[: last[2]])
            ckpt.save(last[1], engine.num_steps, trace, state_tree(last[0]))
        raise
    finally:
        if bar is not None:
            bar.close()
    return state, np.concatenate(losses)


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
    ckpt = checkpoint_of(engine, model, key, args, kwargs)
    k_init, k_draw = jax.random.split(rng)
    reset_failed_solves()
    start = time.perf_counter()
    with CompileTimer() as timer:
        state = svi.init(k_init, *args, **kwargs)
        state, losses = _optimise(svi, state, engine, args, kwargs, ckpt)
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
