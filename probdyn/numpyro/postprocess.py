"""Assemble a `Posterior` from a NumPyro run (shared by every NumPyro runner)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from probdyn.core.assemble import assemble_posterior
from probdyn.core.engines import AbstractEngine
from probdyn.core.posterior import Posterior
from probdyn.numpyro.bridge import as_key, seed_record, versions
from probdyn.numpyro.predict import forward_draws
from probdyn.numpyro.primitives.ode import failed_solves

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
    n_failed = failed_solves()  # read before the forward pass adds its own solves
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
    return assemble_posterior(
        backend="numpyro",
        model=model,
        args=args,
        kwargs=kwargs,
        engine=engine,
        seed=seed_record(key),
        versions=versions(),
        latent=latent_np,
        deterministic=det,
        log_likelihood=loglik,
        posterior_predictive=pp,
        observed=observed,
        params={k: np.asarray(v) for k, v in params.items()},
        sample_stats={k: np.asarray(v) for k, v in (sample_stats or {}).items()},
        traces={k: np.asarray(v) for k, v in (traces or {}).items()},
        num_failed_solves=n_failed,
        wall_time=wall_time,
        compile_time=compile_time,
        extra_attrs=extra_attrs,
    )
