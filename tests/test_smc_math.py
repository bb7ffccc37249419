"""The backend-neutral SMC maths (probdyn/engines/smc_math.py): exact small cases, and
resampling counts checked against their expectation in Monte-Carlo units."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from probdyn.engines import smc_math as sm


def test_normalize_log_weights_sums_to_one_and_keeps_zeros() -> None:
    lw = sm.normalize_log_weights(np.array([0.0, np.log(3.0), -np.inf, np.nan]))
    np.testing.assert_allclose(np.exp(lw), [0.25, 0.75, 0.0, 0.0], rtol=1e-15)
    # Shift invariance, even where exp() of the raw values would overflow.
    np.testing.assert_allclose(
        sm.normalize_log_weights(np.array([1000.0, 1000.0 + np.log(3.0)])),
        np.log([0.25, 0.75]),
        rtol=1e-12,
    )


def test_normalize_log_weights_all_zero_raises() -> None:
    with pytest.raises(ValueError, match="all 2 weights are zero"):
        sm.normalize_log_weights(np.array([-np.inf, np.nan]))


def test_ess_exact_cases() -> None:
    assert sm.ess(np.zeros(17)) == 17.0  # equal weights: ESS = N exactly
    assert sm.ess(np.full(5, -3.2)) == 5.0
    assert sm.ess(np.array([0.0, -np.inf, -np.inf])) == 1.0
    # weights 1, 1, 2: (sum w)^2 / sum w^2 = 16 / 6
    assert sm.ess(np.log([1.0, 1.0, 2.0])) == pytest.approx(16 / 6, rel=1e-14)


def test_log_mean_exp_matches_direct_and_does_not_overflow() -> None:
    x = np.array([-1.0, 0.5, 2.0, 3.0])
    assert sm.log_mean_exp(x) == pytest.approx(np.log(np.mean(np.exp(x))), rel=1e-14)
    assert sm.log_mean_exp(np.array([1000.0, 1000.0])) == pytest.approx(1000.0, rel=1e-15)
    assert sm.log_mean_exp(np.array([-np.inf, np.log(4.0)])) == pytest.approx(np.log(2.0))
    assert sm.log_mean_exp(np.array([-np.inf, -np.inf])) == -math.inf


def test_log_evidence_increment_weighs_by_previous_weights() -> None:
    inc = np.array([0.0, np.log(5.0)])
    assert sm.log_evidence_increment(np.zeros(2), inc) == pytest.approx(sm.log_mean_exp(inc))
    # W = (0.25, 0.75): log(0.25 * 1 + 0.75 * 5)
    prev = np.log([1.0, 3.0]) + 7.0  # unnormalised on purpose
    assert sm.log_evidence_increment(prev, inc) == pytest.approx(np.log(4.0), rel=1e-14)


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(idx, minlength=n)


def test_systematic_resampling_counts_are_floor_or_ceil() -> None:
    rng = np.random.default_rng(0)
    w = np.array([0.05, 0.3, 0.0, 0.15, 0.5])
    lw = np.array([np.log(0.05), np.log(0.3), -np.inf, np.log(0.15), np.log(0.5)])
    for _ in range(200):
        idx = sm.systematic_resample(lw, rng)
        c = _counts(idx, len(w))
        assert np.all(c >= np.floor(len(w) * w)) and np.all(c <= np.ceil(len(w) * w))
        assert c[2] == 0  # a zero weight is never chosen
        assert np.all(np.diff(idx) >= 0)


@pytest.mark.parametrize("method", [sm.systematic_resample, sm.multinomial_resample])
def test_resampling_counts_have_the_right_expectation(method: Callable[..., np.ndarray]) -> None:
    # Over R independent resamplings the mean count of particle i estimates
    # num * W_i. Each count has variance at most num * W_i (1 - W_i) (multinomial;
    # systematic has less), so the MC standard error of the mean count is at most
    # sqrt(num W_i (1 - W_i) / R); 4 SE per particle, 4 particles.
    rng = np.random.default_rng(1)
    w = np.array([0.1, 0.2, 0.3, 0.4])
    num, reps = 50, 2000
    counts = np.mean([_counts(method(np.log(w), rng, num), len(w)) for _ in range(reps)], axis=0)
    se = np.sqrt(num * w * (1 - w) / reps)
    assert np.all(np.abs(counts - num * w) <= 4 * se), (counts, num * w, se)
    assert len(method(np.log(w), rng, 7)) == 7


def test_next_temperature_returns_one_when_reachable() -> None:
    assert sm.next_temperature(np.zeros(10), 0.0, 0.5) == 1.0
    # a nearly flat likelihood keeps almost all the ESS at beta = 1
    ll = np.linspace(-1e-3, 0.0, 100)
    assert sm.next_temperature(ll, 0.3, 0.5) == 1.0


@pytest.mark.parametrize("beta, target", [(0.0, 0.5), (0.2, 0.9), (0.0, 0.1)])
def test_next_temperature_hits_target_ess(beta: float, target: float) -> None:
    rng = np.random.default_rng(2)
    ll = -0.5 * rng.normal(size=400) ** 2 * 1000.0
    new = sm.next_temperature(ll, beta, target)
    assert beta < new < 1.0
    assert abs(sm.ess((new - beta) * ll) / len(ll) - target) < 1e-6


def test_next_temperature_with_previous_weights_and_impossible_particles() -> None:
    rng = np.random.default_rng(3)
    ll = -30.0 * rng.uniform(size=200)
    ll[:50] = -np.inf  # impossible particles: the target is relative to the others
    prev = rng.normal(size=200)
    new = sm.next_temperature(ll, 0.0, 0.5, prev)
    finite = np.isfinite(ll)
    ess0 = sm.ess(np.where(finite, prev, -np.inf))
    got = sm.ess(prev + np.where(finite, new * ll, -np.inf))
    assert abs(got / ess0 - 0.5) < 1e-6


def test_next_temperature_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="beta"):
        sm.next_temperature(np.zeros(3), 1.0, 0.5)
    with pytest.raises(ValueError, match="target_ess"):
        sm.next_temperature(np.zeros(3), 0.0, 1.5)
    with pytest.raises(ValueError, match="every particle"):
        sm.next_temperature(np.full(3, -np.inf), 0.0, 0.5)


def test_step_size_rules() -> None:
    assert sm.adapt_step_size(0.3, 0.75, 0.65, gain=1.0) == pytest.approx(0.3 * math.exp(0.1))
    # The default gain is the shared STEP_ADAPT_GAIN (2): twice the log change.
    assert sm.STEP_ADAPT_GAIN == 2.0
    assert sm.adapt_step_size(0.3, 0.75, 0.65) == pytest.approx(0.3 * math.exp(0.2))
    assert sm.adapt_step_size(0.3, 0.65, 0.65) == 0.3
    # A stage without moves (the first, at temperature 0) has no acceptance rate
    # (NaN) and keeps its step.
    assert sm.adapt_step_size(0.3, float("nan"), 0.65) == 0.3
    # MALA's h is a squared length: twice the gain moves its proposal length as fast.
    assert sm.step_adapt_gain("hmc") == sm.step_adapt_gain("rw") == sm.STEP_ADAPT_GAIN
    assert sm.step_adapt_gain("mala") == 2 * sm.STEP_ADAPT_GAIN
    assert sm.target_acceptance("rw", 1) == sm.TARGET_ACCEPTANCE_RW_1D == 0.44
    assert sm.target_acceptance("rw", 2) == 0.234
    assert sm.target_acceptance("mala", 1) == 0.574
    assert sm.target_acceptance("hmc", 1) == 0.65
    assert sm.initial_step_size("hmc", 16) == pytest.approx(0.5)
    assert sm.initial_step_size("mala", 8) == pytest.approx(0.5)
    assert sm.initial_step_size("rw", 4) == pytest.approx(1.19)
    with pytest.raises(ValueError, match="kernel='nuts'"):
        sm.initial_step_size("nuts", 2)
    with pytest.raises(ValueError, match="kernel='nuts'"):
        sm.step_adapt_gain("nuts")


def test_weighted_variance_weighs_and_floors() -> None:
    x = np.array([[0.0, 5.0], [1.0, 5.0], [3.0, 5.0]])
    # weights 1/4, 1/4, 1/2: mean 1.75, variance (1.75**2 + 0.75**2) / 4 + 1.25**2 / 2
    var = sm.weighted_variance(x, np.log([1.0, 1.0, 2.0]) + 3.0)
    np.testing.assert_allclose(var, [1.6875, sm.MIN_VARIANCE], rtol=1e-14)
    # a zero weight drops the particle; equal weights give the population variance
    np.testing.assert_allclose(
        sm.weighted_variance(x, np.array([0.0, 0.0, -np.inf]))[0], 0.25, rtol=1e-14
    )
    np.testing.assert_allclose(sm.weighted_variance(x, np.zeros(3))[0], x[:, 0].var(), rtol=1e-14)


def test_move_rules() -> None:
    # the distance rule: at least MIN_MOVES, then while the distance grows by 10 %
    assert sm.keep_moving(0, 0.0, 0.0, 10) and sm.keep_moving(1, 0.5, 0.0, 10)
    assert sm.keep_moving(2, 8.0, 4.0, 10) and not sm.keep_moving(3, 8.4, 8.0, 10)
    assert not sm.keep_moving(10, 20.0, 10.0, 10)  # the cap
    assert sm.keep_moving(5, 8.0, 8.0, 10, adaptive=False)
    # the last stage: while some coordinate's correlation with the start exceeds 0.1,
    # whatever the distance does, up to its own cap
    assert sm.keep_moving(12, 8.0, 8.0, 50, correlation=sm.FINAL_CORRELATION + 0.01)
    assert not sm.keep_moving(3, 8.0, 1.0, 50, correlation=sm.FINAL_CORRELATION)
    assert not sm.keep_moving(50, 8.0, 1.0, 50, correlation=0.9)
    assert sm.keep_moving(1, 0.0, 0.0, 50, correlation=0.0)  # at least MIN_MOVES
    assert sm.final_max_moves(10, True) == sm.FINAL_MOVES_FACTOR * 10
    assert sm.final_max_moves(10, False) == 10


def test_start_correlation_is_pearson_per_coordinate() -> None:
    rng = np.random.default_rng(0)
    start = rng.normal(size=(500, 3))
    x = np.column_stack([start[:, 0], 0.3 * start[:, 1] + rng.normal(size=500), -start[:, 2]])
    expected = [np.corrcoef(x[:, j], start[:, j])[0, 1] for j in range(3)]
    np.testing.assert_allclose(sm.start_correlation(x, start), expected, rtol=1e-12)
    # a coordinate that does not vary counts as still correlated
    x[:, 1] = 2.0
    assert sm.start_correlation(x, start)[1] == 1.0


def test_stage_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    sm.check_stage_limit(sm.MAX_STAGES, 1.0, 0.5, 100)  # reached temperature 1: fine
    sm.check_stage_limit(sm.MAX_STAGES - 1, 0.3, 0.5, 100)
    with pytest.raises(RuntimeError, match=r"only 0.3 after 1000 stages.*target_ess=0.5"):
        sm.check_stage_limit(sm.MAX_STAGES, 0.3, 0.5, 100)
    monkeypatch.setattr(sm, "MAX_STAGES", 2)  # the backends read the module's value
    with pytest.raises(RuntimeError, match="after 2 stages"):
        sm.check_stage_limit(2, 0.3, 0.5, 100)
