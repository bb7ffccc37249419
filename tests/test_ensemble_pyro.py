"""The Pyro Ensemble runner (probdyn/pyro/engines/ensemble.py).

Accuracy: anchored members of Bayesian linear regression are independent exact
posterior draws, so their mean and sd must match the analytic posterior within
4 Monte-Carlo standard errors (`check_accuracy`: MCSE of the mean is sd/sqrt(K)
for independent draws, of the sd exact/sqrt(2K); a correct engine fails one of the
six scalar checks with probability about 4e-4). Plain members of a model with one
mode all converge to that mode, the MAP, which for a Gaussian posterior is the
posterior mean.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from engine_backends import check_keys_leave_torch_rng_alone, models

import probdyn
from probdyn.pyro import BayesianMLP
from probdyn.pyro.engines.ensemble import _MemberOptimizer
from probdyn.testing import (
    check_accuracy,
    check_arviz,
    check_finite,
    check_layout,
    linear_regression_data,
    normal_data,
    reference_model,
)

BLR = reference_model("linear_regression", "pyro")
NORMAL = reference_model("normal", "pyro")
# 600 Adam steps from 0.2 down to 0.002 reach these optima to ~1e-6 (the MCSE of the
# accuracy check below is ~5e-3).
PLAIN = probdyn.Ensemble(
    num_members=8,
    num_steps=600,
    learning_rate=0.2,
    final_learning_rate_fraction=0.01,
    progress_bar=False,
)


pytestmark = pytest.mark.usefixtures("torch_float64_one_thread")
pyro_models = models("pyro")


def _fit(model: Any, args: tuple[Any, ...], engine: probdyn.Ensemble, key: Any = 0) -> Any:
    return probdyn.fit(model, *args, engine=engine, key=key, backend="pyro")


def test_anchored_members_are_exact_posterior_draws() -> None:
    problem = linear_regression_data()
    engine = dataclasses.replace(PLAIN, num_members=200, anchored=True)
    post = _fit(BLR, problem.args, engine)
    assert post.attrs["batched"] is True
    check_accuracy(post, "w", *problem.exact)


def test_plain_members_all_reach_the_map_and_layout() -> None:
    problem = linear_regression_data()
    post = _fit(BLR, problem.args, PLAIN)
    members = post.samples["w"][0]
    # Gaussian posterior: MAP = posterior mean; Adam's end-of-run error is ~1e-10 here.
    np.testing.assert_allclose(members, np.broadcast_to(problem.mean, members.shape), atol=1e-6)
    check_layout(post, {"w": (3,)}, num_chains=1, num_draws=8)
    check_finite(post)
    check_arviz(post)
    assert post.traces["loss"].shape == (8, 600)
    assert post.sample_stats["lp"].shape == (1, 8)
    # lp is the final log joint: minus the last loss (plain members are not anchored).
    np.testing.assert_allclose(post.sample_stats["lp"][0], -post.traces["loss"][:, -1], atol=1e-6)
    assert np.all(post.traces["loss"][:, -1] <= post.traces["loss"][:, 0])
    assert post.attrs["engine"]["engine"] == "Ensemble"
    assert post.attrs["wall_time"] > 0


def test_same_key_same_members_and_global_rng_untouched() -> None:
    problem = normal_data()
    engine = dataclasses.replace(PLAIN, num_steps=100)
    fit = lambda key: _fit(NORMAL, problem.args, engine, key)
    check_keys_leave_torch_rng_alone(fit, problem.args[0], generator_seed=3, predict_key=2)


def test_loop_fallback_matches_the_batched_run() -> None:
    problem = normal_data()
    engine = probdyn.Ensemble(
        num_members=6, num_steps=200, learning_rate=0.05, anchored=True, progress_bar=False
    )
    batched = _fit(NORMAL, problem.args, engine)
    looped = _fit(pyro_models.normal_unbatchable, problem.args, engine)
    assert batched.attrs["batched"] is True and looped.attrs["batched"] is False
    np.testing.assert_allclose(looped.samples["mu"], batched.samples["mu"], rtol=1e-10)
    np.testing.assert_allclose(looped.traces["loss"], batched.traces["loss"], rtol=1e-10)


def _partial_bnn(x: Any, y: Any = None) -> None:
    x = torch.as_tensor(x)
    net = BayesianMLP("f", [1, 8, 1], bayesian_layers=[-1])  # layer 0: param sites
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(net(x).squeeze(-1), 0.1), obs=None if y is None else y)


def test_bayesian_mlp_members_have_their_own_params() -> None:
    rng = np.random.default_rng(0)
    x = np.linspace(-2.0, 2.0, 30)[:, None]
    y = np.sin(2 * x[:, 0]) + 0.1 * rng.normal(size=30)
    engine = probdyn.Ensemble(num_members=5, num_steps=300, learning_rate=0.02, progress_bar=False)
    post = _fit(_partial_bnn, (x, y), engine)
    assert post.attrs["batched"] is True
    shapes = {"f.layers.0.weight": (1, 8), "f.layers.0.bias": (8,), "f.layers.1.weight": (8, 1)}
    check_layout(post, shapes, num_chains=1, num_draws=5)
    check_finite(post)
    assert post.params == {}  # per-member params are draws, not shared values
    assert "f.layers.0.weight" in post.attrs["latent_sites"]
    first = post.samples["f.layers.0.weight"][0]
    assert not np.allclose(first[0], first[1])  # members start and end apart
    assert np.all(post.traces["loss"][:, -1] < post.traces["loss"][:, 0])
    assert post.predict(x[:4], key=0)["y"].shape == (1, 5, 4)


# -- Skipped steps: per-member optimiser state --------------------------------------------


def _quadratic_grad(x: torch.Tensor) -> torch.Tensor:
    """The gradient of ``(x - b) A (x - b) / 2``, ``A`` positive definite."""
    curvature = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 3.0]], dtype=x.dtype)
    return (x - torch.tensor([1.0, -2.0, 0.5], dtype=x.dtype)) @ curvature


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_a_skipped_member_resumes_where_it_stopped(optimizer: str) -> None:
    # Member 1's first 3 steps are skipped (NaN loss); from then on it must follow
    # member 0's path 3 steps behind: its learning rate and Adam's bias correction
    # count its own steps, as each member's optax state does in the NumPyro runner
    # (a step counter shared by all members, as in torch.optim, breaks this).
    engine = probdyn.Ensemble(
        num_members=2, num_steps=20, learning_rate=0.1, optimizer=optimizer, progress_bar=False
    )
    flat = torch.zeros((2, 3))
    opt = _MemberOptimizer(engine, flat)
    path = [flat[0].clone()]
    for step in range(engine.num_steps):
        loss = torch.tensor([0.0, torch.nan if step < 3 else 0.0])
        opt.step(flat, _quadratic_grad(flat), loss)
        path.append(flat[0].clone())
    assert torch.equal(flat[1], path[-4]) and not torch.equal(flat[1], flat[0])

    # And the same path as the NumPyro runner's optax optimiser, step for step.
    import jax.numpy as jnp
    import optax

    from probdyn.numpyro.engines.ensemble import _optimizer

    tx = _optimizer(engine)
    x = jnp.zeros(3)
    state = tx.init(x)
    for step in range(engine.num_steps):
        grad = jnp.asarray(_quadratic_grad(torch.tensor(np.asarray(x))).numpy())
        updates, state = tx.update(grad, state, x)
        x = optax.apply_updates(x, updates)
        np.testing.assert_allclose(np.asarray(x), path[step + 1].numpy(), rtol=1e-12, atol=1e-15)
