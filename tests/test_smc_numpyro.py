"""Tempered SMC on the NumPyro backend: evidence, accuracy, multimodality, options.

Repeated runs (to measure Monte-Carlo error) call `sample_smc`, the part of the
runner that produces the particles and the evidence; `probdyn.fit` adds only the
`Posterior`'s post-processing to it. Every run with the same model, data and engine
reuses one compiled program, so a repeat costs the sampling alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from engine_backends import check_step_rule, check_tempered_traces, run_on_four_cpu_devices
from scipy import integrate, stats

import probdyn
from probdyn.engines import smc_math as _smc_math
from probdyn.numpyro import BayesianMLP
from probdyn.numpyro.engines import smc as _smc
from probdyn.numpyro.engines import smc_kernels as _smc_kernels
from probdyn.numpyro.engines import smc_program as _smc_program
from probdyn.numpyro.engines.smc import sample_smc
from probdyn.numpyro.engines.smc_program import particle_batch_size
from probdyn.numpyro.logdensity import flat_model, loglik_floor
from probdyn.testing import (
    check_accuracy,
    check_arviz,
    check_finite,
    check_layout,
    check_reproducible,
    linear_regression_data,
    linear_regression_model,
    normal_data,
    normal_model,
)

ENGINE = probdyn.SMC(num_particles=1000, progress_bar=False)
REPEATS = 10  # independent runs (keys 0..9) per Monte-Carlo error estimate
PROBLEMS = {
    "normal": (normal_model, normal_data),
    "blr": (linear_regression_model, linear_regression_data),
}


def bimodal_model(y: float) -> None:
    """``z ~ N(0.5, 2)``, ``y ~ N(z**2, 0.2)``: for y = 4, modes near z = +-2 whose
    weights differ through the asymmetric prior."""
    z = numpyro.sample("z", dist.Normal(0.5, 2.0))
    numpyro.sample("y", dist.Normal(z**2, 0.2), obs=y)


def capped_scale_model(y: np.ndarray) -> None:
    """``s ~ Gamma(2, 1)`` capped at 2.5 by a factor that is -inf above; ``y_i ~ N(0, s)``.

    ``s`` is positive, so it is sampled through the exp transform (its Jacobian
    enters the prior part); 29 % of the prior draws have log likelihood -inf.
    """
    s = numpyro.sample("s", dist.Gamma(2.0, 1.0))
    numpyro.factor("cap", jnp.where(s < 2.5, 0.0, -jnp.inf))
    numpyro.deterministic("s2", s**2)
    with numpyro.plate("data", len(y)):
        numpyro.sample("y", dist.Normal(0.0, s), obs=y)


def _run(problem: str, key: int, engine: probdyn.SMC = ENGINE) -> probdyn.Posterior:
    model, data = PROBLEMS[problem]
    return probdyn.fit(model, *data().args, engine=engine, key=key)


@functools.cache
def _fit(problem: str, key: int) -> probdyn.Posterior:
    return _run(problem, key)


def _repeat(model: Callable[..., None], args: tuple, stat: Callable) -> np.ndarray:
    return np.array([stat(sample_smc(model, args, {}, ENGINE, key)) for key in range(REPEATS)])


def _assert_log_evidence_within_mcse(estimates: np.ndarray, exact: float) -> None:
    # Error model: REPEATS independent runs give estimates with sample sd s; their
    # mean has MCSE s / sqrt(REPEATS), and (mean - exact) / MCSE is t-distributed
    # with 9 degrees of freedom: |t| > 4 has probability 0.3 %. SMC's estimate of
    # Z is unbiased; log Z-hat is biased low by var(log Z-hat) / 2 (delta method),
    # which we add back: here s is 0.05-0.1, so the correction is ~0.1 MCSE.
    s = estimates.std(ddof=1)
    mcse = s / np.sqrt(len(estimates))
    error = abs(estimates.mean() + s**2 / 2 - exact)
    assert error <= 4 * mcse, (estimates, exact, mcse)
    # Not a vacuous pass through a huge MCSE: 1000 particles pin log Z to a few tenths.
    assert s < 0.3, s


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_log_evidence_matches_exact(problem: str) -> None:
    model, data = PROBLEMS[problem]
    exact = data().log_evidence
    _assert_log_evidence_within_mcse(_repeat(model, data().args, lambda r: r.log_evidence), exact)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_posterior_matches_exact(problem: str) -> None:
    # The particles are resampled and then moved at temperature 1, so they are an
    # unweighted sample and are treated as (nearly) i.i.d. draws of one chain;
    # ArviZ's MCSE in check_accuracy also absorbs the residual correlation between
    # neighbouring particles that share an ancestor after systematic resampling.
    post = _fit(problem, 0)
    data = PROBLEMS[problem][1]()
    check_accuracy(post, data.site, *data.exact)
    np.testing.assert_allclose(post.sample_stats["log_weight"], -np.log(1000), rtol=1e-12)


def test_layout_traces_and_reproducibility() -> None:
    post = _fit("normal", 0)
    check_layout(post, {"mu": ()}, num_chains=1, num_draws=1000)
    check_finite(post)
    check_arviz(post)
    check_tempered_traces(post)
    assert post.attrs["num_stages"] >= 1
    # The prior draws at temperature 0 are not moved; every later stage but the last
    # moves them between MIN_MOVES and num_mcmc_steps times, and the moves do move.
    moves, rates = post.traces["num_moves"], post.traces["acceptance_rate"]
    assert moves[0] == 0 and np.isnan(rates[0])
    assert np.all((moves[1:-1] >= 2) & (moves[1:-1] <= ENGINE.num_mcmc_steps))
    # the last stage, at temperature 1, moves until decorrelated, up to its own cap
    last_cap = _smc_math.final_max_moves(ENGINE.num_mcmc_steps, ENGINE.adaptive_moves)
    assert 2 <= moves[-1] <= last_cap
    assert post.attrs["num_moves"] == moves.sum()
    assert np.all(rates[1:] > 0.1)
    check_step_rule(post, "hmc", 1)
    runs = iter([post, _run("normal", 0), _fit("normal", 1)])
    check_reproducible(lambda key: next(runs))


def test_last_stage_moves_until_decorrelated() -> None:
    # HMC at temperature 1 on N(0, I_3) from resampled starts (each point 4 times),
    # and short trajectories: the distance rule stops while the draws still remember their
    # start; the last stage's rule moves on until every coordinate's correlation with
    # the start (recomputed here in NumPy) is at most FINAL_CORRELATION.
    def log_parts(u: jax.Array) -> tuple[jax.Array, jax.Array]:
        return -0.5 * jnp.sum(u**2), jnp.zeros(())

    evaluate = _smc_kernels.evaluator(log_parts, 0, needs_grad=True)
    start = jnp.repeat(jax.random.normal(jax.random.PRNGKey(0), (250, 3)), 4, axis=0)
    beta = jnp.ones(())
    cloud = _smc_kernels.Cloud(start, *evaluate(start, beta))
    cap = _smc_math.final_max_moves(10, True)
    out = {}
    for final in (False, True):
        moved_cloud, moved = _smc_kernels.move(
            jax.random.PRNGKey(1),
            cloud,
            jnp.ones((), bool),
            evaluate,
            kernel="hmc",
            num_leapfrog_steps=2,
            beta=beta,
            step=jnp.full((1000, 1), 0.25),
            jitter=0.0,
            precond=jnp.ones(3),
            max_moves=jnp.asarray(cap if final else 10),
            adaptive=True,
            final=final,
        )
        rho = _smc_math.start_correlation(np.asarray(moved_cloud.u), np.asarray(start))
        np.testing.assert_allclose(float(moved.correlation), rho.max(), rtol=1e-6)
        out[final] = int(moved.num_moves), float(rho.max())
    (moves_distance, rho_distance), (moves_final, rho_final) = out[False], out[True]
    assert rho_distance > _smc_math.FINAL_CORRELATION
    assert moves_distance < moves_final < cap and rho_final <= _smc_math.FINAL_CORRELATION


def _exact_mode_weight(y: float = 4.0) -> float:
    def density(z: float) -> float:
        return float(stats.norm.pdf(z, 0.5, 2.0) * stats.norm.pdf(y, z**2, 0.2))

    plus = integrate.quad(density, 0.0, 10.0, points=[2.0], epsabs=0.0, epsrel=1e-10)[0]
    minus = integrate.quad(density, -10.0, 0.0, points=[-2.0], epsabs=0.0, epsrel=1e-10)[0]
    return plus / (plus + minus)


def test_bimodal_target_smc_weights_both_modes_nuts_stays_in_one() -> None:
    exact = _exact_mode_weight()  # P(z > 0 | y) = 0.622
    fractions = _repeat(bimodal_model, (4.0,), lambda r: np.mean(r.draws["z"] > 0))
    # Both modes hold a substantial share in every run (exact shares 0.62 / 0.38).
    assert np.all((fractions > 0.2) & (fractions < 0.8)), fractions
    # Error model: the binomial sd sqrt(p (1 - p) / N) = 0.015 understates SMC's
    # error for a mode's share: once the modes separate (no move crosses between
    # them), each reweighting adds about one binomial variance more, measured 2.3x
    # the binomial sd over 16 keys. So the MCSE comes from repeated runs instead,
    # sd / sqrt(REPEATS), with the t(9) false-failure rate of 0.3 % at 4 MCSE.
    mcse = fractions.std(ddof=1) / np.sqrt(REPEATS)
    assert abs(fractions.mean() - exact) <= 4 * mcse, (fractions, exact, mcse)

    nuts = probdyn.NUTS(num_warmup=200, num_samples=200, progress_bar=False)
    post = probdyn.fit(bimodal_model, 4.0, engine=nuts, key=0)
    share = float(np.mean(post.samples["z"] > 0))
    assert min(share, 1.0 - share) <= 0.01, share  # one chain, one mode


def test_constrained_site_and_minus_infinity_likelihood() -> None:
    y = np.array([0.3, -1.2, 2.0, 0.5, -0.7])

    def joint(s: float) -> float:  # exact posterior and evidence by 1-D quadrature
        return float(stats.gamma.pdf(s, 2.0) * np.prod(stats.norm.pdf(y, 0.0, s)))

    def integral(f: Callable[[float], float]) -> float:
        return integrate.quad(f, 0.0, 2.5, epsabs=0.0, epsrel=1e-12)[0]

    evidence = integral(joint)
    mean = integral(lambda s: s * joint(s)) / evidence
    sd = np.sqrt(integral(lambda s: (s - mean) ** 2 * joint(s)) / evidence)
    post = probdyn.fit(capped_scale_model, y, engine=ENGINE, key=0)
    check_finite(post)
    assert np.all((post.samples["s"] > 0) & (post.samples["s"] < 2.5))
    np.testing.assert_allclose(post.samples["s2"], post.samples["s"] ** 2)
    check_accuracy(post, "s", mean, sd)
    estimates = _repeat(capped_scale_model, (y,), lambda r: r.log_evidence)
    _assert_log_evidence_within_mcse(estimates, np.log(evidence))


@pytest.mark.parametrize(
    "kernel, temperatures",
    [("mala", "adaptive"), ("rw", (0.01, 0.03, 0.1, 0.2, 0.4, 0.7, 1.0))],
)
def test_mala_and_random_walk_kernels_and_a_given_schedule(
    kernel: str, temperatures: str | tuple[float, ...]
) -> None:
    engine = probdyn.SMC(
        num_particles=1000, kernel=kernel, temperatures=temperatures, progress_bar=False
    )
    post = _run("normal", 0, engine)
    data = normal_data()
    check_accuracy(post, "mu", *data.exact)
    check_finite(post)
    if not isinstance(temperatures, str):
        np.testing.assert_array_equal(post.traces["temperature"], (0.0, *temperatures))
    # Moves near the kernels' target acceptance (0.574 MALA, 0.44 one-dimensional RW);
    # none at temperature 0.
    rates = post.traces["acceptance_rate"]
    assert np.isnan(rates[0]) and np.all((rates[1:] > 0.2) & (rates[1:] < 0.95))
    assert np.isfinite(post.log_evidence)
    check_step_rule(post, kernel, 1)


def test_param_sites_are_refused_with_a_pointer_to_minibatch() -> None:
    def model(y: np.ndarray) -> None:
        shift = numpyro.param("shift", 0.0)
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu + shift, 1.0), obs=y)

    with pytest.raises(ValueError, match=r"param sites \['shift'\].*stream='minibatch'"):
        probdyn.fit(model, np.zeros(3), engine=ENGINE, key=0)


def bnn_model(x: np.ndarray, y: np.ndarray) -> None:
    net = BayesianMLP("f", [1, 8, 1])
    with numpyro.plate("data", len(y)):
        numpyro.sample("y", dist.Normal(net(x[:, None])[:, 0], 0.1), obs=y)


def test_bayesian_mlp_runs() -> None:
    x = np.linspace(-1.0, 1.0, 16)
    engine = probdyn.SMC(num_particles=200, num_mcmc_steps=5, progress_bar=False)
    post = probdyn.fit(bnn_model, x, np.sin(3 * x), engine=engine, key=0)
    shapes = {"f.layers.0.weight": (1, 8), "f.layers.0.bias": (8,), "f.layers.1.weight": (8, 1)}
    check_layout(post, shapes, num_chains=1, num_draws=200)
    check_finite(post)
    assert post.traces["temperature"][-1] == 1.0 and np.isfinite(post.log_evidence)
    # The fit learned the curve: prior draws miss sin(3x) (sd 0.7) by about 1 on average;
    # a posterior predictive mean within 3 noise sd (0.3) of it has learned the data.
    residual = post.posterior_predictive["y"].mean(axis=(0, 1)) - np.sin(3 * x)
    assert np.sqrt(np.mean(residual**2)) < 0.3


def test_particles_moved_in_batches_match_one_vmap() -> None:
    # Evaluating 4 particles at a time (lax.map batches) is a speed choice: with the
    # same key it gives the same run as moving all 30 in one vmap, up to float64 rounding.
    x = np.linspace(-1.0, 1.0, 16)
    runs = [
        sample_smc(
            bnn_model,
            (x, np.sin(3 * x)),
            {},
            probdyn.SMC(num_particles=30, num_mcmc_steps=3, particles_per_batch=k),
            key=1,
        )
        for k in (4, 30)
    ]
    assert [r.particles_per_batch for r in runs] == [4, 30]
    batched, whole = runs
    np.testing.assert_allclose(
        batched.traces["temperature"], whole.traces["temperature"], atol=1e-9
    )
    np.testing.assert_allclose(batched.log_evidence, whole.log_evidence, atol=1e-8)
    for site, draws in whole.draws.items():
        np.testing.assert_allclose(batched.draws[site], draws, atol=1e-8, err_msg=site)


def wide_bnn_model(x: np.ndarray, y: np.ndarray) -> None:
    net = BayesianMLP("f", [1, 50, 1])
    with numpyro.plate("data", len(y)):
        numpyro.sample("y", dist.Normal(net(x[:, None])[:, 0], 0.1), obs=y)


def test_particles_per_batch_follows_the_size_of_one_gradient() -> None:
    # On a CPU the default batch holds as many particles as fit CPU_BATCH_BYTES of
    # gradient temporaries: all of them for a scalar model, one at a time for a 50-unit
    # network on 20 000 rows (its activations alone are 20 000 x 50 x 8 bytes = 8 MB).
    engine = probdyn.SMC(num_particles=256)
    small = flat_model(normal_model, normal_data().args, {}, ["mu"], {"y"})
    assert particle_batch_size(small, engine) == 0  # 0: BlackJAX's one vmap
    data = (np.linspace(-1.0, 1.0, 20_000), np.zeros(20_000))
    sites = [
        n
        for n, s in numpyro.handlers.trace(numpyro.handlers.seed(wide_bnn_model, 0))
        .get_trace(*data)
        .items()
        if n != "y"
    ]
    big = flat_model(wide_bnn_model, data, {}, sites, {"y"})
    # On a GPU every particle moves in one vmap, whatever its size.
    assert particle_batch_size(big, engine) == (1 if jax.default_backend() == "cpu" else 0)
    fixed = probdyn.SMC(num_particles=256, particles_per_batch=16)
    assert particle_batch_size(big, fixed) == 16
    every = probdyn.SMC(num_particles=256, particles_per_batch=300)
    assert particle_batch_size(big, every) == 0
    with pytest.raises(ValueError, match="particles_per_batch"):
        probdyn.SMC(particles_per_batch=0)


_SHARDED_SMC = """
import json, sys
import jax
import numpy as np
import probdyn
from probdyn.testing import linear_regression_data, reference_model

