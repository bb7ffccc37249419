"""MAP estimates, used to start samplers and guides in a sensible place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, init_to_median
from pyro.optim import ClippedAdam, PyroOptim

from probdyn.engines.losses import MAP_FIX, check_final_loss, optimisation_failed
from probdyn.pyro.bridge import isolated, param_sites, plate_nesting, trace_model

__all__ = ["MAP_STEPS", "adam", "map_estimate"]

MAP_STEPS = 2000


def adam(learning_rate: float, num_steps: int, final_fraction: float) -> PyroOptim:
    """Adam whose learning rate decays exponentially to ``final_fraction`` of its start.

    Pyro's ``ClippedAdam`` multiplies the rate by ``lrd`` every step; clipping is
    switched off so that it is plain Adam, as on the NumPyro backend.
    """
    return ClippedAdam(
        {
            "lr": learning_rate,
            "lrd": final_fraction ** (1.0 / num_steps),
            "clip_norm": float("inf"),
        }
    )


def map_estimate(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    seed: int,
    *,
    num_steps: int = MAP_STEPS,
    learning_rate: float = 0.01,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Maximise the log joint density with Adam from the prior medians.

    Returns ``(latent values, model params)``, both constrained. Oscillatory ODE
    models often have a "everything is noise" local mode that noisy VI or a
    sampler started at the prior falls into; a deterministic optimum is a far
    better place to start NUTS or to centre a guide.

    Raises:
        FloatingPointError: if the optimisation diverges (a step after the first
            fails, or the loss ends non-finite).
    """
    with isolated(seed):
        elbo = Trace_ELBO(max_plate_nesting=plate_nesting(trace_model(model, args, kwargs)))
        guide = AutoDelta(model, init_loc_fn=init_to_median)
        svi = SVI(model, guide, adam(learning_rate, num_steps, 0.1), elbo)
        losses = np.empty(num_steps)
        for step in range(num_steps):
            try:
                losses[step] = svi.step(*args, **kwargs)
            except (ValueError, RuntimeError, ArithmeticError, UserWarning) as err:
                if step == 0:
                    raise
                optimisation_failed(err, losses, step, *MAP_FIX)
        check_final_loss(losses, *MAP_FIX)
        with torch.no_grad():
            latent = {k: v.detach().clone() for k, v in guide.median(*args, **kwargs).items()}
            params = param_sites(trace_model(model, args, kwargs))
    return latent, params
