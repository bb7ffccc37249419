"""Backend parity of LatentODE: the same API, sites and initial weights, and given the same
weights and the same z0 the same model log density and the same q(z0) (float64).

Error model: the encoder is the same float64 arithmetic on both backends (matrix products,
sigmoid, tanh, an exact softplus), so q(z0) differs only by summation order and library
kernels, ~1e-15 relative per operation (asserted to 1e-12). The likelihood also goes through
an adaptive ODE solve (Tsitouras 5(4) in diffrax and in probdyn's torchdiffeq tableau, with
different step-size controllers and dense-output interpolants), so it agrees only as well as
each solve matches the true solution. At rtol = atol = 1e-10 each backend's log density is
3e-8 to 9e-8 from the rtol = 1e-12 value (measured), too coarse for 1e-8; at rtol = atol = 1e-12
(used here) the decoded means differ by 6e-11 and the log density (about -59) by 1.5e-11
(measured), so 1e-8 absolute leaves a margin of ~600. A change in the maths (a mask, the GRU's
direction, an activation) moves these numbers by 1e-2 or more.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
jax = pytest.importorskip("jax")
pytest.importorskip("numpyro")

import jax.numpy as jnp  # noqa: E402
from numpyro import handlers  # noqa: E402
from numpyro.infer.util import log_density  # noqa: E402
from pyro import poutine  # noqa: E402

import probdyn.numpyro.primitives.latent_ode as jax_latent  # noqa: E402
import probdyn.primitives.series as series  # noqa: E402
import probdyn.pyro.primitives.latent_ode as torch_latent  # noqa: E402
from probdyn.pyro.bridge import with_params  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_float64_one_thread")

OPTIONS: dict[str, Any] = dict(
    obs_dim=2, latent_dim=3, field_sizes=(8, 8), decoder_sizes=(6,), encoder_hidden=5, seed=3
)
# One model per backend for every test (NumPyro compiles its solves once per model object).
JAX_LODE = jax_latent.LatentODE(**OPTIONS, rtol=1e-12, atol=1e-12)
TORCH_LODE = torch_latent.LatentODE(**OPTIONS, rtol=1e-12, atol=1e-12)


def _data() -> series.PaddedSeries:
    times = [np.array([0.1, 0.4, 0.9]), np.array([0.0, 0.3]), np.array([0.2, 0.5, 0.6, 1.2])]
    values = [np.arange(6.0).reshape(3, 2) / 3, np.ones((2, 2)), -np.ones((4, 2))]
    values[2][1, 0] = np.nan  # a missing entry inside a series, and padding in series 0, 1
    return series.pad_series(times, values)


def _signature(fn: Any) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def _jax_traces(lode: Any, p: series.PaddedSeries, params: dict | None = None) -> tuple:
    sub = {k: jnp.asarray(v) for k, v in (params or {}).items()}
    args = (p.times, p.values, p.mask)
    kw = dict(t0=0.0, target_times=np.linspace(0.0, 1.5, 4))
    with handlers.seed(rng_seed=0):
        model = handlers.trace(handlers.substitute(lode.model, sub)).get_trace(*args, **kw)
        guide = handlers.trace(handlers.substitute(lode.guide, sub)).get_trace(*args, **kw)
    return model, guide


def _torch_traces(lode: Any, p: series.PaddedSeries, params: dict | None = None) -> tuple:
    args = (p.times, p.values, p.mask)
    kw = dict(t0=0.0, target_times=np.linspace(0.0, 1.5, 4))
    model, guide = with_params(lode.model, params or {}), with_params(lode.guide, params or {})
    with poutine.seed(rng_seed=0), pyro.get_param_store().scope(), torch.no_grad():
        m = poutine.trace(model).get_trace(*args, **kw).nodes
        g = poutine.trace(guide).get_trace(*args, **kw).nodes
    return m, g


def _sites(trace: dict) -> dict[str, tuple]:
    kinds = ("param", "sample", "deterministic")
    return {
        n: (
            "deterministic" if (s.get("infer") or {}).get("_deterministic") else s["type"],
            tuple(s["value"].shape),
        )
        for n, s in trace.items()
        if s["type"] in kinds and not n.endswith(".series")  # plates: NumPyro lists them too
    }


def test_same_api() -> None:
    assert jax_latent.__all__ == torch_latent.__all__ == ["LatentODE", "PaddedSeries", "pad_series"]
    assert jax_latent.pad_series is torch_latent.pad_series is series.pad_series
    assert jax_latent.PaddedSeries is torch_latent.PaddedSeries is series.PaddedSeries
    for method in ("__init__", "model", "guide", "predict"):
        jax_fn = getattr(jax_latent.LatentODE, method)
        assert _signature(getattr(torch_latent.LatentODE, method)) == _signature(jax_fn)


def test_same_sites_and_initial_weights() -> None:
    p = _data()
    jax_lode, torch_lode = JAX_LODE, TORCH_LODE
    assert repr(torch_lode).split(", NeuralODE")[0] == repr(jax_lode).split(", NeuralODE")[0]
    for jtr, ttr in zip(_jax_traces(jax_lode, p), _torch_traces(torch_lode, p)):
        assert _sites(ttr) == _sites(jtr)
        for name, (kind, _) in _sites(jtr).items():
            if kind == "param":  # same seed, same initial network
                np.testing.assert_array_equal(ttr[name]["value"].detach(), jtr[name]["value"])


def _random_weights(names_shapes: dict[str, tuple], seed: int) -> dict[str, np.ndarray]:
    # Away from the initial values, biases non-zero: every path of the networks matters.
    rng = np.random.default_rng(seed)
    return {
        n: rng.standard_normal(shape) / np.sqrt(shape[0] if len(shape) == 2 else 4.0)
        for n, shape in names_shapes.items()
    }


def test_same_log_density_and_guide_given_the_same_weights() -> None:
    p = _data()
    jax_lode, torch_lode = JAX_LODE, TORCH_LODE
    jtr_model, jtr_guide = _jax_traces(jax_lode, p)
    shapes = {
        n: tuple(s["value"].shape)
        for tr in (jtr_model, jtr_guide)
        for n, s in tr.items()
        if s["type"] == "param"
    }
    weights = _random_weights(shapes, seed=11)
    z0 = np.random.default_rng(12).standard_normal((3, OPTIONS["latent_dim"]))

    # The guide: q(z0 | series) from the GRU encoder run backwards over observed points.
    jq = _jax_traces(jax_lode, p, weights)[1]["latent.z0"]["fn"].base_dist
    tq = _torch_traces(torch_lode, p, weights)[1]["latent.z0"]["fn"].base_dist
    np.testing.assert_allclose(tq.loc.numpy(), np.asarray(jq.loc), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tq.scale.numpy(), np.asarray(jq.scale), rtol=1e-12, atol=1e-12)

    # The model: log p(y, z0) with the same weights and z0 (the failed-solve factors are 0).
    args, kw = (p.times, p.values, p.mask), dict(t0=0.0, target_times=np.linspace(0, 1.5, 4))
    jax_logp, jax_tr = log_density(
        jax_lode.model, args, kw, {**weights, "latent.z0": jnp.asarray(z0)}
    )
    conditioned = poutine.condition(
        with_params(torch_lode.model, weights), {"latent.z0": torch.as_tensor(z0)}
    )
    with pyro.get_param_store().scope(), torch.no_grad():
        ttr = poutine.trace(conditioned).get_trace(*args, **kw)
        torch_logp = float(ttr.log_prob_sum())
    print(f"log density: numpyro {float(jax_logp)!r}, pyro {torch_logp!r}")
    assert np.isfinite(torch_logp)
    assert torch_logp == pytest.approx(float(jax_logp), rel=0, abs=1e-8)
    np.testing.assert_allclose(
        ttr.nodes["latent.forecast"]["value"].numpy(),
        np.asarray(jax_tr["latent.forecast"]["value"]),
        rtol=1e-8,
        atol=1e-8,
    )
