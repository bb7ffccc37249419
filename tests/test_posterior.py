"""Posterior: save/load, reproducibility, predict, summary, fit's front door, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from engine_backends import assert_same_posterior

import probdyn
from probdyn.numpyro import BayesianMLP, NeuralODE

X = np.linspace(-1.0, 1.0, 12)
Y = np.sin(2 * X) + np.random.default_rng(0).normal(0.0, 0.1, X.size)


def bnn_model(x, y=None):
    net = BayesianMLP("net", [1, 6, 1], bayesian_layers=[-1])
    sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
    mean = numpyro.deterministic("mean", net(x[:, None])[:, 0])
    numpyro.sample("y", dist.Normal(mean, sigma), obs=y)


@pytest.fixture(scope="module")
def vi_post() -> probdyn.Posterior:
    return probdyn.fit(
        bnn_model, X, Y, engine=probdyn.VI(num_steps=300, num_draws=50, progress_bar=False), key=0
    )


@pytest.fixture(scope="module")
def nuts_post(vi_post: probdyn.Posterior) -> probdyn.Posterior:
    engine = probdyn.NUTS(30, 40, num_chains=2, init=vi_post, progress_bar=False)
    return probdyn.fit(bnn_model, X, Y, engine=engine, key=0)


@pytest.mark.parametrize("which", ["vi_post", "nuts_post"])
def test_save_load_round_trip_is_exact(which: str, request, tmp_path: Path) -> None:
    post = request.getfixturevalue(which)
    post.save(tmp_path / "p.nc")
    assert_same_posterior(post, probdyn.load(tmp_path / "p.nc"))


def test_partial_bnn_params_are_fitted_by_vi_and_fixed_in_nuts(vi_post, nuts_post) -> None:
    assert {"net.layers.0.weight", "net.layers.0.bias"} <= set(vi_post.params)
    for name, value in vi_post.params.items():
        np.testing.assert_array_equal(nuts_post.params[name], value)
    assert vi_post.traces["loss"].shape == (300,)


def test_same_key_reproduces_bit_for_bit(nuts_post, vi_post) -> None:
    again = probdyn.fit(
        bnn_model,
        X,
        Y,
        engine=nuts_post.attrs
        and probdyn.NUTS(30, 40, num_chains=2, init=vi_post, progress_bar=False),
        key=0,
    )
    for name in nuts_post.samples:
        np.testing.assert_array_equal(again.samples[name], nuts_post.samples[name])
    np.testing.assert_array_equal(
        again.posterior_predictive["y"], nuts_post.posterior_predictive["y"]
    )


def test_metadata_is_recorded(nuts_post) -> None:
    attrs = nuts_post.attrs
    assert attrs["backend"] == "numpyro" and attrs["seed"] == 0
    assert attrs["engine"]["engine"] == "NUTS" and attrs["engine"]["num_samples"] == 40
    assert {"jax", "numpyro", "arviz", "probdyn"} <= set(attrs["versions"])
    assert attrs["wall_time"] > 0 and attrs["compile_time"] > 0
    assert {"diverging", "acceptance_rate", "tree_depth", "energy", "lp"} <= set(
        nuts_post.sample_stats
    )


def test_predict_on_new_inputs(nuts_post, tmp_path: Path) -> None:
    x_new = np.linspace(-2.0, 2.0, 7)
    pred = nuts_post.predict(x_new, key=1)
    assert pred["y"].shape == (2, 40, 7) and pred["mean"].shape == (2, 40, 7)
    only = nuts_post.predict(x_new, key=1, sites=["mean"])
    assert list(only) == ["mean"]
    np.testing.assert_allclose(only["mean"], pred["mean"])
    with pytest.raises(ValueError, match="no site"):
        nuts_post.predict(x_new, sites=["nope"])
    nuts_post.save(tmp_path / "p.nc")
    loaded = probdyn.load(tmp_path / "p.nc")
    with pytest.raises(RuntimeError, match="with_model"):
        loaded.predict(x_new)
    again = probdyn.load(tmp_path / "p.nc", model=bnn_model).predict(x_new, key=1)
    np.testing.assert_allclose(again["mean"], pred["mean"])


# 2 chains x 40 draws: every ESS is under 100, so summary() flags the rows and warns.
@pytest.mark.filterwarnings("ignore:.* of .* summary rows:UserWarning")
def test_summary_folds_large_sites(nuts_post) -> None:
    table = nuts_post.summary()  # default: sites with more than 10 elements fold
    assert "mean (12 elements, worst)" in table.index and "sigma" in table.index
    assert "net.layers.1.weight[0, 0]" in table.index  # 6 elements: one row each
    folded = nuts_post.summary(max_elements=5)
    assert "net.layers.1.weight (6 elements, worst)" in folded.index
    row = folded.loc["net.layers.1.weight (6 elements, worst)"]
    per_element = nuts_post.summary(max_elements=None)
    weights = per_element.loc[[f"net.layers.1.weight[{i}, 0]" for i in range(6)]]
    assert row["r_hat"] == weights["r_hat"].max()
    assert row["ess_bulk"] == weights["ess_bulk"].min()


def test_summary_warns_about_few_effective_draws(nuts_post) -> None:
    with pytest.warns(UserWarning, match=r"summary rows (look unconverged|have few effective)"):
        table = nuts_post.summary()
    assert (table["ess_bulk"] < 100).all() and table["flag"].str.contains("ess < 100").all()


def test_vi_summary_has_no_rhat_and_no_arviz_shape_warning(vi_post, caplog) -> None:
    import logging

    with caplog.at_level(logging.WARNING):
        table = vi_post.summary()
    assert table["r_hat"].isna().all() and "flag" not in table
    assert not [r for r in caplog.records if "Shape validation" in r.getMessage()]


def test_backend_detection() -> None:
    from probdyn.core.fit import detect_backend

    assert detect_backend(bnn_model) == "numpyro"

    def helper_only(x):
        return bnn_model(x)  # reaches numpyro through another function

    assert detect_backend(helper_only, (X,)) == "numpyro"

    def plain(x):
        return x + 1

    with pytest.raises(ValueError, match="backend="):
        probdyn.fit(plain, X, engine=probdyn.VI(num_steps=5))


def test_engine_must_be_a_config() -> None:
    with pytest.raises(TypeError, match="engine"):
        probdyn.fit(bnn_model, X, Y, engine="nuts")
    with pytest.raises(ValueError, match="backend"):
        probdyn.fit(bnn_model, X, Y, engine=probdyn.VI(), backend="tensorflow")


def test_import_probdyn_does_not_import_a_backend() -> None:
    code = (
        "import sys, probdyn, probdyn.calibration, probdyn.data; "
        "assert 'jax' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- bad input: each error names the argument and the fix --------------------------------
def decay_model(times, y=None):
    k = numpyro.sample("k", dist.LogNormal(0.0, 1.0))
    z = NeuralODE(lambda t, z, k: -k * z)(jnp.ones(1), times, args=k)[:, 0]
    numpyro.sample("y", dist.Normal(z, 0.1), obs=y)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_observed_data(bad: float) -> None:
    y = np.ones(4)
    y[2] = bad
    with pytest.raises(ValueError, match=r"observed site 'y'.*NaN/inf.*mask"):
        probdyn.fit(decay_model, np.arange(4.0), y, engine=probdyn.NUTS(5, 5))


@pytest.mark.parametrize(
    "times, what",
    [
        (np.array([0.0, 2.0, 1.0]), "unsorted"),
        (np.array([0.0, 1.0, 1.0]), "duplicate"),
        (np.array([0.0, np.nan]), "NaN"),
    ],
)
def test_bad_times(times: np.ndarray, what: str) -> None:
    with pytest.raises(ValueError, match=f"times.*{what}"):
        NeuralODE(lambda t, z, a: -z)(jnp.ones(2), times)


def test_state_and_vector_field_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"vector field returns shape \(3,\).*z0"):
        NeuralODE(lambda t, z, a: jnp.ones(3))(jnp.ones(2), jnp.array([0.0, 1.0]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"solver": "rk45"}, "solver"),
        ({"adjoint": "magic"}, "adjoint"),
        ({"solver": "euler"}, "dt0"),
        ({"rtol": 0.0}, "rtol"),
        ({"max_steps": 0}, "max_steps"),
    ],
)
def test_bad_solver_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NeuralODE(lambda t, z, a: -z, **kwargs)


def test_flow_guide_needs_two_dimensions() -> None:
    with pytest.raises(ValueError, match="guide='flow'"):
        probdyn.fit(decay_model, np.arange(4.0), np.ones(4), engine=probdyn.VI(guide="flow"))


def test_corrupt_or_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.nc"
    bad.write_bytes(b"this is not netCDF")
    with pytest.raises(ValueError, match="not a readable probdyn posterior file"):
        probdyn.load(bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        probdyn.load(tmp_path / "missing.nc")


def test_bad_key() -> None:
    with pytest.raises(TypeError, match="key"):
        probdyn.fit(decay_model, np.arange(4.0), np.ones(4), engine=probdyn.NUTS(5, 5), key="seed")


@pytest.mark.parametrize("backend", ["numpyro", "pyro"])
def test_log_likelihood_at_held_out_observations(backend: str) -> None:
    from scipy import stats

    from probdyn.testing import linear_regression_data, reference_model

    if backend == "pyro":
        torch = pytest.importorskip("torch")
        dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
    try:
        problem = linear_regression_data()
        x, _, prior_scale, noise = problem.args
        model = reference_model("linear_regression", backend)
        engine = probdyn.VI(num_steps=200, num_draws=20, progress_bar=False)
        post = probdyn.fit(model, *problem.args, engine=engine, key=0)
        # At the training data it is the stored pointwise log likelihood.
        at_train = post.log_likelihood_at(*problem.args)
        np.testing.assert_allclose(at_train["y"], post.log_likelihood["y"], rtol=1e-6)
        # At new data it is log N(y_new; x_new w_s, noise) for every draw w_s.
        rng = np.random.default_rng(5)
        x_new, y_new = rng.normal(size=(7, x.shape[1])), rng.normal(size=7)
        ll = post.log_likelihood_at(x_new, y_new, prior_scale, noise)["y"]
        w = post.samples["w"]  # (1, 20, 3)
        expected = stats.norm.logpdf(y_new, np.einsum("cdk,nk->cdn", w, x_new), noise)
        assert ll.shape == (1, 20, 7)
        np.testing.assert_allclose(ll, expected, rtol=1e-6, atol=1e-8)
        with pytest.raises(RuntimeError, match="no model attached"):
            post.with_model(None).log_likelihood_at(x_new, y_new)  # type: ignore[arg-type]
    finally:
        if backend == "pyro":
            torch.set_default_dtype(dtype)


def test_nuts_fits_do_not_pile_up_compiled_sampling_loops() -> None:
    # NumPyro compiles its sampling loop with a fresh jit of the loop body as a static
    # argument on every run, so JAX's cache for it never hits and grew by one
    # executable (with the sampler's closures) per fit; `run_mcmc` drops it.
    import jax
    from numpyro.util import _fori_collect_loop

    from probdyn.testing import normal_model

    loop = jax.jit(_fori_collect_loop, static_argnums=(0, 1), donate_argnums=3)
    engine = probdyn.NUTS(num_warmup=20, num_samples=20, num_chains=1, progress_bar=False)
    for key in range(2):
        probdyn.fit(normal_model, np.zeros(5), engine=engine, key=key)
        assert loop._cache_size() == 0


def test_predict_reuses_its_compiled_program_and_matches_the_constant_data_path() -> None:
    # The forward pass is compiled once per model and argument shapes (data as traced
    # arguments); a model that needs its data as values falls back to compiling them
    # in. Both paths must give the same draws.
    from probdyn.numpyro import predict as _predict

    def model(x, y=None):
        net = BayesianMLP("net", [1, 8, 1])
        s = numpyro.sample("s", dist.HalfNormal(1.0))
        numpyro.sample("y", dist.Normal(net(jnp.asarray(x)[:, None])[:, 0], s), obs=y)

    x = np.linspace(-2.0, 2.0, 20)
    post = probdyn.fit(model, x, np.sin(x), engine=probdyn.VI(num_steps=50, num_draws=20), key=0)
    before = _predict._program.cache_info()
    first = post.predict(np.linspace(-3.0, 3.0, 11), key=1)["y"]
    second = post.predict(np.linspace(-1.0, 1.0, 11), key=1)["y"]
    after = _predict._program.cache_info()
    assert after.misses == before.misses + 1 and after.hits == before.hits + 1
    assert first.shape == second.shape == (1, 20, 11)
    _predict._CONCRETE_ONLY.add(model)
    baked = post.predict(np.linspace(-1.0, 1.0, 11), key=1)["y"]
    np.testing.assert_allclose(second, baked, rtol=1e-5, atol=1e-6)
    assert not np.allclose(first, second)
