"""The NumPyro Ensemble engine: MAP members, anchored (randomised-MAP) members, sharding.

Accuracy tests use the conjugate reference models of `probdyn.testing`, whose
posteriors are Gaussian with a mean linear in the data: there an anchored member
is an exact, independent posterior draw, so K members are K i.i.d. draws.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from engine_backends import run_on_four_cpu_devices
from numpyro.distributions import constraints
from numpyro.infer.util import log_density

import probdyn
from probdyn.numpyro import BayesianMLP
from probdyn.testing import (
    check_accuracy,
    check_arviz,
    check_finite,
    check_layout,
    linear_regression_data,
    normal_data,
    reference_model,
)

PROBLEMS = {"normal": normal_data(), "linear_regression": linear_regression_data()}
EVENT = {"normal": {"mu": ()}, "linear_regression": {"w": (3,)}}

# Anchored members of these convex quadratic objectives converge to their optimum to
# float precision in 1000 Adam steps (the MAP test below checks the same schedule),
# so the draws' only error is Monte-Carlo error.
ANCHORED = probdyn.Ensemble(
    num_members=400,
    num_steps=1000,
    learning_rate=0.05,
    anchored=True,
    progress_bar=False,
)
# Small run shared by the reproducibility and sharding tests (8 members divide
# among 4 devices).
SMALL = probdyn.Ensemble(num_members=8, num_steps=200, learning_rate=0.05, anchored=True)


def _fit(name: str, engine: probdyn.Ensemble, key: int = 0) -> probdyn.Posterior:
    model = reference_model(name, "numpyro")
    return probdyn.fit(model, *PROBLEMS[name].args, engine=engine, key=key)


@pytest.fixture(scope="module")
def anchored() -> dict[str, probdyn.Posterior]:
    return {name: _fit(name, ANCHORED) for name in PROBLEMS}


@pytest.fixture(scope="module")
def small() -> probdyn.Posterior:
    return _fit("linear_regression", dataclasses.replace(SMALL, progress_bar=False))


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_anchored_ensemble_is_exact_posterior_sample(
    anchored: dict[str, probdyn.Posterior], name: str
) -> None:
    # Error model: the 400 members are i.i.d. exact posterior draws, so the sample
    # mean errs by N(0, sd^2 / 400) (MCSE = sd / 20) and the sample sd by about
    # sd / sqrt(2 * 400); check_accuracy allows 4 of those per element (false
    # failure ~6e-5 per element).
    post, problem = anchored[name], PROBLEMS[name]
    check_accuracy(post, problem.site, *problem.exact, num_mcse=4.0)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_layout_arviz_finite(anchored: dict[str, probdyn.Posterior], name: str) -> None:
    post = anchored[name]
    check_layout(post, EVENT[name], num_chains=1, num_draws=ANCHORED.num_members)
    check_finite(post)
    check_arviz(post)
    assert post.traces["loss"].shape == (ANCHORED.num_members, ANCHORED.num_steps)
    assert post.sample_stats["lp"].shape == (1, ANCHORED.num_members)
    assert np.all(np.isfinite(post.traces["loss"]))
    # Every member ends below where it started.
    assert np.all(post.traces["loss"][:, -1] < post.traces["loss"][:, 0])
    assert post.attrs["latent_sites"] == sorted(EVENT[name])
    assert post.attrs["num_devices"] >= 1


@pytest.mark.parametrize(("name", "optimizer"), [("normal", "sgd"), ("linear_regression", "adam")])
def test_plain_ensemble_recovers_map(name: str, optimizer: str) -> None:
    # For a Gaussian posterior the MAP is the posterior mean. The objective is a
    # strongly convex quadratic, which both optimisers solve to float precision
    # in 1000 steps; 1e-6 is 1e-5 posterior sds, so a member anywhere but the
    # optimum fails. (Plain SGD at this rate diverges on the regression, whose
    # largest curvature is ~300: hence Adam there.)
    engine = probdyn.Ensemble(
        num_members=6,
        num_steps=1000,
        learning_rate=0.05,
        optimizer=optimizer,
        progress_bar=False,
    )
    post, problem = _fit(name, engine), PROBLEMS[name]
    draws = post.samples[problem.site][0]
    np.testing.assert_allclose(draws, np.broadcast_to(problem.mean, draws.shape), atol=1e-6)
    # Members start apart (init_scale=1) ...
    assert np.ptp(post.traces["loss"][:, 0]) > 1.0
    # ... and lp is the model's log joint density at the optimum.
    model = reference_model(name, "numpyro")
    exact_lp, _ = log_density(model, problem.args, {}, {problem.site: jnp.asarray(problem.mean)})
    np.testing.assert_allclose(post.sample_stats["lp"][0], float(exact_lp), rtol=1e-10)


def test_reproducible(small: probdyn.Posterior) -> None:
    again = _fit("linear_regression", SMALL)  # with the progress bar, which changes nothing
    other = _fit("linear_regression", SMALL, key=1)
    np.testing.assert_array_equal(small.samples["w"], again.samples["w"])
    np.testing.assert_array_equal(small.traces["loss"], again.traces["loss"])
    assert not np.array_equal(small.samples["w"], other.samples["w"])
    # The members are distinct draws.
    assert len(np.unique(small.samples["w"][0, :, 0])) == SMALL.num_members


_SHARDED_RUN = """
import json, os, sys
import jax
import numpy as np
import probdyn
from probdyn.numpyro.engines.shard import num_devices_of, shard_leading
from probdyn.testing import linear_regression_data, reference_model

