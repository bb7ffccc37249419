"""Pyro test models of the engine tests that run on both backends (see
tests/engine_backends.py): the twins of tests/engine_models_numpyro.py, under the same
names, except where a test's cases name their model per backend. Imported only for
Pyro's cases."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from engine_backends import FK_Y

from probdyn.pyro import BayesianMLP

# -- Feynman–Kac SMC ----------------------------------------------------------------------


def pbnn(x: Any, y: Any = None) -> None:
    """1 -> 16 -> [16 -> 8 stochastic] -> 8 -> 1, as the NumPyro twin's network."""
    x = torch.as_tensor(x)
    net = BayesianMLP("f", [1, 16, 8, 1], activation="gelu", bayesian_layers=[1])
    mean = pyro.deterministic("mean", net(x[:, None])[..., 0])
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(mean, 1.0), obs=None if y is None else torch.as_tensor(y))


def scale_and_loc(y: Any) -> None:
    """``sigma`` a positive latent site, ``loc`` a param: for every sigma the likelihood
    peaks at loc = mean(y)."""
    loc = pyro.param("loc", torch.tensor(0.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(loc, sigma), obs=y)


def in_plate(y: Any) -> None:
    """A data plate of fixed size 20."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", 20):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=torch.as_tensor(y))


def no_plate(y: Any) -> None:
    """Observations outside any plate."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    y = torch.as_tensor(y)
    pyro.sample("y", dist.Normal(mu, 1.0).expand([len(y)]).to_event(1), obs=y)


def global_obs(x: Any) -> None:
    """Observations from a global, not from an argument."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(mu + 0 * torch.as_tensor(x), 1.0), obs=torch.as_tensor(FK_Y))


def no_args() -> None:
    """No argument at all: nothing to cut into batches."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(FK_Y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=torch.as_tensor(FK_Y))


def subsampled(y: Any) -> None:
    """A subsampled data plate."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y), subsample_size=5) as idx:
        pyro.sample("y", dist.Normal(mu, 1.0), obs=torch.as_tensor(y)[idx])


def local_latent(y: Any) -> None:
    """A latent site inside the data plate."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(z, 1.0), obs=torch.as_tensor(y))


def params_only(y: Any) -> None:
    """No latent site, a param only."""
    mu = pyro.param("mu", torch.tensor(0.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=torch.as_tensor(y))


# -- Ensembles and tempered SMC -----------------------------------------------------------


def only_positive() -> None:
    """``x ~ N(0, 1)`` and a factor whose loss is not finite for ``x <= 0`` (-inf here,
    not NaN: Pyro's validation refuses a NaN factor when the model is traced)."""
    x = pyro.sample("x", dist.Normal(0.0, 1.0))
    pyro.factor("only_positive", torch.where(x > 0, -x, -torch.inf))


def poisson_counts(x: Any, y: Any) -> None:
    """A Poisson likelihood: its observations cannot be jittered by an anchored member."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("counts", dist.Poisson(torch.exp(a * x)), obs=y)


def hierarchy(y: Any) -> None:
    """``mu ~ N(0, 10)``, ``z ~ N(mu, 1)``, ``y_i ~ N(z, 1)``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    z = pyro.sample("z", dist.Normal(mu, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(z, 1.0), obs=torch.as_tensor(y))


def normal_unbatchable(
    y: Any, prior_loc: float = 0.0, prior_scale: float = 2.0, noise: float = 1.0
) -> None:
    """The normal reference model, but ``.item()`` cannot run under ``torch.func.vmap``:
    the runners fall back to looping over particles or members."""
    y = torch.as_tensor(y)
    mu = pyro.sample("mu", dist.Normal(prior_loc, prior_scale))
    if not np.isfinite(mu.item()):
        raise ValueError("mu must be finite")
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, noise), obs=y)
