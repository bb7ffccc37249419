"""Assemble a `Posterior` from a Pyro run (shared by every Pyro runner)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from probdyn.core.assemble import assemble_posterior
from probdyn.core.engines import AbstractEngine
from probdyn.core.posterior import Posterior
from probdyn.pyro.bridge import sub_seed, to_numpy, versions
from probdyn.pyro.predict import forward_draws
from probdyn.pyro.primitives.ode import failed_solves

__all__ = ["build_posterior"]


def build_posterior(
    *,
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: AbstractEngine,
    seed: int,
    latent: dict[str, Any],
    params: dict[str, Any],
    observed: dict[str, np.ndarray],
    sample_stats: dict[str, Any] | None = None,
    traces: dict[str, Any] | None = None,
    wall_time: float,
    compile_time: float = 0.0,
    extra_attrs: dict[str, Any] | None = None,
) -> Posterior:
    """Add deterministic sites, log likelihood and posterior predictive, and metadata.

    ``latent`` values are shaped ``(chain, draw, *event)`` (tensors or arrays);
    ``seed`` is the run's integer seed (recorded, so ``key=seed`` reproduces it).
    The failed-solve counter must have been reset by the runner before its run.
    """
    n_failed = failed_solves()  # read before the forward pass adds its own solves
    latent_np = {k: to_numpy(v) for k, v in latent.items()}
    params_np = {k: to_numpy(v) for k, v in params.items()}
    det, loglik, pp = forward_draws(
        model, args, kwargs, latent_np, params_np, sub_seed(seed, 1), latent=set(latent_np)
    )
    return assemble_posterior(
        backend="pyro",
        model=model,
        args=args,
        kwargs=kwargs,
        engine=engine,
        seed=int(seed),
        versions=versions(),
        latent=latent_np,
        deterministic=det,
        log_likelihood=loglik,
        posterior_predictive=pp,
        observed=observed,
        params=params_np,
        sample_stats={k: to_numpy(v) for k, v in (sample_stats or {}).items()},
        traces={k: to_numpy(v) for k, v in (traces or {}).items()},
        num_failed_solves=n_failed,
        wall_time=wall_time,
        compile_time=compile_time,
        extra_attrs=extra_attrs,
    )
