"""The OU dataset and its exact predictive (issue #5), and NUTS calibration on the OU SDE.

Monte-Carlo error models:

* Simulated paths (`ou_dataset` over many keys): the process values are Gaussian,
  so the sample mean at a time has standard error ``sd / sqrt(N)`` and the sample
  variance ``var * sqrt(2 / (N - 1))``; checked to 4 standard errors.
* Draws from the oracle's own predictive: per point ``-log p(y) = H + (z**2 - 1) / 2``
  with ``z ~ N(0, 1)``, so the mean NLL over ``M`` draws at ``n`` points has mean
  ``H`` (the mean entropy) and standard error ``sqrt(0.5 / (M n))``; coverage of
  the 90 % intervals is a binomial proportion, standard error
  ``sqrt(0.9 * 0.1 / (M n))``; the mean CRPS has expectation ``mean(sd) / sqrt(pi)``
  (for ``y ~ F``, ``E CRPS = E|X - X'| / 2``) and its standard error is estimated
  from the draws. All to 4 standard errors.
* SBC-style recovery (NUTS on the mechanistic OU SDE, unknown theta and sigma,
  latent Brownian increments): ``probdyn.sbc`` simulates theta, sigma and the
  data from the prior, fits, and gives fractional ranks ``u`` that are exactly
  Uniform(0, 1) for a calibrated posterior (draws thinned to the ESS). The truth
  is outside the central 90 % interval when ``u < 0.05`` or ``u > 0.95``, so over
  ``K`` independent simulations the misses of each parameter are Binomial(K, 0.1).
  Default suite: K = 5, pass if at most 3 misses per parameter
  (``P(X >= 4) = 0.00046`` each). Slow suite: K = 40, at most 11 misses
  (``P(X >= 12) = 0.0015``), and the simultaneous ECDF uniformity test at
  family-wise level 0.01.
* Pyro: one dataset at known theta, sigma; the truth must lie in the central 99 %
  interval (a calibrated posterior misses with probability 1 % per parameter).
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import probdyn
from probdyn.calibration import coverage, crps
from probdyn.data._ou import OUData, ou_dataset, ou_oracle
from probdyn.numpyro import NeuralSDE

# -- the dataset ------------------------------------------------------------------------------


@pytest.mark.parametrize("drop", [0.3, 0.5, 0.7])
def test_dataset_split_shapes_and_defaults(drop: float) -> None:
    data = ou_dataset(drop=drop, key=0)
    assert (data.theta, data.mu, data.sigma, data.x0) == (0.2, 0.0, 0.1, 1.0)
    np.testing.assert_allclose(data.times, np.arange(1, 101) * 0.1, rtol=1e-12)
    assert data.path.shape == data.y.shape == (100,)
    assert len(data.test_index) == round(100 * drop)
    assert len(data.train_index) == 100 - round(100 * drop)
    both = np.concatenate([data.train_index, data.test_index])
    np.testing.assert_array_equal(np.sort(both), np.arange(100))
    assert np.all(np.diff(data.train_index) > 0) and np.all(np.diff(data.test_index) > 0)
    np.testing.assert_array_equal(data.t_train, data.times[data.train_index])
    np.testing.assert_array_equal(data.y_test, data.y[data.test_index])
    np.testing.assert_array_equal(np.flatnonzero(data.train_mask), data.train_index)
    # The observations are the path plus N(0, 0.02^2) noise (sample sd: SE sd / sqrt(2 (n - 1))).
    residual = data.y - data.path
    assert abs(residual.std(ddof=1) - 0.02) < 4 * 0.02 / math.sqrt(2 * 99)


def test_dataset_is_reproducible_and_nested_across_drops() -> None:
    a, b = ou_dataset(key=3), ou_dataset(key=3)
    for field in ("path", "y", "train_index", "test_index"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.path, ou_dataset(key=4).path)
    g1, g2 = np.random.default_rng(5), np.random.default_rng(5)
    np.testing.assert_array_equal(ou_dataset(key=g1).y, ou_dataset(key=g2).y)
    drops = [ou_dataset(drop=d, key=3) for d in (0.3, 0.5, 0.7)]
    for small, large in zip(drops, drops[1:]):
        np.testing.assert_array_equal(small.y, large.y)
        assert set(small.test_index) < set(large.test_index)
    exact = ou_dataset(noise_sd=0.0, key=3)
    np.testing.assert_array_equal(exact.y, exact.path)


def test_dataset_path_has_the_ou_law() -> None:
    # Exact transitions: at every time the paths have the OU mean and variance.
    theta, sigma, x0, n = 0.7, 0.4, 1.5, 4000
    rng = np.random.default_rng(11)
    paths = np.stack(
        [
            ou_dataset(theta=theta, sigma=sigma, x0=x0, t_max=2.0, num_points=4, key=rng).path
            for _ in range(n)
        ]
    )
    t = np.array([0.5, 1.0, 1.5, 2.0])
    mean = x0 * np.exp(-theta * t)
    var = sigma**2 / (2 * theta) * (1 - np.exp(-2 * theta * t))
    assert np.all(np.abs(paths.mean(0) - mean) < 4 * np.sqrt(var / n))
    assert np.all(np.abs(paths.var(0, ddof=1) - var) < 4 * var * np.sqrt(2 / (n - 1)))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"theta": 0.0}, ValueError, r"theta=0.0 must be positive"),
        ({"sigma": -0.1}, ValueError, r"sigma=-0.1 must be positive"),
        ({"t_max": 0.0}, ValueError, r"t_max=0.0"),
        ({"theta": float("nan")}, ValueError, r"theta=nan must be a finite number"),
        ({"num_points": 1}, ValueError, r"num_points=1 must be an int >= 2"),
        ({"num_points": 10.0}, ValueError, r"num_points=10.0"),
        ({"drop": 0.0}, ValueError, r"drop=0.0 must be a fraction in \(0, 1\)"),
        ({"drop": 1.0}, ValueError, r"drop=1.0"),
        ({"drop": 0.01, "num_points": 10}, ValueError, r"drops 0 of 10 points"),
        ({"drop": 0.99, "num_points": 10}, ValueError, r"drops 10 of 10 points"),
        ({"noise_sd": -0.01}, ValueError, r"noise_sd=-0.01 must be a finite number >= 0"),
        ({"mu": float("inf")}, ValueError, r"mu=inf"),
        ({"key": "zero"}, TypeError, r"key='zero' is not a seed"),
        ({"key": True}, TypeError, r"key=True"),
    ],
)
def test_dataset_refuses_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        ou_dataset(**kwargs)


# -- the oracle -------------------------------------------------------------------------------


def _markov_cov(t: np.ndarray, theta: float, sigma: float) -> np.ndarray:
    """OU covariance built from the Markov property: cov(X_t, X_s) = e^{-theta (t - s)} var(X_s)
    for s <= t, var(X_s) = sigma^2 / (2 theta) (1 - e^{-2 theta s}) (a different route from
    the closed form the module uses)."""
    lo, hi = np.minimum.outer(t, t), np.maximum.outer(t, t)
    return np.exp(-theta * (hi - lo)) * sigma**2 / (2 * theta) * (1 - np.exp(-2 * theta * lo))


@pytest.mark.parametrize("drop, noise_sd", [(0.3, 0.02), (0.7, 0.05), (0.5, 0.0)])
def test_oracle_matches_brute_force_conditioning(drop: float, noise_sd: float) -> None:
    data = ou_dataset(drop=drop, noise_sd=noise_sd, num_points=40, key=2)
    oracle = ou_oracle(data)
    # Conditioning through the joint precision matrix: for a Gaussian with precision
    # P, the held-out block given the rest has covariance inv(P_ss) and mean
    # m_s - inv(P_ss) P_sk (y_k - m_k).
    m = data.mu + (data.x0 - data.mu) * np.exp(-data.theta * data.times)
    joint = _markov_cov(data.times, data.theta, data.sigma) + noise_sd**2 * np.eye(40)
    prec = np.linalg.inv(joint)
    k, s = data.train_index, data.test_index
    cov = np.linalg.inv(prec[np.ix_(s, s)])
    mean = m[s] - cov @ prec[np.ix_(s, k)] @ (data.y[k] - m[k])
    np.testing.assert_allclose(oracle.cov, cov, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(oracle.mean, mean, rtol=1e-7, atol=1e-10)
    sd = np.sqrt(np.diag(cov))
    np.testing.assert_allclose(oracle.sd, sd, rtol=1e-7)
    y = data.y_test
    expected_lp = -0.5 * ((y - mean) / sd) ** 2 - np.log(sd * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(oracle.log_prob, expected_lp, rtol=1e-7, atol=1e-8)
    assert oracle.nlpd == pytest.approx(-expected_lp.mean(), rel=1e-7)
    z90 = statistics.NormalDist().inv_cdf(0.95)
    np.testing.assert_array_equal(oracle.inside, np.abs(y - mean) <= z90 * sd)
    assert oracle.coverage == pytest.approx(np.mean(np.abs(y - mean) <= z90 * sd))
    assert oracle.level == 0.9


def test_oracle_crps_is_the_integral_of_the_squared_cdf_difference() -> None:
    data = ou_dataset(drop=0.5, num_points=20, key=1)
    oracle = ou_oracle(data)
    for i in range(3):
        mu, sd, y = oracle.mean[i], oracle.sd[i], data.y_test[i]
        x = np.linspace(mu - 12 * sd, mu + 12 * sd, 200_001)
        cdf = np.array([statistics.NormalDist(mu, sd).cdf(v) for v in x[::100]])
        cdf = np.interp(x, x[::100], cdf)  # smooth: linear interpolation is ample
        integrand = (cdf - (x >= y)) ** 2
        numeric = float(np.sum(0.5 * (integrand[1:] + integrand[:-1]) * np.diff(x)))
        assert oracle.crps[i] == pytest.approx(numeric, rel=2e-3)
    assert oracle.mean_crps == pytest.approx(oracle.crps.mean())


def test_oracle_scores_of_its_own_draws_match_their_expectations() -> None:
    data = ou_dataset(drop=0.5, key=4)
    oracle = ou_oracle(data)
    n, m = len(data.test_index), 400
    rng = np.random.default_rng(0)
    draws = oracle.mean + oracle.sd * rng.standard_normal((m, n))
    nll, inside, scores = [], [], []
    for row in draws:
        y = data.y.copy()
        y[data.test_index] = row  # the predictive does not depend on the held-out values
        redone = ou_oracle(dataclasses.replace(data, y=y))
        np.testing.assert_allclose(redone.mean, oracle.mean, rtol=1e-12)
        nll.append(-redone.log_prob)
        inside.append(redone.inside)
        scores.append(redone.crps)
    entropy = np.mean(0.5 * np.log(2 * np.pi * np.e * oracle.sd**2))
    assert abs(np.mean(nll) - entropy) < 4 * math.sqrt(0.5 / (m * n))
    assert abs(np.mean(inside) - 0.9) < 4 * math.sqrt(0.09 / (m * n))
    scores_arr = np.asarray(scores)
    se = scores_arr.mean(1).std(ddof=1) / math.sqrt(m)
    assert abs(scores_arr.mean() - np.mean(oracle.sd) / math.sqrt(np.pi)) < 4 * se
    # probdyn.calibration's sample estimators agree with the closed forms on many
    # draws. CRPS: unbiased estimator, per point SE < 0.02 sd with S = 20000 draws
    # (Var|X - y| <= sd^2 (1 + z^2)), so the mean over n points is within
    # 4 * 0.02 * mean(sd * sqrt(1 + z^2)) / sqrt(n) of the closed form.
    s = 20_000
    many = oracle.mean + oracle.sd * rng.standard_normal((1, s, n))
    z = (data.y_test - oracle.mean) / oracle.sd
    bound = 4 * np.mean(oracle.sd * np.sqrt(1 + z**2)) * 2 / math.sqrt(s) / math.sqrt(n)
    assert abs(crps(many, data.y_test) - oracle.mean_crps) < bound
    # Coverage: the sample 5 % / 95 % quantiles have SE sqrt(0.05 * 0.95 / S) / phi(1.645)
    # (in sd units); points farther than 5 SE from an interval end must agree.
    inside = coverage(many, data.y_test, 0.9, reduce=False)[0.9].astype(bool)
    qse = math.sqrt(0.05 * 0.95 / s) / statistics.NormalDist().pdf(1.6448536)
    clear = np.abs(np.abs(z) - 1.6448536) > 5 * qse
    assert clear.sum() >= n - 5
    np.testing.assert_array_equal(inside[clear], oracle.inside[clear])


def test_oracle_is_sharper_with_fewer_points_dropped() -> None:
    sd = [ou_oracle(ou_dataset(drop=d, key=0)).sd.mean() for d in (0.3, 0.5, 0.7)]
    assert sd[0] < sd[1] < sd[2]
    # Never sharper than the observation noise alone.
    assert min(sd) > 0.02


def test_oracle_refuses_a_bad_level() -> None:
    with pytest.raises(ValueError, match=r"level=1.5 must be in \(0, 1\)"):
        ou_oracle(ou_dataset(key=0), level=1.5)


def test_the_data_module_imports_numpy_only() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['jax'] = None; sys.modules['torch'] = None\n"
        "import importlib.util, pathlib\n"
        "spec = importlib.util.spec_from_file_location('m', 'probdyn/data/_ou.py')\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['m'] = m\n"
        "spec.loader.exec_module(m)\n"
        "print(m.ou_oracle(m.ou_dataset(key=0)).nlpd)\n"
    )
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert float(out.stdout) < 0


# -- NUTS on the OU SDE: SBC-style recovery of theta and sigma --------------------------------

SBC_TIMES = np.arange(1, 11) * 0.5  # 10 observations, 10 latent Euler steps of 0.5


def ou_small(times, y=None):
    theta = numpyro.sample("theta", dist.LogNormal(math.log(0.5), 0.5))
    sigma = numpyro.sample("sigma", dist.LogNormal(math.log(0.3), 0.5))
    sde = NeuralSDE.langevin(lambda z, a: -a[0] * z, lambda t, a: a[1], dt=0.5)
    z = sde(jnp.ones(1), times, (theta, sigma), t0=0.0)[:, 0]
    numpyro.sample("y", dist.Normal(z, 0.05).to_event(1), obs=y)


def _misses(result: probdyn.SBCResult, name: str) -> int:
    u = result.fractional_ranks[name]
    return int(np.sum((u < 0.05) | (u > 0.95)))


def _sbc(num_simulations: int, warmup: int, samples: int, key: int) -> probdyn.SBCResult:
    engine = probdyn.NUTS(warmup, samples, max_tree_depth=6, progress_bar=False)
    return probdyn.sbc(
        ou_small,
        engine,
        num_simulations,
        args=(jnp.asarray(SBC_TIMES), jnp.zeros(len(SBC_TIMES))),
        data_arg=1,
        sites=["theta", "sigma"],
        log_likelihood=False,
        key=key,
        progress_bar=False,
    )


def test_nuts_recovers_theta_and_sigma_at_the_nominal_rate() -> None:
    result = _sbc(5, 150, 150, key=0)
    assert set(result.ranks) == {"theta", "sigma"}
    assert np.all(result.num_rank_draws >= 10)  # the chains moved: ESS >= 10 of 150
    assert np.unique(result.truths["theta"]).size == 5  # fresh prior draws each time
    for name in ("theta", "sigma"):
        assert _misses(result, name) <= 3, (name, result.fractional_ranks[name])


@pytest.mark.slow
def test_nuts_recovers_theta_and_sigma_at_the_nominal_rate_many_datasets() -> None:
    result = _sbc(40, 300, 300, key=1)
    for name in ("theta", "sigma"):
        assert _misses(result, name) <= 11, (name, result.fractional_ranks[name])
    assert result.flagged(0.01) == [], result.summary()


@pytest.mark.slow  # about a minute: Pyro's NUTS steps torchsde from Python
def test_pyro_nuts_covers_theta_and_sigma_on_one_dataset() -> None:
    torch = pytest.importorskip("torch")
    pyro = pytest.importorskip("pyro")
    pytest.importorskip("torchsde")
    import pyro.distributions as pdist
    from pyro import poutine

    from probdyn.pyro import NeuralSDE as TorchSDE

    def ou_torch(times, y=None):
        theta = pyro.sample("theta", pdist.LogNormal(math.log(0.5), 0.5))
        sigma = pyro.sample("sigma", pdist.LogNormal(math.log(0.3), 0.5))
        sde = TorchSDE.langevin(lambda z, a: -a[0] * z, lambda t, a: a[1], dt=0.5)
        z = sde(torch.ones(1), times, (theta, sigma), t0=0.0)[:, 0]
        pyro.sample("y", pdist.Normal(z, 0.05).to_event(1), obs=y)

    before, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    try:
        truth = {"theta": torch.tensor(0.5), "sigma": torch.tensor(0.3)}
        times = torch.as_tensor(SBC_TIMES)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            tr = poutine.trace(poutine.condition(ou_torch, truth)).get_trace(times)
        y = tr.nodes["y"]["value"]
        engine = probdyn.NUTS(150, 150, max_tree_depth=5, progress_bar=False)
        post = probdyn.fit(ou_torch, times, y, engine=engine, key=0)
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(before)
    assert post.samples["sde.noise"].shape == (1, 150, 10, 1)
    for name, value in truth.items():
        lo, hi = np.quantile(np.asarray(post.samples[name]), [0.005, 0.995])
        assert lo < float(value) < hi, (name, lo, hi)


def test_held_out_scoring_uses_only_the_kept_points() -> None:
    # The benchmark's masking: dropped points are zeros in y and masked out, so the
    # model's log density does not depend on them (no leak of the held-out values).
    from numpyro.infer.util import log_density

    data: OUData = ou_dataset(drop=0.5, num_points=20, key=0)

    def model(times, y, mask):
        sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
        sde = NeuralSDE.langevin(lambda z, a: -0.2 * z, lambda t, a: a, dt=0.5)
        z = sde(jnp.ones(1), times, sigma, t0=0.0)[:, 0]
        with numpyro.plate("obs", z.shape[0]):
            numpyro.sample("y", dist.Normal(z, 0.02).mask(mask), obs=y)

    point = {"sigma": 0.1, "sde.noise": jnp.zeros((20, 1))}
    mask = jnp.asarray(data.train_mask)
    with_zeros = np.where(data.train_mask, data.y, 0.0)
    a, _ = log_density(model, (data.times, jnp.asarray(with_zeros), mask), {}, point)
    b, _ = log_density(model, (data.times, jnp.asarray(data.y), mask), {}, point)
    assert float(a) == pytest.approx(float(b), rel=1e-6)
