"""LatentSDE on the NumPyro backend: sites, the Girsanov path site, masks, errors and a
smoke fit on the stochastic Lorenz system (float64: tests/conftest.py enables x64)."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer import Trace_ELBO

import probdyn
from probdyn import VI
from probdyn.data._lorenz import stochastic_lorenz
from probdyn.numpyro.primitives.latent_ode import pad_series
from probdyn.numpyro.primitives.latent_sde import _G_FLOOR, LatentSDE

# One small model for the fast tests (its scans compile once and are reused).
_LSDE = LatentSDE(
    obs_dim=2,
    latent_dim=3,
    dt=0.1,
    drift_sizes=(8,),
    diffusion_hidden=4,
    encoder_hidden=8,
    context_dim=4,
    obs_scale=0.5,
)


def _ragged() -> tuple[list[np.ndarray], list[np.ndarray]]:
    times = [np.array([0.1, 0.4, 0.9]), np.array([0.0, 0.3]), np.array([0.2, 0.5, 0.65, 1.2])]
    values = [np.arange(6.0).reshape(3, 2) / 6, np.ones((2, 2)), -np.ones((4, 2))]
    values[2][1, 0] = np.nan  # a missing entry inside a series
    return times, values


def _trace(
    fn: Any, *args: Any, seed: Any = 0, data: dict[str, Any] | None = None, **kw: Any
) -> Any:
    if data is not None:
        fn = handlers.substitute(fn, data=data)
    with handlers.seed(rng_seed=seed):
        return handlers.trace(fn).get_trace(*args, **kw)


def _values(tr: Any, kinds: tuple[str, ...] = ("param", "sample")) -> dict[str, Any]:
    return {
        n: s["value"]
        for n, s in tr.items()
        if s["type"] in kinds and not (s["type"] == "sample" and s["is_observed"])
    }


def _site_logp(tr: Any, name: str) -> np.ndarray:
    s = tr[name]
    return np.asarray(s["fn"].log_prob(s["value"]))


# -- sites and the grid ----------------------------------------------------------------------
def test_sites_shapes_and_grid() -> None:
    p = pad_series(*_ragged())
    grid = _LSDE.grid(p.times, p.mask, t0=0.0)
    # t0, every observed time (padding times are not observed), steps <= dt.
    observed = np.unique(p.times[p.mask.any(-1)])
    assert grid[0] == 0.0 and np.all(np.isin(observed, grid)) and grid[-1] == 1.2
    assert np.all(np.diff(grid) <= 0.1 + 1e-12) and not np.isin(p.times[1, 2:], grid).any()
    steps = len(grid) - 1
    g = _trace(_LSDE.guide, p.times, p.values, p.mask, t0=0.0)
    assert g["latent_sde.z0"]["value"].shape == (3, 3)
    assert g["latent_sde.path_noise"]["value"].shape == (3, steps, 3)
    assert g["latent_sde.path_kl"]["value"].shape == (3,)
    assert g["latent_sde.posterior_path"]["value"].shape == (3, steps + 1, 3)
    assert g["latent_sde.encoder.w"]["type"] == "param"
    assert g["latent_sde.posterior_drift.layers.0.weight"]["value"].shape == (3 + 4, 8)
    m = _trace(_LSDE.model, p.times, p.values, p.mask, t0=0.0, target_times=[0.5, 1.0])
    assert m["latent_sde.path_noise"]["value"].shape == (3, steps, 3)
    assert m["latent_sde.y"]["is_observed"] and m["latent_sde.y"]["value"].shape == (3, 4, 2)
    assert m["latent_sde.forecast"]["value"].shape == (3, 2, 2)
    assert m["latent_sde.forecast_latent"]["value"].shape == (3, 2, 3)
    assert "latent_sde.forecast_noise" not in m  # every target inside the grid
    ahead = _trace(_LSDE.model, p.times, t0=0.0, target_times=np.array([[0.5, 1.5, 1.73]] * 3))
    # Past the grid: a grid from 1.2 through 1.5 and 1.73 (steps <= 0.1): 1.3, 1.4, 1.5,
    # 1.6, 1.7, 1.73.
    assert ahead["latent_sde.forecast_noise"]["value"].shape == (3, 6, 3)
    assert ahead["latent_sde.forecast"]["value"].shape == (3, 3, 2)
    assert "z0_prior='standard'" in repr(_LSDE) and "dt=0.1" in repr(_LSDE)


# -- the Girsanov path site --------------------------------------------------------------------
def test_model_replays_the_guide_path() -> None:
    # The model, given the guide's z0 and path_noise (eps + u sqrt(h)), steps the prior
    # Euler scheme; the guide stepped the posterior one with eps. Same path up to rounding.
    p = pad_series(*_ragged())
    grid = _LSDE.grid(p.times, p.mask, t0=0.0)
    g = _trace(_LSDE.guide, p.times, p.values, p.mask, t0=0.0, seed=3)
    m = _trace(_LSDE.model, p.times, p.values, p.mask, t0=0.0, target_times=grid, data=_values(g))
    guide_path = np.asarray(g["latent_sde.posterior_path"]["value"])
    model_path = np.asarray(m["latent_sde.forecast_latent"]["value"])
    assert guide_path.dtype == np.float64 and np.abs(guide_path).max() > 0.1
    np.testing.assert_allclose(model_path, guide_path, rtol=0, atol=1e-10)
    # ... and the noise values differ (the posterior drift differs from the prior one).
    assert not np.allclose(g["latent_sde.path_noise"]["value"], 0.0)


def _constant_networks(
    lsde: LatentSDE, b_p: np.ndarray, b_q: np.ndarray, beta: np.ndarray
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


def test_path_kl_of_the_elbo_is_girsanov() -> None:
    p = pad_series(*_ragged())
    args = (p.times, p.values, p.mask)
    kw: dict[str, Any] = {"t0": 0.0}
    # (1) Constant drifts and diffusion: u = (b_q - b_p) / g for every step, so the path
    # term of the ELBO is -1/2 |u|^2 (t_end - t0) per series, whatever the noise.
    b_p, b_q = np.array([0.3, -1.0, 2.0]), np.array([-0.7, 0.5, 2.0])
    beta = np.array([0.0, 1.0, -2.0])
    fixed = _constant_networks(_LSDE, b_p, b_q, beta)
    g = _trace(_LSDE.guide, *args, **kw, seed=1, data=fixed)
    m = _trace(_LSDE.model, *args, **kw, data={**_values(g), **fixed})
    path_term = _site_logp(m, "latent_sde.path_noise") - _site_logp(g, "latent_sde.path_noise")
    gdiag = _G_FLOOR + (1 - _G_FLOOR) / (1 + np.exp(-beta))
    analytic = 0.5 * np.sum(((b_q - b_p) / gdiag) ** 2) * (1.2 - 0.0)
    assert analytic > 1.0
    np.testing.assert_allclose(path_term, -analytic, rtol=1e-12)
    np.testing.assert_allclose(g["latent_sde.path_kl"]["value"], analytic, rtol=1e-12)
    # (2) Initial (random) networks: the path term equals -1/2 sum u^2 h as the guide
    # computes it directly (a different formula from the two log densities).
    g = _trace(_LSDE.guide, *args, **kw, seed=2)
    m = _trace(_LSDE.model, *args, **kw, data=_values(g))
    path_term = _site_logp(m, "latent_sde.path_noise") - _site_logp(g, "latent_sde.path_noise")
    kl = np.asarray(g["latent_sde.path_kl"]["value"])
    assert np.all(kl > 0.1)
    np.testing.assert_allclose(path_term, -kl, rtol=1e-10)
    # (3) NumPyro's Trace_ELBO loss = -(log p(y | path) + log p(z0) - log q(z0) - KL_path),
    # with log p(y | path) written out by hand over the observed entries only.
    key = jax.random.key(7)
    guide_key = jax.random.split(key)[1]  # Trace_ELBO seeds the guide with this half
    g = _trace(_LSDE.guide, *args, **kw, seed=guide_key)
    params = _values(g, ("param",))
    params.update(_values(_trace(_LSDE.model, *args, **kw), ("param",)))
    loss = Trace_ELBO().loss(key, params, _LSDE.model, _LSDE.guide, *args, **kw)
    m = _trace(_LSDE.model, p.times, None, p.mask, **kw, target_times=p.times, data=_values(g))
    mean = np.asarray(m["latent_sde.forecast"]["value"])
    r = (p.values - mean)[p.mask] / _LSDE.obs_scale
    loglik = np.sum(-0.5 * r**2 - np.log(_LSDE.obs_scale) - 0.5 * np.log(2 * np.pi))
    z0 = np.asarray(g["latent_sde.z0"]["value"])
    log_prior_z0 = np.sum(-0.5 * z0**2 - 0.5 * np.log(2 * np.pi))
    log_q_z0 = np.sum(_site_logp(g, "latent_sde.z0"))
    kl = np.sum(np.asarray(g["latent_sde.path_kl"]["value"]))
    np.testing.assert_allclose(float(loss), -(loglik + log_prior_z0 - log_q_z0 - kl), rtol=1e-10)


# -- masks -----------------------------------------------------------------------------------
def test_mask_removes_points_from_likelihood_and_encoder() -> None:
    p = pad_series(*_ragged())
    sites = _values(_trace(_LSDE.guide, p.times, p.values, p.mask, t0=0.0))

    def logp(values: Any, mask: Any) -> float:
        tr = _trace(_LSDE.model, p.times, values, mask, t0=0.0, data=sites)
        return float(np.sum(_site_logp(tr, "latent_sde.y")))

    def encoded(values: Any) -> tuple[np.ndarray, np.ndarray]:
        tr = _trace(_LSDE.guide, p.times, values, p.mask, t0=0.0, seed=4)
        return (
            np.asarray(tr["latent_sde.z0"]["fn"].base_dist.loc),
            np.asarray(tr["latent_sde.path_noise"]["value"]),
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
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    options: dict[str, Any] = {"obs_dim": 2, "dt": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        LatentSDE(**options)


def test_model_and_guide_reject_bad_data() -> None:
    p = pad_series(*_ragged())
    lsde = _LSDE
    with pytest.raises(ValueError, match="values has shape"):
        _trace(lsde.model, p.times, p.values[:, :, :1])
    with pytest.raises(ValueError, match=r"values\[0, 3, 0\] is not finite"):
        _trace(lsde.model, p.times, p.values, np.ones((3, 4), bool))
    with pytest.raises(ValueError, match="mask has shape"):
        _trace(lsde.model, p.times, p.values, np.ones((3, 4, 3), bool))
    with pytest.raises(ValueError, match=r"t0=0\.5 is after the first observed time 0\.0"):
        _trace(lsde.model, p.times, p.values, p.mask, t0=0.5)
    with pytest.raises(ValueError, match="strictly increasing"):
        _trace(lsde.model, p.times[:, ::-1].copy())
    with pytest.raises(ValueError, match=r"times must be \(series, time\)"):
        _trace(lsde.model, p.times[0])
    with pytest.raises(ValueError, match="before t0"):
        _trace(lsde.model, p.times, t0=0.0, target_times=[-1.0, 0.5])
    with pytest.raises(ValueError, match="values are required"):
        _trace(lsde.guide, p.times)
    with pytest.raises(ValueError, match="no PRNG key"):
        handlers.trace(lsde.guide).get_trace(p.times, p.values, p.mask)
    with pytest.raises(ValueError, match=r"gives \d+ steps"):
        LatentSDE(obs_dim=2, dt=1e-3, max_steps=10).grid(p.times)
    with pytest.raises(ValueError, match=r"num_series=0\): must be a positive integer"):
        lsde.sample_prior({}, np.array([1.0]), num_series=0, t0=0.0)


# -- smoke fit on the stochastic Lorenz system ------------------------------------------------
def _energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """The (V-statistic) energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'|."""
    d = lambda a, b: float(np.linalg.norm(a[:, None] - b[None], axis=-1).mean())
    return 2 * d(x, y) - d(x, x) - d(y, y)


