"""AttentiveNP (NumPyro): sites, masked attention, and attention against mean pooling in a
short training run; the optional latent path (the full ANP): its sites and its errors.

The tests every backend passes are in tests/test_np.py (padding and context order, the
amortised guide, the constructor's errors) and tests/test_np_training.py (training, and
prediction with the latent path)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from scipy import stats

import probdyn
from probdyn.data import gp_task_stream, gp_tasks
from probdyn.numpyro import (
    AttentiveNP,
    attentive_np_guide,
    attentive_np_model,
    conditional_np_model,
)

FIELDS = ("x_context", "y_context", "mask_context", "x_target", "y_target", "mask_target")


def _kwargs(tasks) -> dict:
    return {f: jnp.asarray(getattr(tasks, f)) for f in FIELDS}


def _trace(**kwargs) -> dict:
    return handlers.trace(handlers.seed(attentive_np_model, 0)).get_trace(**kwargs)


def _expected_shapes(latent_dim: int | None) -> dict[str, tuple[int, ...]]:
    """The param shapes of the attentive NP with hidden=8, encoder_depth=2, num_heads=2."""
    weights = {
        "anp.encoder.layers.0.weight": (2, 8),
        "anp.encoder.layers.1.weight": (8, 8),
        "anp.key_query.layers.0.weight": (1, 8),
        "anp.key_query.layers.1.weight": (8, 8),
        "anp.attention.query.layers.0.weight": (8, 8),
        "anp.attention.key.layers.0.weight": (8, 8),
        "anp.attention.value.layers.0.weight": (8, 8),
        "anp.attention.output.layers.0.weight": (8, 8),
    }
    if latent_dim is not None:
        weights |= {
            "anp.latent_encoder.layers.0.weight": (2, 8),
            "anp.latent_encoder.layers.1.weight": (8, 8),
            "anp.latent_head.layers.0.weight": (8, 8),
            "anp.latent_head.layers.1.weight": (8, 2 * latent_dim),  # loc and raw scale
        }
    # [x, r(x)] = 1 + 8, and with the latent path [x, r(x), z] = 1 + 8 + latent_dim
    weights["anp.decoder.layers.0.weight"] = (9 + (latent_dim or 0), 8)
    weights["anp.decoder.layers.1.weight"] = (8, 8)
    weights["anp.decoder.layers.2.weight"] = (8, 2)
    return weights | {n.replace("weight", "bias"): s[1:] for n, s in weights.items()}


def test_sites_and_minimum_sd() -> None:
    tasks = gp_tasks(3, key=0)
    tr = _trace(**_kwargs(tasks), hidden=8, num_heads=2, encoder_depth=2, min_sd=0.2)
    shapes = {n: s["value"].shape for n, s in tr.items() if s["type"] == "param"}
    assert shapes == _expected_shapes(latent_dim=None)
    assert tr["y"]["is_observed"] and tr["mean"]["value"].shape == (3, 50, 1)
    assert float(tr["sd"]["value"].min()) >= 0.2


def test_masked_context_points_are_dropped_and_an_empty_context_is_finite() -> None:
    with handlers.seed(rng_seed=0):
        anp = AttentiveNP("anp", hidden=16, num_heads=4)
    x_c = jnp.array([[[-1.5], [0.0], [1.5]]])
    y_c = jnp.array([[[1.0], [2.0], [3.0]]])
    x_t = jnp.array([[[-1.0], [1.0]]])
    mask = jnp.array([[True, True, True]])
    r = anp.attend(x_c, y_c, mask, x_t)
    # Masking a context point out equals dropping it, and does change r.
    r_drop = anp.attend(x_c[:, :2], y_c[:, :2], mask[:, :2], x_t)
    r_mask = anp.attend(x_c, y_c, jnp.array([[True, True, False]]), x_t)
    np.testing.assert_allclose(r_mask, r_drop, rtol=1e-12, atol=1e-14)
    assert float(jnp.abs(r_mask - r).max()) > 1e-6
    mean, sd = anp(x_c, y_c, jnp.zeros((1, 3), bool), x_t)
    assert bool(jnp.isfinite(mean).all() & jnp.isfinite(sd).all())
    grads = jax.grad(lambda y: anp(x_c, y, jnp.zeros((1, 3), bool), x_t)[0].sum())(y_c)
    assert bool(jnp.isfinite(grads).all()) and float(jnp.abs(grads).max()) == 0.0


def test_attention_fits_the_context_better_than_mean_pooling() -> None:
    # Kim et al. (2019): a CNP underfits its own context points; attention fixes this. Train an
    # AttentiveNP and a ConditionalNP the same way (600 Adam steps, batches of 16 RBF tasks, the
    # same task stream), then score 300 held-out tasks at their context points (juho-lee/bnp
    # "context LL"). Paired per task (tasks independent, SE = sd(d) / sqrt(300)); require the
    # gain to exceed 4 SE. Measured through probdyn.fit (hidden 64, 4 heads, lr 3e-3, float64,
    # key 0): context LL 0.586 (attentive) vs -0.279 (mean pool), a gain of 0.865 +- 0.018
    # (48 SE).
    test = gp_tasks(300, key=2024)
    y = test.y_target[..., 0]
    context = test.mask_target & ~test.mask_new
    per_task = lambda lp: np.where(context, lp, 0.0).sum(1) / context.sum(1)
    scores = []
    for model, opts in [
        (attentive_np_model, {"hidden": 64, "num_heads": 4}),
        (conditional_np_model, {"hidden": 64}),
    ]:
        engine = probdyn.VI(
            num_steps=600, learning_rate=3e-3, final_learning_rate_fraction=1.0, progress_bar=False
        )
        post = probdyn.fit(model, gp_task_stream(16), engine=engine, key=0, **opts)
        assert np.isfinite(post.traces["loss"]).all()
        inputs = {f: getattr(test, f) for f in FIELDS if f != "y_target"}
        pred = post.predict(**inputs, num_draws=1, sites=["mean", "sd"])
        mean, sd = pred["mean"][0, 0, ..., 0], pred["sd"][0, 0, ..., 0]
        assert float(sd[test.mask_target].min()) >= 0.1
        scores.append(per_task(stats.norm.logpdf(y, mean, sd)))
    diff = scores[0] - scores[1]
    assert diff.mean() > 4 * diff.std(ddof=1) / np.sqrt(diff.size)
    # The 0.1 sd floor caps every point at -log(0.1 sqrt(2 pi)) = 1.384 nats.
    assert scores[0].mean() < 1.384


# -- the latent path (latent_dim=k): the full ANP of Kim et al. (2019) ------------------------


def _params(tr) -> dict:
    return {n: s["value"] for n, s in tr.items() if s["type"] == "param"}


def _fn_trace(fn, **kwargs) -> dict:
    return handlers.trace(handlers.seed(fn, 0)).get_trace(**kwargs)


def test_latent_path_sites_and_shapes() -> None:
    tasks = gp_tasks(3, key=0)
    opts = {"hidden": 8, "num_heads": 2, "latent_dim": 4, "encoder_depth": 2, "min_sd": 0.2}
    tr = _fn_trace(attentive_np_model, **_kwargs(tasks), **opts)
    shapes = {n: s["value"].shape for n, s in tr.items() if s["type"] == "param"}
    assert shapes == _expected_shapes(latent_dim=4)
    assert not tr["z"]["is_observed"] and tr["z"]["value"].shape == (3, 4)
    assert tr["z"]["fn"].event_shape == (4,)
    assert tr["y"]["is_observed"] and tr["mean"]["value"].shape == (3, 50, 1)
    assert float(tr["sd"]["value"].min()) >= 0.2
    # The model's z is p(z | context): the latent encoder on the context set.
    with handlers.seed(rng_seed=0), handlers.substitute(data=_params(tr)):
        anp = AttentiveNP("anp", **opts)
    kw = _kwargs(tasks)
    loc, scale = anp.latent(kw["x_context"], kw["y_context"], kw["mask_context"])
    np.testing.assert_array_equal(tr["z"]["fn"].base_dist.loc, loc)
    np.testing.assert_array_equal(tr["z"]["fn"].base_dist.scale, scale)
    assert float(scale.min()) >= 0.1 and float(scale.max()) <= 1.0
    # The guide has the latent site only, and its params are the model's (shared by name).
    guide = _fn_trace(attentive_np_guide, **kw, **opts)
    assert [n for n, s in guide.items() if s["type"] == "sample"] == ["z"]
    assert set(_params(guide)) == set(shapes)


def test_latent_path_errors_name_the_argument() -> None:
    x, m, x_t = jnp.ones((2, 5, 1)), jnp.ones((2, 5), bool), jnp.zeros((2, 7, 1))
    with handlers.seed(rng_seed=0):
        plain = AttentiveNP("a", hidden=8, num_heads=2)
        full = AttentiveNP("b", hidden=8, num_heads=2, latent_dim=3)
        with pytest.raises(ValueError, match="AttentiveNP\\(latent_dim=0\\)"):
            AttentiveNP("c", hidden=8, num_heads=2, latent_dim=0)
    with pytest.raises(ValueError, match=r"ANP\(z=None\).*latent path"):
        full(x, x, m, x_t)
    with pytest.raises(ValueError, match=r"ANP\(z=<array of shape \(2, 3\)>\).*latent_dim=k"):
        plain(x, x, m, x_t, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"ANP.latent: .*latent_dim=k"):
        plain.latent(x, x, m)
    with pytest.raises(ValueError, match=r"attentive_np_guide\(latent_dim=None\)"):
        _fn_trace(
            attentive_np_guide,
            x_context=x,
            y_context=x,
            mask_context=m,
            x_target=x_t,
            hidden=8,
            num_heads=2,
        )
