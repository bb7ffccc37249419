"""The demo model in Pyro: Lotka–Volterra with learned interaction terms.

The twin of `probdyn.demo._numpyro.predator_prey_ude`: the same sites, shapes,
priors and maths, so both give the same log density at the same point.
"""

from __future__ import annotations

from typing import Any, cast

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from probdyn.pyro import BayesianMLP, NeuralODE

__all__ = ["interaction_prior", "predator_prey_ude"]


def interaction_prior() -> dict[str, dist.Distribution]:
    """The interaction network's prior, by parameter path (as the NumPyro twin's).

    Built when called, not at import, so that its parameters take the float
    precision in force when the model runs.
    """
    return {
        "layers.0.*": dist.Normal(0.0, 1.0),
        "layers.1.weight": dist.Normal(0.0, 0.1),
        "layers.1.bias": dist.Normal(0.0, 1.0),
    }


def predator_prey_ude(times: Any, y: Any | None = None, *, hidden: int = 8) -> None:
    """A universal differential equation for prey ``x`` and predators ``p``.

    ``dx/dt = alpha x - x p g1(x, p)``, ``dp/dt = -gamma p + x p g2(x, p)``:
    growth and death are mechanistic with unknown rates; the per-encounter
    interaction rates are ``g = exp(MLP(x, p))`` with the prior of the NumPyro
    twin (`probdyn.demo._numpyro`, which explains it). Observations are log-normal
    around the state. The state at ``t = 0`` is latent, so observation times need not start
    at 0.

    Sites: ``alpha``, ``gamma``, ``z0``, ``sigma``, ``interaction.*`` (weights),
    ``z`` (the trajectory at ``times``, deterministic) and ``y`` (observed).

    Args:
        times: observation times, shape ``(T,)`` (array or tensor).
        y: observed populations, shape ``(T, 2)``, or None to simulate.
        hidden: width of the interaction network's hidden layer.

    Example:
        >>> import torch, pyro
        >>> with pyro.poutine.trace() as tr, pyro.poutine.seed(rng_seed=0):
        ...     predator_prey_ude(torch.linspace(0.5, 3.0, 6))
        >>> tr.trace.nodes["y"]["value"].shape
        torch.Size([6, 2])
    """
    alpha = pyro.sample("alpha", dist.LogNormal(0.0, 1.0))
    gamma = pyro.sample("gamma", dist.LogNormal(0.0, 1.0))
    z0 = pyro.sample("z0", dist.LogNormal(0.0, 1.0).expand([2]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(0.5))
    net = BayesianMLP("interaction", [2, hidden, 2], prior=interaction_prior())

    def field(t: Tensor, z: Tensor, args: None) -> Tensor:
        # Interactions vanish when either species is absent, and encounters
        # cost prey and feed predators (positive rates, so no finite-time blow
        # up); the network learns how the per-encounter rates vary with state.
        rates = torch.exp(net(z))
        encounters = z[0] * z[1]
        return torch.stack(
            [alpha * z[0] - encounters * rates[0], -gamma * z[1] + encounters * rates[1]]
        )

    ode = NeuralODE(field, rtol=1e-5, atol=1e-5, max_steps=2048)
    z = pyro.deterministic("z", cast(Tensor, ode(z0, times, t0=0.0)))
    loc = torch.log(torch.clamp(z, min=1e-6))
    obs = None if y is None else torch.as_tensor(y, dtype=z.dtype, device=z.device)
    pyro.sample("y", dist.LogNormal(loc, sigma), obs=obs)
