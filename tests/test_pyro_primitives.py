"""probdyn.pyro primitives: BayesianMLP, lift and NeuralODE (twins of test_bnn/test_ode).

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

from probdyn.pyro import BayesianMLP, NeuralODE, lift  # noqa: E402
from probdyn.pyro.primitives.ode import failed_solves, reset_failed_solves  # noqa: E402


@pytest.fixture(autouse=True)
def float64_and_clean_param_store():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
    torch.set_default_dtype(before)


def _base(site):
    d = site["fn"]
    while hasattr(d, "base_dist"):  # Independent(Normal) -> Normal
        d = d.base_dist
    return d


def _scale(site) -> float:
    """The one scale of a prior expanded to a weight's shape."""
    values = torch.unique(_base(site).scale)
    assert values.numel() == 1
    return float(values)


def _trace(fn):
    """The sample and param sites of one run of ``fn``."""
    nodes = poutine.trace(poutine.seed(fn, rng_seed=0)).get_trace().nodes
    return {n: s for n, s in nodes.items() if s["type"] in ("sample", "param")}


def _bound(tol: float, exact) -> float:
    """Largest allowed |error| of an adaptive solve (see the module docstring)."""
    return 100 * tol * (1 + float(np.max(np.abs(np.asarray(exact)))))


# -- BayesianMLP and lift ---------------------------------------------------------------


def test_sites_shapes_and_forward() -> None:
    tr = _trace(lambda: BayesianMLP("f", [3, 5, 2])(torch.ones(7, 3)))
    assert {n: tuple(s["value"].shape) for n, s in tr.items()} == {
        "f.layers.0.weight": (3, 5),
        "f.layers.0.bias": (5,),
        "f.layers.1.weight": (5, 2),
        "f.layers.1.bias": (2,),
    }
    assert all(s["type"] == "sample" for s in tr.values())
    with poutine.seed(rng_seed=0):
        net = BayesianMLP("f", [3, 5, 2])
    assert net(torch.ones(7, 3)).shape == (7, 2)
    assert net(torch.ones(3)).shape == (2,)
    assert net(torch.ones(4, 7, 3)).shape == (4, 7, 2)


def test_calling_the_network_does_not_touch_pyro() -> None:
    def model():
        net = BayesianMLP("f", [2, 4, 1])
        for _ in range(3):
            net(torch.ones(2))

    assert list(_trace(model)) == [f"f.layers.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")]


def test_prior_as_distribution_mapping_and_callable() -> None:
    tr = _trace(lambda: BayesianMLP("f", [2, 4, 1], prior=dist.Normal(0.0, 0.1)))
    assert _scale(tr["f.layers.0.weight"]) == pytest.approx(0.1)

    mapping = {
        "layers.0.weight": dist.Normal(0.0, 2.0),
        "*.bias": dist.Normal(0.0, 0.5),
        "layers.1.*": dist.Laplace(0.0, 1.0),
    }
    tr = _trace(lambda: BayesianMLP("f", [2, 4, 1], prior=mapping))
    assert isinstance(_base(tr["f.layers.1.weight"]), dist.Laplace)
    assert _scale(tr["f.layers.0.bias"]) == pytest.approx(0.5)
    assert tr["f.layers.0.weight"]["fn"].event_shape == (2, 4)  # the whole tensor is one event

    def by_fan_in(path: str, shape: tuple[int, ...]) -> dist.Distribution:
        return dist.Normal(0.0, 1.0 / math.sqrt(shape[0]))

    tr = _trace(lambda: BayesianMLP("f", [16, 4, 1], prior=by_fan_in))
    assert _scale(tr["f.layers.0.weight"]) == pytest.approx(0.25)


def test_mapping_without_a_match_names_the_path() -> None:
    with pytest.raises(ValueError, match=r"layers\.0\.bias"):
        _trace(lambda: BayesianMLP("f", [2, 3, 1], prior={"*.weight": dist.Normal(0, 1)}))


def test_partial_bnn_last_layer_only() -> None:
    tr = _trace(lambda: BayesianMLP("f", [2, 8, 8, 1], bayesian_layers=[-1]))
    kinds = {n: s["type"] for n, s in tr.items()}
    assert kinds["f.layers.2.weight"] == "sample" and kinds["f.layers.2.bias"] == "sample"
    assert kinds["f.layers.0.weight"] == "param" and kinds["f.layers.1.bias"] == "param"


