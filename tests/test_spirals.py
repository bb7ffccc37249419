"""probdyn.data spirals (Chen et al. 2018's latent-ODE protocol) and a smoke latent-ODE fit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import probdyn
from probdyn.data._spirals import _trajectories, spirals
from probdyn.numpyro.primitives.latent_ode import LatentODE


# -- the generator ---------------------------------------------------------------------------
def test_shapes_and_layout() -> None:
    d = spirals(12, num_observed=30, key=0)
    assert d.times.shape == (12, 30) and d.values.shape == (12, 30, 2)
    assert d.index.shape == (12, 30) and d.mask.shape == (12, 30, 2) and d.mask.all()
    assert d.window_times.shape == d.extrap_times.shape == (100,)
    assert d.window_truth.shape == d.extrap_truth.shape == d.extrap_values.shape == (12, 100, 2)
    assert (d.num_series, d.num_observed, d.window) == (12, 30, 100)
    assert np.all(np.diff(d.index, axis=1) > 0)  # sorted, without replacement
    assert np.all(np.diff(d.times, axis=1) > 0)
    np.testing.assert_array_equal(d.times, d.window_times[d.index])
    assert d.window_times[0] == 0.0  # every series starts at t = 0, as in torchdiffeq
    # Observing all 100 points: the index is the whole window.
    full = spirals(3, num_observed=100, key=1)
    np.testing.assert_array_equal(full.index, np.tile(np.arange(100), (3, 1)))


def test_extrapolation_follows_the_observed_window() -> None:
    d = spirals(40, num_observed=50, noise_sd=0.0, key=2)
    grid, ccw, cw = _trajectories(1000)
    step = grid[1] - grid[0]
    # The two windows are consecutive points of one grid: times and trajectories.
    np.testing.assert_allclose(d.window_times, grid[:100])
    np.testing.assert_allclose(d.extrap_times, grid[100:200])
    assert d.extrap_times[0] == pytest.approx(d.window_times[-1] + step)
    assert np.all((d.start >= 100) & (d.start <= 800))  # both windows lie on the grid
    for i in range(d.num_series):
        path = (cw if d.clockwise[i] else ccw)[d.start[i] : d.start[i] + 200]
        np.testing.assert_array_equal(d.window_truth[i], path[:100])
        np.testing.assert_array_equal(d.extrap_truth[i], path[100:])
    # Noise-free observations are the truth at the observed indices.
    np.testing.assert_array_equal(d.values, d.window_truth[np.arange(40)[:, None], d.index])
    np.testing.assert_array_equal(d.extrap_values, d.extrap_truth)


def test_spiral_geometry_and_direction() -> None:
    grid, ccw, cw = _trajectories(1000)
    # Archimedean r = 0.3 theta around (+5, 0) (counter-clockwise) and (-5, 0) (clockwise).
    np.testing.assert_allclose(np.hypot(ccw[:, 0] - 5, ccw[:, 1]), 0.3 * grid, atol=1e-12)
    np.testing.assert_allclose(
        np.hypot(cw[:, 0] + 5, cw[:, 1]), 0.3 * (6 * np.pi - grid), atol=1e-12
    )

    def turning(path: np.ndarray, centre: float) -> np.ndarray:
        rel = path - np.array([centre, 0.0])
        return rel[:-1, 0] * rel[1:, 1] - rel[:-1, 1] * rel[1:, 0]  # z of r_k x r_{k+1}

    assert np.all(turning(ccw[1:], 5.0) > 0) and np.all(turning(cw[:-1], -5.0) < 0)
    # torchdiffeq's code: r = 50 b / (6 pi + 1 - t) for the clockwise spiral.
    _, _, cw_code = _trajectories(1000, clockwise_radius="torchdiffeq")
    r = np.hypot(cw_code[:, 0] + 5, cw_code[:, 1])
    np.testing.assert_allclose(r, 15.0 / (6 * np.pi + 1 - grid), rtol=1e-12)
    assert spirals(4, key=0, clockwise_radius="torchdiffeq").clockwise_radius == "torchdiffeq"


def test_directions_are_balanced_and_noise_has_the_stated_sd() -> None:
    d = spirals(2000, num_observed=100, key=3)
    # Binomial(2000, 1/2): sd of the share 0.0112; 4 sd = 0.045.
    assert abs(d.clockwise.mean() - 0.5) < 0.045
    # 400,000 N(0, 0.3^2) residuals: the sd estimate has relative sd 1/sqrt(2 n) = 0.0011;
    # 4 of those is 0.0045 relative.
    resid = d.values - d.window_truth
    assert np.std(resid) == pytest.approx(0.3, rel=0.0045)


def test_reproducible_and_key_dependent() -> None:
    a, b = spirals(6, num_observed=30, key=7), spirals(6, num_observed=30, key=7)
    for name in ("times", "values", "extrap_values", "start", "clockwise"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = spirals(6, num_observed=30, key=np.random.default_rng(7))
    np.testing.assert_array_equal(a.values, c.values)  # an int seed is a fresh Generator
    d = spirals(6, num_observed=30, key=8)
    assert not np.array_equal(a.values, d.values)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.noise_sd = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_observed": 0}, r"num_observed=0"),
        ({"num_observed": 101}, r"num_observed=101.*window=100"),
        ({"num_observed": 30.0}, r"num_observed=30.0"),
        ({"num_series": 0}, r"num_series=0"),
        ({"window": 400}, r"num_total=1000.*3 \* window = 1200"),
        ({"noise_sd": -0.1}, r"noise_sd=-0.1"),
        ({"noise_sd": float("nan")}, r"noise_sd=nan"),
        ({"clockwise_radius": "hyperbolic"}, r"clockwise_radius='hyperbolic'"),
    ],
)
def test_rejects_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        spirals(**{"num_series": 4, **kwargs})  # type: ignore[arg-type]


# -- a smoke latent-ODE fit ------------------------------------------------------------------
def test_smoke_latent_ode_extrapolates_better_than_holding_the_last_point() -> None:
    # Chen et al.'s sizes (latent 4, field 20-20 ELU, encoder 25, decoder 20), smoke data:
    # 32 spirals (theirs 1000), 30 of 100 points seen, 700 Adam steps (theirs 2000; the rate
    # decays from 0.01 to 0.003), a fixed-step Heun solver. Scored on the next 100 points
    # against the noise-free spiral; baseline: each series' last observation, held.
    data = spirals(32, num_observed=30, key=0)
    lode = LatentODE(obs_dim=2, latent_dim=4, obs_scale=0.3, solver="heun", dt0=0.1)
    engine = probdyn.VI(
        guide=lode.guide,
        num_steps=700,
        learning_rate=1e-2,
        final_learning_rate_fraction=0.3,
        num_draws=8,
        progress_bar=False,
    )
    post = probdyn.fit(lode.model, data.times, data.values, data.mask, t0=0.0, engine=engine, key=0)
    losses = np.asarray(post.traces["loss"])
    assert np.all(np.isfinite(losses)) and losses[-50:].mean() < 0.1 * losses[:50].mean()
    pred = post.predict(
        data.times,
        data.values,
        data.mask,
        t0=0.0,
        target_times=data.extrap_times,
        sites=["latent.forecast"],
    )
    mean = np.asarray(pred["latent.forecast"]).mean((0, 1))
    assert mean.shape == (32, 100, 2)
    rmse = lambda a, b: float(np.sqrt(np.mean((a - b) ** 2)))
    ratio = rmse(mean, data.extrap_truth) / rmse(data.values[:, -1:], data.extrap_truth)
    print(f"extrapolation RMSE / baseline RMSE: {ratio:.3f}")
    # Measured before choosing the bound (this configuration under the suite's float64, fit
    # key 0): data key 0 (this test) 0.329; keys 1, 2, 4: 0.471, 0.263, 0.665 (baseline RMSE
    # 2.1-2.5; the published latent ODE at full size is 0.16). The run is seeded, so the
    # spread over data keys stands in for the Monte-Carlo error of the fit (data, initial
    # draws, optimiser noise): sd 0.18 over the four, and the bound 0.9 is 3.2 sd above
    # this test's 0.33. (In float32 the same keys gave 0.52-0.74.) An untrained model (20
    # steps) scores about 2.9 and an under-trained one (300 steps) up to 1.13.
    assert ratio < 0.9
