"""BayesianMLP and lift: sites, priors, partial BNNs."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro import handlers

from probdyn.numpyro import BayesianMLP, lift


def _base(site):
    d = site["fn"]
    while hasattr(d, "base_dist"):  # Independent(Expanded(Normal)) -> Normal
        d = d.base_dist
    return d


def _trace(fn):
    return handlers.trace(handlers.seed(fn, 0)).get_trace()


def test_sites_shapes_and_forward() -> None:
    tr = _trace(lambda: BayesianMLP("f", [3, 5, 2])(jnp.ones((7, 3))))
    assert {n: s["value"].shape for n, s in tr.items()} == {
        "f.layers.0.weight": (3, 5),
        "f.layers.0.bias": (5,),
        "f.layers.1.weight": (5, 2),
        "f.layers.1.bias": (2,),
    }
    assert all(s["type"] == "sample" for s in tr.values())
    with handlers.seed(rng_seed=0):
        net = BayesianMLP("f", [3, 5, 2])
    assert net(jnp.ones((7, 3))).shape == (7, 2)
    assert net(jnp.ones(3)).shape == (2,)


def test_prior_as_distribution_mapping_and_callable() -> None:
    tr = _trace(lambda: BayesianMLP("f", [2, 4, 1], prior=dist.Normal(0.0, 0.1)))
    assert float(_base(tr["f.layers.0.weight"]).scale) == pytest.approx(0.1)

    mapping = {
        "layers.0.weight": dist.Normal(0.0, 2.0),
        "*.bias": dist.Normal(0.0, 0.5),
        "layers.1.*": dist.Laplace(0.0, 1.0),
    }
    tr = _trace(lambda: BayesianMLP("f", [2, 4, 1], prior=mapping))
    assert isinstance(_base(tr["f.layers.1.weight"]), dist.Laplace)
    assert float(_base(tr["f.layers.0.bias"]).scale) == pytest.approx(0.5)

    def by_fan_in(path: str, shape: tuple[int, ...]) -> dist.Distribution:
        return dist.Normal(0.0, 1.0 / np.sqrt(shape[0]))

    tr = _trace(lambda: BayesianMLP("f", [16, 4, 1], prior=by_fan_in))
    assert float(_base(tr["f.layers.0.weight"]).scale) == pytest.approx(0.25)


def test_mapping_without_a_match_names_the_path() -> None:
    with pytest.raises(ValueError, match=r"layers\.0\.bias"):
        _trace(lambda: BayesianMLP("f", [2, 3, 1], prior={"*.weight": dist.Normal(0, 1)}))


def test_partial_bnn_last_layer_only() -> None:
    tr = _trace(lambda: BayesianMLP("f", [2, 8, 8, 1], bayesian_layers=[-1]))
    kinds = {n: s["type"] for n, s in tr.items()}
    assert kinds["f.layers.2.weight"] == "sample" and kinds["f.layers.2.bias"] == "sample"
    assert kinds["f.layers.0.weight"] == "param" and kinds["f.layers.1.bias"] == "param"


def test_first_build_inside_a_jit_trace_does_not_leak_a_tracer() -> None:
    # The template network is cached per (sizes, seed); if the cache kept arrays
    # made while jit was tracing, every later build would hold a leaked tracer.
    sizes = [3, 7, 5, 1]  # a shape no other test builds, so the cache starts empty

    def partial_bnn() -> jax.Array:
        net = BayesianMLP("leak", sizes, bayesian_layers=[-1])
        return net(jnp.ones(3))

    inside = jax.jit(lambda: handlers.seed(partial_bnn, 0)())()
    outside = handlers.seed(partial_bnn, 0)()  # raised UnexpectedTracerError before
    np.testing.assert_allclose(inside, outside, rtol=1e-12)


@pytest.mark.parametrize("prior", [1.0, "normal", [dist.Normal(0, 1)]])
def test_prior_that_is_not_a_distribution(prior: object) -> None:
    with pytest.raises(TypeError, match="prior"):
        _trace(lambda: BayesianMLP("f", [2, 3, 1], prior=prior))


def test_callable_prior_returning_a_non_distribution() -> None:
    with pytest.raises(TypeError, match=r"not a numpyro\.distributions\.Distribution"):
        _trace(lambda: BayesianMLP("f", [2, 3, 1], prior=lambda path, shape: 0.5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sizes": [2]}, "sizes"),
        ({"sizes": [2, 0, 1]}, "sizes"),
        ({"activation": "swish!"}, "activation"),
        ({"bayesian_layers": [5]}, "bayesian_layers"),
        ({"name": ""}, "name"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"name": "f", "sizes": [2, 3, 1], **kwargs}
    with pytest.raises(ValueError, match=match):
        _trace(lambda: BayesianMLP(**args))


def test_lift_any_equinox_module() -> None:
    net = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
    tr = _trace(lambda: lift("g", net, dist.Normal(0, 1)))
    assert "g.layers.0.weight" in tr and tr["g.layers.0.weight"]["value"].shape == (4, 2)
    tr = _trace(
        lambda: lift("g", net, dist.Normal(0, 1), bayesian=lambda p: p.startswith("layers.1"))
    )
    assert tr["g.layers.0.weight"]["type"] == "param"
    assert tr["g.layers.1.weight"]["type"] == "sample"
