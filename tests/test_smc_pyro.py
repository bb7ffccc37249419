"""The Pyro tempered-SMC runner (probdyn/pyro/engines/smc.py).

Monte-Carlo error model:

* Log evidence: R runs with keys 0..R-1 give independent estimates; their mean
  has standard error ``s / sqrt(R)`` with ``s`` the sample sd. Three standard
  errors would be a 0.27 % two-sided false-failure rate if ``s`` were the true
  sd; with ``s`` estimated from R runs the same rate needs the Student-t
  quantile with R - 1 degrees of freedom ("3 sigma-equivalent"). The estimator's
  own bias, ``E[log Z_hat] - log Z ~ -var / 2`` (a few 1e-3 here), is far below
  that tolerance.
* Posterior moments: `check_accuracy` (4 MCSE, ArviZ's MCSE of the particle
  cloud, which sees the duplicates that resampling leaves as autocorrelation).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
from engine_backends import (
    check_keys_leave_torch_rng_alone,
    check_step_rule,
    check_tempered_traces,
    models,
)
from scipy import stats

import probdyn
from probdyn.engines import smc_math as _smc_math
from probdyn.pyro import BayesianMLP
from probdyn.testing import (
    check_accuracy,
    check_arviz,
    check_finite,
    check_layout,
    linear_regression_data,
    normal_data,
    reference_model,
)

ENGINE = probdyn.SMC(num_particles=1000, num_mcmc_steps=5, progress_bar=False)
SHORT = probdyn.SMC(num_particles=100, num_mcmc_steps=2, progress_bar=False)
NUM_RUNS = 8
PROBLEMS = {
    "normal": ("normal", normal_data, {"mu": ()}),
    "blr": ("linear_regression", linear_regression_data, {"w": (3,)}),
}


pytestmark = pytest.mark.usefixtures("torch_float64_one_thread")


def _fit(model: Any, args: tuple[Any, ...], engine: probdyn.SMC, key: Any = 0) -> Any:
    return probdyn.fit(model, *args, engine=engine, key=key, backend="pyro")


@functools.cache
def _runs(problem: str) -> list[probdyn.Posterior]:
    name, data, _ = PROBLEMS[problem]
    model = reference_model(name, "pyro")
    return [_fit(model, data().args, ENGINE, key) for key in range(NUM_RUNS)]


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_log_evidence_matches_the_exact_value(problem: str) -> None:
    exact = PROBLEMS[problem][1]().log_evidence
    estimates = np.array([post.log_evidence for post in _runs(problem)])
    se = estimates.std(ddof=1) / math.sqrt(NUM_RUNS)
    quantile = stats.t.ppf(1 - stats.norm.sf(3.0), df=NUM_RUNS - 1)
    assert abs(estimates.mean() - exact) <= quantile * se, (estimates, exact, se)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_particles_match_the_exact_posterior(problem: str) -> None:
    post = _runs(problem)[0]
    data = PROBLEMS[problem][1]()
    assert post.attrs["batched"] is True
    check_accuracy(post, data.site, *data.exact)


def test_layout_traces_and_weights() -> None:
    post = _runs("normal")[0]
    n = ENGINE.num_particles
    check_layout(post, {"mu": ()}, num_chains=1, num_draws=n)
    check_finite(post)
    check_arviz(post)
    check_tempered_traces(post)
    # No move at temperature 0 (exact prior draws); then between MIN_MOVES and
    # num_mcmc_steps moves per stage, and in the last stage (until decorrelated) up
    # to final_max_moves, as on the NumPyro backend.
    rates, moves = post.traces["acceptance_rate"], post.traces["num_moves"]
    assert moves[0] == 0 and np.isnan(rates[0])
    assert np.all((moves[1:-1] >= 2) & (moves[1:-1] <= ENGINE.num_mcmc_steps))
    last_cap = _smc_math.final_max_moves(ENGINE.num_mcmc_steps, ENGINE.adaptive_moves)
    assert 2 <= moves[-1] <= last_cap
    assert np.all((rates[1:] > 0) & (rates[1:] <= 1))
    np.testing.assert_allclose(post.sample_stats["log_weight"], np.full((1, n), -math.log(n)))
    check_step_rule(post, "hmc", 1)


@pytest.mark.parametrize("kernel", ["mala", "rw"])
def test_other_kernels_are_accurate(kernel: str) -> None:
    data = normal_data()
    engine = probdyn.SMC(num_particles=1000, kernel=kernel, num_mcmc_steps=5, progress_bar=False)
    post = _fit(reference_model("normal", "pyro"), data.args, engine)
    check_accuracy(post, "mu", *data.exact)
    assert np.isfinite(post.log_evidence)
    check_step_rule(post, kernel, 1)


def test_given_temperatures_are_followed() -> None:
    data = normal_data()
    engine = probdyn.SMC(num_particles=1000, temperatures=[0.05, 0.2, 0.5, 1.0], progress_bar=False)
    post = _fit(reference_model("normal", "pyro"), data.args, engine)
    np.testing.assert_array_equal(post.traces["temperature"], [0.0, 0.05, 0.2, 0.5, 1.0])
    check_accuracy(post, "mu", *data.exact)


def test_same_key_same_draws_and_global_rng_untouched() -> None:
    data = normal_data()
    model = reference_model("normal", "pyro")
    fit = lambda key: _fit(model, data.args, SHORT, key)
    check_keys_leave_torch_rng_alone(fit, data.args[0], generator_seed=5, predict_key=1)


def test_loop_fallback_matches_the_batched_run() -> None:
    data = normal_data()
    engine = probdyn.SMC(num_particles=50, kernel="mala", num_mcmc_steps=1, progress_bar=False)
    batched = _fit(reference_model("normal", "pyro"), data.args, engine)
    looped = _fit(models("pyro").normal_unbatchable, data.args, engine)
    assert batched.attrs["batched"] is True and looped.attrs["batched"] is False
    np.testing.assert_allclose(looped.samples["mu"], batched.samples["mu"], rtol=1e-8)
    assert looped.log_evidence == pytest.approx(batched.log_evidence, rel=1e-8)


def _partial_bnn(x: Any, y: Any) -> None:
    net = BayesianMLP("f", [1, 4, 1], bayesian_layers=[-1])
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(net(x).squeeze(-1), 0.1), obs=y)


def test_param_sites_are_refused() -> None:
    x, y = np.ones((5, 1)), np.zeros(5)
    with pytest.raises(ValueError, match=r"param site\(s\) \['f.layers.0.bias'"):
        _fit(_partial_bnn, (x, y), SHORT)
