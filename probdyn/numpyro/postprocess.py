"""Assemble a `Posterior` from a NumPyro run (shared by every NumPyro runner)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from probdyn.core.assemble import RunFields, assemble_run
from probdyn.core.posterior import Posterior
from probdyn.numpyro.bridge import as_key, seed_record, versions
from probdyn.numpyro.predict import forward_draws
from probdyn.numpyro.primitives.ode import failed_solves

if TYPE_CHECKING:
    from typing import Unpack

__all__ = ["build_posterior"]


def build_posterior(*, key: int | jax.Array, **run: Unpack[RunFields]) -> Posterior:
    """Add deterministic sites, log likelihood and posterior predictive, and metadata.

    ``run`` holds what the runner produced (see `probdyn.core.assemble.RunFields`);
    the forward pass draws from ``fold_in(key, 1)``.
    """

    def forward(latent: dict[str, np.ndarray], params: dict[str, np.ndarray]) -> Any:
        rng = jax.random.fold_in(as_key(key), 1)
        return forward_draws(
            run["model"], run["args"], run["kwargs"], latent, params, rng, latent=set(latent)
        )

    return assemble_run(
        run,
        backend="numpyro",
        seed=seed_record(key),
        versions=versions(),
        num_failed_solves=failed_solves(),  # before the forward pass adds its own solves
        to_numpy=np.asarray,
        forward=forward,
    )