problem = linear_regression_data()
model = reference_model("linear_regression", "numpyro")
engine = probdyn.SMC(num_particles=400, num_mcmc_steps=3, progress_bar=False)
post = probdyn.fit(model, *problem.args, engine=engine, key=0)
np.save(sys.argv[1], post.samples["w"])
print(json.dumps({
    "device_count": jax.device_count(),
    "num_devices": post.attrs["num_devices"],
    "log_evidence": post.log_evidence,
    "temperature": post.traces["temperature"].tolist(),
}))
"""


@pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="forces 4 CPU devices; the default backend is not CPU"
)
def test_sharded_particles_match_single_device(tmp_path: Path) -> None:
    # The same fit with the particle axis split over 4 (forced CPU) devices.
    out = tmp_path / "w.npy"
    report = run_on_four_cpu_devices(_SHARDED_SMC, str(out))
    assert report["device_count"] == 4 and report["num_devices"] == 4
    problem = linear_regression_data()
    engine = probdyn.SMC(num_particles=400, num_mcmc_steps=3, progress_bar=False)
    single = probdyn.fit(linear_regression_model, *problem.args, engine=engine, key=0)
    assert single.attrs["num_devices"] == 1
    np.testing.assert_allclose(report["temperature"], single.traces["temperature"], atol=1e-10)
    np.testing.assert_allclose(report["log_evidence"], single.log_evidence, atol=1e-10)
    np.testing.assert_allclose(np.load(out), single.samples["w"], rtol=0, atol=1e-10)


# -- Particles whose log likelihood is not finite --------------------------------------------


def never_valid_model(y: float) -> None:
    """A likelihood that is NaN for every ``mu``."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.factor("broken", jnp.nan * mu)
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_all_invalid_prior_draws_raise() -> None:
    engine = probdyn.SMC(num_particles=50, num_mcmc_steps=2, progress_bar=False)
    with pytest.raises(RuntimeError, match="all 50 prior draws have a non-finite log likelihood"):
        sample_smc(never_valid_model, (0.5,), {}, engine, 0)


