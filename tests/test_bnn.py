"""BayesianMLP and lift on both backends: sites, priors, partial BNNs.

The tests that assert the same thing on both backends take the ``backend`` fixture (a
small adapter over NumPyro's or Pyro's tracing); its Pyro param is skipped when torch
or pyro is missing. Backend-specific tests name their backend (the Pyro ones take the
``pyro_backend`` fixture). Pyro runs in float64 on one torch thread (tests/conftest.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as jdist
import pytest
from numpyro import handlers

import probdyn.numpyro as pn


# -- the two backends behind one small interface -------------------------------------------
class _NumPyro:
    """NumPyro's BayesianMLP, distributions and tracing."""

    name = "numpyro"
    BayesianMLP = staticmethod(pn.BayesianMLP)
    lift = staticmethod(pn.lift)
    dist = jdist

    @staticmethod
    def trace(fn: Callable[[], Any]) -> dict[str, Any]:
        """Every site of one seeded run of ``fn``."""
        return handlers.trace(handlers.seed(fn, 0)).get_trace()

    @staticmethod
    def seeded() -> AbstractContextManager[Any]:
        return handlers.seed(rng_seed=0)

    @staticmethod
    def ones(*shape: int) -> Any:
        return jnp.ones(shape)


class _Pyro:
    """Pyro's BayesianMLP, distributions and tracing."""

    name = "pyro"

    def __init__(self) -> None:
        import pyro.distributions as pdist
        import torch
        from pyro import poutine

        import probdyn.pyro as pp

        self.BayesianMLP, self.lift, self.dist = pp.BayesianMLP, pp.lift, pdist
        self._poutine, self._torch = poutine, torch

    def trace(self, fn: Callable[[], Any]) -> dict[str, Any]:
        """The sample and param sites of one seeded run of ``fn``."""
        nodes = self._poutine.trace(self._poutine.seed(fn, rng_seed=0)).get_trace().nodes
        return {n: s for n, s in nodes.items() if s["type"] in ("sample", "param")}

    def seeded(self) -> AbstractContextManager[Any]:
        return self._poutine.seed(rng_seed=0)

    def ones(self, *shape: int) -> Any:
        return self._torch.ones(shape)


_BACKENDS: dict[str, Any] = {}


def _pyro_adapter(request: pytest.FixtureRequest) -> Iterator[Any]:
    pytest.importorskip("torch")
    pyro = pytest.importorskip("pyro")
    pytest.importorskip("torchdiffeq")
    request.getfixturevalue("torch_float64_one_thread")
    pyro.clear_param_store()
    yield _BACKENDS.setdefault("pyro", _Pyro())
    pyro.clear_param_store()


