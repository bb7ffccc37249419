"""Assemble a `Posterior` from a Pyro run (shared by every Pyro runner)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from probdyn._engines import AbstractEngine
from probdyn._posterior import Posterior
from probdyn.pyro._ode import failed_solves
from probdyn.pyro._predict import forward_draws
from probdyn.pyro._util import sub_seed, to_numpy, versions

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
    if n_failed:
        warnings.warn(
            f"{n_failed} ODE solve(s) failed during the run (max_steps reached or a "
            "non-finite state); those proposals were rejected. See "
            "posterior.attrs['num_failed_solves'].",
            RuntimeWarning,
            stacklevel=3,
        )
    attrs = {
        "engine": engine.to_dict(),
        "backend": "pyro",
        "seed": int(seed),
        "versions": versions(),
        "wall_time": float(wall_time),
        "compile_time": float(compile_time),
        "num_failed_solves": int(n_failed),
        "latent_sites": sorted(latent_np),
        "model": getattr(model, "__name__", repr(model)),
        **(extra_attrs or {}),
    }
    return Posterior(
        samples={**latent_np, **det},
        sample_stats={k: to_numpy(v) for k, v in (sample_stats or {}).items()},
        posterior_predictive=pp,
        log_likelihood=loglik,
        observed_data=observed,
        params=params_np,
        traces={k: to_numpy(v) for k, v in (traces or {}).items()},
        attrs=attrs,
        model=model,
        model_args=args,
        model_kwargs=kwargs,
    )
