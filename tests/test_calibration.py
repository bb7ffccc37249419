"""probdyn.calibration against cases with known answers.

Most checks score a Gaussian predictive on data drawn from it, where coverage equals
the nominal level, the PIT is uniform and CRPS / NLPD have closed forms. Every
statistical tolerance is written in Monte-Carlo standard errors (se) of the stated
error model; seeds are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from scipy import stats

from probdyn import calibration as cal

LEVELS = (0.2, 0.5, 0.8, 0.9, 0.95)


@pytest.fixture(autouse=True)
def _close_figures() -> Any:
    yield
    plt.close("all")


def gaussian_case(
    n_obs: int = 2000, n_draws: int = 2000, scale: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Predictive N(mu_i, (scale * sigma_i)^2) as draws (1, n_draws, n_obs); data from
    N(mu_i, sigma_i^2). ``scale=1`` is calibrated, ``scale<1`` too narrow."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0.0, 2.0, size=n_obs)
    sigma = rng.uniform(0.5, 2.0, size=n_obs)
    draws = mu + scale * sigma * rng.normal(size=(1, n_draws, n_obs))
    y = mu + sigma * rng.normal(size=n_obs)
    return draws, y, mu, sigma


def gaussian_crps(y: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    z = (y - mu) / sigma
    return sigma * (
        z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / math.sqrt(math.pi)
    )


def binomial_se(level: float, n: int) -> float:
    return math.sqrt(level * (1 - level) / n)


# -- coverage, intervals ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["central", "hdi"])
def test_coverage_of_calibrated_gaussian_is_nominal(kind: str) -> None:
    # Error model: the indicators "y_i inside its interval" are independent Bernoulli
    # (independent draws and data per element) with mean = the expected predictive mass
    # of the sample interval, which is the level up to O(1/n_draws); so the coverage has
    # se = sqrt(level (1 - level) / n_obs). Tolerance 3.5 se.
    draws, y, _, _ = gaussian_case()
    cov = cal.coverage(draws, y, LEVELS, kind=kind)
    assert set(cov) == set(LEVELS)
    for level in LEVELS:
        assert abs(cov[level] - level) < 3.5 * binomial_se(level, y.size), (level, cov[level])


def test_coverage_of_too_narrow_predictive_is_below_nominal() -> None:
    # Half-width intervals of a N(0, 1) cover P(|Z| < z_{0.95} / 2) = 0.5935 at level 0.9.
    draws, y, _, _ = gaussian_case(scale=0.5)
    expected = 2 * stats.norm.cdf(stats.norm.ppf(0.95) / 2) - 1
    cov = cal.coverage(draws, y, 0.9)[0.9]
    assert abs(cov - expected) < 3.5 * binomial_se(expected, y.size)


def test_central_interval_matches_numpy_quantile() -> None:
    draws = np.random.default_rng(1).normal(size=(2, 300, 4, 3))
    lo, hi = cal.interval(draws, 0.8)
    flat = draws.reshape(600, 4, 3)
    np.testing.assert_allclose(lo, np.quantile(flat, 0.1, axis=0), rtol=1e-13)
    np.testing.assert_allclose(hi, np.quantile(flat, 0.9, axis=0), rtol=1e-13)


def test_hdi_is_the_shortest_window_of_sorted_draws() -> None:
    lo, hi = cal.interval(np.array([3.0, 0.0, 10.0, 1.0, 2.0]), 0.6, kind="hdi", sample_dims=1)
    assert (float(lo), float(hi)) == (0.0, 2.0)  # 3 of 5 draws; ties broken to the left
    # Vectorised result == a loop over elements of the definition.
    draws = np.random.default_rng(2).gamma(2.0, size=(1, 101, 5, 2))
    lo, hi = cal.interval(draws, 0.7, kind="hdi")
    m = math.ceil(0.7 * 101)
    for idx in np.ndindex(5, 2):
        x = np.sort(draws[(0, slice(None), *idx)])
        i = int(np.argmin(x[m - 1 :] - x[: 101 - m + 1]))
        assert (lo[idx], hi[idx]) == (x[i], x[i + m - 1])


def test_hdi_of_exponential_is_shorter_with_right_coverage() -> None:
    # Exp(1): the 90 % HDI is [0, log 10] (width 2.303), the central interval
    # [-log 0.95, -log 0.05] (width 2.944). Coverage error model as above (3.5 se).
    rng = np.random.default_rng(3)
    n_obs, n_draws = 2000, 2000
    draws = rng.exponential(size=(1, n_draws, n_obs))
    y = rng.exponential(size=n_obs)
    hdi = cal.interval_width(draws, 0.9, kind="hdi", reduce=False)
    central = cal.interval_width(draws, 0.9, reduce=False)
    assert np.all(hdi < central)
    # Widths are independent across elements: mean within 4 se of the exact width
    # (the sample HDI's O(1/n_draws) bias is far below the se here).
    for width, exact in ((hdi, math.log(10)), (central, math.log(0.95 / 0.05))):
        se = width.std(ddof=1) / math.sqrt(n_obs)
        assert abs(width.mean() - exact) < 4 * se, (width.mean(), exact, se)
    cov = cal.coverage(draws, y, (0.5, 0.9), kind="hdi")
    for level, value in cov.items():
        assert abs(value - level) < 3.5 * binomial_se(level, n_obs)
    lo, _ = cal.interval(draws, 0.9, kind="hdi")
    assert np.quantile(lo, 0.99) < 0.01  # the HDI starts at the mode 0


# -- PIT -------------------------------------------------------------------------------------
def test_pit_of_calibrated_gaussian_is_uniform_and_narrow_is_rejected() -> None:
    draws, y, _, _ = gaussian_case()
    u = cal.pit(draws, y)
    assert u.shape == y.shape and np.all((u >= 0) & (u <= 1))
    # Continuous draws have no ties: PIT = #{x < y} / n exactly, independent of key.
    np.testing.assert_array_equal(u, np.mean(draws[0] < y, axis=0))
    np.testing.assert_array_equal(u, cal.pit(draws, y, key=123))
    # Under uniformity the KS p-value is Uniform(0, 1) (slightly conservative on the
    # 1/n grid): p > 1e-3 fails with probability < 0.1 % for a random seed.
    statistic, p_value = cal.pit_test(u)
    assert p_value > 1e-3 and 0 < statistic < 0.05
    # Half-width predictive: U-shaped PIT, rejected decisively.
    narrow_draws, narrow_y, _, _ = gaussian_case(scale=0.5)
    _, p_narrow = cal.pit_test(cal.pit(narrow_draws, narrow_y))
    assert p_narrow < 1e-6


def test_pit_is_randomised_for_ties() -> None:
    # Poisson draws and data: many ties. The randomised PIT is uniform (p > 1e-3 as
    # above); the plain empirical CDF #{x <= y} / n is not (it piles up on the grid).
    rng = np.random.default_rng(4)
    draws = rng.poisson(3.0, size=(1, 500, 2000)).astype(float)
    y = rng.poisson(3.0, size=2000).astype(float)
    u = cal.pit(draws, y, key=7)
    assert cal.pit_test(u)[1] > 1e-3
    assert cal.pit_test(np.mean(draws[0] <= y, axis=0))[1] < 1e-6
    np.testing.assert_array_equal(u, cal.pit(draws, y, key=7))
    np.testing.assert_array_equal(u, cal.pit(draws, y, key=np.random.default_rng(7)))
    assert not np.array_equal(u, cal.pit(draws, y, key=8))
    below = np.mean(draws[0] < y, axis=0)
    at_or_below = np.mean(draws[0] <= y, axis=0)
    assert np.all((u >= below) & (u <= at_or_below))


# -- CRPS, NLPD, RMSE ------------------------------------------------------------------------
@pytest.mark.parametrize("n_obs, n_draws", [(1000, 2000), (20000, 5)])
def test_crps_matches_closed_form_gaussian(n_obs: int, n_draws: int) -> None:
    # The sample estimator is unbiased for the CRPS of the draws' distribution, so
    # d_i = estimate_i - closed_form_i are independent with mean 0: |mean d| < 4 se.
    # With 5 draws the biased (all-pairs) estimator would be off by E|X - X'| / 10
    # = 0.11 sigma, about 50 se.
    draws, y, mu, sigma = gaussian_case(n_obs=n_obs, n_draws=n_draws)
    per_element = cal.crps(draws, y, reduce=False)
    d = per_element - gaussian_crps(y, mu, sigma)
    assert abs(d.mean()) < 4 * d.std(ddof=1) / math.sqrt(y.size)
    assert cal.crps(draws, y) == pytest.approx(per_element.mean(), rel=1e-12)
    # A point prediction scores its absolute error.
    assert cal.crps(np.full((1, 2, 3), 1.0), np.array([0.0, 1.0, 3.0])) == pytest.approx(1.0)


def _normal_logpdf(y: Any, mean: Any, var: Any) -> Any:
    return -0.5 * (np.log(2 * np.pi * var) + (y - mean) ** 2 / var)


def test_nlpd_exact_matches_closed_form() -> None:
    # y ~ N(theta, 1) with posterior draws theta_s ~ N(m, tau^2): the predictive is
    # N(m, 1 + tau^2). p_hat(y) = mean_s N(y; theta_s, 1) has variance
    # (E[N(y; theta, 1)^2] - p^2) / S with E[N(y; theta, 1)^2] = N(y; m, tau^2 + 1/2) /
    # (2 sqrt(pi)); by the delta method the NLPD error has sd = sd(p_hat) / p. 4 sd.
    rng = np.random.default_rng(5)
    m, tau = 0.3, 0.8
    theta = rng.normal(m, tau, size=(2, 1000, 1))
    y = np.linspace(-2.0, 2.5, 40)
    ll = _normal_logpdf(y, theta, 1.0)
    estimate = cal.nlpd(None, y, log_likelihood=ll, reduce=False)
    p = np.exp(_normal_logpdf(y, m, 1 + tau**2))
    second = np.exp(_normal_logpdf(y, m, tau**2 + 0.5)) / (2 * math.sqrt(math.pi))
    sd = np.sqrt((second - p**2) / theta.size) / p
    assert np.all(np.abs(estimate - (-np.log(p))) < 4 * sd)
    # draws are only checked; log-sum-exp does not underflow for very small likelihoods.
    draws = theta + rng.normal(size=(2, 1000, y.size))
    assert cal.nlpd(draws, y, log_likelihood=ll) == pytest.approx(estimate.mean(), rel=1e-12)
    shifted = cal.nlpd(None, y, log_likelihood=ll - 1e4, reduce=False)
    np.testing.assert_allclose(shifted, estimate + 1e4, rtol=1e-12)
    # Identical draws: the exact value -ll; all draws -inf: +inf, without warnings.
    np.testing.assert_allclose(cal.nlpd(None, y, log_likelihood=ll[:, :1] * 0 - 2.0), 2.0)
    assert cal.nlpd(None, y[:1], log_likelihood=np.full((1, 3, 1), -np.inf)) == np.inf


def test_nlpd_log_likelihood_with_summed_event_dims() -> None:
    # A model that sums a trailing event dimension returns ll (chain, draw, T) for
    # observations (T, D); the result has shape (T,).
    rng = np.random.default_rng(6)
    ll = rng.normal(size=(1, 50, 7))
    observed = rng.normal(size=(7, 2))
    out = cal.nlpd(None, observed, log_likelihood=ll, reduce=False)
    assert out.shape == (7,)
    observed[3] = np.nan  # a fully missing time point is left out
    assert np.isnan(cal.nlpd(None, observed, log_likelihood=ll, reduce=False)[3])
    assert cal.nlpd(None, observed, log_likelihood=ll) == pytest.approx(np.delete(out, 3).mean())


def _silverman(flat: np.ndarray) -> np.ndarray:
    q25, q75 = np.quantile(flat, [0.25, 0.75], axis=0)
    spread = np.minimum(flat.std(axis=0, ddof=1), (q75 - q25) / 1.349)
    return 0.9 * spread * flat.shape[0] ** -0.2


def test_nlpd_kernel_estimate_against_gaussian() -> None:
    rng = np.random.default_rng(7)
    n_obs, n_draws = 200, 4000
    mu = rng.normal(size=n_obs)
    sigma = rng.uniform(0.5, 2.0, size=n_obs)
    draws = mu + sigma * rng.normal(size=(1, n_draws, n_obs))
    y = mu + sigma * rng.normal(size=n_obs)
    # Default bandwidth is the documented Silverman rule.
    h = _silverman(draws[0])
    default = cal.nlpd(draws, y, reduce=False)
    np.testing.assert_allclose(default, cal.nlpd(draws, y, bandwidth=h, reduce=False))
    # For a fixed bandwidth h the KDE is a mean of S iid kernels with mean
    # N(y; mu, sigma^2 + h^2) and second moment N(y; mu, sigma^2 + h^2 / 2) / (2 sqrt(pi) h);
    # delta method for the log: 4 sd per element.
    h = 0.2 * sigma
    kde = cal.nlpd(draws, y, bandwidth=h, reduce=False)
    f = np.exp(_normal_logpdf(y, mu, sigma**2 + h**2))
    second = np.exp(_normal_logpdf(y, mu, sigma**2 + h**2 / 2)) / (2 * math.sqrt(math.pi) * h)
    sd = np.sqrt((second - f**2) / n_draws) / f
    assert np.all(np.abs(kde - (-np.log(f))) < 4 * sd)
    # Against the true density N(y; mu, sigma^2): d_i = kde_i - exact_i are independent
    # across elements with mean KL(N(0, s^2) || N(0, s^2 + h^2)) (the smoothing bias,
    # ~h^4 / 4 s^4 for Silverman's h): |mean d - mean KL| < 4 se.
    exact = -_normal_logpdf(y, mu, sigma**2)
    h = _silverman(draws[0])
    ratio = sigma**2 / (sigma**2 + h**2)
    kl = 0.5 * (ratio - 1 - np.log(ratio))
    d = default - exact
    assert abs(d.mean() - kl.mean()) < 4 * d.std(ddof=1) / math.sqrt(n_obs)


def test_nlpd_kernel_estimate_degenerate_element_is_inf() -> None:
    draws = np.zeros((1, 10, 2))
    draws[0, :, 1] = np.arange(10.0)
    out = cal.nlpd(draws, np.array([0.0, 4.5]), reduce=False)
    assert out[0] == np.inf and np.isfinite(out[1])


def test_rmse() -> None:
    draws = np.stack([np.zeros((3, 2)), 2 * np.ones((3, 2))])[None]  # mean 1 everywhere
    observed = np.array([[1.0, 3.0], [1.0, 1.0], [4.0, 1.0]])
    assert cal.rmse(draws, observed) == pytest.approx(math.sqrt((4 + 9) / 6))
    np.testing.assert_allclose(cal.rmse(draws, observed, axis=1), [math.sqrt(3), math.sqrt(4 / 3)])


# -- per output dimension / per time point ---------------------------------------------------
def _metrics(draws: np.ndarray, observed: np.ndarray, **axis: Any) -> dict[str, Any]:
    return {
        "coverage": cal.coverage(draws, observed, 0.5, **axis)[0.5],
        "hdi": cal.coverage(draws, observed, 0.9, kind="hdi", **axis)[0.9],
        "crps": cal.crps(draws, observed, **axis),
        "nlpd": cal.nlpd(draws, observed, **axis),
        "rmse": cal.rmse(draws, observed, **axis),
        "width": cal.interval_width(draws, **axis),
    }


def test_axis_matches_per_slice_results() -> None:
    rng = np.random.default_rng(8)
    draws = rng.normal(size=(2, 150, 6, 3)) * np.array([0.5, 1.0, 2.0])  # (chain, draw, T, D)
    observed = rng.normal(size=(6, 3))
    per_dim = _metrics(draws, observed, axis=-1)
    per_time = _metrics(draws, observed, axis=0)
    for name in per_dim:
        assert per_dim[name].shape == (3,) and per_time[name].shape == (6,), name
        for j in range(3):
            part = _metrics(draws[..., j], observed[..., j])[name]
            assert per_dim[name][j] == pytest.approx(part, rel=1e-12), (name, j)
        for t in range(6):
            part = _metrics(draws[:, :, t], observed[t])[name]
            assert per_time[name][t] == pytest.approx(part, rel=1e-12), (name, t)
    # Keeping every axis is the per-element result; negative and positive axes agree.
    per_element = cal.crps(draws, observed, reduce=False)
    np.testing.assert_allclose(cal.crps(draws, observed, axis=(0, 1)), per_element)
    np.testing.assert_allclose(cal.crps(draws, observed, axis=(-1, 0)), per_element)
    assert cal.crps(draws, observed) == pytest.approx(per_element.mean())


def test_missing_observations_are_left_out() -> None:
    draws, y, _, _ = gaussian_case(n_obs=300, n_draws=400)
    y_missing = y.copy()
    y_missing[::3] = np.nan
    keep = ~np.isnan(y_missing)
    assert cal.coverage(draws, y_missing)[0.9] == cal.coverage(draws[..., keep], y[keep])[0.9]
    assert cal.crps(draws, y_missing) == pytest.approx(cal.crps(draws[..., keep], y[keep]))
    assert cal.nlpd(draws, y_missing) == pytest.approx(cal.nlpd(draws[..., keep], y[keep]))
    assert cal.rmse(draws, y_missing) == pytest.approx(cal.rmse(draws[..., keep], y[keep]))
    u = cal.pit(draws, y_missing)
    assert np.all(np.isnan(u[~keep])) and not np.any(np.isnan(u[keep]))
    assert cal.pit_test(u) == cal.pit_test(u[keep])
    assert np.all(np.isnan(cal.crps(draws, y_missing, reduce=False)[~keep]))
    # A slice with no observation at all is NaN, without a warning (warnings are errors).
    grid = np.zeros((2, 3))  # inside the point-mass interval [0, 0]
    grid[:, 0] = np.nan
    out = cal.coverage(np.zeros((1, 5, 2, 3)), grid, 0.5, axis=1)[0.5]
    assert np.isnan(out[0]) and np.all(out[1:] == 1.0)


# -- table and plots -------------------------------------------------------------------------
def test_calibration_table_columns_and_values() -> None:
    draws, y, mu, _ = gaussian_case(n_obs=200, n_draws=500)
    table = cal.calibration_table(draws, y)
    assert list(table.index) == [0.5, 0.9]
    assert list(table.columns) == [
        "coverage",
        "mean_width",
        "n",
        "rmse",
        "crps",
        "coverage_hdi",
        "mean_width_hdi",
    ]
    for level in (0.5, 0.9):
        assert table.loc[level, "coverage"] == cal.coverage(draws, y, level)[level]
        assert table.loc[level, "coverage_hdi"] == cal.coverage(draws, y, level, kind="hdi")[level]
        assert table.loc[level, "mean_width"] == pytest.approx(cal.interval_width(draws, level))
    assert table["crps"].iloc[0] == pytest.approx(cal.crps(draws, y))
    assert table["n"].iloc[0] == 200
    ll = _normal_logpdf(y, mu, np.ones_like(y))[None, None] + np.zeros((1, 4, 1))
    with_ll = cal.calibration_table(draws[:, :4], y, (0.5,), log_likelihood=ll)
    assert with_ll.loc[0.5, "nlpd"] == pytest.approx(-_normal_logpdf(y, mu, 1.0).mean())


def test_plot_reliability(tmp_path: Path) -> None:
    draws, y, _, _ = gaussian_case(n_obs=300, n_draws=500)
    ax = cal.plot_reliability(draws, y)
    assert isinstance(ax, matplotlib.axes.Axes)
    nominal, empirical = ax.lines[-1].get_data()
    assert len(nominal) == 19
    levels = [float(v) for v in nominal]
    cov = cal.coverage(draws, y, levels)
    np.testing.assert_allclose(empirical, [cov[v] for v in levels])
    ax.figure.savefig(tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").stat().st_size > 0
    _, given = plt.subplots()
    assert cal.plot_reliability(draws, y, (0.5, 0.9), kind="hdi", ax=given) is given


def test_plot_pit(tmp_path: Path) -> None:
    u = np.random.default_rng(9).uniform(size=1000)
    ax = cal.plot_pit(u, bins=10)
    assert isinstance(ax, matplotlib.axes.Axes)
    (bars,) = ax.containers  # the histogram's bars (the band is drawn over them)
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert [p.get_height() for p in bars] == list(counts)
    assert ax.get_ylim()[1] > counts.max()  # head room: the legend hides no bar
    ax.figure.savefig(tmp_path / "pit.png")
    assert (tmp_path / "pit.png").stat().st_size > 0
    _, given = plt.subplots()
    assert cal.plot_pit(u, ax=given) is given


# -- input errors ----------------------------------------------------------------------------
DRAWS = np.zeros((1, 10, 3))
OBS = np.zeros(3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: cal.interval(DRAWS, 1.0), "level=1.0"),
        (lambda: cal.interval(DRAWS, 0.9, kind="hpd"), "kind='hpd'"),
        (lambda: cal.coverage(DRAWS, OBS, (0.5, 1.5)), r"\[1.5\] outside \(0, 1\)"),
        (lambda: cal.coverage(DRAWS, OBS, ()), "at least one level"),
        (lambda: cal.coverage(DRAWS, np.zeros(4)), "event shape"),
        (lambda: cal.coverage(DRAWS, OBS, sample_dims=3), "sample_dims=3"),
        (lambda: cal.coverage(np.zeros(5), OBS, sample_dims=2), "leading sample"),
        (lambda: cal.coverage(DRAWS, OBS, axis=1), "axis=1"),
        (lambda: cal.crps(DRAWS, OBS, axis=(0, -1)), "repeated axis"),
        (lambda: cal.crps(DRAWS, OBS, reduce=False, axis=0), "reduce=True"),
        (lambda: cal.crps(DRAWS[:, :1], OBS), "at least two draws"),
        (lambda: cal.rmse(np.full((1, 4, 3), np.nan), OBS), "NaN"),
        (lambda: cal.pit(DRAWS, OBS, key="seed"), "key='seed'"),
        (lambda: cal.pit_test(np.array([0.2, 1.5])), r"\[0, 1\]"),
        (lambda: cal.pit_test(np.array([np.nan])), "no"),
        (lambda: cal.nlpd(DRAWS, OBS, bandwidth=0.0), "bandwidth=0.0"),
        (lambda: cal.nlpd(None, OBS), "draws=None"),
        (lambda: cal.nlpd(None, OBS, log_likelihood=np.zeros((1, 10, 4))), "event shape"),
        (lambda: cal.nlpd(DRAWS, OBS, log_likelihood=np.zeros((1, 5, 3))), "hold 10 draws"),
        (lambda: cal.nlpd(None, OBS, log_likelihood=np.full((1, 2, 3), np.nan)), "NaN"),
        (lambda: cal.nlpd(DRAWS, OBS, log_likelihood=DRAWS, bandwidth=1.0), "drop one"),
        (lambda: cal.plot_pit(np.array([0.5]), bins=0), "bins=0"),
        (lambda: cal.plot_reliability(DRAWS, OBS, band=1.0), "band=1.0"),
    ],
)
def test_input_errors(call: Any, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        call()
