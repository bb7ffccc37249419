"""NumPyro test models of the engine tests that run on both backends (see
tests/engine_backends.py); tests/engine_models_pyro.py has the Pyro twin of each one
under the same name, except where a test's cases name their model per backend."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from engine_backends import FK_Y

from probdyn.numpyro import BayesianMLP

# -- Feynman–Kac SMC ----------------------------------------------------------------------


def pbnn(x: Any, y: Any = None) -> None:
    """1 -> 16 -> [16 -> 8 stochastic] -> 8 -> 1 on the Zhao et al. toy problem; the
    other layers are param sites."""
    net = BayesianMLP("f", [1, 16, 8, 1], activation="gelu", bayesian_layers=[1])
    mean = numpyro.deterministic("mean", net(x[:, None])[..., 0])
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(mean, 1.0), obs=y)


def scale_and_loc(y: Any) -> None:
    """``sigma`` a positive latent site, ``loc`` a param: for every sigma the likelihood
    peaks at loc = mean(y)."""
    loc = numpyro.param("loc", 0.0)
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("data", len(y)):
        numpyro.sample("y", dist.Normal(loc, sigma), obs=y)


def in_plate(y: Any) -> None:
    """A data plate of fixed size 20."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", 20):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def no_plate(y: Any) -> None:
    """Observations outside any plate."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(mu, 1.0).expand([len(y)]).to_event(1), obs=y)


def global_obs(x: Any) -> None:
    """Observations from a global, not from an argument."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", len(x)):
        numpyro.sample("y", dist.Normal(mu + 0 * x, 1.0), obs=FK_Y)


def no_args() -> None:
    """No argument at all: nothing to cut into batches."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", len(FK_Y)):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=FK_Y)


def subsampled(y: Any) -> None:
    """A subsampled data plate."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", len(y), subsample_size=5) as idx:
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])


def local_latent(y: Any) -> None:
    """A latent site inside the data plate."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", len(y)):
        z = numpyro.sample("z", dist.Normal(mu, 1.0))
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y)


def params_only(y: Any) -> None:
    """No latent site, a param only."""
    mu = numpyro.param("mu", 0.0)
    with numpyro.plate("data", len(y)):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


# -- Ensembles ----------------------------------------------------------------------------


def only_positive() -> None:
    """``x ~ N(0, 1)`` and a factor whose loss is not finite for ``x <= 0`` (NaN here)."""
    x = numpyro.sample("x", dist.Normal(0.0, 1.0))
    numpyro.factor("only_positive", jnp.where(x > 0, -x, jnp.nan))


def poisson_rate(y: Any) -> None:
    """A Poisson likelihood: its observations cannot be jittered by an anchored member."""
    rate = numpyro.sample("rate", dist.LogNormal(0.0, 1.0))
    with numpyro.plate("data", len(y)):
        numpyro.sample("y", dist.Poisson(rate), obs=y)


def hierarchy(y: Any) -> None:
    """``mu ~ N(0, 10)``, ``z ~ N(mu, 1)``, ``y_i ~ N(z, 1)``."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    z = numpyro.sample("z", dist.Normal(mu, 1.0))
    with numpyro.plate("data", len(y)):
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y)