@pytest.fixture(params=["numpyro", "pyro"])
def backend(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The NumPyro or the Pyro adapter (Pyro: float64, a clean param store)."""
    if request.param == "numpyro":
        yield _BACKENDS.setdefault("numpyro", _NumPyro())
        return
    yield from _pyro_adapter(request)


@pytest.fixture
def pyro_backend(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The Pyro adapter, for the Pyro-only tests."""
    yield from _pyro_adapter(request)


def _base(site: dict[str, Any]) -> Any:
    d = site["fn"]
    while hasattr(d, "base_dist"):  # Independent(Expanded(Normal)) -> Normal
        d = d.base_dist
    return d


def _scale(site: dict[str, Any]) -> float:
    """The one scale of a prior expanded to a weight's shape."""
    values = np.unique(np.asarray(_base(site).scale))
    assert values.size == 1
    return float(values[0])


# -- on both backends ----------------------------------------------------------------------
def test_sites_shapes_and_forward(backend: Any) -> None:
    tr = backend.trace(lambda: backend.BayesianMLP("f", [3, 5, 2])(backend.ones(7, 3)))
    assert {n: tuple(s["value"].shape) for n, s in tr.items()} == {
        "f.layers.0.weight": (3, 5),
        "f.layers.0.bias": (5,),
        "f.layers.1.weight": (5, 2),
        "f.layers.1.bias": (2,),
    }
    assert all(s["type"] == "sample" for s in tr.values())
    with backend.seeded():
        net = backend.BayesianMLP("f", [3, 5, 2])
    assert net(backend.ones(7, 3)).shape == (7, 2)
    assert net(backend.ones(3)).shape == (2,)
    assert net(backend.ones(4, 7, 3)).shape == (4, 7, 2)


def test_prior_as_distribution_mapping_and_callable(backend: Any) -> None:
    BayesianMLP, dist = backend.BayesianMLP, backend.dist
    tr = backend.trace(lambda: BayesianMLP("f", [2, 4, 1], prior=dist.Normal(0.0, 0.1)))
    assert _scale(tr["f.layers.0.weight"]) == pytest.approx(0.1)

    mapping = {
        "layers.0.weight": dist.Normal(0.0, 2.0),
        "*.bias": dist.Normal(0.0, 0.5),
        "layers.1.*": dist.Laplace(0.0, 1.0),
    }
    tr = backend.trace(lambda: BayesianMLP("f", [2, 4, 1], prior=mapping))
    assert isinstance(_base(tr["f.layers.1.weight"]), dist.Laplace)
    assert _scale(tr["f.layers.0.bias"]) == pytest.approx(0.5)
    assert tr["f.layers.0.weight"]["fn"].event_shape == (2, 4)  # the whole tensor is one event

    def by_fan_in(path: str, shape: tuple[int, ...]) -> Any:
        return dist.Normal(0.0, 1.0 / math.sqrt(shape[0]))

    tr = backend.trace(lambda: BayesianMLP("f", [16, 4, 1], prior=by_fan_in))
    assert _scale(tr["f.layers.0.weight"]) == pytest.approx(0.25)


def test_mapping_without_a_match_names_the_path(backend: Any) -> None:
    prior = {"*.weight": backend.dist.Normal(0, 1)}
    with pytest.raises(ValueError, match=r"layers\.0\.bias"):
        backend.trace(lambda: backend.BayesianMLP("f", [2, 3, 1], prior=prior))


def test_partial_bnn_last_layer_only(backend: Any) -> None:
    tr = backend.trace(lambda: backend.BayesianMLP("f", [2, 8, 8, 1], bayesian_layers=[-1]))
    kinds = {n: s["type"] for n, s in tr.items()}
    assert kinds["f.layers.2.weight"] == "sample" and kinds["f.layers.2.bias"] == "sample"
    assert kinds["f.layers.0.weight"] == "param" and kinds["f.layers.1.bias"] == "param"


@pytest.mark.parametrize(
    "make_prior",
    [lambda dist: 1.0, lambda dist: "normal", lambda dist: [dist.Normal(0, 1)]],
    ids=["float", "str", "list"],
)
def test_prior_that_is_not_a_distribution(backend: Any, make_prior: Callable) -> None:
    prior = make_prior(backend.dist)
    with pytest.raises(TypeError, match="prior"):
        backend.trace(lambda: backend.BayesianMLP("f", [2, 3, 1], prior=prior))


def test_callable_prior_returning_a_non_distribution(backend: Any) -> None:
    match = rf"not a {backend.name}\.distributions\.Distribution"
    with pytest.raises(TypeError, match=match):
        backend.trace(lambda: backend.BayesianMLP("f", [2, 3, 1], prior=lambda path, shape: 0.5))


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
def test_bad_arguments(backend: Any, kwargs: dict, match: str) -> None:
    args = {"name": "f", "sizes": [2, 3, 1], **kwargs}
    with pytest.raises(ValueError, match=match):
        backend.trace(lambda: backend.BayesianMLP(**args))


# -- NumPyro only --------------------------------------------------------------------------
def test_first_build_inside_a_jit_trace_does_not_leak_a_tracer() -> None:
    # The template network is cached per (sizes, seed); if the cache kept arrays
    # made while jit was tracing, every later build would hold a leaked tracer.
    sizes = [3, 7, 5, 1]  # a shape no other test builds, so the cache starts empty

    def partial_bnn() -> jax.Array:
        net = pn.BayesianMLP("leak", sizes, bayesian_layers=[-1])
        return net(jnp.ones(3))

    inside = jax.jit(lambda: handlers.seed(partial_bnn, 0)())()
    outside = handlers.seed(partial_bnn, 0)()  # raised UnexpectedTracerError before
    np.testing.assert_allclose(inside, outside, rtol=1e-12)


def test_lift_any_equinox_module() -> None:
    net = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
    trace = _NumPyro.trace
    tr = trace(lambda: pn.lift("g", net, jdist.Normal(0, 1)))
    assert "g.layers.0.weight" in tr and tr["g.layers.0.weight"]["value"].shape == (4, 2)
    tr = trace(
        lambda: pn.lift("g", net, jdist.Normal(0, 1), bayesian=lambda p: p.startswith("layers.1"))
    )
    assert tr["g.layers.0.weight"]["type"] == "param"
    assert tr["g.layers.1.weight"]["type"] == "sample"


# -- Pyro only -----------------------------------------------------------------------------
def test_calling_the_network_does_not_touch_pyro(pyro_backend: Any) -> None:
    import torch

    def model() -> None:
        net = pyro_backend.BayesianMLP("f", [2, 4, 1])
        for _ in range(3):
            net(torch.ones(2))

    sites = list(pyro_backend.trace(model))
    assert sites == [f"f.layers.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")]


