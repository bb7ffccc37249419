"""Backend parity of LatentSDE: the same API, sites and initial weights, and given the same
weights, ``z0`` and guide noise ``eps``, the same ELBO terms (float64).

Both backends build the same grid, run the same GRU, networks and Euler–Maruyama steps, so
the only differences are in the order of floating-point operations (~1e-14 relative over
these short solves). 1e-8 is far above that and far below any difference in the maths.
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

from latent_sde_cases import ragged  # noqa: E402
from numpyro import handlers  # noqa: E402
from numpyro.primitives import Messenger  # noqa: E402
from pyro import poutine  # noqa: E402

import probdyn.pyro.primitives.latent_sde as torch_lsde  # noqa: E402
from probdyn.numpyro.primitives.latent_sde import LatentSDE as JaxLatentSDE  # noqa: E402
from probdyn.primitives.series import pad_series  # noqa: E402
from probdyn.pyro.bridge import with_params  # noqa: E402
from probdyn.pyro.primitives.latent_sde import LatentSDE as TorchLatentSDE  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_float64_one_thread")

_OPTIONS: dict[str, Any] = {
    "obs_dim": 2,
    "latent_dim": 3,
    "dt": 0.1,
    "drift_sizes": (8, 6),
    "diffusion_hidden": 4,
    "decoder_sizes": (5,),
    "encoder_hidden": 8,
    "context_dim": 4,
    "obs_scale": 0.5,
    "z0_prior": "learned",
    "seed": 3,
}


class _FixedKey(Messenger):
    """Answer ``numpyro.prng_key()`` with one given key: the NumPyro guide's eps is then
    ``jax.random.normal(key, shape)``, which the Pyro guide is handed too."""

    def __init__(self, fn: Any, key: Any) -> None:
        super().__init__(fn)
        self.key = key

    def process_message(self, msg: Any) -> None:
        if msg["type"] == "prng_key":
            msg["kwargs"]["rng_key"] = self.key


def _signature(fn: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_same_api() -> None:
    for name in ("__init__", "model", "guide", "grid", "predict", "sample_prior"):
        jax_sig = _signature(getattr(JaxLatentSDE, name))
        torch_sig = _signature(getattr(TorchLatentSDE, name))
        assert [s[0::2] for s in jax_sig] == [s[0::2] for s in torch_sig], name
        assert [s[1] for s in jax_sig] == [s[1] for s in torch_sig], name


def _jax_trace(fn: Any, *args: Any, data: dict[str, Any], key: Any = None, **kw: Any) -> Any:
    fn = handlers.substitute(fn, data=data)
    if key is not None:
        fn = _FixedKey(fn, key)
    with handlers.seed(rng_seed=0):
        return handlers.trace(fn).get_trace(*args, **kw)


def _torch_trace(
    fn: Any, *args: Any, params: dict[str, Any], data: dict[str, Any], **kw: Any
) -> Any:
    tensors = {k: torch.as_tensor(np.array(v)) for k, v in data.items()}
    fn = poutine.condition(with_params(fn, params), data=tensors)
    with pyro.get_param_store().scope(), torch.no_grad():
        return poutine.trace(fn).get_trace(*args, **kw)


def _jax_logp(tr: Any, name: str) -> np.ndarray:
    s = tr[name]
    return np.asarray(s["fn"].log_prob(s["value"]))


def _torch_logp(tr: Any, name: str) -> np.ndarray:
    s = tr.nodes[name]
    return s["fn"].log_prob(s["value"]).detach().numpy()


def test_same_weights_and_noise_give_the_same_elbo_terms(monkeypatch: Any) -> None:
    p = pad_series(*ragged())
    args = (p.times, p.values, p.mask)
    jl, tl = JaxLatentSDE(**_OPTIONS), TorchLatentSDE(**_OPTIONS)
    grid = jl.grid(p.times, p.mask, t0=0.0)
    np.testing.assert_array_equal(grid, tl.grid(p.times, p.mask, t0=0.0))
    steps, shape = len(grid) - 1, (3, len(grid) - 1, 3)
    # The initial weights are the same numbers on both backends (NumPy initialisers).
    with handlers.seed(rng_seed=0):
        jg0 = handlers.trace(jl.guide).get_trace(*args, t0=0.0)
        jm0 = handlers.trace(jl.model).get_trace(*args, t0=0.0)
    init = {
        n: np.asarray(s["value"])
        for tr in (jg0, jm0)
        for n, s in tr.items()
        if s["type"] == "param"
    }
    with pyro.get_param_store().scope(), torch.no_grad():
        tg0 = poutine.trace(tl.guide).get_trace(*args, t0=0.0)
        tm0 = poutine.trace(tl.model).get_trace(*args, t0=0.0)
    torch_init = {
        n: s["value"].detach().numpy()
        for tr in (tg0, tm0)
        for n, s in tr.nodes.items()
        if s["type"] == "param"
    }
    assert sorted(init) == sorted(torch_init) and len(init) == 28
    for n, v in init.items():
        np.testing.assert_array_equal(torch_init[n], v, err_msg=n)
    # Perturbed weights (non-zero biases, a learned z0 prior away from N(0, I)), copied by
    # name from the NumPyro values into the Pyro params.
    rng = np.random.default_rng(0)
    params = {n: v + 0.3 * rng.standard_normal(v.shape) for n, v in init.items()}
    params["latent_sde.z0_scale"] = np.exp(0.2 * rng.standard_normal(3))
    # The guide: the same eps (NumPyro's draw from a fixed key, handed to the Pyro guide)
    # and the same z0.
    key = jax.random.key(11)
    eps = np.array(jax.random.normal(key, shape))  # a writable copy, for torch

    def pyro_eps(size: tuple[int, ...], dtype: Any) -> Any:
        assert tuple(size) == shape and dtype == torch.float64
        return torch.as_tensor(eps)

    monkeypatch.setattr(torch_lsde, "_standard_normal", pyro_eps)
    jg = _jax_trace(jl.guide, *args, t0=0.0, data=params, key=key)
    z0 = np.asarray(jg["latent_sde.z0"]["value"])
    tg = _torch_trace(tl.guide, *args, t0=0.0, params=params, data={"latent_sde.z0": z0})
    for name in ("path_noise", "path_kl", "posterior_path"):
        a, b = np.asarray(jg[f"latent_sde.{name}"]["value"]), tg.nodes[f"latent_sde.{name}"]
        np.testing.assert_allclose(
            b["value"].detach().numpy(), a, rtol=1e-8, atol=1e-10, err_msg=name
        )
    assert np.abs(np.asarray(jg["latent_sde.path_kl"]["value"])).min() > 0.1
    assert not np.allclose(jg["latent_sde.path_noise"]["value"], eps)  # u != 0
    # The guide's log densities, site by site (z0 under the same encoder, the path site's
    # Girsanov density).
    for site in ("latent_sde.z0", "latent_sde.path_noise"):
        np.testing.assert_allclose(_torch_logp(tg, site), _jax_logp(jg, site), rtol=1e-8)
    # The model at the guide's values (and the same forecast noise past the grid).
    target = np.array([0.35, 1.2, 1.45])
    forecast_noise = rng.standard_normal((3, 3, 3))  # 1.2 -> 1.3, 1.4, 1.45
    latent = {
        "latent_sde.z0": z0,
        "latent_sde.path_noise": np.asarray(jg["latent_sde.path_noise"]["value"]),
        "latent_sde.forecast_noise": forecast_noise,
    }
    jm = _jax_trace(jl.model, *args, t0=0.0, target_times=target, data={**params, **latent})
    tm = _torch_trace(tl.model, *args, t0=0.0, target_times=target, params=params, data=latent)
    for site in ("latent_sde.z0", "latent_sde.path_noise", "latent_sde.y"):
        np.testing.assert_allclose(_torch_logp(tm, site), _jax_logp(jm, site), rtol=1e-8)
    for site in ("latent_sde.forecast", "latent_sde.forecast_latent"):
        a = np.asarray(jm[site]["value"])
        np.testing.assert_allclose(
            tm.nodes[site]["value"].detach().numpy(), a, rtol=1e-8, atol=1e-10
        )
    # The ELBO's terms: log p(z0, path, y) and log q(z0, path), and their difference.
    sites = ("latent_sde.z0", "latent_sde.path_noise", "latent_sde.y")
    log_p = [
        sum(float(np.sum(f(tr, s))) for s in sites)
        for f, tr in ((_jax_logp, jm), (_torch_logp, tm))
    ]
    log_q = [
        sum(float(np.sum(f(tr, s))) for s in sites[:2])
        for f, tr in ((_jax_logp, jg), (_torch_logp, tg))
    ]
    np.testing.assert_allclose(log_p[1], log_p[0], rtol=1e-8)
    np.testing.assert_allclose(log_q[1], log_q[0], rtol=1e-8)
    np.testing.assert_allclose(log_p[1] - log_q[1], log_p[0] - log_q[0], rtol=1e-8)
    # ... and Pyro's whole-trace log density (observed and deterministic sites included) is
    # that log p plus the forecast noise's: no other site contributes.
    ahead = float(np.sum(_jax_logp(jm, "latent_sde.forecast_noise")))
    np.testing.assert_allclose(_torch_logp(tm, "latent_sde.forecast_noise").sum(), ahead)
    np.testing.assert_allclose(float(tm.log_prob_sum()), log_p[0] + ahead, rtol=1e-8)
    assert steps == 13
