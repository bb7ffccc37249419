"""Ensemble-started sampling: ``NUTS(init="ensemble")`` and ``init=Ensemble(...)``.

The model is the smallest network with a weight symmetry: ``f(x) = w2 tanh(w1 x)``
is unchanged by ``(w1, w2) -> (-w1, -w2)``, so the posterior has two mirror-image
basins separated by the ridge ``w1 = 0`` (where the function is flat and the data,
a clear ``tanh`` shape, are badly fitted). Members of an ensemble started at random
land in either basin; each chain must stay in its member's basin, and the chains'
predictive functions must agree although their weights do not.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import probdyn
from probdyn.core.engines import ensemble_init

X = np.linspace(-2.0, 2.0, 40)
Y = 2.0 * np.tanh(1.5 * X) + 0.1 * np.random.default_rng(0).normal(size=X.size)


def numpyro_model(x, y=None):  # type: ignore[no-untyped-def]
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    w1 = numpyro.sample("w1", dist.Normal(0.0, 2.0))
    w2 = numpyro.sample("w2", dist.Normal(0.0, 2.0))
    mean = numpyro.deterministic("mean", w2 * jnp.tanh(w1 * x))
    numpyro.sample("y", dist.Normal(mean, 0.1), obs=y)


def pyro_model(x, y=None):  # type: ignore[no-untyped-def]
    import pyro
    import pyro.distributions as dist
    import torch

    w1 = pyro.sample("w1", dist.Normal(0.0, 2.0))
    w2 = pyro.sample("w2", dist.Normal(0.0, 2.0))
    mean = pyro.deterministic("mean", w2 * torch.tanh(w1 * x))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(mean, 0.1), obs=y)


def _split_rhat(draws: np.ndarray) -> float:
    """Rank-free split R-hat of one scalar ``(chain, draw)`` (Gelman et al. 2013)."""
    half = draws.shape[1] // 2
    chains = np.concatenate([draws[:, :half], draws[:, half : 2 * half]])
    n = chains.shape[1]
    within = chains.var(axis=1, ddof=1).mean()
    between = n * chains.mean(axis=1).var(ddof=1)
    return float(np.sqrt(((n - 1) / n * within + between / n) / within))


def test_init_ensemble_means_one_member_per_chain() -> None:
    assert ensemble_init(probdyn.NUTS(num_chains=3, init="ensemble")).num_members == 3
    given = probdyn.Ensemble(num_members=6, num_steps=100)
    assert ensemble_init(probdyn.HMC(num_chains=2, init=given)) is given
    assert ensemble_init(probdyn.NUTS(init="map")) is None


def test_an_ensemble_smaller_than_the_chains_is_refused() -> None:
    with pytest.raises(ValueError, match="at least num_chains members"):
        probdyn.NUTS(num_chains=4, init=probdyn.Ensemble(num_members=2))


def test_an_unknown_init_names_the_ensemble_choices() -> None:
    with pytest.raises(ValueError, match="'ensemble'"):
        probdyn.NUTS(init="ensembel")


def test_numpyro_chains_land_in_different_basins_and_agree_on_the_function() -> None:
    pytest.importorskip("numpyro")
    engine = probdyn.NUTS(
        num_warmup=200,
        num_samples=200,
        num_chains=8,
        init=probdyn.Ensemble(num_members=8, num_steps=500, init_scale=2.0, progress_bar=False),
        chain_method="vectorized",
        progress_bar=False,
    )
    post = probdyn.fit(numpyro_model, X, Y, engine=engine, key=1)
    w1 = post.samples["w1"]
    signs = np.sign(w1)
    # Every chain stays in one basin: its draws all share a sign ...
    assert np.all(signs == signs[:, :1])
    # ... and the eight members did not all land in the same one. With starts of
    # random sign this fails with probability 2 / 2**8 for a broken sampler too, but
    # a sampler that pulled every chain into one basin fails it always.
    assert len(set(signs[:, 0])) == 2
    # Weights differ between basins by construction; the function does not.
    assert _split_rhat(w1) > 2.0
    mean = post.samples["mean"]
    assert max(_split_rhat(mean[..., i]) for i in range(0, X.size, 5)) < 1.05
    assert post.attrs["engine"]["init"].startswith("Ensemble(")
    assert post.attrs["init_wall_time"] > 0


def test_init_ensemble_string_fits_num_chains_members() -> None:
    pytest.importorskip("numpyro")
    engine = probdyn.NUTS(
        num_warmup=100,
        num_samples=50,
        num_chains=2,
        init="ensemble",
        progress_bar=False,
    )
    post = probdyn.fit(numpyro_model, X, Y, engine=engine, key=0)
    assert post.samples["w1"].shape == (2, 50)
    assert post.attrs["engine"]["init"] == "ensemble"


def _model_with_param(backend: str):  # type: ignore[no-untyped-def]
    if backend == "numpyro":
        import numpyro
        import numpyro.distributions as dist

        def with_param(x, y=None):  # type: ignore[no-untyped-def]
            scale = numpyro.param("scale", 1.0)
            w = numpyro.sample("w", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(w * scale * x, 0.1), obs=y)

        return with_param, X, Y
    import pyro
    import pyro.distributions as dist
    import torch

    def with_param_pyro(x, y=None):  # type: ignore[no-untyped-def]
        scale = pyro.param("scale", torch.tensor(1.0))
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(w * scale * x, 0.1), obs=y)

    return with_param_pyro, torch.as_tensor(X), torch.as_tensor(Y)


@pytest.mark.parametrize("backend", ["numpyro", "pyro"])
def test_an_ensemble_start_of_a_model_with_param_sites_is_refused_before_fitting(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each member fits its own param value; a sampler holds one fixed. Refused on both
    # backends, and before the ensemble is fitted (no ensemble runner is looked up).
    pytest.importorskip(backend)
    fit_module = importlib.import_module("probdyn.core.fit")  # the name `fit` is the function

    model, x, y = _model_with_param(backend)
    looked_up: list[str] = []
    real = fit_module.get_runner

    def spy(engine, *rest):  # type: ignore[no-untyped-def]
        looked_up.append(type(engine).__name__)
        return real(engine, *rest)

    monkeypatch.setattr(fit_module, "get_runner", spy)
    for init in ("ensemble", probdyn.Ensemble(num_members=2, num_steps=10, progress_bar=False)):
        engine = probdyn.NUTS(
            num_warmup=10, num_samples=10, num_chains=2, init=init, progress_bar=False
        )
        with pytest.raises(ValueError, match=r"param site\(s\) \['scale'\]"):
            probdyn.fit(model, x, y, engine=engine, key=0)
    assert "Ensemble" not in looked_up


@pytest.mark.parametrize("backend", ["numpyro", "pyro"])
def test_init_posterior_from_an_ensemble_with_param_sites_is_refused(backend: str) -> None:
    # The same rule when the user fits the ensemble first and passes its posterior:
    # the Pyro runner used to start the chains with the param at its initial value.
    pytest.importorskip(backend)
    model, x, y = _model_with_param(backend)
    members = probdyn.fit(
        model, x, y, engine=probdyn.Ensemble(num_members=2, num_steps=10, progress_bar=False)
    )
    assert members.samples["scale"].shape[:2] == (1, 2)  # one value per member
    engine = probdyn.NUTS(
        num_warmup=10, num_samples=10, num_chains=2, init=members, progress_bar=False
    )
    with pytest.raises(ValueError, match=r"param site\(s\) \['scale'\]"):
        probdyn.fit(model, x, y, engine=engine, key=0)


def test_pyro_chains_stay_in_their_members_basins() -> None:
    pytest.importorskip("pyro")
    import torch

    engine = probdyn.NUTS(
        num_warmup=100,
        num_samples=100,
        num_chains=4,
        init=probdyn.Ensemble(num_members=4, num_steps=300, init_scale=2.0, progress_bar=False),
        progress_bar=False,
    )
    x, y = torch.as_tensor(X), torch.as_tensor(Y)
    post = probdyn.fit(pyro_model, x, y, engine=engine, key=3)
    signs = np.sign(post.samples["w1"])
    assert np.all(signs == signs[:, :1])
    mean = post.samples["mean"]
    assert max(_split_rhat(mean[..., i]) for i in range(0, X.size, 5)) < 1.05
