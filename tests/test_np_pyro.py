"""Neural processes on Pyro, what only the Pyro backend has or shows: a torch.Generator key,
amortised prediction checked against the fitted network, save/load, refusals of custom models,
and the stream runner's batches.

The tests every backend passes are in tests/test_np.py (sites, masking, invariances, guides,
errors) and tests/test_np_training.py (training runs, amortised prediction with a latent path)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")

from pyro import poutine  # noqa: E402

import probdyn  # noqa: E402
from probdyn.data import TaskStream, gp_task_stream  # noqa: E402
from probdyn.pyro.bridge import with_params  # noqa: E402
from probdyn.pyro.primitives.neural_process import (  # noqa: E402
    attentive_np_model,
    conditional_np_model,
    latent_np_guide,
    latent_np_model,
)

pytestmark = pytest.mark.usefixtures("torch_float64_one_thread")

STREAM = gp_task_stream(4)


def _fit(model, num_steps: int = 3, key=0, stream=STREAM, **options) -> probdyn.Posterior:
    guide = latent_np_guide if model is latent_np_model else "normal"
    engine = probdyn.VI(guide=guide, num_steps=num_steps, progress_bar=False)
    return probdyn.fit(model, stream, engine=engine, key=key, **options)


def test_a_torch_generator_key_repeats_the_run_and_isolates_it() -> None:
    # (The int-key runs of every NP on both backends: tests/test_np_training.py.)
    run = lambda key: _fit(conditional_np_model, key=key, hidden=8)
    pyro.clear_param_store()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    # A torch.Generator key: the same generator state gives the same run.
    gen = lambda: torch.Generator().manual_seed(5)
    np.testing.assert_array_equal(run(gen()).traces["loss"], run(gen()).traces["loss"])
    # Neither the global torch RNG nor the user's param store is touched.
    assert torch.equal(torch.get_rng_state(), before)
    assert len(pyro.get_param_store()) == 0


def _network(model, params: dict, kw: dict, **options) -> dict:
    """One run of ``model`` with ``params``: its trace's sites, without going through predict."""
    tkw = {k: torch.as_tensor(v) for k, v in kw.items()}
    with poutine.seed(rng_seed=0), torch.no_grad():
        return poutine.trace(with_params(model, params)).get_trace(**tkw, **options).nodes


def test_predict_with_a_context_runs_the_fitted_network() -> None:
    post = _fit(conditional_np_model, hidden=8)
    rng = np.random.default_rng(0)
    x_c, x_t = rng.uniform(-2, 2, 6), np.linspace(-2, 2, 9)
    y_c = np.sin(x_c)
    pred = post.predict(x_t, context=(x_c, y_c), num_draws=3, key=1)
    assert {k: v.shape for k, v in pred.items()} == {k: (1, 3, 9) for k in ("mean", "sd", "y")}
    # The CNP predictive is deterministic; only the replicated y differs between runs.
    np.testing.assert_array_equal(pred["mean"][0, 0], pred["mean"][0, 2])
    assert not np.array_equal(pred["y"][0, 0], pred["y"][0, 1])
    # The same numbers as the network itself, with the fitted weights, on the same task.
    kw = {
        "x_context": x_c[None, :, None],
        "y_context": y_c[None, :, None],
        "mask_context": np.ones((1, 6), bool),
        "x_target": x_t[None, :, None],
    }
    tr = _network(conditional_np_model, post.params, kw, hidden=8)
    np.testing.assert_allclose(pred["mean"][0, 0], tr["mean"]["value"][0, :, 0], rtol=1e-12)
    np.testing.assert_allclose(pred["sd"][0, 0], tr["sd"]["value"][0, :, 0], rtol=1e-12)
    # The pointwise log likelihood of new targets is that Gaussian's.
    y_t = np.cos(x_t)
    ll = post.log_likelihood_at(x_t, y_t, context=(x_c, y_c), num_draws=2)["y"]
    exact = stats.norm.logpdf(y_t, pred["mean"][0, 0], pred["sd"][0, 0])
    assert ll.shape == (1, 2, 9)
    np.testing.assert_allclose(ll[0, 1], exact, rtol=1e-12)
    # (n, 1) arrays keep the trailing dimension; a (batch, n, 1) batch keeps the batch axis.
    two = post.predict(x_t[:, None], context=(x_c[:, None], y_c[:, None]), num_draws=2)
    assert two["mean"].shape == (1, 2, 9, 1)
    np.testing.assert_allclose(two["mean"][0, 0, :, 0], pred["mean"][0, 0], rtol=1e-12)
    batch = post.predict(
        np.stack([x_t, x_t])[..., None],
        context=(np.stack([x_c, -x_c])[..., None], np.stack([y_c, y_c])[..., None]),
        num_draws=2,
    )
    assert batch["mean"].shape == (1, 2, 2, 9, 1)
    np.testing.assert_allclose(batch["mean"][0, 0, 0, :, 0], pred["mean"][0, 0], rtol=1e-12)


