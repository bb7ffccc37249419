"""Neural processes on both backends (each test runs once per backend, through the adapters of
tests/np_backends.py): sites, masking and invariances, the amortised guides, and the errors.

Training runs and amortised prediction on both backends: tests/test_np_training.py.
Backend-specific tests: tests/test_np_pyro.py and tests/test_np_attentive_numpyro.py;
tests/test_np_parity.py compares the two backends' numbers with each other.
"""

from __future__ import annotations

import numpy as np
import pytest
from np_backends import (
    BACKENDS,
    FIELDS,
    STREAM,
    Backend,
    as_data,
    backend_for,
    fit,
    params_of,
    sites,
    task_data,
    to_numpy,
    z_dist,
)

import probdyn
from probdyn.data import gp_tasks


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    return backend_for(request)


# -- sites ----------------------------------------------------------------------------------


def test_conditional_np_sites_and_minimum_sd(backend: Backend) -> None:
    tasks = gp_tasks(3, key=0)
    tr = sites(
        backend.trace(
            backend.mod.conditional_np_model, task_data(backend, tasks), hidden=8, min_sd=0.2
        )
    )
    params = {n: s["value"].shape for n, s in tr.items() if s["type"] == "param"}
    assert params == {
        "cnp.encoder.layers.0.weight": (2, 8),
        "cnp.encoder.layers.0.bias": (8,),
        "cnp.encoder.layers.1.weight": (8, 8),
        "cnp.encoder.layers.1.bias": (8,),
        "cnp.encoder.layers.2.weight": (8, 8),
        "cnp.encoder.layers.2.bias": (8,),
        "cnp.decoder.layers.0.weight": (9, 8),
        "cnp.decoder.layers.0.bias": (8,),
        "cnp.decoder.layers.1.weight": (8, 8),
        "cnp.decoder.layers.1.bias": (8,),
        "cnp.decoder.layers.2.weight": (8, 2),
        "cnp.decoder.layers.2.bias": (2,),
    }
    assert tr["y"]["is_observed"] and tr["y"]["value"].shape == (3, 50, 1)
    assert tr["mean"]["value"].shape == tr["sd"]["value"].shape == (3, 50, 1)
    assert float(tr["sd"]["value"].min()) >= 0.2
    assert tr["cnp.encoder.layers.0.weight"]["value"].dtype == np.float64


def test_latent_npsites(backend: Backend) -> None:
    tasks = gp_tasks(3, key=0)
    opts = {"hidden": 8, "latent_dim": 4, "encoder_depth": 2, "min_sd": 0.2}
    data = task_data(backend, tasks)
    tr = sites(backend.trace(backend.mod.latent_np_model, data, **opts))
    shapes = {n: s["value"].shape for n, s in tr.items() if s["type"] == "param"}
    assert shapes == {
        "lnp.latent_encoder.layers.0.weight": (2, 8),
        "lnp.latent_encoder.layers.0.bias": (8,),
        "lnp.latent_encoder.layers.1.weight": (8, 8),
        "lnp.latent_encoder.layers.1.bias": (8,),
        "lnp.latent_head.layers.0.weight": (8, 8),
        "lnp.latent_head.layers.0.bias": (8,),
        "lnp.latent_head.layers.1.weight": (8, 8),
        "lnp.latent_head.layers.1.bias": (8,),
        "lnp.deterministic_encoder.layers.0.weight": (2, 8),
        "lnp.deterministic_encoder.layers.0.bias": (8,),
        "lnp.deterministic_encoder.layers.1.weight": (8, 8),
        "lnp.deterministic_encoder.layers.1.bias": (8,),
        "lnp.decoder.layers.0.weight": (13, 8),  # [x, r, z] = 1 + 8 + 4
        "lnp.decoder.layers.0.bias": (8,),
        "lnp.decoder.layers.1.weight": (8, 8),
        "lnp.decoder.layers.1.bias": (8,),
        "lnp.decoder.layers.2.weight": (8, 2),
        "lnp.decoder.layers.2.bias": (2,),
    }
    assert not tr["z"]["is_observed"] and tr["z"]["value"].shape == (3, 4)
    assert tr["z"]["fn"].event_shape == (4,)
    assert tr["y"]["is_observed"] and tr["mean"]["value"].shape == (3, 50, 1)
    assert float(tr["sd"]["value"].min()) >= 0.2
    # Without the deterministic path the decoder sees [x, z] only.
    bare = sites(backend.trace(backend.mod.latent_np_model, data, **opts, deterministic_path=False))
    assert not any("deterministic_encoder" in n for n in bare)
    assert bare["lnp.decoder.layers.0.weight"]["value"].shape == (5, 8)
    # The guide has the latent site only, and its params are the model's (shared by name).
    guide = sites(backend.trace(backend.mod.latent_np_guide, data, **opts))
    assert [n for n, s in guide.items() if s["type"] == "sample"] == ["z"]
    assert set(params_of(guide)) == set(shapes)


