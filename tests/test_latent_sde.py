"""LatentSDE on both backends: sites, the Girsanov path site, masks, errors and the
prediction helpers (float64: tests/conftest.py enables x64 for NumPyro; the Pyro params
run in float64 on one torch thread). The smoke fits are in tests/test_latent_sde_fit.py.

The tests that assert the same thing on both backends take the ``backend`` fixture (a
small adapter over NumPyro's or Pyro's tracing); its Pyro param is skipped when torch
or pyro is missing. Backend-specific tests name their backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from latent_sde_cases import ragged
from numpyro import handlers
from numpyro.infer import Trace_ELBO

from probdyn.numpyro.primitives.latent_sde import LatentSDE as JaxLatentSDE
from probdyn.primitives.latent_sde import G_FLOOR
from probdyn.primitives.series import pad_series

# One small model for the fast tests (the NumPyro one's scans compile once and are reused).
_SMALL: dict[str, Any] = {
    "obs_dim": 2,
    "latent_dim": 3,
    "dt": 0.1,
    "drift_sizes": (8,),
    "diffusion_hidden": 4,
    "encoder_hidden": 8,
    "context_dim": 4,
    "obs_scale": 0.5,
}


# -- the two backends behind one small interface -------------------------------------------
class _NumPyro:
    """Tracing a NumPyro LatentSDE's model or guide (seeded, params and sites substituted)."""

    name = "numpyro"
    LatentSDE = JaxLatentSDE
    lsde = JaxLatentSDE(**_SMALL)

    @staticmethod
    def _values(tr: Any, kinds: tuple[str, ...] = ("param", "sample")) -> dict[str, Any]:
        return {
            n: s["value"]
            for n, s in tr.items()
            if s["type"] in kinds and not (s["type"] == "sample" and s["is_observed"])
        }

    def trace(
        self,
        fn: Any,
        *args: Any,
        seed: Any = 0,
        replay: Any = None,
        params: dict[str, Any] | None = None,
        **kw: Any,
    ) -> Any:
        """Trace ``fn`` seeded, with ``replay``'s params and samples and ``params`` held."""
        data = {**(self._values(replay) if replay is not None else {}), **(params or {})}
        if data:
            fn = handlers.substitute(fn, data=data)
        with handlers.seed(rng_seed=seed):
            return handlers.trace(fn).get_trace(*args, **kw)

    @staticmethod
    def sites(tr: Any) -> dict[str, Any]:
        return tr

    @staticmethod
    def array(x: np.ndarray) -> Any:
        return jnp.asarray(x)

    @staticmethod
    def numpy(x: Any) -> np.ndarray:
        return np.asarray(x)

    def value(self, tr: Any, name: str) -> np.ndarray:
        """A site's value, as NumPy."""
        return self.numpy(tr[name]["value"])

    @staticmethod
    def logp(tr: Any, name: str) -> np.ndarray:
        """A site's log density at its value."""
        s = tr[name]
        return np.asarray(s["fn"].log_prob(s["value"]))

    def elbo_loss_and_guide(self, args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[float, Any]:
        """NumPyro's Trace_ELBO loss (one particle) and the guide trace it drew."""
        lsde = self.lsde
        key = jax.random.key(7)
        guide_key = jax.random.split(key)[1]  # Trace_ELBO seeds the guide with this half
        g = self.trace(lsde.guide, *args, **kw, seed=guide_key)
        params = self._values(g, ("param",))
        params.update(self._values(self.trace(lsde.model, *args, **kw), ("param",)))
        loss = Trace_ELBO().loss(key, params, lsde.model, lsde.guide, *args, **kw)
        return float(loss), g


class _Pyro:
    """Tracing a Pyro LatentSDE's model or guide (torch seeded, params held, sites replayed)."""

    name = "pyro"

    def __init__(self) -> None:
        from probdyn.pyro.primitives.latent_sde import LatentSDE

        self.LatentSDE = LatentSDE
        self.lsde = LatentSDE(**_SMALL)

    def trace(
        self,
        fn: Any,
        *args: Any,
        seed: int = 0,
        replay: Any = None,
        params: dict[str, Any] | None = None,
        **kw: Any,
    ) -> Any:
        """Trace ``fn`` with torch seeded (and ``params`` held, sample sites replayed)."""
        import torch
        from pyro import poutine

        from probdyn.pyro.bridge import with_params

        if params:
            fn = with_params(fn, params)
        if replay is not None:
            fn = poutine.replay(fn, trace=replay)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            return poutine.trace(fn).get_trace(*args, **kw)

    @staticmethod
    def sites(tr: Any) -> dict[str, Any]:
        return tr.nodes

    @staticmethod
    def array(x: np.ndarray) -> Any:
        import torch

        return torch.as_tensor(x)

    @staticmethod
    def numpy(x: Any) -> np.ndarray:
        return x.detach().numpy()

    def value(self, tr: Any, name: str) -> np.ndarray:
        """A site's value, as NumPy."""
        return self.numpy(tr.nodes[name]["value"])

    @staticmethod
    def logp(tr: Any, name: str) -> np.ndarray:
        """A site's log density at its value."""
        import torch

        s = tr.nodes[name]
        with torch.no_grad():
            return s["fn"].log_prob(s["value"]).numpy()

    def elbo_loss_and_guide(self, args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[float, Any]:
        """Pyro's Trace_ELBO loss (one particle) and the guide trace it drew: the ELBO runs
        the guide first, so the same torch seed gives the same guide draws."""
        import torch
        from pyro.infer import Trace_ELBO as PyroTraceELBO

        lsde = self.lsde
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(7)
            loss = PyroTraceELBO(max_plate_nesting=1).loss(lsde.model, lsde.guide, *args, **kw)
        return loss, self.trace(lsde.guide, *args, **kw, seed=7)


_BACKENDS: dict[str, Any] = {}


@pytest.fixture(params=["numpyro", "pyro"])
def backend(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The NumPyro or the Pyro adapter (Pyro: float64, one thread, a private param store)."""
    if request.param == "numpyro":
        yield _BACKENDS.setdefault("numpyro", _NumPyro())
        return
    pytest.importorskip("torch")
    pyro = pytest.importorskip("pyro")
    request.getfixturevalue("torch_float64_one_thread")
    adapter = _BACKENDS.setdefault("pyro", _Pyro())
    # Every test starts from the initial weights and leaves the global store as it was.
    with pyro.get_param_store().scope():
        yield adapter


@pytest.fixture
def pyro_backend(torch_float64_one_thread: None) -> Iterator[Any]:
    """The Pyro adapter, for the Pyro-only tests (float64, one thread, a private store)."""
    pyro = pytest.importorskip("pyro")
    adapter = _BACKENDS.setdefault("pyro", _Pyro())
    with pyro.get_param_store().scope():
        yield adapter


# -- sites and the grid ----------------------------------------------------------------------
def test_sites_shapes_and_grid(backend: Any) -> None:
    p = pad_series(*ragged())
    lsde, trace = backend.lsde, backend.trace
    value = backend.value
    grid = lsde.grid(p.times, p.mask, t0=0.0)
    # t0, every observed time (padding times are not observed), steps <= dt.
    observed = np.unique(p.times[p.mask.any(-1)])
    assert grid[0] == 0.0 and np.all(np.isin(observed, grid)) and grid[-1] == 1.2
    assert np.all(np.diff(grid) <= 0.1 + 1e-12) and not np.isin(p.times[1, 2:], grid).any()
    steps = len(grid) - 1
    g = trace(lsde.guide, p.times, p.values, p.mask, t0=0.0)
    assert value(g, "latent_sde.z0").shape == (3, 3)
    assert value(g, "latent_sde.path_noise").shape == (3, steps, 3)
    assert value(g, "latent_sde.path_kl").shape == (3,)
    assert value(g, "latent_sde.posterior_path").shape == (3, steps + 1, 3)
    assert backend.sites(g)["latent_sde.encoder.w"]["type"] == "param"
    assert value(g, "latent_sde.posterior_drift.layers.0.weight").shape == (3 + 4, 8)
    assert backend.sites(g)["latent_sde.path_noise"]["fn"].batch_shape == (3,)
    m = trace(lsde.model, p.times, p.values, p.mask, t0=0.0, target_times=[0.5, 1.0])
    assert value(m, "latent_sde.path_noise").shape == (3, steps, 3)
    assert backend.sites(m)["latent_sde.y"]["is_observed"]
    assert value(m, "latent_sde.y").shape == (3, 4, 2)
    assert value(m, "latent_sde.forecast").shape == (3, 2, 2)
    assert value(m, "latent_sde.forecast_latent").shape == (3, 2, 3)
    assert value(m, "latent_sde.y").dtype == np.float64
    assert "latent_sde.forecast_noise" not in backend.sites(m)  # every target inside the grid
    # The backend's arrays work as well as NumPy arrays (what probdyn.fit hands the model).
    times, mask = backend.array(p.times), backend.array(p.mask)
    tm = trace(lsde.model, times, None, mask, t0=0.0)
    assert value(tm, "latent_sde.path_noise").shape == (3, steps, 3)
    ahead = trace(lsde.model, p.times, t0=0.0, target_times=np.array([[0.5, 1.5, 1.73]] * 3))
    # Past the grid: a grid from 1.2 through 1.5 and 1.73 (steps <= 0.1): 1.3, 1.4, 1.5,
    # 1.6, 1.7, 1.73.
    assert value(ahead, "latent_sde.forecast_noise").shape == (3, 6, 3)
    assert value(ahead, "latent_sde.forecast").shape == (3, 3, 2)
    assert "z0_prior='standard'" in repr(lsde) and "dt=0.1" in repr(lsde)
    # (Another name: Pyro's parameter store already holds the small model's weights.)
    learned = backend.LatentSDE(obs_dim=2, dt=0.5, z0_prior="learned", name="learned")
    lt = trace(learned.model, p.times)
    assert backend.sites(lt)["learned.z0_scale"]["type"] == "param"
    np.testing.assert_array_equal(value(lt, "learned.z0_scale"), np.ones(4))


# -- the Girsanov path site --------------------------------------------------------------------
def test_model_replays_the_guide_path(backend: Any) -> None:
    # The model, given the guide's z0 and path_noise (eps + u sqrt(h)), steps the prior
    # Euler scheme; the guide stepped the posterior one with eps. Same path up to rounding.
    p = pad_series(*ragged())
    lsde, trace = backend.lsde, backend.trace
    grid = lsde.grid(p.times, p.mask, t0=0.0)
    g = trace(lsde.guide, p.times, p.values, p.mask, t0=0.0, seed=3)
    m = trace(lsde.model, p.times, p.values, p.mask, t0=0.0, target_times=grid, replay=g)
    guide_path = backend.value(g, "latent_sde.posterior_path")
    model_path = backend.value(m, "latent_sde.forecast_latent")
    assert guide_path.dtype == np.float64 and np.abs(guide_path).max() > 0.1
    np.testing.assert_allclose(model_path, guide_path, rtol=0, atol=1e-10)
    # ... and the noise values differ (the posterior drift differs from the prior one).
    assert not np.allclose(backend.value(g, "latent_sde.path_noise"), 0.0)


def _constant_networks(
    lsde: Any, b_p: np.ndarray, b_q: np.ndarray, beta: np.ndarray
) -> dict[str, Any]:
    """Param values that make f_p = b_p, f_q = b_q and g = floor + (1 - floor) sigmoid(beta)."""
    out: dict[str, Any] = {}
    for part, sizes, last in (
        ("prior_drift", lsde.prior_sizes, b_p),
        ("posterior_drift", lsde.posterior_sizes, b_q),
    ):
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            out[f"{lsde.name}.{part}.layers.{i}.weight"] = np.zeros((n_in, n_out))
            out[f"{lsde.name}.{part}.layers.{i}.bias"] = np.zeros(n_out)
        out[f"{lsde.name}.{part}.layers.{len(sizes) - 2}.bias"] = last
    shape = (lsde.latent_dim, lsde.diffusion_hidden)
    out[f"{lsde.name}.diffusion.w1"] = np.zeros(shape)
    out[f"{lsde.name}.diffusion.w2"] = np.zeros(shape)
    out[f"{lsde.name}.diffusion.b2"] = beta
    return out


def test_path_kl_of_the_elbo_is_girsanov(backend: Any) -> None:
    p = pad_series(*ragged())
    lsde, trace = backend.lsde, backend.trace
    value, logp = backend.value, backend.logp
    args = (p.times, p.values, p.mask)
    kw: dict[str, Any] = {"t0": 0.0}
    path = "latent_sde.path_noise"
    # (1) Constant drifts and diffusion: u = (b_q - b_p) / g for every step, so the path
    # term of the ELBO is -1/2 |u|^2 (t_end - t0) per series, whatever the noise.
    b_p, b_q = np.array([0.3, -1.0, 2.0]), np.array([-0.7, 0.5, 2.0])
    beta = np.array([0.0, 1.0, -2.0])
    fixed = _constant_networks(lsde, b_p, b_q, beta)
    g = trace(lsde.guide, *args, **kw, seed=1, params=fixed)
    m = trace(lsde.model, *args, **kw, params=fixed, replay=g)
    path_term = logp(m, path) - logp(g, path)
    gdiag = G_FLOOR + (1 - G_FLOOR) / (1 + np.exp(-beta))
    analytic = 0.5 * np.sum(((b_q - b_p) / gdiag) ** 2) * (1.2 - 0.0)
    assert analytic > 1.0 and path_term.shape == (3,)
    np.testing.assert_allclose(path_term, -analytic, rtol=1e-12)
    np.testing.assert_allclose(value(g, "latent_sde.path_kl"), analytic, rtol=1e-12)
    # (2) Initial (random) networks: the path term equals -1/2 sum u^2 h as the guide
    # computes it directly (a different formula from the two log densities).
    g = trace(lsde.guide, *args, **kw, seed=2)
    m = trace(lsde.model, *args, **kw, replay=g)
    path_term = logp(m, path) - logp(g, path)
    kl = value(g, "latent_sde.path_kl")
    assert np.all(kl > 0.1)
    np.testing.assert_allclose(path_term, -kl, rtol=1e-10)
    # (3) Trace_ELBO's loss = -(log p(y | path) + log p(z0) - log q(z0) - KL_path), with
    # log p(y | path) written out by hand over the observed entries only.
    loss, g = backend.elbo_loss_and_guide(args, kw)
    m = trace(lsde.model, p.times, None, p.mask, **kw, target_times=p.times, replay=g)
    mean = value(m, "latent_sde.forecast")
    r = (p.values - mean)[p.mask] / lsde.obs_scale
    loglik = np.sum(-0.5 * r**2 - np.log(lsde.obs_scale) - 0.5 * np.log(2 * np.pi))
    z0 = value(g, "latent_sde.z0")
    log_prior_z0 = np.sum(-0.5 * z0**2 - 0.5 * np.log(2 * np.pi))
    log_q_z0 = np.sum(logp(g, "latent_sde.z0"))
    kl_sum = np.sum(value(g, "latent_sde.path_kl"))
    np.testing.assert_allclose(loss, -(loglik + log_prior_z0 - log_q_z0 - kl_sum), rtol=1e-10)


def test_pyro_vectorised_particles(pyro_backend: Any) -> None:
    # Under a particle plate left of the series plate (Pyro's vectorised ELBO), every
    # particle gets its own eps and path, and the path term is still -KL per path.
    import pyro
    import torch
    from pyro.infer import Trace_ELBO as PyroTraceELBO

    p = pad_series(*ragged())
    lsde, trace = pyro_backend.lsde, pyro_backend.trace
    args, kw = (p.times, p.values, p.mask), {"t0": 0.0}

    def in_plate(fn: Any) -> Any:
        def run(*a: Any, **k: Any) -> None:
            with pyro.plate("particles", 5, dim=-2):
                fn(*a, **k)

        return run

    g = trace(in_plate(lsde.guide), *args, **kw, seed=4)
    m = trace(in_plate(lsde.model), *args, **kw, replay=g)
    steps = len(lsde.grid(p.times, p.mask, t0=0.0)) - 1
    noise = pyro_backend.value(g, "latent_sde.path_noise")
    assert noise.shape == (5, 3, steps, 3) and not np.allclose(noise[0], noise[1])
    path = "latent_sde.path_noise"
    path_term = pyro_backend.logp(m, path) - pyro_backend.logp(g, path)
    kl = pyro_backend.value(g, "latent_sde.path_kl")
    assert path_term.shape == kl.shape == (5, 3) and np.all(kl > 0.1)
    np.testing.assert_allclose(path_term, -kl, rtol=1e-10)
    assert pyro_backend.value(m, "latent_sde.y").shape == (3, 4, 2)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        elbo = PyroTraceELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
        assert np.isfinite(elbo.loss(lsde.model, lsde.guide, *args, **kw))


# -- masks -----------------------------------------------------------------------------------
def test_mask_removes_points_from_likelihood_and_encoder(backend: Any) -> None:
    p = pad_series(*ragged())
    lsde, trace = backend.lsde, backend.trace
    sites = trace(lsde.guide, p.times, p.values, p.mask, t0=0.0)

    def logp(values: Any, mask: Any) -> float:
        tr = trace(lsde.model, p.times, values, mask, t0=0.0, replay=sites)
        return float(np.sum(backend.logp(tr, "latent_sde.y")))

    def encoded(values: Any) -> tuple[np.ndarray, np.ndarray]:
        tr = trace(lsde.guide, p.times, values, p.mask, t0=0.0, seed=4)
        return (
            backend.numpy(backend.sites(tr)["latent_sde.z0"]["fn"].base_dist.loc),
            backend.value(tr, "latent_sde.path_noise"),
        )

    base, (loc, noise) = logp(p.values, p.mask), encoded(p.values)
    assert np.isfinite(base)
    changed = p.values.copy()
    changed[2, 1, 0] = 1e6  # a masked (missing) entry
    changed[1, 3, :] = -7.0  # padding
    assert logp(changed, p.mask) == base
    loc2, noise2 = encoded(changed)
    np.testing.assert_array_equal(loc2, loc)
    np.testing.assert_array_equal(noise2, noise)  # the context too: same posterior path
    observed = p.values.copy()
    observed[0, 2, 0] += 1.0  # the last observation of series 0: only the context sees it
    assert logp(observed, p.mask) != base
    loc3, noise3 = encoded(observed)
    assert not np.allclose(loc3, loc) and not np.allclose(noise3[0], noise[0])
    # A (B, T) mask is the (B, T, D) mask broadcast over D.
    time_mask = np.any(p.mask, axis=-1)
    filled = np.where(p.mask, p.values, 0.0)
    full_mask = np.broadcast_to(time_mask[..., None], p.mask.shape)
    assert logp(filled, time_mask) == logp(filled, full_mask)


# -- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"obs_dim": 0}, r"obs_dim=0\): must be a positive integer"),
        ({"latent_dim": 2.5}, r"latent_dim=2.5\)"),
        ({"dt": -0.1}, r"dt=-0.1\): must be a positive finite number"),
        ({"obs_scale": 0.0}, r"obs_scale=0.0\)"),
        ({"drift_sizes": 16}, r"drift_sizes=16\): must be a sequence"),
        ({"decoder_sizes": (8, 0)}, r"decoder_sizes=\(8, 0\)\)"),
        ({"z0_prior": "flat"}, r"z0_prior='flat'\): give 'standard'"),
        ({"name": ""}, r"name=''\)"),
        ({"seed": 1.5}, r"seed=1.5\): must be an integer"),
    ],
)
def test_constructor_rejects_bad_arguments(
    backend: Any, kwargs: dict[str, Any], match: str
) -> None:
    options: dict[str, Any] = {"obs_dim": 2, "dt": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        backend.LatentSDE(**options)


def test_model_and_guide_reject_bad_data(backend: Any) -> None:
    p = pad_series(*ragged())
    lsde, trace = backend.lsde, backend.trace
    with pytest.raises(ValueError, match="values has shape"):
        trace(lsde.model, p.times, p.values[:, :, :1])
    with pytest.raises(ValueError, match=r"values\[0, 3, 0\] is not finite"):
        trace(lsde.model, p.times, p.values, np.ones((3, 4), bool))
    with pytest.raises(ValueError, match="mask has shape"):
        trace(lsde.model, p.times, p.values, np.ones((3, 4, 3), bool))
    with pytest.raises(ValueError, match=r"t0=0\.5 is after the first observed time 0\.0"):
        trace(lsde.model, p.times, p.values, p.mask, t0=0.5)
    with pytest.raises(ValueError, match=r"t0=nan must be a concrete, finite scalar"):
        trace(lsde.model, p.times, t0=float("nan"))
    with pytest.raises(ValueError, match="strictly increasing"):
        trace(lsde.model, p.times[:, ::-1].copy())
    with pytest.raises(ValueError, match=r"times must be \(series, time\)"):
        trace(lsde.model, p.times[0])
    with pytest.raises(ValueError, match="before t0"):
        trace(lsde.model, p.times, t0=0.0, target_times=[-1.0, 0.5])
    with pytest.raises(ValueError, match=r"target_times has shape \(2, 2\)"):
        trace(lsde.model, p.times, t0=0.0, target_times=np.ones((2, 2)))
    with pytest.raises(ValueError, match="values are required"):
        trace(lsde.guide, p.times)
    with pytest.raises(ValueError, match=r"gives \d+ steps"):
        backend.LatentSDE(obs_dim=2, dt=1e-3, max_steps=10).grid(p.times)
    with pytest.raises(ValueError, match=r"num_series=0\): must be a positive integer"):
        lsde.sample_prior({}, np.array([1.0]), num_series=0, t0=0.0)
    with pytest.raises(ValueError, match=r"target_times has shape \(\)"):
        lsde.sample_prior({}, np.array(1.0), num_series=2, t0=0.0)


def test_numpyro_guide_needs_a_prng_key() -> None:
    p = pad_series(*ragged())
    lsde = _BACKENDS.setdefault("numpyro", _NumPyro()).lsde
    with pytest.raises(ValueError, match="no PRNG key"):
        handlers.trace(lsde.guide).get_trace(p.times, p.values, p.mask)


# -- prediction helpers ------------------------------------------------------------------------
def test_pyro_sample_prior_and_predict_are_seeded_and_isolated(pyro_backend: Any) -> None:
    import pyro
    import torch

    p = pad_series(*ragged())
    lsde = pyro_backend.lsde
    before = torch.get_rng_state()
    target = np.array([0.5, 1.0, 1.5])
    a = lsde.sample_prior({}, target, num_series=6, t0=0.0, key=1)
    b = lsde.sample_prior({}, target, num_series=6, t0=0.0, key=1)
    c = lsde.sample_prior({}, target, num_series=6, t0=0.0, key=2)
    assert a["mean"].shape == (6, 3, 2) and a["latent"].shape == (6, 3, 3)
    np.testing.assert_array_equal(a["mean"], b["mean"])
    assert not np.allclose(a["mean"], c["mean"])
    # Params given are used: a zero decoder gives a zero mean.
    zero = {"latent_sde.decoder.layers.0.weight": np.zeros((3, 2))}
    assert np.all(lsde.sample_prior(zero, target, num_series=2, t0=0.0)["mean"] == 0.0)
    pred = lsde.predict({}, p.times, p.values, p.mask, target_times=target, num_draws=4, t0=0.0)
    assert pred["mean"].shape == (4, 3, 3, 2) and pred["latent"].shape == (4, 3, 3, 3)
    assert pred["z0"].shape == (4, 3, 3) and np.all(np.isfinite(pred["mean"]))
    again = lsde.predict({}, p.times, p.values, p.mask, target_times=target, num_draws=4, t0=0.0)
    np.testing.assert_array_equal(pred["mean"], again["mean"])
    assert not np.allclose(pred["z0"][0], pred["z0"][1])  # draws differ
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    assert len(pyro.get_param_store()) == 0
