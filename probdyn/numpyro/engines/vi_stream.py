"""Variational inference across a stream of task batches (amortised models) on NumPyro.

`probdyn.fit(model, stream, engine=probdyn.VI(...))` with a `probdyn.data.TaskStream`
lands here (the ``"stream"`` variant of the VI runner). Every step draws a fresh
batch of tasks and takes one optimiser step on the negative ELBO of that batch, per
counted point (the stream's ``count``). Latent sites are local to each task, so they
need an amortised guide function; a model whose only non-observed sites are ``param``
sites (a conditional or attentive neural process) is fitted by maximum likelihood (an
empty guide).

The ELBO is NumPyro's ``TraceMeanField_ELBO``: the KL between a Gaussian guide site and
its Gaussian model site is analytic (the NP ELBO of Garnelo et al. 2018b), the likelihood
term a reparameterised estimate. Steps run in compiled blocks: the host draws a block of
batches, one ``lax.scan`` consumes them. The compiled block is cached per (model, guide,
engine, options), so fitting the same model again does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro import handlers
from numpyro.infer import SVI, TraceMeanField_ELBO
from numpyro.optim import optax_to_numpyro
from tqdm.auto import tqdm

from probdyn.core.assemble import assemble_amortized
from probdyn.core.engines import VI
from probdyn.core.posterior import Posterior
from probdyn.data._tasks import TaskStream, stream_rng
from probdyn.engines.checks import check_stream_model
from probdyn.engines.keys import int_key
from probdyn.engines.losses import check_final_loss, learning_rate_fix
from probdyn.engines.vi_checkpoint import VICheckpoint
from probdyn.numpyro.bridge import as_key, seed_record, trace_model, versions
from probdyn.numpyro.engines.timing import CompileTimer
from probdyn.numpyro.engines.vi import block_ends, checkpoint_of, restore_state, state_tree
from probdyn.numpyro.primitives.ode import failed_solves, reset_failed_solves

__all__ = ["run_vi_stream"]

# Steps per compiled block. Fixed, so fits of any length share one program (only a last,
# shorter block compiles its own); small enough for a lively progress bar.
_BLOCK = 25


def _no_guide(*args: Any, **kwargs: Any) -> None:
    """The guide of a model without latent sites: maximum likelihood of its params."""


def _per_point(fn: Callable[..., Any], counter: TaskStream) -> Callable[..., Any]:
    """``fn`` with every log density divided by the batch's number of counted points."""

    def scaled(**kwargs: Any) -> Any:
        with handlers.scale(scale=1.0 / jnp.maximum(counter.points(kwargs), 1)):
            return fn(**kwargs)

    return scaled


def _counter(stream: TaskStream) -> TaskStream:
    """A stand-in with the stream's fields and count only: the compiled step depends on
    nothing else, so a new stream object of the same kind reuses it (cache key)."""
    return TaskStream(_no_guide, fields=stream.fields, count=stream.count)


def _options_key(kwargs: dict[str, Any]) -> tuple[tuple[str, Any], ...] | None:
    """A hashable form of the model options, or None (then nothing is cached)."""
    items = tuple(sorted(kwargs.items()))
    try:
        hash(items)
    except TypeError:
        return None
    return items


@functools.lru_cache(maxsize=8)
def _compiled(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    counter: TaskStream,
    engine: VI,
    options: tuple[tuple[str, Any], ...],
) -> tuple[SVI, Callable[..., Any]]:
    return _build(model, guide, counter, engine, dict(options))


def _build(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    counter: TaskStream,
    engine: VI,
    options: dict[str, Any],
) -> tuple[SVI, Callable[..., Any]]:
    schedule = optax.exponential_decay(
        engine.learning_rate, engine.num_steps, engine.final_learning_rate_fraction
    )
    svi = SVI(
        _per_point(model, counter),
        _per_point(guide, counter),
        optax_to_numpyro(optax.adam(schedule)),
        TraceMeanField_ELBO(num_particles=engine.num_particles),
    )

    @jax.jit
    def run_block(state: Any, batches: dict[str, jax.Array]) -> tuple[Any, jax.Array]:
        def body(s: Any, batch: dict[str, jax.Array]) -> tuple[Any, jax.Array]:
            return svi.stable_update(s, **batch, **options)

        return jax.lax.scan(body, state, batches)

    return svi, run_block