# -- masking and invariances ----------------------------------------------------------------

PADDING_CASES = {  # model, its options, the tasks' key, whether z is held at a traced draw
    "conditional": ("conditional_np_model", {"hidden": 16}, 1, False),
    "attentive": ("attentive_np_model", {"hidden": 16, "num_heads": 4}, 1, False),
    "latent-given-z": ("latent_np_model", {"hidden": 16, "latent_dim": 3}, 2, True),
}


@pytest.mark.parametrize("case", list(PADDING_CASES))
def test_padding_and_context_order_do_not_matter(backend: Backend, case: str) -> None:
    model_name, opts, key, given_z = PADDING_CASES[case]
    model = getattr(backend.mod, model_name)
    tasks = gp_tasks(4, key=key)
    arrays = {f: np.array(getattr(tasks, f)) for f in FIELDS}
    tr = backend.trace(model, as_data(backend, arrays), **opts)
    values = params_of(tr) | ({"z": to_numpy(tr["z"]["value"])} if given_z else {})
    logp = backend.log_density(model, values, **opts)
    base = logp(as_data(backend, arrays))
    assert np.isfinite(base)
    # Garbage in padded context and target slots changes nothing.
    noisy = {f: a.copy() for f, a in arrays.items()}
    noisy["x_context"][~tasks.mask_context] = 7.0
    noisy["y_context"][~tasks.mask_context] = -7.0
    noisy["y_target"][~tasks.mask_target] = 99.0
    np.testing.assert_allclose(logp(as_data(backend, noisy)), base, rtol=1e-12)
    # Reversing the real context points of every task changes nothing (mean pool, attention:
    # a weighted sum over the set).
    perm = {f: a.copy() for f, a in arrays.items()}
    for f in ("x_context", "y_context"):
        for i, n in enumerate(tasks.num_context):
            perm[f][i, :n] = perm[f][i, :n][::-1]
    np.testing.assert_allclose(logp(as_data(backend, perm)), base, rtol=1e-12)
    # Only real targets count: dropping the last real target changes the log density.
    fewer = {f: a.copy() for f, a in arrays.items()}
    fewer["mask_target"][0, fewer["mask_target"][0].sum() - 1] = False
    assert logp(as_data(backend, fewer)) != base


GUIDES = {  # model, guide, options
    "latent": ("latent_np_model", "latent_np_guide", {"hidden": 16, "latent_dim": 3}),
    "attentive": (
        "attentive_np_model",
        "attentive_np_guide",
        {"hidden": 16, "num_heads": 4, "latent_dim": 3},
    ),
}


