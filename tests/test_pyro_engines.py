"""The Pyro runners: keys, isolation from global state, save/load, predict, params.

The accuracy of every engine on exact posteriors is checked in test_conformance.py;
this file checks what is specific to the Pyro backend.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from engine_backends import assert_same_posterior

import probdyn
from probdyn.testing import check_layout, normal_data, normal_model_pyro

X = np.linspace(-1.0, 1.0, 12)
Y = np.sin(2 * X) + np.random.default_rng(0).normal(0.0, 0.1, X.size)
HIDDEN_INIT = torch.linspace(-1.5, 1.5, 6)


def partial_bnn(x, y=None):
    """A one-hidden-layer network whose hidden layer is deterministic (``pyro.param``)
    and whose output layer is Bayesian."""
    w_hidden = pyro.param("hidden.weight", HIDDEN_INIT.to(x.dtype)[None, :].clone())
    b_hidden = pyro.param("hidden.bias", torch.zeros(6, dtype=x.dtype))
    h = torch.tanh(x[:, None] * w_hidden + b_hidden)
    w_out = pyro.sample("out.weight", dist.Normal(0.0, 1.0).expand([6]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(0.5))
    mean = pyro.deterministic("mean", (h * w_out).sum(-1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(mean, sigma), obs=y)


pytestmark = pytest.mark.usefixtures("torch_float64_one_thread")


VI_ENGINE = probdyn.VI(num_steps=300, num_draws=50, learning_rate=0.02, progress_bar=False)


@pytest.fixture(scope="module")
def vi_post() -> probdyn.Posterior:
    return probdyn.fit(partial_bnn, X, Y, engine=VI_ENGINE, key=0)


@pytest.fixture(scope="module")
def nuts_post(vi_post: probdyn.Posterior) -> probdyn.Posterior:
    engine = probdyn.NUTS(40, 30, num_chains=2, max_tree_depth=6, init=vi_post, progress_bar=False)
    return probdyn.fit(partial_bnn, X, Y, engine=engine, key=0)


def _global_state() -> tuple:
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _assert_same_global_state(before: tuple, after: tuple) -> None:
    assert torch.equal(before[0], after[0])
    np.testing.assert_array_equal(before[1][1], after[1][1])
    assert before[1][2:] == after[1][2:] and before[2] == after[2]


def test_pyro_model_is_routed_to_the_pyro_runners(vi_post, nuts_post) -> None:
    assert vi_post.backend == nuts_post.backend == "pyro"
    assert {"torch", "pyro-ppl", "arviz", "probdyn"} <= set(nuts_post.attrs["versions"])
    assert nuts_post.attrs["compile_time"] == 0.0 and nuts_post.attrs["wall_time"] > 0
    assert nuts_post.attrs["num_failed_solves"] == 0


def test_layout_dtype_and_sample_stats(nuts_post) -> None:
    check_layout(nuts_post, {"out.weight": (6,), "sigma": (), "mean": (12,)}, num_chains=2)
    assert nuts_post.samples["sigma"].dtype == np.float64
    stats = nuts_post.sample_stats
    expected = {"diverging", "acceptance_rate", "step_size", "lp", "n_steps", "tree_depth"}
    assert expected <= set(stats)
    assert stats["diverging"].dtype == bool
    assert np.all((stats["acceptance_rate"] >= 0) & (stats["acceptance_rate"] <= 1))
    assert np.all(stats["n_steps"] >= 1) and np.all(stats["n_steps"] < 2**10)
    # After warmup the step size is fixed within a chain.
    assert np.all(stats["step_size"] == stats["step_size"][:, :1])
    assert nuts_post.log_likelihood["y"].shape == (2, 30, 12)


@pytest.mark.parametrize("kernel", ["NUTS", "HMC"])
def test_acceptance_rate_is_recovered_per_draw(kernel: str) -> None:
    # Pyro keeps only a running mean m_n of the acceptance probabilities; the
    # runner's kernel recovers each draw's value from it. Averaging the recovered
    # values must give back Pyro's running mean after every draw.
    from pyro.infer import MCMC

    from probdyn.pyro.engines import mcmc as _mcmc

    problem = normal_data()
    model = lambda y: normal_model_pyro(torch.as_tensor(y), *problem.args[1:])
    cls = _mcmc._NUTS if kernel == "NUTS" else _mcmc._HMC
    k = cls(model) if kernel == "NUTS" else cls(model, fixed_num_steps=None, trajectory_length=1.0)
    running: list[float] = []

    def hook(kern, params, stage, i):
        if stage.startswith("Sample"):
            running.append(kern._mean_accept_prob)

    pyro.set_rng_seed(0)
    MCMC(k, num_samples=60, warmup_steps=30, hook_fn=hook, disable_progbar=True).run(
        problem.args[0]
    )
    rate = np.array([row["acceptance_rate"] for row in k.transitions])
    assert len(rate) == 60 and len(np.unique(rate)) > 10
    assert np.all((rate >= 0) & (rate <= 1))
    np.testing.assert_allclose(np.cumsum(rate) / np.arange(1, 61), running, rtol=1e-10)


def test_hmc_num_steps_is_fixed() -> None:
    problem = normal_data()
    engine = probdyn.HMC(30, 20, num_steps=7, progress_bar=False)
    post = probdyn.fit(normal_model_pyro, *problem.args, engine=engine, key=0)
    assert np.all(post.sample_stats["n_steps"] == 7)
    assert "tree_depth" not in post.sample_stats


@pytest.mark.parametrize("make_key", [lambda: 3, lambda: torch.Generator().manual_seed(3)])
def test_same_key_same_draws(make_key) -> None:
    problem = normal_data()
    engine = probdyn.NUTS(30, 20, num_chains=2, progress_bar=False)
    a = probdyn.fit(normal_model_pyro, *problem.args, engine=engine, key=make_key())
    b = probdyn.fit(normal_model_pyro, *problem.args, engine=engine, key=make_key())
    np.testing.assert_array_equal(a.samples["mu"], b.samples["mu"])
    np.testing.assert_array_equal(a.posterior_predictive["y"], b.posterior_predictive["y"])
    np.testing.assert_array_equal(a.sample_stats["lp"], b.sample_stats["lp"])
    # The recorded seed reproduces the run, also when the key was a generator.
    c = probdyn.fit(normal_model_pyro, *problem.args, engine=engine, key=a.attrs["seed"])
    np.testing.assert_array_equal(a.samples["mu"], c.samples["mu"])


def test_generator_key_is_advanced_and_other_keys_differ() -> None:
    problem = normal_data()
    engine = probdyn.VI(num_steps=50, num_draws=20, progress_bar=False)
    gen = torch.Generator().manual_seed(0)
    a = probdyn.fit(normal_model_pyro, *problem.args, engine=engine, key=gen)
    b = probdyn.fit(normal_model_pyro, *problem.args, engine=engine, key=gen)
    assert a.attrs["seed"] != b.attrs["seed"]
    assert not np.array_equal(a.samples["mu"], b.samples["mu"])


def test_chains_are_sequential_for_every_chain_method() -> None:
    # On Pyro, "vectorized" runs the chains one after another like "sequential",
    # so the two give the same draws; "parallel" is refused with a clear error.
    problem = normal_data()
    posts = [
        probdyn.fit(
            normal_model_pyro,
            *problem.args,
            engine=probdyn.NUTS(20, 20, num_chains=2, chain_method=m, progress_bar=False),
            key=0,
        )
        for m in ("sequential", "vectorized")
    ]
    np.testing.assert_array_equal(posts[0].samples["mu"], posts[1].samples["mu"])
    assert not np.array_equal(posts[0].samples["mu"][0], posts[0].samples["mu"][1])
    with pytest.raises(ValueError, match=r"chain_method='parallel'.*'sequential'"):
        probdyn.fit(
            normal_model_pyro,
            *problem.args,
            engine=probdyn.NUTS(5, 5, num_chains=2, chain_method="parallel"),
        )


@pytest.mark.parametrize(
    "engine",
    [
        probdyn.NUTS(20, 10, num_chains=2, max_tree_depth=5, progress_bar=False),
        probdyn.VI(num_steps=20, num_draws=10, progress_bar=False),
    ],
    ids=["nuts", "vi"],
)
def test_global_rng_and_param_store_are_untouched(engine) -> None:
    pyro.clear_param_store()
    user_param = pyro.param("user.w", torch.tensor([1.0, 2.0]))
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(5)
    before = _global_state()
    post = probdyn.fit(partial_bnn, X, Y, engine=engine, key=0)
    _assert_same_global_state(before, _global_state())
    post.predict(np.linspace(-2.0, 2.0, 5), key=1)
    _assert_same_global_state(before, _global_state())
    store = pyro.get_param_store()
    # The user's parameters survive, and the fit's own parameters do not leak in.
    assert set(store.keys()) == {"user.w"}
    assert torch.equal(store["user.w"], user_param)
    pyro.clear_param_store()


def test_save_load_round_trip_is_exact(nuts_post, vi_post, tmp_path: Path) -> None:
    for post in (nuts_post, vi_post):
        post.save(tmp_path / "p.nc")
        loaded = probdyn.load(tmp_path / "p.nc")
        assert_same_posterior(post, loaded)
        assert loaded.backend == "pyro"


def test_predict_on_new_inputs(nuts_post, tmp_path: Path) -> None:
    x_new = np.linspace(-2.0, 2.0, 7)
    pred = nuts_post.predict(x_new, key=1)
    assert set(pred) == {"y", "mean"}
    assert pred["y"].shape == (2, 30, 7) and pred["mean"].shape == (2, 30, 7)
    only = nuts_post.predict(x_new, key=1, sites=["mean"])
    assert list(only) == ["mean"]
    np.testing.assert_array_equal(only["mean"], pred["mean"])
    again = nuts_post.predict(x_new, key=1)
    np.testing.assert_array_equal(again["y"], pred["y"])
    with pytest.raises(ValueError, match="no site"):
        nuts_post.predict(x_new, sites=["nope"])
    # The mean is a deterministic function of the draws and the fitted params.
    params = nuts_post.params
    h = np.tanh(x_new[:, None] * params["hidden.weight"] + params["hidden.bias"])
    expected = np.einsum("nh,cdh->cdn", h, nuts_post.samples["out.weight"])
    np.testing.assert_allclose(pred["mean"], expected, rtol=1e-12)
    nuts_post.save(tmp_path / "p.nc")
    loaded = probdyn.load(tmp_path / "p.nc", model=partial_bnn)
    np.testing.assert_array_equal(loaded.predict(x_new, key=1)["mean"], pred["mean"])


def test_partial_bnn_params_are_fitted_by_vi_and_fixed_in_nuts(vi_post, nuts_post) -> None:
    assert set(vi_post.params) == {"hidden.weight", "hidden.bias"}
    assert vi_post.params["hidden.weight"].shape == (1, 6)
    # VI moved the deterministic layer away from its initial values ...
    assert not np.allclose(vi_post.params["hidden.weight"][0], HIDDEN_INIT.numpy())
    assert vi_post.traces["loss"].shape == (300,)
    # ... and NUTS started from the VI fit holds it there.
    for name, value in vi_post.params.items():
        np.testing.assert_array_equal(nuts_post.params[name], value)
    assert "hidden.weight" not in nuts_post.samples
    h = np.tanh(X[:, None] * vi_post.params["hidden.weight"] + vi_post.params["hidden.bias"])
    expected = np.einsum("nh,cdh->cdn", h, nuts_post.samples["out.weight"])
    np.testing.assert_allclose(nuts_post.samples["mean"], expected, rtol=1e-12)


@pytest.mark.parametrize("init", ["map", "sample"])
def test_init_strategies(init: str) -> None:
    engine = probdyn.NUTS(20, 10, num_chains=2, max_tree_depth=6, init=init, progress_bar=False)
    post = probdyn.fit(partial_bnn, X, Y, engine=engine, key=0)
    assert np.all(np.isfinite(post.samples["out.weight"]))
    if init == "map":  # the MAP fit moved the deterministic layer, NUTS kept it
        assert not np.allclose(post.params["hidden.weight"][0], HIDDEN_INIT.numpy())
    # VI from the same starts (the cheaper conjugate model: MAP runs 2000 steps).
    problem = normal_data()
    vi = probdyn.VI(num_steps=20, num_draws=10, init=init, progress_bar=False)
    post = probdyn.fit(normal_model_pyro, *problem.args, engine=vi, key=0)
    if init == "map":  # 20 steps from the MAP estimate stay close to the exact mean
        assert abs(post.samples["mu"].mean() - problem.mean) < 3 * problem.sd


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_observed_data(bad: float) -> None:
    y = Y.copy()
    y[2] = bad
    with pytest.raises(ValueError, match=r"observed site 'y'.*NaN/inf.*mask"):
        probdyn.fit(partial_bnn, X, y, engine=probdyn.NUTS(5, 5))


def test_bad_key() -> None:
    with pytest.raises(TypeError, match="key"):
        probdyn.fit(partial_bnn, X, Y, engine=probdyn.NUTS(5, 5), key="seed")
    with pytest.raises(ValueError, match="key"):
        probdyn.fit(partial_bnn, X, Y, engine=probdyn.NUTS(5, 5), key=-1)


def test_float32_default_gives_float32_arrays() -> None:
    torch.set_default_dtype(torch.float32)
    try:
        post = probdyn.fit(
            normal_model_pyro,
            *normal_data().args,
            engine=probdyn.VI(num_steps=20, num_draws=10, progress_bar=False),
        )
    finally:
        torch.set_default_dtype(torch.float64)
    assert post.samples["mu"].dtype == np.float32
    assert post.log_likelihood["y"].dtype == np.float32


def _locally_imported_model(y):
    # Pyro is imported inside the function, so only tracing can tell the backend.
    import pyro
    import pyro.distributions as dist

    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.param("offset", torch.zeros(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_backend_detection_by_tracing_leaves_global_state_alone() -> None:
    from probdyn.core.fit import detect_backend

    assert detect_backend(partial_bnn) == "pyro"  # from the modules it refers to
    pyro.clear_param_store()
    before = _global_state()
    assert detect_backend(_locally_imported_model, (np.ones(3),)) == "pyro"
    _assert_same_global_state(before, _global_state())
    assert list(pyro.get_param_store().keys()) == []
