"""probdyn.pyro NeuralODE: what only the Pyro backend has (the tests both backends share
are in test_ode.py; BayesianMLP: test_bnn).

Accuracy tests run in float64. Tolerances for adaptive solves: with the local error
held at rtol = atol = tol per step, the global error of these short, non-expanding
problems is at most the sum of the local errors, and every solve here takes fewer
than 100 steps, so a solution is within 100 * tol * (1 + |z|) of the truth.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
pytest.importorskip("torchdiffeq")

import numpy as np  # noqa: E402
import pyro.distributions as dist  # noqa: E402
from pyro import poutine  # noqa: E402

from probdyn.pyro import BayesianMLP, NeuralODE  # noqa: E402
from probdyn.pyro.primitives.ode import failed_solves, reset_failed_solves  # noqa: E402


@pytest.fixture(autouse=True)
def float64_and_clean_param_store():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
    torch.set_default_dtype(before)


def _bound(tol: float, exact) -> float:
    """Largest allowed |error| of an adaptive solve (see the module docstring)."""
    return 100 * tol * (1 + float(np.max(np.abs(np.asarray(exact)))))


# -- NeuralODE: accuracy ----------------------------------------------------------------


def decay(t, z, k):
    return -k * z


@pytest.mark.parametrize("solver", ["tsit5", "dopri5", "dopri8", "bosh3"])
def test_every_adaptive_solver_matches_closed_form(solver: str) -> None:
    times = torch.tensor([0.0, 0.4, 1.3, 2.0])
    ys = NeuralODE(decay, solver=solver, rtol=1e-8, atol=1e-8)(torch.ones(2), times, args=0.7)
    exact = torch.exp(-0.7 * times)[:, None].expand(4, 2)
    torch.testing.assert_close(ys, exact, rtol=0, atol=_bound(1e-8, exact))


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2), ("midpoint", 2)])
def test_fixed_step_solvers_converge_at_their_order(solver: str, order: int) -> None:
    # Halving dt0 divides the global error by 2**order once dt0 is small; the
    # observed order is within 0.1 of it at these step sizes.
    times = torch.tensor([0.0, 0.5, 1.0])

    def error(dt0: float) -> float:
        ys = NeuralODE(decay, solver=solver, dt0=dt0)(torch.ones(1), times, args=1.0)
        return float((ys[:, 0] - torch.exp(-times)).abs().max())

    observed = math.log2(error(1e-3) / error(5e-4))
    assert abs(observed - order) < 0.1


def test_numpy_inputs_and_the_dtype_of_z0() -> None:
    ys = NeuralODE(decay)(np.ones(2, dtype=np.float32), np.linspace(0.0, 1.0, 3), args=1.0)
    assert isinstance(ys, torch.Tensor) and ys.dtype == torch.float32 and ys.shape == (3, 2)


def _lotka_volterra(t, z, p):
    return torch.stack([p[0] * z[0] - p[1] * z[0] * z[1], p[1] * z[0] * z[1] - p[2] * z[1]])


@pytest.mark.parametrize("adjoint", ["recursive", "backsolve"])
def test_gradient_matches_finite_differences(adjoint: str) -> None:
    times = torch.linspace(0.0, 2.0, 6)
    ode = NeuralODE(_lotka_volterra, rtol=1e-10, atol=1e-10, adjoint=adjoint)

    def loss(p):
        return (ode(torch.tensor([1.0, 0.5]), times, args=p) ** 2).sum()

    p = torch.tensor([1.0, 0.8, 0.6], requires_grad=True)
    (grad,) = torch.autograd.grad(loss(p), p)
    eps = 1e-4
    with torch.no_grad():
        fd = torch.stack(
            [(loss(p + eps * e) - loss(p - eps * e)) / (2 * eps) for e in torch.eye(3)]
        )
    # Central differences err by eps**2 * |L'''| / 6 (about 1e-6 here: it falls 100x
    # per 10x smaller eps) plus rounding (1e-16 * |L| / eps, negligible); the
    # adjoint's own error is set by the solve tolerance (1e-10). 1e-5 covers both.
    torch.testing.assert_close(grad, fd, rtol=0, atol=1e-5)


def test_backsolve_differentiates_tensors_the_field_closes_over() -> None:
    # The field uses sampled weights and a rate through its closure, not `args`:
    # the continuous adjoint must still find them.
    times = torch.linspace(0.0, 1.0, 4)

    def grads(adjoint: str) -> list:
        pyro.clear_param_store()
        with poutine.seed(rng_seed=1):
            net = BayesianMLP("f", [2, 4, 2], bayesian_layers=[0])
        rate = torch.tensor(0.3, requires_grad=True)
        ode = NeuralODE(
            lambda t, z, a: torch.tanh(net(z)) - rate * z, rtol=1e-10, atol=1e-10, adjoint=adjoint
        )
        ode(torch.tensor([0.5, -0.2]), times).pow(2).sum().backward()
        param = pyro.param("f.layers.1.weight")
        return [rate.grad, param.grad]

    recursive, backsolve = grads("recursive"), grads("backsolve")
    assert all(g is not None and g.abs().max() > 0 for g in backsolve)
    # Both are the gradient of a solution within 1e-10-ish tolerance of the truth.
    for a, b in zip(recursive, backsolve):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


# -- NeuralODE: batched and ragged series -----------------------------------------------


def _forced(t, z, k):
    return -k * z + torch.sin(t)


def _forced_exact(z0, times, t0: float, k: float):
    """Closed form of dz/dt = -k z + sin t from z(t0) = z0."""

    def particular(s):
        return (k * torch.sin(s) - torch.cos(s)) / (1 + k**2)

    t0_ = torch.tensor(t0)
    return (z0 - particular(t0_)) * torch.exp(-k * (times - t0))[:, None] + particular(times)[
        :, None
    ]


SERIES = [[0.0, 0.3, 1.1, 2.5], [0.1, 0.9], [0.0, 0.2, 0.4, 0.6, 3.0]]
Z0 = [[1.0, 2.0], [0.5, 0.1], [2.0, -1.0]]


@pytest.fixture
def series() -> list:
    return [torch.tensor(t) for t in SERIES]


@pytest.fixture
def z0() -> torch.Tensor:
    return torch.tensor(Z0)


def test_ragged_batch_with_a_shared_t0_is_one_solve_over_the_union(series, z0) -> None:
    tol = 1e-9
    ode = NeuralODE(_forced, rtol=tol, atol=tol)
    ragged = ode(z0, series, args=0.3, t0=0.0)
    assert [tuple(r.shape) for r in ragged] == [(4, 2), (2, 2), (5, 2)]
    for i, t in enumerate(series):
        exact = _forced_exact(z0[i], t, 0.0, 0.3)
        torch.testing.assert_close(ragged[i], exact, rtol=0, atol=_bound(tol, exact))
        alone = ode(z0[i], t, args=0.3, t0=0.0)
        torch.testing.assert_close(ragged[i], alone, rtol=0, atol=2 * _bound(tol, exact))


def test_two_d_times_with_a_shared_start(z0) -> None:
    times = torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.3, 2.0]])
    ys = NeuralODE(_forced, rtol=1e-9, atol=1e-9)(z0[:2], times, args=0.3)
    assert ys.shape == (2, 3, 2)
    for i in range(2):
        exact = _forced_exact(z0[i], times[i], 0.0, 0.3)
        torch.testing.assert_close(ys[i], exact, rtol=0, atol=_bound(1e-9, exact))


def test_field_that_cannot_be_vectorised_falls_back_to_per_series(series, z0) -> None:
    def branching(t, z, k):
        if float(z.sum()) > 1e6:  # data-dependent Python control flow defeats vmap
            raise AssertionError("unreachable")
        return -k * z

    ys = NeuralODE(branching, rtol=1e-9, atol=1e-9)(z0, series, args=0.5, t0=0.0)
    for i, t in enumerate(series):
        exact = z0[i] * torch.exp(-0.5 * t)[:, None]
        torch.testing.assert_close(ys[i], exact, rtol=0, atol=_bound(1e-9, exact))


def test_ragged_inside_a_model_gives_the_closed_form_log_density() -> None:
    series = [torch.tensor([0.0, 0.5, 1.5]), torch.tensor([0.2, 2.0])]
    obs = [2.0 * torch.exp(-0.6 * t) for t in series]

    def model():
        k = pyro.sample("k", dist.LogNormal(0.0, 1.0))
        ys = NeuralODE(decay, rtol=1e-10, atol=1e-10)(torch.full((2, 1), 2.0), series, args=k)
        for i, (y, o) in enumerate(zip(ys, obs)):
            pyro.sample(f"y{i}", dist.Normal(y[:, 0], 0.05).to_event(1), obs=o)

    k = torch.tensor(0.5)
    logp = poutine.trace(poutine.condition(model, {"k": k})).get_trace().log_prob_sum()
    expected = dist.LogNormal(0.0, 1.0).log_prob(k)
    for t, o in zip(series, obs):
        expected = expected + dist.Normal(2.0 * torch.exp(-k * (t - t[0])), 0.05).log_prob(o).sum()
    # d logp / dy = |y - o| / 0.05**2 <= 80 per point, times the solve error
    # (100 * 1e-10 * 3) at 5 points.
    torch.testing.assert_close(logp, expected, rtol=0, atol=5 * 80 * _bound(1e-10, 2.0))


# -- NeuralODE: failed solves -----------------------------------------------------------


def test_failed_solve_outside_a_model_returns_zeros_and_counts() -> None:
    reset_failed_solves()
    ys = NeuralODE(lambda t, z, k: k * z**2, max_steps=64)(
        torch.ones(1), torch.tensor([0.0, 1.0]), args=5.0
    )
    assert torch.equal(ys, torch.zeros(2, 1))
    assert failed_solves() == 1


def test_a_failed_series_does_not_spoil_the_others() -> None:
    # dz/dt = 5 z**2 blows up at t = 0.2 from z = 1 but decays like -1 / (1 + 5 t)
    # from z = -1; the shared batched solve fails, and is redone series by series.
    times = torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.5, 1.0]])
    reset_failed_solves()
    ys = NeuralODE(lambda t, z, k: k * z**2, rtol=1e-9, atol=1e-9, max_steps=500)(
        torch.tensor([[1.0], [-1.0]]), times, args=5.0
    )
    assert torch.equal(ys[0], torch.zeros(3, 1))
    exact = -1 / (1 + 5 * times[1])
    torch.testing.assert_close(ys[1, :, 0], exact, rtol=0, atol=_bound(1e-9, exact))
    assert failed_solves() == 1


def test_max_steps_bounds_the_whole_solve() -> None:
    # torchdiffeq's own limit restarts at every output time; ours counts the solve.
    times = torch.linspace(0.0, 10.0, 41)
    reset_failed_solves()
    NeuralODE(decay, rtol=1e-10, atol=1e-10, max_steps=20)(torch.ones(1), times, args=1.0)
    assert failed_solves() == 1
    NeuralODE(decay, rtol=1e-10, atol=1e-10, max_steps=4096)(torch.ones(1), times, args=1.0)
    assert failed_solves() == 1


def test_solving_leaves_the_global_rng_alone(series, z0) -> None:
    state = torch.get_rng_state()
    NeuralODE(_forced)(z0, series, args=0.3, t0=0.0)
    assert torch.equal(torch.get_rng_state(), state)


# -- NeuralODE: what torchdiffeq lacks (the bad input both backends refuse: test_ode.py) --


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"solver": "kvaerno5"}, r"Pyro backend \(torchdiffeq\) has no kvaerno5.*dopri5"),
        ({"adjoint": "forward"}, r"forward mode.*recursive"),
    ],
)
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NeuralODE(decay, **kwargs)
