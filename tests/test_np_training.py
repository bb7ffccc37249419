"""Neural processes on both backends (each test runs once per backend, through the adapters of
tests/np_backends.py): training across a TaskStream through probdyn.fit (reproducibility by
key, short training runs against a trivial baseline) and amortised prediction with a latent
path.
"""

from __future__ import annotations

import numpy as np
import pytest
from np_backends import BACKENDS, FIELDS, STREAM, Backend, as_data, backend_for, fit, sites
from scipy import stats

import probdyn
from probdyn.data import gp_task_stream, gp_tasks, mean_log_likelihood


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    return backend_for(request)


# -- training across a TaskStream -----------------------------------------------------------


def test_conditional_np_training_is_reproducible_by_key(backend: Backend) -> None:
    run = lambda key: fit(backend, "conditional_np_model", key=key, hidden=8)
    with backend.leaves_global_state_alone():
        a, b = run(0), run(0)
        np.testing.assert_array_equal(a.traces["loss"], b.traces["loss"])
        assert a.params.keys() == b.params.keys()
        for name, value in a.params.items():
            np.testing.assert_array_equal(value, b.params[name])
        assert not np.array_equal(a.traces["loss"], run(1).traces["loss"])
    # An amortised posterior: the fitted params (NumPy, float64), no draws, the stream recorded.
    assert a.amortized and a.samples == {} and a.num_draws == 0 and a.backend == backend.name
    assert a.traces["loss"].shape == (3,) and np.isfinite(a.traces["loss"]).all()
    assert len(a.params) == 12
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in a.params.values())
    assert a.attrs["stream"]["options"] == {"hidden": 8} and a.attrs["seed"] == 0
    assert a.attrs["stream"]["fields"] == list(FIELDS) and a.attrs["latent_sites"] == []


@pytest.mark.parametrize(
    ("model", "opts"),
    [
        ("attentive_np_model", {"hidden": 8, "num_heads": 2}),
        ("latent_np_model", {"hidden": 8, "latent_dim": 2}),
    ],
)
def test_attentive_and_latent_training_are_reproducible_by_key(
    backend: Backend, model: str, opts: dict
) -> None:
    run = lambda key: fit(backend, model, key=key, **opts).traces["loss"]
    with backend.leaves_global_state_alone():
        a = run(0)
        assert np.isfinite(a).all()
        np.testing.assert_array_equal(a, run(0))
        assert not np.array_equal(a, run(1))


def test_short_training_beats_a_trivial_baseline(backend: Backend) -> None:
    # 600 Adam steps (constant learning rate 3e-3) on batches of 16 RBF tasks, then score the
    # new target points of 300 held-out RBF tasks. Trivial baseline: the best context-free
    # Gaussian, N(0, v) with v the marginal variance of y, estimated on 2000 other tasks. The
    # comparison is paired per task (per-task mean LL over its new points); tasks are
    # independent, so the SE of the mean difference is sd(d) / sqrt(300). Require the gain to
    # exceed 4 SE.
    # Measured through probdyn.fit (hidden 64, float64, key 0): NumPyro CNP -0.437, baseline
    # -0.873 nats per point, a paired gain of 0.436 +- 0.028 (about 15 SE; about 15 s here);
    # Pyro CNP -0.426, a gain of 0.447 +- 0.028 (16 SE; 7-11 s on the shared 2-core machine).
    # The oracle is about 1.55 on such tasks.
    engine = probdyn.VI(
        num_steps=600, learning_rate=3e-3, final_learning_rate_fraction=1.0, progress_bar=False
    )
    model = backend.mod.conditional_np_model
    post = probdyn.fit(model, gp_task_stream(16), engine=engine, key=0, hidden=64)
    losses = post.traces["loss"]
    assert losses.shape == (600,) and np.isfinite(losses).all()
    assert post.amortized and post.num_draws == 0 and "cnp.decoder.layers.2.weight" in post.params
    # Each loss is on a fresh independent batch: compare the first and last 100 steps by a
    # two-sample z statistic (4 SE).
    first, last = losses[:100], losses[-100:]
    se = np.hypot(first.std(ddof=1), last.std(ddof=1)) / 10.0
    assert first.mean() - last.mean() > 4 * se

    test = gp_tasks(300, key=2024)
    kw = {f: getattr(test, f) for f in FIELDS}
    inputs = {f: v for f, v in kw.items() if f != "y_target"}
    pred = post.predict(**inputs, num_draws=1, sites=["mean", "sd"])  # the options are kept
    mean, sd = pred["mean"][0, 0, ..., 0], pred["sd"][0, 0, ..., 0]
    y = test.y_target[..., 0]
    ll = stats.norm.logpdf(y, mean, sd)
    # log_likelihood_at scores the same predictive (zero at the padded slots).
    at = post.log_likelihood_at(**kw, num_draws=1)["y"][0, 0, ..., 0]
    np.testing.assert_allclose(at, np.where(test.mask_target, ll, 0.0), rtol=1e-12, atol=1e-12)
    other = gp_tasks(2000, key=7)
    var = np.mean(other.y_target[other.mask_target] ** 2)
    base = stats.norm.logpdf(y, 0.0, np.sqrt(var))
    new = test.mask_new
    cnp_ll, _ = mean_log_likelihood(ll, new)
    base_ll, _ = mean_log_likelihood(base, new)
    per_task = lambda lp: np.where(new, lp, 0.0).sum(1) / new.sum(1)
    diff = per_task(ll) - per_task(base)
    assert diff.mean() > 4 * diff.std(ddof=1) / np.sqrt(diff.size)
    # The 0.1 sd floor caps every point at -log(0.1 sqrt(2 pi)) = 1.384 nats.
    assert base_ll < cnp_ll < 1.384 and float(sd[test.mask_target].min()) >= 0.1