@pytest.mark.parametrize("kind", list(GUIDES))
def test_guide_amortises_over_targets_and_ignores_padding(backend: Backend, kind: str) -> None:
    model_name, guide_name, opts = GUIDES[kind]
    model, guide = getattr(backend.mod, model_name), getattr(backend.mod, guide_name)
    tasks = gp_tasks(4, key=1)
    arrays = {f: np.array(getattr(tasks, f)) for f in FIELDS}
    kw = as_data(backend, arrays)
    params = params_of(backend.trace(model, kw, **opts))
    prior = z_dist(backend.trace(model, kw, params, **opts))
    # Prediction (no y_target): the guide is the model's p(z | context).
    pred = z_dist(backend.trace(guide, {**kw, "y_target": None}, params, **opts))
    np.testing.assert_array_equal(pred[0], prior[0])
    np.testing.assert_array_equal(pred[1], prior[1])
    # Training: q(z | targets) differs from p(z | context) (more points), its scale >= 0.1.
    post = z_dist(backend.trace(guide, kw, params, **opts))
    assert np.abs(post[0] - prior[0]).max() > 1e-3 and post[1].min() >= 0.1
    # Garbage in padded target slots does not change q.
    noisy = {f: a.copy() for f, a in arrays.items()}
    noisy["x_target"][~tasks.mask_target] = 5.0
    noisy["y_target"][~tasks.mask_target] = -9.0
    again = z_dist(backend.trace(guide, as_data(backend, noisy), params, **opts))
    np.testing.assert_allclose(again[0], post[0], rtol=1e-12)
    np.testing.assert_allclose(again[1], post[1], rtol=1e-12)
    # Without mask_target every slot counts, the padding included: q changes.
    unmasked = {**as_data(backend, noisy), "mask_target": None}
    unmasked_q = z_dist(backend.trace(guide, unmasked, params, **opts))
    assert np.abs(unmasked_q[0] - post[0]).max() > 1e-3


# -- errors ---------------------------------------------------------------------------------


def test_errors_name_the_argument(backend: Backend) -> None:
    mod = backend.mod
    with backend.seeded():
        with pytest.raises(ValueError, match=r"min_sd=1\.5"):
            mod.ConditionalNP("c", min_sd=1.5)
        with pytest.raises(ValueError, match="hidden=0"):
            mod.ConditionalNP("c", hidden=0)
        with pytest.raises(ValueError, match="activation='nope'"):
            mod.ConditionalNP("c", activation="nope")
        with pytest.raises(ValueError, match="num_heads=3"):
            mod.AttentiveNP("a", hidden=16, num_heads=3)
        with pytest.raises(ValueError, match="AttentiveNP\\(num_heads=0\\)"):
            mod.AttentiveNP("a", num_heads=0)
        with pytest.raises(ValueError, match=r"min_sd=1\.0"):
            mod.AttentiveNP("a", min_sd=1.0)
        with pytest.raises(ValueError, match="LatentNP\\(latent_dim=0\\)"):
            mod.LatentNP("l", latent_dim=0)
        with pytest.raises(ValueError, match=r"min_sd=0\.0"):
            mod.LatentNP("l", min_sd=0.0)
        with pytest.raises(ValueError, match="activation='nope'"):
            mod.LatentNP("l", activation="nope")
    with pytest.raises(ValueError, match="num_steps=0"):
        probdyn.VI(num_steps=0)
    with pytest.raises(TypeError, match="key="):
        fit(backend, "conditional_np_model", key="a", hidden=8)
    model = mod.conditional_np_model
    with pytest.raises(TypeError, match="only positional argument"):
        probdyn.fit(model, STREAM, 1.0, engine=probdyn.VI(), **backend.fit_options)
    with pytest.raises(TypeError, match=r"fitted with probdyn\.VI"):
        probdyn.fit(model, STREAM, engine=probdyn.NUTS(), **backend.fit_options)
    # A latent model needs an amortised guide function, one that samples its latent site.
    engine = probdyn.VI(num_steps=1, progress_bar=False)
    with pytest.raises(ValueError, match=r"VI\(guide='normal'\).*\['z'\].*latent_np_guide"):
        probdyn.fit(mod.latent_np_model, STREAM, engine=engine, hidden=8, latent_dim=2)
    # Without latent_dim the attentive model has no latent site, and the guide says so.
    engine = probdyn.VI(guide=mod.attentive_np_guide, num_steps=1, progress_bar=False)
    with pytest.raises(ValueError, match=r"attentive_np_guide\(latent_dim=None\)"):
        probdyn.fit(mod.attentive_np_model, STREAM, engine=engine, hidden=8, num_heads=2)