def test_lorenz_generator() -> None:
    t = np.array([0.0, 0.5, 1.0])
    a = stochastic_lorenz(4, t, seed=3)
    assert a.shape == (4, 3, 3) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, stochastic_lorenz(4, t, seed=3))
    # Without noise the paths are the (deterministic) Lorenz flow: Euler with dt and dt/2
    # agree to O(dt) from the same initial states.
    coarse = stochastic_lorenz(4, t, b=(0.0, 0.0, 0.0), dt=1e-3, seed=3)
    fine = stochastic_lorenz(4, t, b=(0.0, 0.0, 0.0), dt=5e-4, seed=3)
    np.testing.assert_array_equal(coarse[:, 0], a[:, 0])
    assert np.abs(coarse - fine).max() < 0.05 * np.abs(fine).max()


def test_smoke_fit_onstochastic_lorenz() -> None:
    # Li et al.'s stochastic Lorenz (a = (10, 28, 8/3), diagonal multiplicative noise 0.15
    # per coordinate, (x, y, z)(0) ~ N(0, I)) on t in [0, 1], 21 observation times, 32
    # series (not 1024), normalised per coordinate, observation noise 0.01; 500 Adam steps.
    start = time.perf_counter()
    t = np.linspace(0.0, 1.0, 21)
    raw = stochastic_lorenz(32, t, seed=0)
    mu, sd = raw.reshape(-1, 3).mean(0), raw.reshape(-1, 3).std(0)
    y = (raw - mu) / sd + 0.01 * np.random.default_rng(1).standard_normal(raw.shape)
    times = np.tile(t, (32, 1))
    y[3, 5:9, 1] = np.nan  # some missing entries: masked out of the fit
    # z0_prior="learned" (as torchsde's example): with N(0, I) the short fit leaves the
    # encoder's z0 spread (~0.3) far below the prior's and the prior at t = 0.25 worse
    # than at initialisation (measured energy distance 1.09 -> 1.43).
    lsde = LatentSDE(
        obs_dim=3,
        latent_dim=4,
        dt=0.05,
        drift_sizes=(32,),
        encoder_hidden=32,
        context_dim=8,
        obs_scale=0.3,
        z0_prior="learned",
    )
    truth = (stochastic_lorenz(400, np.array([0.25, 1.0]), seed=2) - mu) / sd

    def discrepancy(params: dict[str, Any]) -> list[float]:
        draws = lsde.sample_prior(params, np.array([0.25, 1.0]), num_series=400, t0=0.0, key=5)
        return [_energy_distance(draws["mean"][:, i], truth[:, i]) for i in range(2)]

    # Test ELBO: the negative ELBO per series on 32 fresh series (same normalisation),
    # 16-particle estimate with a fixed key, at the initial and at the fitted weights.
    test_y = (stochastic_lorenz(32, t, seed=3) - mu) / sd

    def heldout_loss(params: dict[str, Any]) -> float:
        elbo = Trace_ELBO(num_particles=16)
        loss = elbo.loss(
            jax.random.PRNGKey(7), params, lsde.model, lsde.guide, times, test_y, t0=0.0
        )
        return float(loss) / 32

    before = discrepancy({})
    test_before = heldout_loss({})
    engine = VI(
        guide=lsde.guide, num_steps=500, learning_rate=2e-2, num_draws=8, progress_bar=False
    )
    post = probdyn.fit(lsde.model, times, y, t0=0.0, engine=engine, key=0)
    losses = post.traces["loss"]
    after = discrepancy(post.params)
    test_after = heldout_loss({k: jnp.asarray(v) for k, v in post.params.items()})
    print(
        f"loss {losses[:50].mean():.0f} -> {losses[-50:].mean():.0f}; test -ELBO per series "
        f"{test_before:.1f} -> {test_after:.1f}; energy distance "
        f"t=0.25 {before[0]:.3f} -> {after[0]:.3f}, t=1 {before[1]:.3f} -> {after[1]:.3f}"
    )
    assert np.all(np.isfinite(losses))
    assert post.samples["latent_sde.path_noise"].shape == (1, 8, 32, 20, 4)
    assert "latent_sde.posterior_drift.layers.0.weight" in post.params
    # Measured (seeded, CPU, float64): mean loss over the first 50 steps 10549, last 50 1003.
    assert losses[-50:].mean() < 0.25 * losses[:50].mean()
    # Measured energy distances, prior samples vs 400 fresh true paths: t = 0.25:
    # 1.091 -> 0.232; t = 1.0: 2.412 -> 0.186. Monte-Carlo error of one estimate (400 vs
    # 400 draws), the sd over 6 seeds of both samples: before 0.049 / 0.066, after
    # 0.011 / 0.032; the bounds below (0.55, 1.2) sit > 6 such sd from both values.
    assert after[0] < 0.5 * before[0] and after[1] < 0.5 * before[1]
    # Test ELBO on fresh series. Measured: -ELBO per series 1411 at the initial weights,
    # 32.0 after the fit, close to the training loss per series (1003 / 32 = 31.3): the
    # fit generalises. Bounds: a 10x drop, and within 1.5x of the training loss.
    assert test_after < 0.1 * test_before
    assert test_after < 1.5 * losses[-50:].mean() / 32
    # Posterior predictive: inside the training grid each draw's path is its posterior
    # draw (the same for any key); past t = 1 the prior continues it with fresh noise.
    target = np.array([0.5, 1.0, 1.2])
    pred = [
        post.predict(times, y, t0=0.0, target_times=target, key=k, sites=["latent_sde.forecast"])
        for k in (0, 1)
    ]
    a, b = (d["latent_sde.forecast"] for d in pred)
    assert a.shape == (1, 8, 32, 3, 3) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a[..., :2, :], b[..., :2, :])
    assert not np.allclose(a[..., 2, :], b[..., 2, :])
    rmse = float(np.sqrt(np.nanmean((a[0, :, :, 0].mean(0) - y[:, 10]) ** 2)))
    assert rmse < 0.5  # reconstruction at t = 0.5, normalised units (measured 0.29)
    new = lsde.predict(post.params, times[:4], y[:4], target_times=target, num_draws=5, t0=0.0)
    assert new["mean"].shape == (5, 4, 3, 3) and new["z0"].shape == (5, 4, 4)
    assert new["latent"].shape == (5, 4, 3, 4)
    print(f"smoke fit took {time.perf_counter() - start:.1f} s")