def test_short_elbo_training_beats_a_trivial_baseline(backend: Backend) -> None:
    # 600 Adam steps of the NP ELBO on batches of 16 RBF tasks (constant learning rate 3e-3),
    # then score the new target points of 300 held-out RBF tasks by the juho-lee/bnp
    # convention: per point, the log of the mean over 16 draws z ~ p(z | context) of
    # N(y; mean(z), sd(z)). Trivial baseline and paired 4-SE test as in
    # test_short_training_beats_a_trivial_baseline (tasks independent: SE = sd(d) / sqrt(300)).
    # Measured through probdyn.fit (hidden 64, latent 32, float64, key 0): NumPyro LatentNP
    # -0.488, baseline -0.873 nats per point, a paired gain of 0.384 +- 0.027 (14 SE); Pyro
    # -0.487, a gain of 0.386 +- 0.028 (14 SE; about 20 s on the shared 2-core machine).
    opts = {"hidden": 64, "latent_dim": 32}
    engine = probdyn.VI(
        guide=backend.mod.latent_np_guide,
        num_steps=600,
        learning_rate=3e-3,
        final_learning_rate_fraction=1.0,
        progress_bar=False,
    )
    model = backend.mod.latent_np_model
    post = probdyn.fit(model, gp_task_stream(16), engine=engine, key=0, **opts)
    losses = post.traces["loss"]
    assert losses.shape == (600,) and np.isfinite(losses).all()
    first, last = losses[:100], losses[-100:]
    assert first.mean() - last.mean() > 4 * np.hypot(first.std(ddof=1), last.std(ddof=1)) / 10

    test = gp_tasks(300, key=2024)
    kw = {f: getattr(test, f) for f in FIELDS}
    # 16 runs of the model: z ~ p(z | context) each, scored on the targets.
    lp = post.log_likelihood_at(**kw, num_draws=16, key=1)["y"][0, ..., 0]
    sd = post.predict(**kw, num_draws=2, sites=["sd"])["sd"]
    assert lp.shape == (16, 300, 50) and float(sd.min()) >= 0.1
    y = test.y_target[..., 0]
    ll = np.logaddexp.reduce(lp, axis=0) - np.log(lp.shape[0])
    other = gp_tasks(2000, key=7)
    base = stats.norm.logpdf(y, 0.0, np.sqrt(np.mean(other.y_target[other.mask_target] ** 2)))
    new = test.mask_new
    per_task = lambda v: np.where(new, v, 0.0).sum(1) / new.sum(1)
    diff = per_task(ll) - per_task(base)
    assert diff.mean() > 4 * diff.std(ddof=1) / np.sqrt(diff.size)
    lnp_ll, _ = mean_log_likelihood(ll, new)
    assert lnp_ll < 1.384  # the 0.1 decoder floor caps every point (and so every mixture)


# -- amortised prediction with a latent path -------------------------------------------------

LATENT_FITS = {  # model, guide, options, the network's site prefix
    "latent": ("latent_np_model", "latent_np_guide", {"hidden": 8, "latent_dim": 2}, "lnp"),
    "attentive": (
        "attentive_np_model",
        "attentive_np_guide",
        {"hidden": 8, "num_heads": 2, "latent_dim": 2},
        "anp",
    ),
}


@pytest.mark.parametrize("kind", list(LATENT_FITS))
def test_latent_fit_and_predict_draw_z_from_the_context(backend: Backend, kind: str) -> None:
    # A short NP-ELBO fit through probdyn.fit (3 steps: it runs, not that it learns), then
    # amortised prediction on a new task: every draw has its own z ~ p(z | context), and the
    # decoder maps it to that draw's mean and sd.
    model_name, guide_name, opts, prefix = LATENT_FITS[kind]
    model = getattr(backend.mod, model_name)
    engine = probdyn.VI(guide=getattr(backend.mod, guide_name), num_steps=3, progress_bar=False)
    post = probdyn.fit(model, STREAM, engine=engine, key=0, **opts)
    assert post.amortized and post.traces["loss"].shape == (3,)
    assert np.isfinite(post.traces["loss"]).all()
    assert f"{prefix}.latent_head.layers.1.weight" in post.params
    assert post.attrs["latent_sites"] == []
    rng = np.random.default_rng(1)
    x_c, x_t = rng.uniform(-2, 2, 5), np.linspace(-2, 2, 7)
    y_c = np.sin(x_c)
    pred = post.predict(x_t, context=(x_c, y_c), num_draws=4, key=3)
    # One task: the batch axis of one is dropped from every site, z included.
    assert {k: v.shape for k, v in pred.items()} == {
        "z": (1, 4, 2),
        "mean": (1, 4, 7),
        "sd": (1, 4, 7),
        "y": (1, 4, 7),
    }
    assert not np.allclose(pred["z"][0, 0], pred["z"][0, 1])
    assert not np.allclose(pred["mean"][0, 0], pred["mean"][0, 1])
    kw = {
        "x_context": x_c[None, :, None],
        "y_context": y_c[None, :, None],
        "mask_context": np.ones((1, 5), bool),
        "x_target": x_t[None, :, None],
    }
    for d in range(4):
        z = pred["z"][0, d][None]
        tr = sites(backend.trace(model, as_data(backend, kw), post.params, z, **opts))
        np.testing.assert_allclose(pred["mean"][0, d], tr["mean"]["value"][0, :, 0], rtol=1e-12)
        np.testing.assert_allclose(pred["sd"][0, d], tr["sd"]["value"][0, :, 0], rtol=1e-12)
