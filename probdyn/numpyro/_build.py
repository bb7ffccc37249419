"""Assemble a `Posterior` from a NumPyro run (shared by every NumPyro runner)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from probdyn._engines import AbstractEngine
from probdyn._posterior import Posterior
from probdyn.numpyro._ode import failed_solves
from probdyn.numpyro._predict import forward_draws
from probdyn.numpyro._util import as_key, seed_record, versions

__all__ = ["build_posterior"]


def build_posterior(
    *,
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: AbstractEngine,
    key: Any,
    latent: dict[str, Any],
    params: dict[str, Any],
    observed: dict[str, np.ndarray],
    sample_stats: dict[str, Any] | None = None,
    traces: dict[str, Any] | None = None,
    wall_time: float,
    compile_time: float,
    extra_attrs: dict[str, Any] | None = None,
) -> Posterior:
    """Add deterministic sites, log likelihood and posterior predictive, and metadata."""
    latent_np = {k: np.asarray(v) for k, v in latent.items()}
    det, loglik, pp = forward_draws(
        model,
        args,
        kwargs,
        latent_np,
        params,
        jax.random.fold_in(as_key(key), 1),
        latent=set(latent_np),
    )
    n_failed = failed_solves()
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
        "backend": "numpyro",
        "seed": seed_record(key),
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
        sample_stats={k: np.asarray(v) for k, v in (sample_stats or {}).items()},
        posterior_predictive=pp,
        log_likelihood=loglik,
        observed_data=observed,
        params={k: np.asarray(v) for k, v in params.items()},
        traces={k: np.asarray(v) for k, v in (traces or {}).items()},
        attrs=attrs,
        model=model,
        model_args=args,
        model_kwargs=kwargs,
    )