def test_param_layers_start_deterministically_without_the_global_rng(pyro_backend: Any) -> None:
    import pyro
    import torch

    BayesianMLP = pyro_backend.BayesianMLP
    state = torch.get_rng_state()
    first = BayesianMLP("f", [2, 8, 1], bayesian_layers=[])
    assert torch.equal(torch.get_rng_state(), state)
    pyro.clear_param_store()
    second = BayesianMLP("f", [2, 8, 1], bayesian_layers=[])
    for a, b in zip(first.layers, second.layers):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert first.layers[0].weight.std() > 0


def test_lift_any_torch_module(pyro_backend: Any) -> None:
    import pyro
    import torch
    from pyro import poutine

    lift, dist = pyro_backend.lift, pyro_backend.dist
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    original = {k: v.clone() for k, v in net.state_dict().items()}
    with poutine.trace() as tr, poutine.seed(rng_seed=0):
        sampled = lift("g", net, dist.Normal(0, 1))
    nodes = tr.trace.nodes
    assert nodes["g.0.weight"]["value"].shape == (4, 2)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    w0, b0 = nodes["g.0.weight"]["value"], nodes["g.0.bias"]["value"]
    w2, b2 = nodes["g.2.weight"]["value"], nodes["g.2.bias"]["value"]
    expected = torch.tanh(x @ w0.T + b0) @ w2.T + b2
    torch.testing.assert_close(sampled(x), expected, rtol=1e-14, atol=1e-14)
    assert all(torch.equal(v, original[k]) for k, v in net.state_dict().items())

    partial = lambda: lift("g", net, dist.Normal(0, 1), bayesian=lambda p: p.startswith("2."))
    tr = pyro_backend.trace(partial)
    assert tr["g.0.weight"]["type"] == "param"
    assert tr["g.2.weight"]["type"] == "sample"
    # The copy computes with the param store's tensor, so learning reaches it.
    with poutine.seed(rng_seed=0):
        copy = partial()
    copy(x).sum().backward()
    assert pyro.param("g.0.weight").grad is not None


def test_lift_refuses_a_pyro_module(pyro_backend: Any) -> None:
    import pyro
    import torch

    lift, dist = pyro_backend.lift, pyro_backend.dist
    with pytest.raises(TypeError, match="PyroModule"):
        pyro_backend.trace(
            lambda: lift("g", pyro.nn.PyroModule[torch.nn.Linear](2, 1), dist.Normal(0, 1))
        )
