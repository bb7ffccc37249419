"""The demo model in NumPyro: Lotka–Volterra with learned interaction terms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array

from probdyn.numpyro import BayesianMLP, NeuralODE

__all__ = ["predator_prey_ude"]


def predator_prey_ude(times: Array, y: Array | None = None, *, hidden: int = 8) -> None:
    """A universal differential equation for prey ``x`` and predators ``p``.

    ``dx/dt = alpha x - x p g1(x, p)``, ``dp/dt = -gamma p + x p g2(x, p)``:
    growth and death are mechanistic with unknown rates; the per-encounter
    interaction rates ``g`` are a small Bayesian MLP (classical Lotka–Volterra is
    the special case of constant ``g``). Observations are log-normal around the state. The state
    at ``t = 0`` is latent, so observation times need not start at 0.

    Sites: ``alpha``, ``gamma``, ``z0``, ``sigma``, ``interaction.*`` (weights),
    ``z`` (the trajectory at ``times``, deterministic) and ``y`` (observed).
    """
    alpha = numpyro.sample("alpha", dist.LogNormal(0.0, 1.0))
    gamma = numpyro.sample("gamma", dist.LogNormal(0.0, 1.0))
    z0 = numpyro.sample("z0", dist.LogNormal(0.0, 1.0).expand([2]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
    net = BayesianMLP("interaction", [2, hidden, 2], prior=dist.Normal(0.0, 1.0))

    def field(t: Array, z: Array, args: None) -> Array:
        # Interactions vanish when either species is absent, and encounters
        # cost prey and feed predators (positive rates, so no finite-time blow
        # up); the network learns how the per-encounter rates vary with state.
        rates = jax.nn.softplus(net(z))
        encounters = z[0] * z[1]
        return jnp.stack(
            [alpha * z[0] - encounters * rates[0], -gamma * z[1] + encounters * rates[1]]
        )

    ode = NeuralODE(field, rtol=1e-5, atol=1e-5, max_steps=2048)
    z = numpyro.deterministic("z", ode(z0, times, t0=0.0))
    loc = jnp.log(jnp.clip(z, 1e-6))
    numpyro.sample("y", dist.LogNormal(loc, sigma), obs=y)
