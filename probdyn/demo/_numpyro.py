"""The demo model in NumPyro: Lotka–Volterra with learned interaction terms."""

from __future__ import annotations

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array

from probdyn.numpyro import BayesianMLP, NeuralODE

__all__ = ["interaction_prior", "predator_prey_ude"]


# Log-rate network: hidden layer N(0, 1); output weights N(0, 0.1) (small
# state-dependent deviations); output bias N(0, 1) (the log of a constant rate).
def interaction_prior() -> dict[str, dist.Distribution]:
    """The interaction network's prior, by parameter path.

    Built when called, not at import, so that its parameters take the float
    precision in force when the model runs.
    """
    return {
        "layers.0.*": dist.Normal(0.0, 1.0),
        "layers.1.weight": dist.Normal(0.0, 0.1),
        "layers.1.bias": dist.Normal(0.0, 1.0),
    }


def predator_prey_ude(times: Array, y: Array | None = None, *, hidden: int = 8) -> None:
    """A universal differential equation for prey ``x`` and predators ``p``.

    ``dx/dt = alpha x - x p g1(x, p)``, ``dp/dt = -gamma p + x p g2(x, p)``:
    growth and death are mechanistic with unknown rates; the per-encounter
    interaction rates are ``g = exp(MLP(x, p))``, a small Bayesian MLP on the log
    scale. Its output bias is the log of a constant rate (classical
    Lotka–Volterra) under a ``Normal(0, 1)`` prior; its output weights, under a
    ``Normal(0, 0.1)`` prior, make the rates vary with the state. The small prior
    says "close to Lotka–Volterra unless the data say otherwise", and it is what
    lets NUTS mix: with ``Normal(0, 1)`` on every weight the posterior is a thin
    ridge in 42 dimensions and chains stall. (Measured on the demo data, NUTS
    from a MAP start, tree depth 7: the bulk ESS of the trajectory at the held-out
    times was 2–16 (min–median) per 200 draws with ``Normal(0, 1)`` weights, and
    73–237 per 400 draws from two chains with this prior.) Observations are
    log-normal around the state. The state at ``t = 0`` is latent, so
    observation times need not start at 0.

    Sites: ``alpha``, ``gamma``, ``z0``, ``sigma``, ``interaction.*`` (weights),
    ``z`` (the trajectory at ``times``, deterministic) and ``y`` (observed).
    """
    alpha = numpyro.sample("alpha", dist.LogNormal(0.0, 1.0))
    gamma = numpyro.sample("gamma", dist.LogNormal(0.0, 1.0))
    z0 = numpyro.sample("z0", dist.LogNormal(0.0, 1.0).expand([2]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
    net = BayesianMLP("interaction", [2, hidden, 2], prior=interaction_prior())

    def field(t: Array, z: Array, args: None) -> Array:
        # Interactions vanish when either species is absent, and encounters
        # cost prey and feed predators (positive rates, so no finite-time blow
        # up); the network learns how the per-encounter rates vary with state.
        rates = jnp.exp(net(z))
        encounters = z[0] * z[1]
        return jnp.stack(
            [alpha * z[0] - encounters * rates[0], -gamma * z[1] + encounters * rates[1]]
        )

    ode = NeuralODE(field, rtol=1e-5, atol=1e-5, max_steps=2048)
    z = numpyro.deterministic("z", ode(z0, times, t0=0.0))
    loc = jnp.log(jnp.clip(z, 1e-6))
    numpyro.sample("y", dist.LogNormal(loc, sigma), obs=y)
