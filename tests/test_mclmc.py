"""MCLMC (BlackJAX's microcanonical Langevin sampler) on the NumPyro backend.

The shared contract (layout, ArviZ round trip, same key same draws, accuracy against
both exact posteriors, the Pyro backend's error) is checked by tests/test_conformance.py
("mclmc"). Here: what only MCLMC has (its sample stats and tuned values, thinning,
the blocks of the progress bar not changing the draws, starts from a `Posterior`),
its config checks, and its errors.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import probdyn
from probdyn.testing import check_accuracy, linear_regression_data, reference_model

ENGINE = probdyn.MCLMC(num_warmup=200, num_samples=60, num_chains=2, thinning=3, progress_bar=False)
STATS = ("lp", "energy_change", "kinetic_change", "diverging", "step_size")


def _blr(engine: probdyn.MCLMC, key: int = 0) -> probdyn.Posterior:
    model = reference_model("linear_regression", "numpyro")
    return probdyn.fit(model, *linear_regression_data().args, engine=engine, key=key)


@functools.cache
def _fit() -> probdyn.Posterior:
    return _blr(ENGINE)


def test_sample_stats_and_tuned_values() -> None:
    post = _fit()
    assert post.samples["w"].shape == (2, 60, 3)
    assert set(STATS) <= set(post.sample_stats)
    for name in STATS:
        assert post.sample_stats[name].shape == (2, 60), name
    step = post.sample_stats["step_size"]
    assert np.all(step > 0) and np.all(step == step[:, :1])  # one tuned value per chain
    assert len(post.attrs["L"]) == 2 and all(v > 0 for v in post.attrs["L"])
    assert len(post.attrs["initial_step_size"]) == 2
    assert all(v > 0 for v in post.attrs["initial_step_size"])
    # 80 / 10 / 10 % of num_warmup, no preconditioning: exactly num_warmup steps.
    assert post.attrs["tuning_steps"] == 200
    assert len(post.attrs["energy_variance_per_dim"]) == 2
    idata = post.to_arviz()
    assert set(STATS) <= set(idata.sample_stats.data_vars)


def test_lp_is_the_models_log_density_at_the_draws() -> None:
    # lp must be NumPyro's -potential_energy (unconstrained, with Jacobians) at the
    # kept draw, as NUTS's lp: recompute it independently from the draws.
    import jax.numpy as jnp
    from numpyro.infer.util import potential_energy

    post = _fit()
    model = reference_model("linear_regression", "numpyro")
    args = linear_regression_data().args
    for c, d in [(0, 0), (1, 59), (0, 31)]:
        pe = potential_energy(model, args, {}, {"w": jnp.asarray(post.samples["w"][c, d])})
        np.testing.assert_allclose(post.sample_stats["lp"][c, d], -float(pe), rtol=1e-10)


def test_blocks_do_not_change_the_draws() -> None:
    # Draw i's key is fold_in(chain key, i): with a progress bar the 60 draws run in
    # 20 blocks of 3, without one in one call, and the draws are the same bit for bit.
    with_bar = _blr(dataclasses.replace(ENGINE, progress_bar=True))
    np.testing.assert_array_equal(with_bar.samples["w"], _fit().samples["w"])
    np.testing.assert_array_equal(with_bar.sample_stats["lp"], _fit().sample_stats["lp"])


def test_start_from_a_posterior() -> None:
    # Chains start at the given posterior's draws, spread evenly over them: chain 0
    # at draw 0 (the exact posterior mean), chain 1 at draw 1 (w = 30, 100s of sds
    # away). After 40 tuning steps chain 0 is in the bulk and chain 1 still far off
    # (it moves at most one step size per step), so the first kept draw tells the starts.
    problem = linear_regression_data()
    starts = np.stack([problem.mean, np.full(3, 30.0)])[None]
    short = dataclasses.replace(
        ENGINE, num_warmup=40, num_samples=2, thinning=1, init=probdyn.Posterior({"w": starts})
    )
    first = _blr(short).samples["w"][:, 0]
    sd = np.sqrt(np.diag(problem.cov))
    assert np.all(np.abs(first[0] - problem.mean) < 6 * sd)
    assert np.all(np.abs(first[1] - problem.mean) > 6 * sd)


def test_concentrated_posterior_started_at_its_mode() -> None:
    # 50 independent Normal(0, 1e-3) coordinates, both chains started at the mode (as
    # an ensemble member starts a network's chain at its MAP), in float32 as the UCI
    # benchmark runs. BlackJAX's first step size guess, sqrt(50) / 4 = 1.8, is 1800
    # sds: its first tuning step threw a chain so far out (log density -1e8, where
    # float32 rounding turns the energy errors into noise) that it never came back
    # (mean 184 sds off, measured; in float64 it came back); on power-plant it froze
    # 3 of 4 chains. The tuner must start from a step size on the target's scale.
    # Tolerances: thinned draws of these 60-draw chains have a bulk ESS of tens per
    # coordinate, so |chain mean| / sd averages about 0.8 / sqrt(ESS) ~ 0.15 over
    # coordinates and the sd ratio is within a few % of 1; 0.5 and (0.8, 1.25) fail
    # only a chain with a handful of effective draws.
    scale, dim = 1e-3, 50

    def model() -> None:
        numpyro.sample("x", dist.Normal(0.0, scale).expand([dim]).to_event(1))

    engine = dataclasses.replace(ENGINE, num_samples=60, init="median")
    with jax.enable_x64(False):  # float32, JAX's default and the UCI benchmark's
        post = probdyn.fit(model, engine=engine, key=0)
    x = post.samples["x"]  # (chain, draw, dim)
    assert x.dtype == np.float32
    off = np.mean(np.abs(x.mean(axis=1)), axis=-1) / scale
    ratio = np.mean(x.std(axis=1), axis=-1) / scale
    assert np.all(off < 0.5), off
    assert np.all((ratio > 0.8) & (ratio < 1.25)), ratio
    assert np.all(np.asarray(post.attrs["initial_step_size"]) < np.sqrt(dim) / 4)


def test_a_chain_that_never_moves_is_reported() -> None:
    from probdyn.numpyro.engines.mclmc import _warn_frozen

    rng = np.random.default_rng(0)
    flat = rng.normal(size=(3, 5, 4))
    _warn_frozen(flat, np.ones(3))  # all chains move: no warning (warnings are errors)
    _warn_frozen(flat[:, :1], np.ones(3))  # one draw per chain: nothing to tell
    flat[1] = flat[1, 0]
    with pytest.warns(RuntimeWarning, match=r"chain\(s\) \[1\] did not move"):
        _warn_frozen(flat, np.array([0.1, 0.0, 0.1]))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: probdyn.MCLMC(num_warmup=19), "num_warmup >= 20"),
        (lambda: probdyn.MCLMC(num_warmup=0), "num_warmup"),
        (lambda: probdyn.MCLMC(num_samples=0), "num_samples"),
        (lambda: probdyn.MCLMC(num_chains=1.5), "num_chains"),
        (lambda: probdyn.MCLMC(thinning=0), "thinning"),
        (lambda: probdyn.MCLMC(desired_energy_variance=0.0), "desired_energy_variance"),
        (lambda: probdyn.MCLMC(desired_energy_variance=float("inf")), "desired_energy_var"),
        (lambda: probdyn.MCLMC(diagonal_preconditioning="yes"), "diagonal_preconditioning"),
        (lambda: probdyn.MCLMC(init="zeros"), "init"),
    ],
)
def test_config_checks(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_config_defaults_and_misspelt_option() -> None:
    engine = probdyn.MCLMC()
    assert (engine.num_warmup, engine.num_samples, engine.thinning) == (50000, 1000, 10)
    assert engine.to_dict()["engine"] == "MCLMC"
    assert probdyn.MCLMC(init="ensemble").init == "ensemble"
    with pytest.raises(TypeError, match="Did you mean 'thinning'"):
        probdyn.MCLMC(thining=5)


@pytest.mark.usefixtures("torch_float64_one_thread")
def test_pyro_backend_names_the_numpyro_backend() -> None:
    model = reference_model("linear_regression", "pyro")
    args = linear_regression_data().args
    with pytest.raises(NotImplementedError, match="MCLMC runs on the NumPyro backend"):
        probdyn.fit(model, *args, engine=ENGINE, backend="pyro")


def test_discrete_latent_site_is_refused() -> None:
    def model(y):
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu + z, 1.0), obs=y)

    with pytest.raises(ValueError, match="discrete"):
        probdyn.fit(model, np.zeros(3), engine=ENGINE)


@pytest.mark.slow
def test_diagonal_preconditioning_is_accurate() -> None:
    problem = linear_regression_data()
    engine = probdyn.MCLMC(
        num_warmup=2000,
        num_samples=500,
        num_chains=2,
        diagonal_preconditioning=True,
        progress_bar=False,
    )
    post = _blr(engine)
    assert post.traces["inverse_mass_matrix"].shape == (2, 3)
    # BlackJAX re-tunes the step size for num_warmup * 0.1 / 3 more steps.
    assert post.attrs["tuning_steps"] == 2000 + 200 // 3
    check_accuracy(post, problem.site, *problem.exact)


def test_pyro_refuses_before_fitting_an_ensemble_start(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pyro")
    import pyro
    import pyro.distributions as pdist

    def model() -> None:
        pyro.sample("a", pdist.Normal(0.0, 1.0))
        pyro.sample("b", pdist.Normal(0.0, 1.0))

    from probdyn.core import backends

    def no_ensemble(*args: object, **kwargs: object) -> None:
        raise AssertionError("the ensemble start was fitted")

    real = backends.get_runner
    import sys

    monkeypatch.setattr(
        sys.modules["probdyn.core.fit"],
        "get_runner",
        lambda engine, backend, variant="": (
            no_ensemble if isinstance(engine, probdyn.Ensemble) else real(engine, backend, variant)
        ),
    )
    engine = probdyn.MCLMC(num_warmup=20, num_samples=5, num_chains=2, init="ensemble")
    with pytest.raises(NotImplementedError, match="NumPyro backend only"):
        probdyn.fit(model, engine=engine, backend="pyro")
