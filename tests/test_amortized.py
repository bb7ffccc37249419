"""Training across a TaskStream and the amortised Posterior (NumPyro): the stream, the
context call, predict/log_likelihood_at with ``context=``, save/load, ArviZ, seeds."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers

import probdyn
from probdyn.calibration import coverage, crps, nlpd
from probdyn.core.arviz import import_arviz
from probdyn.data import TASK_FIELDS, TaskStream, gp_task_stream, gp_tasks, stream_rng
from probdyn.data._tasks import context_call
from probdyn.numpyro import ConditionalNP, conditional_np_model, latent_np_guide, latent_np_model

OPTS = {"hidden": 8}


@functools.cache
def _cnp() -> probdyn.Posterior:
    engine = probdyn.VI(num_steps=20, learning_rate=3e-3, num_draws=64, progress_bar=False)
    return probdyn.fit(conditional_np_model, gp_task_stream(4), engine=engine, key=0, **OPTS)


@functools.cache
def _lnp() -> probdyn.Posterior:
    engine = probdyn.VI(guide=latent_np_guide, num_steps=20, progress_bar=False)
    stream = gp_task_stream(4)
    return probdyn.fit(latent_np_model, stream, engine=engine, key=0, hidden=8, latent_dim=3)


def _task(seed: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    t = gp_tasks(1, key=seed)
    n_c, n = int(t.num_context[0]), int(t.mask_target[0].sum())
    x_c, y_c = t.x_context[0, :n_c, 0], t.y_context[0, :n_c, 0]
    return x_c, y_c, t.x_target[0, n_c:n, 0], t.y_target[0, n_c:n, 0]


# -- the stream ------------------------------------------------------------------------------
def test_stream_draws_the_model_fields_reproducibly() -> None:
    stream = gp_task_stream(3, max_points=20, max_context=10)
    a, b = stream.draw(stream_rng(4)), stream.draw(stream_rng(4))
    assert sorted(a) == sorted(TASK_FIELDS) and a["x_target"].shape == (3, 20, 1)
    np.testing.assert_array_equal(a["y_target"], b["y_target"])
    many = stream.draw_many(stream_rng(4), 5)
    assert many["mask_target"].shape == (5, 3, 20)
    np.testing.assert_array_equal(many["y_target"][0], a["y_target"])  # same generator order
    # The loss of a batch is per real target point.
    assert int(stream.points(a)) == int(a["mask_target"].sum())
    assert TaskStream(lambda r: a, count=None).points(a) == 3


def test_stream_refuses_bad_definitions_and_batches() -> None:
    with pytest.raises(TypeError, match="sample="):
        TaskStream(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fields='x'"):
        TaskStream(lambda r: {}, fields="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count='n'"):
        TaskStream(lambda r: {}, count="n")
    with pytest.raises(ValueError, match="no field 'y_context'"):
        TaskStream(lambda r: {"x_context": np.ones(2)}).draw(stream_rng(0))
    sizes = iter([2, 3])
    ragged = TaskStream(lambda r: {"x": np.ones(next(sizes))}, fields=("x",), count=None)
    with pytest.raises(ValueError, match="changed shape"):
        ragged.draw_many(stream_rng(0), 2)
    with pytest.raises(ValueError, match="kernel='cosine'"):
        gp_task_stream(4, kernel="cosine")  # type: ignore[arg-type]


def test_context_call_shapes_and_errors() -> None:
    kw, squeeze = context_call((np.zeros(7), np.ones(7)), (np.ones(3), np.ones(3)), TASK_FIELDS)
    assert kw["y_target"].shape == (1, 7, 1) and kw["mask_target"].all()
    # One task of 2-D arrays keeps its output dimension; a batch keeps its batch axis.
    _, sq2 = context_call((np.zeros((7, 1)),), (np.ones((3, 1)), np.ones((3, 1))), TASK_FIELDS)
    assert sq2({"y": np.zeros((1, 4, 1, 7, 1))})["y"].shape == (1, 4, 7, 1)
    _, sq3 = context_call((np.zeros((2, 7, 1)),), (np.ones((2, 3, 1)),) * 2, TASK_FIELDS)
    assert sq3({"y": np.zeros((1, 4, 2, 7, 1))})["y"].shape == (1, 4, 2, 7, 1)
    # A latent of size 1 is not mistaken for the output dimension.
    assert squeeze({"z": np.zeros((1, 7, 1, 1))})["z"].shape == (1, 7, 1)
    with pytest.raises(ValueError, match="trained on the fields"):
        context_call((np.zeros(3),), (np.ones(2), np.ones(2)), ("x", "y"))
    with pytest.raises(ValueError, match="pair"):
        context_call((np.zeros(3),), np.ones(2), TASK_FIELDS)
    with pytest.raises(ValueError, match="disagree"):
        context_call((np.zeros(3),), (np.ones(2), np.ones(4)), TASK_FIELDS)
    with pytest.raises(ValueError, match="shape"):
        context_call((np.zeros((1, 1, 1, 3)),), (np.ones(2), np.ones(2)), TASK_FIELDS)


# -- the amortised posterior ------------------------------------------------------------------
def test_amortized_posterior_layout_and_metadata() -> None:
    post = _cnp()
    assert post.amortized and post.samples == {} and (post.num_chains, post.num_draws) == (0, 0)
    assert post.traces["loss"].shape == (20,) and np.isfinite(post.traces["loss"]).all()
    assert post.attrs["stream"]["options"] == OPTS
    assert post.attrs["stream"]["description"] == "gp_tasks(4, kernel='rbf')"
    assert "amortized over gp_tasks(4" in repr(post)
    with pytest.raises(ValueError, match="amortised"):
        post.summary()


def test_predict_with_context_is_the_network_on_the_new_task() -> None:
    post = _cnp()
    x_c, y_c, x_t, y_t = _task()
    pred = post.predict(x_t, context=(x_c, y_c), key=1)
    n = x_t.size
    assert {k: v.shape for k, v in pred.items()} == {k: (1, 64, n) for k in ("y", "mean", "sd")}
    # The Gaussian of every draw is the network's output with the fitted weights.
    weights = {k: jnp.asarray(v) for k, v in post.params.items()}
    with handlers.substitute(data=weights), handlers.seed(rng_seed=0):
        net = ConditionalNP("cnp", **OPTS)
    mean, sd = net(
        jnp.asarray(x_c)[None, :, None],
        jnp.asarray(y_c)[None, :, None],
        jnp.ones((1, x_c.size)),
        jnp.asarray(x_t)[None, :, None],
    )
    for d in (0, 63):
        np.testing.assert_allclose(pred["mean"][0, d], np.asarray(mean)[0, :, 0], rtol=1e-10)
        np.testing.assert_allclose(pred["sd"][0, d], np.asarray(sd)[0, :, 0], rtol=1e-10)
    # The replicated observations are draws from it: standardised, mean 0 and sd 1 (a CNP's
    # points are independent; 64 * n draws, 5 SE).
    zs = (pred["y"] - pred["mean"]) / pred["sd"]
    assert abs(zs.mean()) < 5 / np.sqrt(zs.size) and abs(zs.std() - 1) < 5 / np.sqrt(2 * zs.size)
    # Seeds: the same key repeats the draws, another key changes them.
    again = post.predict(x_t, context=(x_c, y_c), key=1)
    np.testing.assert_array_equal(again["y"], pred["y"])
    assert not np.array_equal(post.predict(x_t, context=(x_c, y_c), key=2)["y"], pred["y"])
    # The calibration tools take the draws unchanged.
    cov = coverage(pred["y"], y_t, levels=0.9)[0.9]
    assert 0.0 <= cov <= 1.0 and np.isfinite(crps(pred["y"], y_t))


def test_log_likelihood_at_with_context_is_the_gaussian_log_density() -> None:
    post = _cnp()
    x_c, y_c, x_t, y_t = _task()
    ll = post.log_likelihood_at(x_t, y_t, context=(x_c, y_c), num_draws=3)["y"]
    pred = post.predict(x_t, context=(x_c, y_c), num_draws=1, sites=["mean", "sd"])
    mean, sd = pred["mean"][0, 0], pred["sd"][0, 0]
    exact = -0.5 * ((y_t - mean) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)
    assert ll.shape == (1, 3, x_t.size)
    np.testing.assert_allclose(ll[0, 2], exact, rtol=1e-10)
    # Every draw is the same Gaussian, so the exact NLPD is minus its mean log density.
    score = nlpd(post.predict(x_t, context=(x_c, y_c), num_draws=3)["y"], y_t, log_likelihood=ll)
    np.testing.assert_allclose(score, -exact.mean(), rtol=1e-10)


def test_latent_np_draws_z_from_the_context_prior() -> None:
    post = _lnp()
    x_c, y_c, x_t, _ = _task()
    pred = post.predict(x_t, context=(x_c, y_c), num_draws=8)
    assert pred["z"].shape == (1, 8, 3) and pred["mean"].shape == (1, 8, x_t.size)
    # Each draw has its own z, hence its own predictive mean.
    assert np.ptp(pred["z"][0], axis=0).min() > 0 and np.ptp(pred["mean"][0], axis=0).min() > 0


def test_save_load_and_arviz(tmp_path) -> None:
    post = _cnp()
    idata = post.to_arviz()
    assert list(idata.groups()) == ["constant_data"]
    np.testing.assert_array_equal(
        idata.constant_data["cnp.decoder.layers.0.bias"].values,
        post.params["cnp.decoder.layers.0.bias"],
    )
    path = tmp_path / "np.nc"
    post.save(str(path))
    loaded = probdyn.load(str(path), model=conditional_np_model)
    assert loaded.amortized and loaded.attrs["stream"] == post.attrs["stream"]
    x_c, y_c, x_t, _ = _task()
    a = post.predict(x_t, context=(x_c, y_c), num_draws=2)
    b = loaded.predict(x_t, context=(x_c, y_c), num_draws=2)  # options from attrs
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_misuse_is_refused() -> None:
    post = _cnp()
    x_c, y_c, x_t, _ = _task()
    with pytest.raises(ValueError, match="num_draws=0"):
        post.predict(x_t, context=(x_c, y_c), num_draws=0)
    ordinary = probdyn.Posterior(samples={"mu": np.zeros((1, 3))}, model=conditional_np_model)
    with pytest.raises(ValueError, match="apply to amortised posteriors"):
        ordinary.predict(x_t, context=(x_c, y_c))
    with pytest.raises(ValueError, match="need an amortised guide"):
        probdyn.fit(latent_np_model, gp_task_stream(2), engine=probdyn.VI(num_steps=2))
    with pytest.raises(ValueError, match="or, for an amortised fit"):
        probdyn.Posterior(samples={})


# -- conformance: both backends, both kinds of NP -----------------------------------------------
def _np_fit(backend: str, kind: str) -> probdyn.Posterior:
    mod = __import__(f"probdyn.{backend}", fromlist=["x"])
    if kind == "conditional":
        model, guide, opts = mod.conditional_np_model, "normal", OPTS
    else:
        model, guide, opts = (
            mod.latent_np_model,
            mod.latent_np_guide,
            {"hidden": 8, "latent_dim": 2},
        )
    engine = probdyn.VI(guide=guide, num_steps=5, num_draws=7, progress_bar=False)
    return probdyn.fit(model, gp_task_stream(2), engine=engine, key=0, **opts)


@pytest.mark.usefixtures("torch_float64_one_thread")
@pytest.mark.parametrize("kind", ["conditional", "latent"])
@pytest.mark.parametrize("backend", ["numpyro", "pyro"])
def test_np_posterior_conformance(backend: str, kind: str, tmp_path) -> None:
    if backend == "pyro":
        pytest.importorskip("torch")
    post = _np_fit(backend, kind)
    assert post.amortized and post.backend == backend and post.samples == {}
    # Layout: (chain, draw, *shape) with one chain of num_draws runs.
    x_c, y_c, x_t, y_t = _task()
    pred = post.predict(x_t, context=(x_c, y_c), key=3)
    for site in ("y", "mean", "sd"):
        assert pred[site].shape == (1, 7, x_t.size) and np.isfinite(pred[site]).all()
    ll = post.log_likelihood_at(x_t, y_t, context=(x_c, y_c), key=3)["y"]
    assert ll.shape == (1, 7, x_t.size) and np.isfinite(ll).all()
    # Seeds: the same key repeats every draw, another key changes them.
    np.testing.assert_array_equal(post.predict(x_t, context=(x_c, y_c), key=3)["y"], pred["y"])
    assert not np.array_equal(post.predict(x_t, context=(x_c, y_c), key=4)["y"], pred["y"])
    # ArviZ: the weights are constant data; the draws convert as any posterior predictive.
    az = import_arviz()
    idata = post.to_arviz()
    assert sorted(idata.constant_data.data_vars) == sorted(post.params)
    ppc = az.from_dict(posterior_predictive={"y": pred["y"]}, observed_data={"y": y_t})
    assert ppc.posterior_predictive["y"].shape == (1, 7, x_t.size)
    # A saved posterior predicts the same.
    post.save(str(tmp_path / "p.nc"))
    loaded = probdyn.load(str(tmp_path / "p.nc"), model=post.model)
    np.testing.assert_array_equal(loaded.predict(x_t, context=(x_c, y_c), key=3)["y"], pred["y"])
