"""MAP estimates, used to start samplers and guides in a sensible place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from numpyro.infer import SVI, Trace_ELBO, init_to_median
from numpyro.infer.autoguide import AutoDelta
from numpyro.optim import optax_to_numpyro

from probdyn.engines.losses import MAP_FIX, check_final_loss

__all__ = ["MAP_STEPS", "map_estimate"]

MAP_STEPS = 2000


def map_estimate(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: jax.Array,
    *,
    num_steps: int = MAP_STEPS,
    learning_rate: float = 0.01,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Maximise the log joint density with Adam from the prior medians.

    Returns ``(latent values, model params)``, both constrained. Oscillatory ODE
    models often have a "everything is noise" local mode that noisy VI or a
    sampler started at the prior falls into; a deterministic optimum is a far
    better place to start NUTS or to centre a guide.

    Raises:
        FloatingPointError: if the optimisation ends at a non-finite loss.
    """
    guide = AutoDelta(model, init_loc_fn=init_to_median)
    schedule = optax.exponential_decay(learning_rate, num_steps, 0.1)
    svi = SVI(model, guide, optax_to_numpyro(optax.adam(schedule)), Trace_ELBO())
    state = svi.init(key, *args, **kwargs)

    @jax.jit
    def run(state: Any) -> Any:
        def body(s: Any, _: None) -> tuple[Any, jax.Array]:
            return svi.stable_update(s, *args, **kwargs)

        return jax.lax.scan(body, state, None, length=num_steps)

    state, losses = run(state)
    check_final_loss(np.asarray(losses), *MAP_FIX)
    params = svi.get_params(state)
    latent = guide.median(params)
    model_params = {k: v for k, v in params.items() if not k.endswith("_auto_loc")}
    return latent, model_params
