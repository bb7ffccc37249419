"""NeuralODE: accuracy, batched and ragged times, failed solves, bad input.

The tests that take the ``backend`` fixture run on NumPyro and on Pyro
(tests/solver_backends.py), each backend held to its own tolerance where the two
differ (NumPyro: a relative tolerance; Pyro: `solver_backends.adaptive_bound`, the
error an adaptive solve at ``rtol = atol = tol`` may make). The NumPyro-only tests
(JAX gradients, NUTS) follow them; the Pyro-only ones are in test_pyro_primitives.py.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from solver_backends import BACKENDS, Backend, adaptive_bound, backend_context

import probdyn
from probdyn.numpyro import NeuralODE


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    """Each backend in turn (Pyro skipped where it is not installed)."""
    with backend_context(request.param) as b:
        yield b


def decay(t, z, k):
    return -k * z


def _assert_close(
    backend: Backend, actual: Any, expected: Any, *, numpyro: dict, pyro: dict
) -> None:
    """Each backend's own check: NumPy's ``assert_allclose`` with ``numpyro``'s
    tolerances, torch's ``assert_close`` (which also checks dtypes) with ``pyro``'s."""
    if backend.name == "numpyro":
        np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), **numpyro)
    else:
        backend.xp.testing.assert_close(actual, expected, **pyro)


# -- both backends ------------------------------------------------------------------------------


def test_exponential_decay_matches_closed_form(backend: Backend) -> None:
    times = backend.asarray([0.0, 0.4, 1.3, 2.0])
    ode = backend.NeuralODE(decay, rtol=1e-10, atol=1e-10)
    ys = ode(backend.asarray([2.0, 1.0]), times, args=0.7)
    exact = backend.xp.exp(-0.7 * times)[:, None] * backend.asarray([2.0, 1.0])
    pyro_tol = {"rtol": 0, "atol": adaptive_bound(1e-10, exact)}
    _assert_close(backend, ys, exact, numpyro={"rtol": 1e-8}, pyro=pyro_tol)


def test_t0_keyword_starts_before_first_observation(backend: Backend) -> None:
    times = backend.asarray([0.5, 1.0])
    ode = backend.NeuralODE(decay, rtol=1e-10, atol=1e-10)
    ys = ode(backend.xp.ones(1), times, args=1.0, t0=0.0)
    pyro_tol = {"rtol": 0, "atol": adaptive_bound(1e-10, 1.0)}
    _assert_close(backend, ys[:, 0], backend.xp.exp(-times), numpyro={"rtol": 1e-8}, pyro=pyro_tol)


def test_batched_times_rows_are_separate_series(backend: Backend) -> None:
    times = backend.asarray([[0.0, 0.5, 1.0], [0.2, 0.3, 2.0]])
    z0 = backend.asarray([[1.0], [3.0]])
    ys = backend.NeuralODE(decay, rtol=1e-9, atol=1e-9)(z0, times, args=0.5)
    assert ys.shape == (2, 3, 1)
    for i in range(2):
        exact = z0[i, 0] * backend.xp.exp(-0.5 * (times[i] - times[i, 0]))
        pyro_tol = {"rtol": 0, "atol": adaptive_bound(1e-9, exact)}
        _assert_close(backend, ys[i, :, 0], exact, numpyro={"rtol": 1e-7}, pyro=pyro_tol)


def test_ragged_batch_with_different_starts_equals_per_series_solves(backend: Backend) -> None:
    xp = backend.xp
    ode = backend.NeuralODE(lambda t, z, k: -k * z + xp.sin(t), rtol=1e-9, atol=1e-9)
    series = [
        backend.asarray([0.0, 0.3, 1.1, 2.5]),
        backend.asarray([0.1, 0.9]),
        backend.asarray([0.0, 0.2, 0.4, 0.6, 3.0]),
    ]
    z0 = backend.asarray([[1.0, 2.0], [0.5, 0.1], [2.0, -1.0]])
    ragged = ode(z0, series, args=0.3)
    assert [tuple(r.shape) for r in ragged] == [(4, 2), (2, 2), (5, 2)]
    for i, t in enumerate(series):
        # NumPyro pads the series into one batched solve; Pyro, with different
        # starts, solves one series at a time: the very same computation.
        _assert_close(
            backend,
            ragged[i],
            ode(z0[i], t, args=0.3),
            numpyro={"rtol": 1e-10, "atol": 1e-12},
            pyro={"rtol": 0, "atol": 0},
        )


def test_failed_solve_gives_minus_infinity_log_density_and_is_counted(backend: Backend) -> None:
    def exploding(times, y=None):
        k = backend.sample("k", backend.dist.Normal(0.0, 3.0))
        ode = backend.NeuralODE(lambda t, z, k: k * z**2, max_steps=64)
        z = ode(backend.xp.ones(1), times, args=k)
        backend.sample("y", backend.dist.Normal(z[:, 0], 0.1).to_event(1), obs=y)

    times, y = backend.xp.linspace(0.0, 2.0, 5), backend.xp.ones(5)
    backend.reset_failed_solves()
    ok = backend.log_density(exploding, (times, y), {"k": -0.1})
    backend.sync()
    assert np.isfinite(ok) and backend.failed_solves() == 0
    blown = backend.log_density(exploding, (times, y), {"k": 5.0})  # blows up at t=0.2
    backend.sync()
    assert blown == -np.inf
    assert backend.failed_solves() == 1
    backend.reset_failed_solves()
    assert backend.failed_solves() == 0


@pytest.mark.parametrize(
    "times, match",
    [
        ([0.0, 0.5, 0.3], "unsorted"),
        ([0.0, 0.5, 0.5], "duplicate"),
        ([0.0, float("nan"), 1.0], "NaN"),
        ([[0.0, 1.0], [1.0, 0.5]], r"times\[1\].*unsorted"),
    ],
)
def test_bad_times(backend: Backend, times, match: str) -> None:
    z0 = backend.xp.ones((2, 1)) if np.ndim(times) == 2 else backend.xp.ones(1)
    with pytest.raises(ValueError, match=match):
        backend.NeuralODE(decay)(z0, np.array(times), args=1.0)


def test_ragged_series_that_is_not_1d(backend: Backend) -> None:
    with pytest.raises(ValueError, match=r"times\[0\] must be a non-empty 1-D array"):
        backend.NeuralODE(decay)(
            backend.xp.ones((2, 1)), [np.array(0.0), np.array([0.0, 1.0])], args=1.0
        )


def test_state_and_field_shape_mismatch(backend: Backend) -> None:
    xp = backend.xp
    with pytest.raises(ValueError, match="vector field returns shape"):
        backend.NeuralODE(lambda t, z, a: xp.zeros(3))(xp.ones(2), xp.linspace(0, 1, 3))


def test_one_initial_state_per_series(backend: Backend) -> None:
    xp = backend.xp
    times = xp.zeros((2, 3)) + backend.asarray([0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="one initial state per series"):
        backend.NeuralODE(decay)(xp.ones((3, 1)), times, args=1.0)


def test_t0_after_the_first_time(backend: Backend) -> None:
    with pytest.raises(ValueError, match=r"t0=0\.7 is after"):
        backend.NeuralODE(decay)(backend.xp.ones(1), backend.asarray([0.5, 1.0]), args=1.0, t0=0.7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"solver": "rk45"}, "choose one of"),
        ({"adjoint": "magic"}, "choose one of"),
        ({"solver": "euler"}, "fixed-step: give dt0"),
        ({"max_steps": 0}, "max_steps"),
        ({"rtol": 0.0}, "rtol"),
        ({"atol": -1.0}, "atol"),
    ],
)
def test_bad_options(backend: Backend, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        backend.NeuralODE(decay, **kwargs)


def test_vector_field_must_be_callable(backend: Backend) -> None:
    with pytest.raises(TypeError, match="vector_field"):
        backend.NeuralODE(1.0)


# -- NumPyro only -------------------------------------------------------------------------------


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


def test_kvaerno5_gradient_matches_finite_differences() -> None:
    # kvaerno5's field goes through a guard that keeps the derivatives lineax sees
    # finite (tests/test_bad_input_ode.py); where they are finite anyway, the
    # gradient must be the solver's own.
    times = jnp.linspace(0.0, 2.0, 6)
    ode = NeuralODE(
        lambda t, z, p: jnp.stack([-p[0] * z[0] + p[1] * z[1], p[0] * z[0] - p[2] * z[1]]),
        solver="kvaerno5",
        rtol=1e-10,
        atol=1e-10,
    )

    def loss(p):
        return jnp.sum(ode(jnp.array([1.0, 0.5]), times, args=p) ** 2)

    p = jnp.array([50.0, 0.8, 0.6])  # stiff: rates 0.6 to 50
    grad = jax.grad(loss)(p)
    eps = 1e-6
    fd = np.array(
        [(loss(p.at[i].add(eps)) - loss(p.at[i].add(-eps))) / (2 * eps) for i in range(3)]
    )
    np.testing.assert_allclose(grad, fd, rtol=1e-5)


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