engine = probdyn.Ensemble(**json.loads(sys.argv[1]))
problem = linear_regression_data()
model = reference_model("linear_regression", "numpyro")
post = probdyn.fit(model, *problem.args, engine=engine, key=0)
np.save(sys.argv[2], post.samples["w"])
print(json.dumps({
    "device_count": jax.device_count(),
    "x64": bool(jax.config.jax_enable_x64),
    "num_devices": post.attrs["num_devices"],
    "shard_divisible": num_devices_of(shard_leading(jax.numpy.zeros((8, 2)))),
    "shard_indivisible": num_devices_of(shard_leading(jax.numpy.zeros((6, 2)))),
}))
"""


def test_members_stepped_in_batches_match_one_vmap(small: probdyn.Posterior) -> None:
    # Stepping 3 of the 8 members at a time (lax.map batches, the last one short) is a
    # speed choice: the same members and losses as one vmap, up to float64 rounding.
    engine = dataclasses.replace(SMALL, progress_bar=False, members_per_batch=3)
    batched = _fit("linear_regression", engine)
    np.testing.assert_allclose(batched.samples["w"], small.samples["w"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(batched.traces["loss"], small.traces["loss"], rtol=1e-10)
    with pytest.raises(ValueError, match="members_per_batch"):
        probdyn.Ensemble(members_per_batch=0)


@pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="forces 4 CPU devices; the default backend is not CPU"
)
def test_sharded_members_match_single_device(small: probdyn.Posterior, tmp_path: Path) -> None:
    config = {
        "num_members": SMALL.num_members,
        "num_steps": SMALL.num_steps,
        "learning_rate": SMALL.learning_rate,
        "anchored": SMALL.anchored,
        "progress_bar": False,
    }
    out = tmp_path / "w.npy"
    report = run_on_four_cpu_devices(_SHARDED_RUN, json.dumps(config), str(out))
    assert report["device_count"] == 4 and report["x64"]
    # The members' final values came back split over the 4 devices ...
    assert report["num_devices"] == 4
    # ... by the documented rule: leading axis divisible -> sharded, else one device.
    assert report["shard_divisible"] == 4
    assert report["shard_indivisible"] == 1
    sharded = np.load(out)
    # Same key -> same draws up to rounding, not bit for bit: each device runs a
    # program compiled for 2 members instead of 8, and XLA may vectorise and fuse
    # the per-member sums differently, which changes the last bit (measured:
    # 2e-16). 1e-10 is far below any algorithmic difference (posterior sd ~0.1).
    np.testing.assert_allclose(sharded, small.samples["w"], rtol=0, atol=1e-10)


def _param_model(x: Any, y: Any = None) -> None:
    w = numpyro.sample("w", dist.Normal(0.0, 1.0))
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    numpyro.deterministic("noise", sigma)
    mu = numpyro.deterministic("mu", w * x)
    with numpyro.plate("data", len(x)):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


def test_param_sites_are_per_member_and_used_by_predict() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=25)
    y = 0.7 * x + rng.normal(0.0, 0.3, 25)
    # Few steps: the members have not converged, so their params still differ.
    engine = probdyn.Ensemble(num_members=5, num_steps=20, learning_rate=0.05, progress_bar=False)
    post = probdyn.fit(_param_model, x, y, engine=engine, key=0)
    check_layout(post, {"w": (), "sigma": ()}, num_chains=1, num_draws=5)
    check_finite(post)
    assert "sigma" in post.attrs["latent_sites"] and not post.params
    sigma = post.samples["sigma"][0]
    assert np.all(sigma > 0) and len(np.unique(sigma)) == 5
    x_new = np.linspace(-2.0, 2.0, 7)
    pred = post.predict(x_new, key=0)
    np.testing.assert_allclose(pred["noise"][0], sigma, rtol=1e-12)
    np.testing.assert_allclose(pred["mu"][0], post.samples["w"][0][:, None] * x_new, rtol=1e-12)
    assert pred["y"].shape == (1, 5, 7)


def test_bayesian_mlp_plugs_in() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-2.0, 2.0, (40, 1))
    y = np.sin(2 * x[:, 0]) + rng.normal(0.0, 0.1, 40)

    def model(x: Any, y: Any = None) -> None:
        net = BayesianMLP("f", [1, 8, 1])
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", dist.Normal(net(x)[..., 0], 0.1), obs=y)

    engine = probdyn.Ensemble(num_members=4, num_steps=300, learning_rate=0.02, progress_bar=False)
    post = probdyn.fit(model, x, y, engine=engine, key=0)
    events = {
        "f.layers.0.weight": (1, 8),
        "f.layers.0.bias": (8,),
        "f.layers.1.weight": (8, 1),
        "f.layers.1.bias": (1,),
    }
    check_layout(post, events, num_chains=1, num_draws=4)
    check_finite(post)
    loss = post.traces["loss"]
    assert np.all(loss[:, -1] < 0.5 * loss[:, 0])
    pred = post.predict(np.linspace(-2.0, 2.0, 9)[:, None], key=1)
    assert pred["y"].shape == (1, 4, 9) and np.all(np.isfinite(pred["y"]))


def test_bad_models_raise() -> None:
    def no_latents(y: Any) -> None:
        numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    def discrete() -> None:
        numpyro.sample("k", dist.Poisson(3.0))

    engine = probdyn.Ensemble(num_members=2, num_steps=5, progress_bar=False)
    with pytest.raises(ValueError, match="no latent sample sites or params"):
        probdyn.fit(no_latents, np.ones(3), engine=engine, key=0)
    with pytest.raises(ValueError, match="'k' is discrete"):
        probdyn.fit(discrete, engine=engine, key=0)


# -- Blocks of steps -----------------------------------------------------------------------


def test_blocks_run_exactly_num_steps() -> None:
    # 73 steps run in ceil(73 / 50) = 2-step blocks, the last one with one step past
    # the end that must change nothing. With a constant learning rate the path does
    # not depend on num_steps, so a 74-step run passes through the 73-step run's end:
    # its 74th loss (before its last step) is the 73-step run's final objective,
    # -lp (plain members). Had the 73-step run taken a 74th step, it would not be.
    base = probdyn.Ensemble(
        num_members=4,
        num_steps=73,
        learning_rate=0.05,
        final_learning_rate_fraction=1.0,
        progress_bar=False,
    )
    post = _fit("normal", base)
    longer = _fit("normal", dataclasses.replace(base, num_steps=74))
    shown = _fit("normal", dataclasses.replace(base, progress_bar=True))
    assert post.traces["loss"].shape == (4, 73)
    np.testing.assert_array_equal(longer.traces["loss"][:, :73], post.traces["loss"])
    np.testing.assert_allclose(
        -post.sample_stats["lp"][0], longer.traces["loss"][:, 73], rtol=1e-13
    )
    assert not np.allclose(longer.traces["loss"][:, 73], longer.traces["loss"][:, 72], rtol=1e-13)
    # The progress bar changes only how the blocks are reported.
    np.testing.assert_array_equal(shown.samples["mu"], post.samples["mu"])
    np.testing.assert_array_equal(shown.traces["loss"], post.traces["loss"])