def _train(
    run_block: Callable[..., Any],
    state: Any,
    stream: TaskStream,
    rng: np.random.Generator,
    engine: VI,
    block: int,
    ckpt: VICheckpoint | None,
) -> tuple[Any, np.ndarray]:
    """The training loop: blocks of fresh batches, the checkpoint written (and a saved
    one resumed from, with the stream's generator state) as `probdyn.VI` says."""
    saved = ckpt.load(engine.num_steps) if ckpt else None
    done, losses = 0, []
    if saved is not None:
        state = restore_state(state, saved, engine.checkpoint or "")
        rng.bit_generator.state = saved["extra"]["stream_rng"]
        done, losses = saved["step"], [saved["losses"]]

    def save(at: tuple[Any, ...]) -> None:
        if ckpt:
            trace = np.concatenate(losses[: at[2]])
            ckpt.save(at[1], engine.num_steps, trace, state_tree(at[0]), {"stream_rng": at[3]})

    last = (state, done, len(losses), rng.bit_generator.state)  # after the last whole block
    bar = tqdm(total=engine.num_steps, initial=done, disable=not engine.progress_bar, desc="VI")
    try:
        for end in block_ends(done, engine.num_steps, block):
            state, loss = run_block(state, stream.draw_many(rng, end - done))
            losses.append(np.asarray(loss))
            bar.update(end - done)
            bar.set_postfix(loss=f"{float(loss[-1]):.4g}")
            last, begun, done = (state, end, len(losses), rng.bit_generator.state), done, end
            if ckpt and ckpt.due(begun, end, engine.num_steps):
                save(last)
    except KeyboardInterrupt:
        if last[1] > 0:
            save(last)
        raise
    finally:
        bar.close()
    return state, np.concatenate(losses)


def run_vi_stream(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: VI,
    key: int | jax.Array,
) -> Posterior:
    """Fit ``model`` (and ``engine.guide``) across the `TaskStream` ``args[0]``; an
    amortised `Posterior`."""
    stream: TaskStream = args[0]
    rng_key = as_key(key)
    seed = int_key(key)
    rng = stream_rng(seed if seed is not None else np.asarray(rng_key))
    first = stream.draw(rng)
    trace = trace_model(model, (), {**first, **kwargs}, rng_key)
    latent = [n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]]
    observed = [n for n, s in trace.items() if s["type"] == "sample" and s["is_observed"]]
    check_stream_model(engine, stream.fields, latent, observed)
    guide = engine.guide if callable(engine.guide) else _no_guide
    options = _options_key(kwargs)
    # The checkpoint settings change nothing compiled: one cache entry for any of them.
    trained = dataclasses.replace(engine, checkpoint=None, checkpoint_every=1000)
    if options is None:
        svi, run_block = _build(model, guide, _counter(stream), trained, kwargs)
    else:
        svi, run_block = _compiled(model, guide, _counter(stream), trained, options)

    block = min(_BLOCK, engine.num_steps)
    ckpt = checkpoint_of(engine, model, key, args, kwargs)
    reset_failed_solves()
    start = time.perf_counter()
    with CompileTimer() as timer:
        state = svi.init(rng_key, **{k: jnp.asarray(v) for k, v in first.items()}, **kwargs)
        state, losses = _train(run_block, state, stream, rng, engine, block, ckpt)
        params = jax.block_until_ready(svi.get_params(state))
    check_final_loss(losses, *learning_rate_fix(engine))
    wall = time.perf_counter() - start
    return assemble_amortized(
        backend="numpyro",
        model=model,
        kwargs=kwargs,
        engine=engine,
        seed=seed_record(key),
        versions=versions(),
        params={k: np.asarray(v) for k, v in params.items()},
        losses=losses,
        stream=stream,
        num_failed_solves=failed_solves(),
        wall_time=wall,
        compile_time=timer.seconds,
    )