def test_a_loaded_posterior_predicts_the_same(tmp_path) -> None:
    post = _fit(attentive_np_model, hidden=8, num_heads=2)
    path = tmp_path / "anp.nc"
    post.save(str(path))
    loaded = probdyn.load(path, model=attentive_np_model)
    assert loaded.amortized and loaded.backend == "pyro"
    assert loaded.attrs["stream"]["options"] == {"hidden": 8, "num_heads": 2}
    for name, value in post.params.items():
        np.testing.assert_array_equal(loaded.params[name], value)
    np.testing.assert_array_equal(loaded.traces["loss"], post.traces["loss"])
    x_c, x_t = np.array([-1.0, 0.0, 1.5]), np.linspace(-2, 2, 5)
    y_c = np.array([0.5, -0.2, 1.0])
    # The network options come from the file: hidden=8 and num_heads=2 are not passed again.
    a = post.predict(x_t, context=(x_c, y_c), num_draws=2, key=4)
    b = loaded.predict(x_t, context=(x_c, y_c), num_draws=2, key=4)
    assert a.keys() == b.keys() == {"mean", "sd", "y"}
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def _no_observation(x_context, y_context, mask_context, x_target, y_target=None, mask_target=None):
    w = pyro.param("w", lambda: torch.zeros(()))
    pyro.deterministic("m", w * x_target)


def _latent_without_guide_site(x_context, y_context, mask_context, x_target, **kw):
    pyro.param("w", lambda: torch.zeros(()))


def test_custom_models_are_refused_with_the_reason() -> None:
    # (The errors every backend gives: tests/test_np.py.)
    engine = probdyn.VI(guide=_latent_without_guide_site, num_steps=1, progress_bar=False)
    with pytest.raises(ValueError, match=r"does not sample.*\['z'\]"):
        probdyn.fit(latent_np_model, STREAM, engine=engine, hidden=8, latent_dim=2)
    with pytest.raises(ValueError, match="needs an observed site"):
        _fit(_no_observation)


def test_every_step_draws_a_fresh_batch_and_counts_its_points() -> None:
    # A stream of one-task batches whose target count grows by one per batch, for a model whose
    # log density per point is known: y ~ N(w, 1) with w fixed by a learning rate of 1e-12.
    # The loss of step i is then -mean log N(y_j; w, 1) over that batch's real targets, so it
    # tells which batch was drawn (batch 0 sets the params up; step i trains on batch i + 1)
    # and that padded slots do not count.
    seen = []

    def sample(rng: np.random.Generator) -> dict:
        n = len(seen) + 1
        y = rng.normal(size=(1, 6, 1))
        seen.append(y[0, :n, 0])
        mask = np.arange(6)[None] < n
        return {"x": np.zeros((1, 6, 1)), "y": y, "mask": mask}

    def model(x, y, mask):
        w = pyro.param("w", lambda: torch.tensor(0.3))
        pyro.sample("obs", pyro.distributions.Normal(w, 1.0).mask(mask[..., None]), obs=y)

    stream = TaskStream(sample, fields=("x", "y", "mask"), count="mask")
    engine = probdyn.VI(num_steps=4, learning_rate=1e-12, progress_bar=False)
    post = probdyn.fit(model, stream, engine=engine, key=0, backend="pyro")  # no probe draw
    exact = [-stats.norm.logpdf(y, 0.3, 1.0).mean() for y in seen[1:]]
    assert len(seen) == 5
    np.testing.assert_allclose(post.traces["loss"], exact, rtol=1e-9)
    np.testing.assert_allclose(post.params["w"], 0.3, atol=1e-9)  # maximum likelihood, w only
    assert list(post.params) == ["w"]
