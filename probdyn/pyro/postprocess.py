"""Assemble a `Posterior` from a Pyro run (shared by every Pyro runner)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from probdyn.core.assemble import RunFields, assemble_run
from probdyn.core.posterior import Posterior
from probdyn.pyro.bridge import sub_seed, to_numpy, versions
from probdyn.pyro.predict import forward_draws
from probdyn.pyro.primitives.ode import failed_solves

if TYPE_CHECKING:
    from typing import Unpack

__all__ = ["build_posterior"]


def build_posterior(*, seed: int, **run: Unpack[RunFields]) -> Posterior:
    """Add deterministic sites, log likelihood and posterior predictive, and metadata.

    ``run`` holds what the runner produced (see `probdyn.core.assemble.RunFields`):
    ``latent`` values are shaped ``(chain, draw, *event)`` (tensors or arrays);
    ``seed`` is the run's integer seed (recorded, so ``key=seed`` reproduces it).
    The failed-solve counter must have been reset by the runner before its run.
    """

    def forward(latent: dict[str, np.ndarray], params: dict[str, np.ndarray]) -> Any:
        model, args, kwargs = run["model"], run["args"], run["kwargs"]
        return forward_draws(
            model, args, kwargs, latent, params, sub_seed(seed, 1), latent=set(latent)
        )

    return assemble_run(
        run,
        backend="pyro",
        seed=int(seed),
        versions=versions(),
        num_failed_solves=failed_solves(),  # before the forward pass adds its own solves
        to_numpy=to_numpy,
        forward=forward,
    )
