"""Backend parity: probdyn.numpyro and probdyn.pyro export the same primitives, and the
same weights, vector field and point give the same numbers in both (float64).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pyro")
pytest.importorskip("torchdiffeq")
jax = pytest.importorskip("jax")
pytest.importorskip("numpyro")

import jax.numpy as jnp  # noqa: E402
import pyro  # noqa: E402
from numpyro import handlers  # noqa: E402
from numpyro.infer.util import log_density  # noqa: E402
from pyro import poutine  # noqa: E402

import probdyn.demo._numpyro as demo_numpyro  # noqa: E402
import probdyn.demo._pyro as demo_pyro  # noqa: E402
import probdyn.numpyro as pn  # noqa: E402
import probdyn.pyro as pp  # noqa: E402
from probdyn.numpyro.primitives.bnn import ACTIVATIONS as JAX_ACTIVATIONS  # noqa: E402
from probdyn.pyro.primitives.bnn import ACTIVATIONS as TORCH_ACTIVATIONS  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_float64_one_thread")


@pytest.fixture(autouse=True)
def clean_param_store() -> Iterator[None]:
    """Every test starts, and leaves, with an empty Pyro param store."""
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


# -- (1) the same API -------------------------------------------------------------------


def _parameters(obj, skip: frozenset[str] = frozenset()) -> list[tuple]:
    sig = inspect.signature(obj)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values() if p.name not in skip]


def test_same_public_names() -> None:
    assert pn.__all__ == pp.__all__


@pytest.mark.parametrize("name", pn.__all__)
def test_same_signatures(name: str) -> None:
    skip = pp.BACKEND_ONLY_KWARGS.get(name, frozenset())
    jax_obj, torch_obj = getattr(pn, name), getattr(pp, name)
    assert _parameters(torch_obj, skip) == _parameters(jax_obj)
    if inspect.isclass(jax_obj) and "__call__" in vars(jax_obj):
        assert _parameters(torch_obj.__call__, skip) == _parameters(jax_obj.__call__)


@pytest.mark.parametrize("name", pp.__all__)
def test_documented_with_an_example(name: str) -> None:
    doc = inspect.getdoc(getattr(pp, name)) or ""
    assert "Example:" in doc


def test_same_activations() -> None:
    assert sorted(TORCH_ACTIVATIONS) == sorted(JAX_ACTIVATIONS)


# -- (2) the same numbers ---------------------------------------------------------------

SIZES = [2, 6, 5, 2]


def _weights(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i, (n_in, n_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        out[f"f.layers.{i}.weight"] = scale * rng.normal(size=(n_in, n_out))
        out[f"f.layers.{i}.bias"] = scale * rng.normal(size=n_out)
    return out


def _jax_net(weights: dict, activation: str = "tanh"):
    data = {k: jnp.asarray(v) for k, v in weights.items()}
    with handlers.substitute(data=data):
        return pn.BayesianMLP("f", SIZES, activation=activation)


def _torch_net(weights: dict, activation: str = "tanh"):
    data = {k: torch.as_tensor(v) for k, v in weights.items()}
    return poutine.condition(pp.BayesianMLP, data=data)("f", SIZES, activation=activation)


@pytest.mark.parametrize("activation", sorted(JAX_ACTIVATIONS))
def test_bayesian_mlp_same_weights_same_outputs(activation: str) -> None:
    weights = _weights(0)
    x = np.random.default_rng(1).normal(size=(4, 3, SIZES[0]))
    out_jax = np.asarray(_jax_net(weights, activation)(jnp.asarray(x)))
    out_torch = _torch_net(weights, activation)(torch.as_tensor(x)).numpy()
    # The same float64 arithmetic up to summation order and library kernels: ~1e-15.
    np.testing.assert_allclose(out_torch, out_jax, rtol=1e-12, atol=1e-12)


def _fields(weights: dict):
    jax_net, torch_net = _jax_net(weights), _torch_net(weights)

    def jax_field(t, z, k):
        return 0.5 * jax_net(z) - k * z + 0.1 * jnp.sin(t)

    def torch_field(t, z, k):
        return 0.5 * torch_net(z) - k * z + 0.1 * torch.sin(t)

    return jax_field, torch_field


# Each backend's dopri5 solve at rtol = atol = 1e-10 is within ~100 * 1e-10 * (1 + |z|)
# of the truth (global error <= sum of local errors, < 100 steps here), so the two
# agree to ~2e-8: rtol 1e-6 is far above that yet catches any difference in the maths.
TIGHT = {"solver": "dopri5", "rtol": 1e-10, "atol": 1e-10}


def test_neural_ode_same_field_same_trajectory() -> None:
    jax_field, torch_field = _fields(_weights(2))
    times = np.array([0.3, 0.7, 1.5, 2.0, 3.2])
    z0 = np.array([0.4, -0.8])
    ys_jax = pn.NeuralODE(jax_field, **TIGHT)(jnp.asarray(z0), jnp.asarray(times), 0.3, t0=0.0)
    ys_torch = pp.NeuralODE(torch_field, **TIGHT)(torch.as_tensor(z0), times, 0.3, t0=0.0)
    np.testing.assert_allclose(ys_torch.numpy(), np.asarray(ys_jax), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("t0", [None, 0.0])
def test_neural_ode_same_ragged_trajectories(t0) -> None:
    jax_field, torch_field = _fields(_weights(3))
    series = [np.array([0.0, 0.4, 2.5]), np.array([0.2, 1.0]), np.array([0.0, 0.1, 0.5, 3.0])]
    z0 = np.array([[0.4, -0.8], [1.0, 0.2], [-0.5, 0.5]])
    ys_jax = pn.NeuralODE(jax_field, **TIGHT)(
        jnp.asarray(z0), [jnp.asarray(s) for s in series], 0.3, t0=t0
    )
    ys_torch = pp.NeuralODE(torch_field, **TIGHT)(torch.as_tensor(z0), series, 0.3, t0=t0)
    for a, b in zip(ys_torch, ys_jax):
        np.testing.assert_allclose(a.numpy(), np.asarray(b), rtol=1e-6, atol=1e-8)


# -- the demo model -----------------------------------------------------------------------

TIMES = np.linspace(0.5, 4.0, 8)


def _demo_point() -> dict[str, np.ndarray]:
    point = {
        "alpha": np.array(1.1),
        "gamma": np.array(0.7),
        "z0": np.array([1.2, 0.6]),
        "sigma": np.array(0.2),
    }
    rng = np.random.default_rng(4)
    for i, (n_in, n_out) in enumerate([(2, 8), (8, 2)]):
        point[f"interaction.layers.{i}.weight"] = 0.5 * rng.normal(size=(n_in, n_out))
        point[f"interaction.layers.{i}.bias"] = 0.5 * rng.normal(size=n_out)
    return point


def _torch_trace(point: dict, y: np.ndarray | None):
    data = {k: torch.as_tensor(v) for k, v in point.items()}
    model = poutine.seed(poutine.condition(demo_pyro.predator_prey_ude, data=data), rng_seed=0)
    tr = poutine.trace(model).get_trace(TIMES, y)
    tr.compute_log_prob()
    return tr


def _jax_log_density(point: dict, y: np.ndarray):
    params = {k: jnp.asarray(v) for k, v in point.items()}
    return log_density(
        demo_numpyro.predator_prey_ude, (jnp.asarray(TIMES), jnp.asarray(y)), {}, params
    )


def _first_order_bound(y: np.ndarray, z: np.ndarray, sigma: float, dz: np.ndarray) -> float:
    """|change of the y site's log density| when z moves by at most dz (first order):
    d/dz log LogNormal(y | log z, sigma) = (log y - log z) / (sigma**2 z)."""
    return float(np.sum(np.abs(np.log(y) - np.log(z)) / (sigma**2 * z) * dz))


def _assert_demo_log_densities_agree(solve_tol: float) -> None:
    point = _demo_point()
    y = _torch_trace(point, None).nodes["y"]["value"].numpy()  # data simulated at this point
    tr = _torch_trace(point, y)
    logp_jax, tr_jax = _jax_log_density(point, y)
    z_torch, z_jax = tr.nodes["z"]["value"].numpy(), np.asarray(tr_jax["z"]["value"])
    # The priors are the same formulas in float64: equal to rounding.
    for name in point:
        site_jax = tr_jax[name]
        lp_jax = float(jnp.sum(site_jax["fn"].log_prob(site_jax["value"])))
        assert float(tr.nodes[name]["log_prob_sum"]) == pytest.approx(lp_jax, rel=1e-12, abs=1e-12)
    # Each solve is within 100 * tol * (1 + |z|) of the truth (see TIGHT), so the
    # trajectories differ by at most twice that, and the log density by that
    # difference propagated through the observation model.
    dz = 2 * 100 * solve_tol * (1 + np.abs(z_jax))
    assert np.all(np.abs(z_torch - z_jax) <= dz)
    bound = _first_order_bound(y, z_jax, float(point["sigma"]), dz)
    assert abs(float(tr.log_prob_sum()) - float(logp_jax)) <= bound


def test_demo_log_density_agrees_at_the_same_point(monkeypatch) -> None:
    # Solve both demos tightly (with one solver) so that what is compared is the
    # model's maths, not two solvers' error at the demo's rtol of 1e-5.
    def tight(backend):
        return lambda field, **kwargs: backend.NeuralODE(
            field, **{**kwargs, **TIGHT, "max_steps": 100_000}
        )

    monkeypatch.setattr(demo_numpyro, "NeuralODE", tight(pn))
    monkeypatch.setattr(demo_pyro, "NeuralODE", tight(pp))
    _assert_demo_log_densities_agree(TIGHT["rtol"])


def test_demo_log_density_agrees_at_the_demos_own_tolerance() -> None:
    _assert_demo_log_densities_agree(1e-5)


def test_demo_sites_are_the_same() -> None:
    tr = _torch_trace(_demo_point(), None)
    torch_sites = {
        n: tuple(s["value"].shape)
        for n, s in tr.nodes.items()
        if s["type"] == "sample" and n != "ode.failed"
    }
    with handlers.seed(rng_seed=0):
        tr_jax = handlers.trace(demo_numpyro.predator_prey_ude).get_trace(jnp.asarray(TIMES))
    jax_sites = {
        n: tuple(s["value"].shape)
        for n, s in tr_jax.items()
        if s["type"] in ("sample", "deterministic") and n != "ode.failed"
    }
    assert torch_sites == jax_sites
    assert "ode.failed" in tr.nodes and "ode.failed" in tr_jax
