"""Variational inference runner for Pyro models (SVI with an autoguide).

Differences from the NumPyro runner, forced by Pyro:

* ``guide="flow"`` (Pyro's ``AutoIAFNormal``) ignores ``init``: Pyro's flow guide
  always starts at a standard normal in unconstrained space.
* With ``num_particles > 1`` the particles are vectorised when the model allows it
  (every batch dimension is a ``pyro.plate``, and one trial ELBO evaluation
  succeeds); other models (e.g. with a neural ODE inside) loop over particles.
* As on NumPyro, observations need not sit inside ``pyro.plate``: the ELBO is
  told the model's real plate nesting, so Pyro's site-shape check accepts them.
* The fit runs in a private, empty parameter store: ``pyro.param`` sites start at
  their initial values and the user's own parameter store is left as it was.
* A `probdyn.data.TaskStream` argument (training across task batches, an amortised
  posterior) is handed to `probdyn.pyro.engines.vi_stream.run_vi_stream`, as on NumPyro.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoNormal,
    init_to_median,
    init_to_sample,
    init_to_value,
)
from tqdm.auto import tqdm

from probdyn.core.engines import VI
from probdyn.core.posterior import Posterior
from probdyn.engines.checks import check_guide_samples, check_vi_model
from probdyn.engines.losses import check_final_loss, learning_rate_fix, optimisation_failed
from probdyn.engines.mcmc import init_strategy
from probdyn.engines.vi_checkpoint import (
    DeferredInterrupt,
    VICheckpoint,
    decode_tree,
    learning_rate_at,
    vi_fingerprint,
)
from probdyn.pyro.bridge import (
    as_seed,
    check_observed,
    isolated,
    latent_sites,
    param_sites,
    plate_nesting,
    plates_complete,
    sub_seed,
    to_torch_args,
    trace_model,
)
from probdyn.pyro.engines.map import adam, map_estimate
from probdyn.pyro.postprocess import build_posterior
from probdyn.pyro.primitives.ode import reset_failed_solves

__all__ = ["run_vi"]


def _guide(engine: VI, model: Callable[..., Any], start: dict[str, Any] | None) -> Any:
    """The autoguide ``engine.guide`` names, started at ``start`` if given."""
    if engine.guide == "flow":
        return AutoIAFNormal(model, num_transforms=2)  # Pyro's flow guide takes no init
    init = init_strategy(engine.init, init_to_sample, init_to_median, start, init_to_value)
    if engine.guide == "normal":
        return AutoNormal(model, init_loc_fn=init)
    return AutoLowRankMultivariateNormal(model, init_loc_fn=init, rank=engine.rank)


def _elbo(
    engine: VI,
    model: Callable[..., Any],
    guide: Any,
    trace: dict[str, Any],
    args: tuple,
    kwargs: dict,
) -> Trace_ELBO:
    """Trace_ELBO, with vectorised particles when the model allows it: every batch
    dimension of every site is a plate, and one trial evaluation runs without an
    error or a warning (Pyro checks site shapes against plates while validation is
    on). Otherwise the particles are looped over."""
    nesting = plate_nesting(trace)
    if engine.num_particles > 1 and plates_complete(trace):
        elbo = Trace_ELBO(
            num_particles=engine.num_particles, vectorize_particles=True, max_plate_nesting=nesting
        )
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("error")
                loss = elbo.loss(model, guide, *args, **kwargs)
            if np.isfinite(loss):
                return elbo
        except Exception:
            pass
    return Trace_ELBO(num_particles=engine.num_particles, max_plate_nesting=nesting)


def _check_custom_guide(
    guide: Callable[..., Any], latent: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[str]:
    """The guide's own ``param`` sites; raise if it misses a latent site of the model.

    Runs the guide once (which also creates its params in the run's private store).
    """
    found = trace_model(guide, args, kwargs)
    return check_guide_samples(guide, latent, {n: site["type"] for n, site in found.items()})


def checkpoint_of(
    engine: VI, model: Callable[..., Any], seed: int, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> VICheckpoint | None:
    """The fit's checkpoint file (`probdyn.engines.vi_checkpoint`), or None without one."""
    if engine.checkpoint is None:
        return None
    fingerprint = vi_fingerprint(
        backend="pyro", model=model, engine=engine, key=int(seed), args=args, kwargs=kwargs
    )
    return VICheckpoint(engine.checkpoint, engine.checkpoint_every, fingerprint)


def _fit_state(optim: Any) -> dict[str, Any]:
    """Params (unconstrained), optimiser state and the torch RNG state: a checkpoint tree."""
    params = pyro.get_param_store().get_state()["params"]
    return {
        "params": {n: v.detach() for n, v in params.items()},
        "optim": optim.get_state(),
        "torch_rng": torch.get_rng_state(),
    }


def _restore(optim: Any, engine: VI, saved: dict[str, Any]) -> None:
    """Set the params, the optimiser state and the torch RNG to the saved ones. A run
    extended past its ``num_steps`` continues on the new schedule from the saved step."""
    skeleton, arrays = saved["state"]
    tree = decode_tree(skeleton, arrays, array=torch.as_tensor)
    params = pyro.get_param_store().get_state()["params"]
    here = {n: (tuple(v.shape), v.dtype) for n, v in params.items()}
    there = {n: (tuple(v.shape), v.dtype) for n, v in tree["params"].items()}
    if here != there:
        raise ValueError(
            f"VI(checkpoint={engine.checkpoint!r}): the saved params do not fit this fit's "
            f"(names, shapes or dtypes differ: saved {there}, here {here}). Delete the file "
            "or pass another path."
        )
    with torch.no_grad():
        for name, value in tree["params"].items():
            params[name].copy_(value)
    if saved["num_steps"] != engine.num_steps:
        lrd = engine.final_learning_rate_fraction ** (1.0 / engine.num_steps)
        for state in tree["optim"].values():
            for group in state["param_groups"]:
                group.update(lr=learning_rate_at(engine, saved["step"]), lrd=lrd)
    optim.set_state(tree["optim"])
    torch.set_rng_state(tree["torch_rng"])


def train(
    step: Callable[[int, np.ndarray], float],
    optim: Any,
    engine: VI,
    ckpt: VICheckpoint | None,
    extra: tuple[Callable[[], Any], Callable[[Any], None]] | None = None,
) -> np.ndarray:
    """Run ``step(i, losses)`` (optimiser step ``i``, its loss) for the steps not yet done: from a
    saved checkpoint's step when there is one, writing the checkpoint as `probdyn.VI`
    says. ``extra`` gets and sets more state to keep (a task stream's generator).

    Raises:
        KeyboardInterrupt: after the step under way and a checkpoint write, on Ctrl-C.
    """
    losses = np.empty(engine.num_steps)
    first = 0
    saved = ckpt.load(engine.num_steps) if ckpt else None
    if saved is not None:
        _restore(optim, engine, saved)
        if extra:
            extra[1](saved["extra"])
        first = saved["step"]
        losses[:first] = saved["losses"]
    block = max(1, engine.num_steps // 50)  # progress bar refreshes per block of steps
    bar = tqdm(total=engine.num_steps, initial=first, disable=not engine.progress_bar, desc="VI")
    with bar, DeferredInterrupt(ckpt is not None) as stop:
        for i in range(first, engine.num_steps):
            losses[i] = step(i, losses)
            if ckpt and (stop.requested or ckpt.due(i, i + 1, engine.num_steps)):
                state, more = _fit_state(optim), extra[0]() if extra else None
                ckpt.save(i + 1, engine.num_steps, losses[: i + 1], state, more)
            if (i + 1) % block == 0 or i + 1 == engine.num_steps:
                bar.update(i + 1 - bar.n)
                bar.set_postfix(loss=f"{losses[i]:.4g}")
            if stop.requested:
                raise KeyboardInterrupt
    return losses


def _optimise(
    svi: SVI,
    engine: VI,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    ckpt: VICheckpoint | None,
) -> np.ndarray:
    """The loss per step; raises if the optimisation diverged (`probdyn.engines.losses`):
    a step after the first fails, or the loss ends non-finite."""

    def step(i: int, losses: np.ndarray) -> float:
        try:
            return float(svi.step(*args, **kwargs))
        except (ValueError, RuntimeError, ArithmeticError, UserWarning) as err:
            if i == 0:
                raise
            optimisation_failed(err, losses, i, *learning_rate_fix(engine))
            raise  # not reached: optimisation_failed raises

    losses = train(step, svi.optim, engine, ckpt)
    check_final_loss(losses, *learning_rate_fix(engine))
    return losses


def run_vi(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: VI,
    key: int | torch.Generator,
) -> Posterior:
    """Fit an autoguide (or the user's guide function) by SVI; its draws form one
    chain of ``num_draws`` draws. (A `TaskStream` argument is
    trained by `run_vi_stream`, registered as the ``"stream"`` variant.)

    See the module docstring for how this differs from the NumPyro runner.
    """
    seed = as_seed(key)
    targs, tkwargs = to_torch_args(args, kwargs)
    with isolated(seed):
        trace = trace_model(model, targs, tkwargs)
        observed = check_observed(trace)
        latent = latent_sites(trace)
        model_params = list(param_sites(trace))
        check_vi_model(engine, latent, model_params, sum(trace[n]["value"].numel() for n in latent))
        guide_params: list[str] = []
        if callable(engine.guide):
            guide_params = _check_custom_guide(engine.guide, latent, targs, tkwargs)
        centre = None
        if engine.init == "map":
            centre, _ = map_estimate(model, targs, tkwargs, sub_seed(seed, 2))
        reset_failed_solves()
        begin = time.perf_counter()
        torch.manual_seed(sub_seed(seed, 0))
        custom = callable(engine.guide)
        guide: Any = engine.guide if custom else _guide(engine, model, centre)
        guide(*targs, **tkwargs)  # sets the guide up outside any particle plate
        elbo = _elbo(engine, model, guide, trace, targs, tkwargs)
        optim = adam(engine.learning_rate, engine.num_steps, engine.final_learning_rate_fraction)
        svi = SVI(model, guide, optim, elbo)
        losses = _optimise(
            svi, engine, targs, tkwargs, checkpoint_of(engine, model, seed, args, kwargs)
        )
        torch.manual_seed(sub_seed(seed, 4))
        with torch.no_grad():
            if custom:
                traces = [trace_model(guide, targs, tkwargs) for _ in range(engine.num_draws)]
                rows = [{s: tr[s]["value"] for s in latent} for tr in traces]
            else:
                rows = [guide(*targs, **tkwargs) for _ in range(engine.num_draws)]
            fitted = param_sites(trace_model(model, targs, tkwargs))
            if guide_params:
                fitted.update(param_sites(trace_model(guide, targs, tkwargs)))
        wall = time.perf_counter() - begin
    return build_posterior(
        model=model,
        args=args,
        kwargs=kwargs,
        engine=engine,
        seed=seed,
        latent={s: torch.stack([r[s] for r in rows]).unsqueeze(0) for s in latent},
        params={k: fitted[k] for k in [*model_params, *guide_params]},
        observed=observed,
        traces={"loss": losses},
        wall_time=wall,
    )
