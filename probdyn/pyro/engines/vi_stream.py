"""Variational inference across a stream of task batches (amortised models) on Pyro.

The twin of `probdyn.numpyro.engines.vi_stream`: `probdyn.fit(model, stream,
engine=probdyn.VI(...))` with a `probdyn.data.TaskStream` lands here (through the
``"stream"`` variant of the VI runner). Every step draws a fresh
batch of tasks and takes one optimiser step on the negative ELBO of that batch, per counted
point (the stream's ``count``): model and guide run under ``poutine.scale(1 / points)``.
Latent sites are local to each task, so they need an amortised guide function; a model whose
only non-observed sites are ``param`` sites (a conditional or attentive neural process) is
fitted by maximum likelihood (an empty guide).

The ELBO is Pyro's ``TraceMeanField_ELBO``: the KL between a Gaussian guide site and its
Gaussian model site is analytic (the NP ELBO of Garnelo et al. 2018b), the likelihood term a
reparameterised estimate. The optimiser is the ordinary Pyro VI runner's Adam, its learning
rate decaying exponentially to ``final_learning_rate_fraction`` of its start.

As on NumPyro, an int ``key`` seeds the task stream with `probdyn.data.stream_rng`, so both
backends train on the same batches (the first batch sets the params up, the next
``num_steps`` are trained on). The run happens inside `isolated`: the global torch RNG and
the user's parameter store are left as they were. Steps run one by one in Python (Pyro has
nothing to compile), so ``compile_time`` is 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.util import zero_grads

from probdyn.core.assemble import assemble_amortized
from probdyn.core.engines import VI
from probdyn.core.posterior import Posterior
from probdyn.data._tasks import TaskStream, stream_rng
from probdyn.engines.checks import check_fittable, check_guide_samples, check_stream_model
from probdyn.engines.losses import check_final_loss, learning_rate_fix, optimisation_failed
from probdyn.pyro.bridge import (
    as_seed,
    isolated,
    latent_sites,
    observed_sites,
    plate_nesting,
    sub_seed,
    to_numpy,
    to_torch,
    trace_model,
    versions,
)
from probdyn.pyro.engines.map import adam
from probdyn.pyro.engines.vi import checkpoint_of, train
from probdyn.pyro.primitives.ode import failed_solves, reset_failed_solves

__all__ = ["run_vi_stream"]


def _no_guide(*args: Any, **kwargs: Any) -> None:
    """The guide of a model without latent sites: maximum likelihood of its params."""


def _batch(stream: TaskStream, rng: np.random.Generator) -> tuple[dict[str, Any], float]:
    """The next batch as tensors (floats in torch's default dtype) and its loss scale,
    ``1 / max(points, 1)``."""
    batch = stream.draw(rng)
    scale = 1.0 / max(float(stream.points(batch)), 1.0)
    return {k: to_torch(v) for k, v in batch.items()}, scale


def _check_guide(guide: Callable[..., Any], latent: list[str], kwargs: dict[str, Any]) -> None:
    """Raise if the guide does not sample every latent site of the model."""
    found = trace_model(guide, (), kwargs)
    check_guide_samples(guide, latent, {n: s["type"] for n, s in found.items()}, who="a guide")


def _step(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    elbo: TraceMeanField_ELBO,
    optim: Any,
    batch: dict[str, Any],
    scale: float,
) -> float:
    """One optimiser step on the per-point negative ELBO of ``batch`` (as ``SVI.step``,
    with the batch's own scale)."""
    scaled_model = poutine.scale(model, scale=scale)
    scaled_guide = poutine.scale(guide, scale=scale)
    with poutine.trace(param_only=True) as capture:
        loss = elbo.loss_and_grads(scaled_model, scaled_guide, **batch)
    values: list[Any] = [site["value"] for site in capture.trace.nodes.values()]
    params = {value.unconstrained() for value in values}
    optim(params)
    zero_grads(params)
    return float(loss)


def run_vi_stream(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: VI,
    key: int | torch.Generator,
) -> Posterior:
    """Fit ``model`` (and ``engine.guide``) across the `TaskStream` ``args[0]``; an
    amortised `Posterior`."""
    stream: TaskStream = args[0]
    seed = as_seed(key)
    rng = stream_rng(seed)  # an int key: the NumPyro runner's stream for that key
    options = {k: to_torch(v) for k, v in kwargs.items()}
    reset_failed_solves()
    begin = time.perf_counter()
    with isolated(seed):
        first, _ = _batch(stream, rng)
        with pyro.get_param_store().scope():  # a look at the sites only: no params kept
            trace = trace_model(model, (), {**first, **options})
        latent = latent_sites(trace)
        observed = list(observed_sites(trace))
        check_stream_model(engine, stream.fields, latent, observed)
        check_fittable(latent, [n for n, s in trace.items() if s["type"] == "param"])
        guide = engine.guide if callable(engine.guide) else _no_guide
        # The params start from the first batch, the guide's first (a name shared by model
        # and guide keeps the guide's initial value, as NumPyro's SVI.init does).
        torch.manual_seed(sub_seed(seed, 0))
        if latent:
            _check_guide(guide, latent, {**first, **options})
        trace_model(model, (), {**first, **options})

        elbo = TraceMeanField_ELBO(
            num_particles=engine.num_particles, max_plate_nesting=plate_nesting(trace)
        )
        optim = adam(engine.learning_rate, engine.num_steps, engine.final_learning_rate_fraction)
        ckpt = checkpoint_of(engine, model, seed, args, kwargs)

        def step(i: int, losses: np.ndarray) -> float:
            batch, scale = _batch(stream, rng)
            try:
                return _step(model, guide, elbo, optim, {**batch, **options}, scale)
            except (ValueError, RuntimeError, ArithmeticError, UserWarning) as err:
                if i == 0:
                    raise
                optimisation_failed(err, losses, i, *learning_rate_fix(engine))
                raise  # not reached: optimisation_failed raises

        def get_rng() -> dict[str, Any]:
            return {"stream_rng": rng.bit_generator.state}

        def set_rng(saved: dict[str, Any]) -> None:
            rng.bit_generator.state = saved["stream_rng"]

        losses = train(step, optim, engine, ckpt, (get_rng, set_rng))
        check_final_loss(losses, *learning_rate_fix(engine))
        params = {name: np.array(to_numpy(value)) for name, value in pyro.get_param_store().items()}
        wall = time.perf_counter() - begin
    return assemble_amortized(
        backend="pyro",
        model=model,
        kwargs=kwargs,
        engine=engine,
        seed=int(seed),
        versions=versions(),
        params=params,
        losses=losses,
        stream=stream,
        num_failed_solves=failed_solves(),
        wall_time=wall,
        compile_time=0.0,
    )
