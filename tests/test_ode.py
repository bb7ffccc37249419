"""NeuralODE: accuracy, gradients, batched and ragged times, failed solves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import log_density

import probdyn
from probdyn.numpyro import NeuralODE


def decay(t, z, k):
    return -k * z


def test_exponential_decay_matches_closed_form() -> None:
    times = jnp.array([0.0, 0.4, 1.3, 2.0])
    ys = NeuralODE(decay, rtol=1e-10, atol=1e-10)(jnp.array([2.0, 1.0]), times, args=0.7)
    np.testing.assert_allclose(ys, np.exp(-0.7 * times)[:, None] * [2.0, 1.0], rtol=1e-8)


def test_t0_keyword_starts_before_first_observation() -> None:
    times = jnp.array([0.5, 1.0])
    ys = NeuralODE(decay, rtol=1e-10, atol=1e-10)(jnp.ones(1), times, args=1.0, t0=0.0)
    np.testing.assert_allclose(ys[:, 0], np.exp(-times), rtol=1e-8)


@pytest.mark.parametrize("adjoint", ["recursive", "backsolve"])
def test_gradient_matches_finite_differences(adjoint: str) -> None:
    times = jnp.linspace(0.0, 2.0, 6)
    ode = NeuralODE(
        lambda t, z, p: jnp.stack(
            [p[0] * z[0] - p[1] * z[0] * z[1], p[1] * z[0] * z[1] - p[2] * z[1]]
        ),
        rtol=1e-10,
        atol=1e-10,
        adjoint=adjoint,
    )

    def loss(p):
        return jnp.sum(ode(jnp.array([1.0, 0.5]), times, args=p) ** 2)

    p = jnp.array([1.0, 0.8, 0.6])
    grad = jax.grad(loss)(p)
    eps = 1e-6
    fd = np.array(
        [(loss(p.at[i].add(eps)) - loss(p.at[i].add(-eps))) / (2 * eps) for i in range(3)]
    )
    np.testing.assert_allclose(grad, fd, rtol=1e-5)


def test_batched_times_rows_are_separate_series() -> None:
    times = jnp.array([[0.0, 0.5, 1.0], [0.2, 0.3, 2.0]])
    z0 = jnp.array([[1.0], [3.0]])
    ys = NeuralODE(decay, rtol=1e-9, atol=1e-9)(z0, times, args=0.5)
    assert ys.shape == (2, 3, 1)
    for i in range(2):
        expected = z0[i, 0] * np.exp(-0.5 * (times[i] - times[i, 0]))
        np.testing.assert_allclose(ys[i, :, 0], expected, rtol=1e-7)


def test_ragged_batch_equals_per_series_solves() -> None:
    ode = NeuralODE(lambda t, z, k: -k * z + jnp.sin(t), rtol=1e-9, atol=1e-9)
    series = [
        jnp.array([0.0, 0.3, 1.1, 2.5]),
        jnp.array([0.1, 0.9]),
        jnp.array([0.0, 0.2, 0.4, 0.6, 3.0]),
    ]
    z0 = jnp.array([[1.0, 2.0], [0.5, 0.1], [2.0, -1.0]])
    ragged = ode(z0, series, args=0.3)
    assert [r.shape for r in ragged] == [(4, 2), (2, 2), (5, 2)]
    for i, t in enumerate(series):
        np.testing.assert_allclose(ragged[i], ode(z0[i], t, args=0.3), rtol=1e-10, atol=1e-12)


def test_ragged_inside_a_model_under_nuts() -> None:
    series = [np.array([0.0, 0.5, 1.5]), np.array([0.0, 2.0])]
    obs = [2.0 * np.exp(-0.6 * t) for t in series]

    def model(series, obs):
        k = numpyro.sample("k", dist.LogNormal(0.0, 1.0))
        ys = NeuralODE(decay)(jnp.full((2, 1), 2.0), series, args=k)
        for i, (y, o) in enumerate(zip(ys, obs)):
            numpyro.sample(f"y{i}", dist.Normal(y[:, 0], 0.05), obs=o)

    post = probdyn.fit(model, series, obs, engine=probdyn.NUTS(100, 100, progress_bar=False))
    assert abs(post.samples["k"].mean() - 0.6) < 0.1


def exploding_model(times, y=None):
    k = numpyro.sample("k", dist.Normal(0.0, 3.0))
    z = NeuralODE(lambda t, z, k: k * z**2, max_steps=64)(jnp.ones(1), times, args=k)
    numpyro.sample("y", dist.Normal(z[:, 0], 0.1), obs=y)


def test_failed_solve_gives_minus_infinity_log_density() -> None:
    times = jnp.linspace(0.0, 2.0, 5)
    y = jnp.ones(5)
    ok, _ = log_density(exploding_model, (times, y), {}, {"k": -0.1})
    blown, _ = log_density(exploding_model, (times, y), {}, {"k": 5.0})  # blows up at t=0.2
    assert np.isfinite(ok)
    assert blown == -np.inf


def test_failed_solves_are_rejected_counted_and_reported() -> None:
    times = np.linspace(0.0, 2.0, 5)
    y = 1.0 / (1.0 + 0.3 * times)  # the solution for k = -0.3
    with pytest.warns(RuntimeWarning, match="ODE/SDE solve"):
        post = probdyn.fit(
            exploding_model,
            times,
            y,
            engine=probdyn.NUTS(100, 100, init="sample", progress_bar=False),
            key=3,
        )
    assert post.attrs["num_failed_solves"] > 0
    assert np.all(np.isfinite(post.samples["k"]))
    assert abs(post.samples["k"].mean() + 0.3) < 0.1