def test_stage_checks_read_the_stage_statistics() -> None:
    # A stage counts its valid particles from the log likelihoods its moves computed:
    # no likelihood pass of its own. None valid after a later stage, or a stalled
    # temperature, stop the run with the matching error.
    engine = probdyn.SMC(num_particles=50, progress_bar=False)
    ok = {"temperature": 0.3, "log_increment": -1.0, "all_invalid": False, "num_valid": 50}
    _smc._check_stage(ok, 0.1, 2, 50, engine)  # a good stage passes
    with pytest.raises(RuntimeError, match=r"\(stage 3\) all 50 particles have a non-finite"):
        _smc._check_stage({**ok, "num_valid": 0}, 0.1, 2, 50, engine)
    with pytest.raises(RuntimeError, match=r"\(stage 3\) all 50 particles have a non-finite"):
        _smc._check_stage({**ok, "all_invalid": True}, 0.1, 2, 50, engine)
    with pytest.raises(RuntimeError, match=r"temperature stopped increasing at 0\.3"):
        _smc._check_stage({**ok, "temperature": 0.3}, 0.3, 2, 50, engine)
    with pytest.raises(RuntimeError, match="all 50 prior draws"):
        _smc._check_stage({**ok, "num_valid": 0}, 0.0, 0, 50, engine)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_all_invalid_is_read_off_the_log_likelihood_increment(dtype: type) -> None:
    # A stage reports log mean exp(delta * loglik), loglik = floor where not finite
    # (BlackJAX's formula, written out here): every particle invalid <=> flagged.
    n, floor = 1000, loglik_floor(dtype)

    def increment(loglik: np.ndarray, delta: float) -> jax.Array:
        return jax.nn.logsumexp(jnp.asarray(delta * loglik, dtype)) - jnp.log(n)

    invalid = np.full(n, floor)
    one_poor = invalid.copy()
    one_poor[7] = -1e6  # a single valid particle, with a very low likelihood
    for delta in (1e-3, 0.5, 1.0):
        d = jnp.asarray(delta, dtype)
        assert bool(_smc_program.all_invalid(increment(invalid, delta), d))
        assert not bool(_smc_program.all_invalid(increment(one_poor, delta), d))
        assert not bool(_smc_program.all_invalid(increment(np.zeros(n), delta), d))
    # A stage that did not move the temperature (rejuvenation, or stalled) says nothing.
    zero = jnp.asarray(0.0, dtype)
    assert not bool(_smc_program.all_invalid(increment(invalid, 0.0), zero))
