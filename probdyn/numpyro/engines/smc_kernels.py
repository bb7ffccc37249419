"""The move kernels of the NumPyro tempered SMC runner, on BlackJAX's MCMC kernels.

Every particle moves with the stage's shared step size times its own jitter factor
(see `probdyn.engines.smc_math.STEP_JITTER`), preconditioned per coordinate by the
weighted variance of the particle cloud: HMC takes that variance as its diagonal
inverse mass matrix, MALA and the random walk its square root as a per-coordinate
scale (MALA runs in coordinates divided by that scale).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import blackjax
import jax
import jax.numpy as jnp
from blackjax.mcmc import random_walk
from blackjax.mcmc.mala import MALAState

from probdyn.core.engines import SMC

__all__ = ["MoveKernel", "move_kernel"]


class MoveKernel(NamedTuple):
    """A BlackJAX move kernel and how its preconditioner follows the particle cloud."""

    init: Callable[..., Any]
    step: Callable[..., Any]
    preconditioner: str  # name of the per-coordinate parameter
    from_variance: Callable[[jax.Array], jax.Array]


def _hmc_step(
    rng_key: jax.Array,
    state: Any,
    logdensity_fn: Callable[[jax.Array], jax.Array],
    step_size: jax.Array,
    jitter: jax.Array,
    inverse_mass_matrix: jax.Array,
    *,
    num_integration_steps: int,
) -> tuple[Any, Any]:
    """BlackJAX's HMC with a diagonal inverse mass matrix and a jittered step size."""
    return blackjax.hmc.build_kernel()(
        rng_key,
        state,
        logdensity_fn,
        step_size * jitter,
        inverse_mass_matrix,
        num_integration_steps,
    )


def _mala_step(
    rng_key: jax.Array,
    state: MALAState,
    logdensity_fn: Callable[[jax.Array], jax.Array],
    step_size: jax.Array,
    jitter: jax.Array,
    scale: jax.Array,
) -> tuple[MALAState, Any]:
    """BlackJAX's MALA in the coordinates ``z = u / scale`` (diagonal preconditioning).

    The map is linear, so its Jacobian is a constant that the Metropolis ratio
    ignores; the chain on ``z`` mapped back leaves the target of ``u`` invariant.
    """
    scaled = MALAState(state.position / scale, state.logdensity, state.logdensity_grad * scale)
    new, info = blackjax.mala.build_kernel()(
        rng_key, scaled, lambda z: logdensity_fn(z * scale), step_size * jitter
    )
    return MALAState(new.position * scale, new.logdensity, new.logdensity_grad / scale), info


def _rw_step(
    rng_key: jax.Array,
    state: Any,
    logdensity_fn: Callable[[jax.Array], jax.Array],
    step_size: jax.Array,
    jitter: jax.Array,
    scale: jax.Array,
) -> tuple[Any, Any]:
    """BlackJAX's additive random walk, Gaussian steps of sd ``step_size * jitter * scale``."""
    kernel = blackjax.additive_step_random_walk.build_kernel()
    step = random_walk.normal(step_size * jitter * scale)
    return kernel(rng_key, state, logdensity_fn, step)


def move_kernel(engine: SMC) -> MoveKernel:
    """The BlackJAX kernel ``engine.kernel`` names, with its preconditioner's name and
    how that preconditioner follows the particle cloud's variance."""
    if engine.kernel == "hmc":
        step = partial(_hmc_step, num_integration_steps=engine.num_leapfrog_steps)
        return MoveKernel(blackjax.hmc.init, step, "inverse_mass_matrix", lambda v: v)
    if engine.kernel == "mala":
        return MoveKernel(blackjax.mala.init, _mala_step, "scale", jnp.sqrt)
    return MoveKernel(blackjax.additive_step_random_walk.init, _rw_step, "scale", jnp.sqrt)