def test_param_layers_start_deterministically_without_the_global_rng() -> None:
    state = torch.get_rng_state()
    first = BayesianMLP("f", [2, 8, 1], bayesian_layers=[])
    assert torch.equal(torch.get_rng_state(), state)
    pyro.clear_param_store()
    second = BayesianMLP("f", [2, 8, 1], bayesian_layers=[])
    for a, b in zip(first.layers, second.layers):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert first.layers[0].weight.std() > 0


@pytest.mark.parametrize("prior", [1.0, "normal", [dist.Normal(0, 1)]])
def test_prior_that_is_not_a_distribution(prior: object) -> None:
    with pytest.raises(TypeError, match="prior"):
        _trace(lambda: BayesianMLP("f", [2, 3, 1], prior=prior))


def test_callable_prior_returning_a_non_distribution() -> None:
    with pytest.raises(TypeError, match=r"not a pyro\.distributions\.Distribution"):
        _trace(lambda: BayesianMLP("f", [2, 3, 1], prior=lambda path, shape: 0.5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sizes": [2]}, "sizes"),
        ({"sizes": [2, 0, 1]}, "sizes"),
        ({"activation": "swish!"}, "activation"),
        ({"bayesian_layers": [5]}, "bayesian_layers"),
        ({"name": ""}, "name"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"name": "f", "sizes": [2, 3, 1], **kwargs}
    with pytest.raises(ValueError, match=match):
        _trace(lambda: BayesianMLP(**args))


def test_lift_any_torch_module() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    original = {k: v.clone() for k, v in net.state_dict().items()}
    with poutine.trace() as tr, poutine.seed(rng_seed=0):
        sampled = lift("g", net, dist.Normal(0, 1))
    nodes = tr.trace.nodes
    assert nodes["g.0.weight"]["value"].shape == (4, 2)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    w0, b0 = nodes["g.0.weight"]["value"], nodes["g.0.bias"]["value"]
    w2, b2 = nodes["g.2.weight"]["value"], nodes["g.2.bias"]["value"]
    expected = torch.tanh(x @ w0.T + b0) @ w2.T + b2
    torch.testing.assert_close(sampled(x), expected, rtol=1e-14, atol=1e-14)
    assert all(torch.equal(v, original[k]) for k, v in net.state_dict().items())

    tr = _trace(lambda: lift("g", net, dist.Normal(0, 1), bayesian=lambda p: p.startswith("2.")))
    assert tr["g.0.weight"]["type"] == "param"
    assert tr["g.2.weight"]["type"] == "sample"
    # The copy computes with the param store's tensor, so learning reaches it.
    with poutine.seed(rng_seed=0):
        partial = lift("g", net, dist.Normal(0, 1), bayesian=lambda p: p.startswith("2."))
    partial(x).sum().backward()
    assert pyro.param("g.0.weight").grad is not None


def test_lift_refuses_a_pyro_module() -> None:
    with pytest.raises(TypeError, match="PyroModule"):
        _trace(lambda: lift("g", pyro.nn.PyroModule[torch.nn.Linear](2, 1), dist.Normal(0, 1)))


# -- NeuralODE: accuracy ----------------------------------------------------------------


def decay(t, z, k):
    return -k * z


def test_exponential_decay_matches_closed_form() -> None:
    times = torch.tensor([0.0, 0.4, 1.3, 2.0])
    ys = NeuralODE(decay, rtol=1e-10, atol=1e-10)(torch.tensor([2.0, 1.0]), times, args=0.7)
    exact = torch.exp(-0.7 * times)[:, None] * torch.tensor([2.0, 1.0])
    torch.testing.assert_close(ys, exact, rtol=0, atol=_bound(1e-10, exact))


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


def test_t0_keyword_starts_before_first_observation() -> None:
    times = torch.tensor([0.5, 1.0])
    ys = NeuralODE(decay, rtol=1e-10, atol=1e-10)(torch.ones(1), times, args=1.0, t0=0.0)
    torch.testing.assert_close(ys[:, 0], torch.exp(-times), rtol=0, atol=_bound(1e-10, 1.0))


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


def test_batched_times_rows_are_separate_series() -> None:
    times = torch.tensor([[0.0, 0.5, 1.0], [0.2, 0.3, 2.0]])
    z0 = torch.tensor([[1.0], [3.0]])
    ys = NeuralODE(decay, rtol=1e-9, atol=1e-9)(z0, times, args=0.5)
    assert ys.shape == (2, 3, 1)
    for i in range(2):
        exact = z0[i, 0] * torch.exp(-0.5 * (times[i] - times[i, 0]))
        torch.testing.assert_close(ys[i, :, 0], exact, rtol=0, atol=_bound(1e-9, exact))


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


def test_ragged_batch_with_different_starts_equals_per_series_solves(series, z0) -> None:
    ode = NeuralODE(_forced, rtol=1e-9, atol=1e-9)
    ragged = ode(z0, series, args=0.3)
    assert [tuple(r.shape) for r in ragged] == [(4, 2), (2, 2), (5, 2)]
    for i, t in enumerate(series):
        # Different t0: one solve per series, the very same computation.
        torch.testing.assert_close(ragged[i], ode(z0[i], t, args=0.3), rtol=0, atol=0)


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


def exploding_model(times, y=None):
    k = pyro.sample("k", dist.Normal(0.0, 3.0))
    z = NeuralODE(lambda t, z, k: k * z**2, max_steps=64)(torch.ones(1), times, args=k)
    pyro.sample("y", dist.Normal(z[:, 0], 0.1).to_event(1), obs=y)


def _log_density(model, params, *args):
    return poutine.trace(poutine.condition(model, params)).get_trace(*args).log_prob_sum()


def test_failed_solve_gives_minus_infinity_log_density() -> None:
    times = torch.linspace(0.0, 2.0, 5)
    y = torch.ones(5)
    reset_failed_solves()
    ok = _log_density(exploding_model, {"k": torch.tensor(-0.1)}, times, y)
    assert torch.isfinite(ok) and failed_solves() == 0
    blown = _log_density(exploding_model, {"k": torch.tensor(5.0)}, times, y)  # blows up at 0.2
    assert blown == -math.inf
    assert failed_solves() == 1
    reset_failed_solves()
    assert failed_solves() == 0


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


# -- NeuralODE: bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "times, match",
    [
        ([0.0, 0.5, 0.3], "unsorted"),
        ([0.0, 0.5, 0.5], "duplicate"),
        ([0.0, float("nan"), 1.0], "NaN"),
        ([[0.0, 1.0], [1.0, 0.5]], r"times\[1\].*unsorted"),
    ],
)
def test_bad_times(times, match: str) -> None:
    z0 = torch.ones(2, 1) if np.ndim(times) == 2 else torch.ones(1)
    with pytest.raises(ValueError, match=match):
        NeuralODE(decay)(z0, np.array(times), args=1.0)


def test_ragged_series_that_is_not_1d() -> None:
    with pytest.raises(ValueError, match=r"times\[0\] must be a non-empty 1-D array"):
        NeuralODE(decay)(torch.ones(2, 1), [np.array(0.0), np.array([0.0, 1.0])], args=1.0)


def test_state_and_field_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="vector field returns shape"):
        NeuralODE(lambda t, z, a: torch.zeros(3))(torch.ones(2), torch.linspace(0, 1, 3))


def test_one_initial_state_per_series() -> None:
    with pytest.raises(ValueError, match="one initial state per series"):
        NeuralODE(decay)(torch.ones(3, 1), torch.zeros(2, 3) + torch.arange(3.0), args=1.0)


def test_t0_after_the_first_time() -> None:
    with pytest.raises(ValueError, match=r"t0=0\.7 is after"):
        NeuralODE(decay)(torch.ones(1), torch.tensor([0.5, 1.0]), args=1.0, t0=0.7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"solver": "rk45"}, "choose one of"),
        ({"solver": "kvaerno5"}, r"Pyro backend \(torchdiffeq\) has no kvaerno5.*dopri5"),
        ({"adjoint": "forward"}, r"forward mode.*recursive"),
        ({"adjoint": "magic"}, "choose one of"),
        ({"solver": "euler"}, "fixed-step: give dt0"),
        ({"max_steps": 0}, "max_steps"),
        ({"rtol": 0.0}, "rtol"),
        ({"atol": -1.0}, "atol"),
    ],
)
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NeuralODE(decay, **kwargs)


def test_vector_field_must_be_callable() -> None:
    with pytest.raises(TypeError, match="vector_field"):
        NeuralODE(1.0)  # type: ignore[arg-type]
