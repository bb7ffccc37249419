"""probdyn.pyro NeuralSDE (the twin of test_sde_numpyro.py, on torchsde).

Monte-Carlo error models (as in test_sde_numpyro.py):

* Strong order: ``E|Z_h(T) - Z(T)|`` over ``N`` paths sharing one Brownian path
  across step sizes; the log-log slope's standard error by the delta method
  (`probdyn.primitives.sde.log_log_slope`); pass if ``|slope - p| <= 0.1 + 4 se``
  (0.1: the resolution that tells the orders 0.5, 1.0, 1.5 apart; it also covers
  the few-hundredths bias of the ``O(h^{1/2})`` next term of the error).
* Weak moments (OU, simulated path): Gaussian paths, so the sample mean and
  variance have standard errors ``sd / sqrt(N)`` and ``var sqrt(2 / (N - 1))``;
  4 standard errors. Euler against the exact law of its own chain, SRA1 against
  the continuous law (its weak error here, O(h^2) ~ 1e-3 relative, is far below
  the Monte-Carlo error).

The posterior-coverage check with NUTS runs on the NumPyro backend (fast to
sample); test_sde_parity.py shows that the two backends' OU models have the same
log density at the same point, and here Pyro's NUTS is only run briefly on it.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
pytest.importorskip("torchsde")

import numpy as np  # noqa: E402
import pyro.distributions as dist  # noqa: E402
from pyro import poutine  # noqa: E402

import probdyn  # noqa: E402
from probdyn.primitives.sde import gbm_solution, log_log_slope, ou_mean_cov, time_grid  # noqa: E402
from probdyn.pyro.primitives.ode import failed_solves, reset_failed_solves  # noqa: E402
from probdyn.pyro.primitives.sde import NeuralSDE  # noqa: E402


@pytest.fixture(autouse=True)
def float64_one_thread_clean_param_store():
    before, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
    torch.set_num_threads(threads)
    torch.set_default_dtype(before)


def _solve_with(sde: NeuralSDE, z0, times, noise, levy=None, args=None, t0=None):
    """Solve with the given standard-normal increments (the latent sites' values)."""
    data = {f"{sde.name}.noise": torch.as_tensor(np.array(noise))}
    if levy is not None:
        data[f"{sde.name}.levy"] = torch.as_tensor(np.array(levy))

    def model():
        return sde(torch.as_tensor(np.array(z0)), torch.as_tensor(np.array(times)), args, t0=t0)

    with torch.no_grad():
        return poutine.condition(model, data=data)().numpy()


def _trace(model, *args):
    return poutine.trace(poutine.seed(model, rng_seed=0)).get_trace(*args)


# -- strong convergence on geometric Brownian motion ------------------------------------------

MU, SIGMA, T, PATHS = 0.5, 0.8, 1.0, 2000
LEVELS = (5, 6, 7, 8, 9)


@pytest.fixture(scope="module")
def gbm_paths() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(20240502)
    n = 2 ** LEVELS[-1]
    w = rng.standard_normal((n, PATHS)) * np.sqrt(T / n)
    return w, gbm_solution(1.0, MU, SIGMA, T, w.sum(axis=0))


@pytest.mark.parametrize("solver, order", [("euler", 0.5), ("milstein", 1.0)])
def test_strong_order_on_geometric_brownian_motion(gbm_paths, solver: str, order: float) -> None:
    w, exact = gbm_paths
    errors, steps = [], []
    for level in LEVELS:
        n, h = 2**level, T / 2**level
        sde = NeuralSDE(lambda t, z, a: MU * z, lambda t, z, a: SIGMA * z, dt=h, solver=solver)
        coarse = w.reshape(n, -1, PATHS).sum(axis=1)
        z = _solve_with(sde, np.ones(PATHS), [0.0, T], coarse / np.sqrt(h))
        errors.append(np.abs(z[-1] - exact))
        steps.append(h)
    slope, se = log_log_slope(np.array(errors).T, steps)
    assert se < 0.03
    assert abs(slope - order) <= 0.1 + 4 * se, (slope, se)


def _coarsen(w: np.ndarray, u: np.ndarray, h_fine: float, k: int):
    """Fine (W, U) -> standard normals of the coarse steps' W and Lévy area H
    (``U_{s,t} = U_{s,u} + U_{u,t} + (t - u) W_{s,u}``, ``H = U / h - W / 2``)."""
    n = w.shape[0] // k
    wb, ub = w.reshape(n, k, -1), u.reshape(n, k, -1)
    after = h_fine * np.arange(k - 1, -1, -1)[None, :, None]
    W = wb.sum(axis=1)
    U = ub.sum(axis=1) + (after * wb).sum(axis=1)
    h = h_fine * k
    return W / np.sqrt(h), (U / h - 0.5 * W) / np.sqrt(h / 12)


def test_srk_has_strong_order_one_and_a_half_for_additive_noise() -> None:
    # Reference: SRA1 on a grid 16 times finer, driven by the same (W, H).
    paths, ref_level, levels = 1000, 12, (4, 5, 6, 7, 8)
    rng = np.random.default_rng(8)
    h_fine = T / 2**ref_level
    w = rng.standard_normal((2**ref_level, paths)) * np.sqrt(h_fine)
    u = h_fine * (0.5 * w + rng.standard_normal(w.shape) * np.sqrt(h_fine / 12))

    def solve(level: int) -> np.ndarray:
        sde = NeuralSDE.langevin(
            lambda z, a: -z + torch.sin(z) ** 2,
            lambda t, a: 1.0 + t,
            dt=T / 2**level,
            solver="srk",
        )
        xi, eta = _coarsen(w, u, h_fine, 2 ** (ref_level - level))
        return _solve_with(sde, 0.5 * np.ones(paths), [0.0, T], xi, eta)[-1]

    reference = solve(ref_level)
    errors = np.array([np.abs(solve(level) - reference) for level in levels]).T
    slope, se = log_log_slope(errors, [T / 2**level for level in levels])
    assert se < 0.03
    assert abs(slope - 1.5) <= 0.1 + 4 * se, (slope, se)


# -- weak moments of Ornstein–Uhlenbeck with the simulated path ---------------------------------

THETA, OU_MU, OU_SIGMA, X0 = 1.0, 0.5, 0.6, 2.0
OU_TIMES = np.array([0.73, 2.0])
OU_PATHS = 4000


def _euler_chain_moments(times: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
    grid, index = time_grid(0.0, times, dt, 10_000)
    mean, var, means, variances = X0, 0.0, [X0], [0.0]
    for h in np.diff(grid):
        mean = mean + THETA * (OU_MU - mean) * h
        var = (1 - THETA * h) ** 2 * var + OU_SIGMA**2 * h
        means.append(mean)
        variances.append(var)
    return np.array(means)[index], np.array(variances)[index]


@pytest.mark.parametrize("solver", ["euler", "srk"])
def test_ou_moments_with_simulated_path(solver: str) -> None:
    dt = 0.05
    sde = NeuralSDE.langevin(
        lambda z, a: THETA * (OU_MU - z),
        lambda t, a: OU_SIGMA,
        dt=dt,
        solver=solver,
        brownian="simulate",
    )
    z = sde(X0 * torch.ones(OU_PATHS), OU_TIMES, t0=0.0, key=11).numpy()
    if solver == "euler":
        mean, var = _euler_chain_moments(OU_TIMES, dt)
    else:
        mean, cov = ou_mean_cov(OU_TIMES, X0, THETA, OU_MU, OU_SIGMA)
        var = np.diag(cov)
    sd = np.sqrt(var)
    np.testing.assert_array_less(np.abs(z.mean(axis=1) - mean), 4 * sd / math.sqrt(OU_PATHS))
    var_se = var * math.sqrt(2 / (OU_PATHS - 1))
    np.testing.assert_array_less(np.abs(z.var(axis=1, ddof=1) - var), 4 * var_se)


# -- the grid, the sites and the key -----------------------------------------------------------


def test_steps_land_on_irregular_times() -> None:
    times = np.array([0.13, 0.5, 0.52, 1.37])
    sde = NeuralSDE(lambda t, z, a: -z, lambda t, z, a: 0.0 * z, dt=0.2)
    grid, index = time_grid(0.0, times, 0.2, 100)
    expected = np.cumprod(np.concatenate([[1.0], 1 - np.diff(grid)]))[index]
    z = sde(torch.ones(1), times, t0=0.0, key=0)
    np.testing.assert_allclose(z[:, 0].numpy(), expected, rtol=1e-14)


@pytest.mark.parametrize(
    "solver, noise, z0, size, sites",
    [
        ("euler", "diagonal", np.ones((4, 2)), None, {"sde.noise": (7, 4, 2)}),
        ("milstein", "diagonal", np.ones(3), None, {"sde.noise": (7, 3)}),
        ("srk", "additive", np.ones(3), None, {"sde.noise": (7, 3), "sde.levy": (7, 3)}),
        ("euler", "general", np.ones((4, 3)), 2, {"sde.noise": (7, 4, 2)}),
    ],
)
def test_latent_sites_names_and_shapes(solver, noise, z0, size, sites) -> None:
    def diffusion(t, z, a):
        g = 0.1 * torch.ones_like(z) if noise == "additive" else 0.1 * z
        return torch.stack([g] * size, dim=-1) if noise == "general" else g

    sde = NeuralSDE(
        lambda t, z, a: -z, diffusion, dt=0.25, solver=solver, noise=noise, brownian_size=size
    )

    def model():
        return sde(torch.as_tensor(z0), torch.tensor([0.0, 0.6, 1.5]))

    tr = _trace(model)
    got = {n: tuple(s["value"].shape) for n, s in tr.nodes.items() if s["type"] == "sample"}
    assert got.pop("sde.failed") is not None
    assert got == sites
    assert tuple(tr.nodes["_RETURN"]["value"].shape) == (3, *z0.shape)
    for name, shape in sites.items():
        x = np.random.default_rng(0).standard_normal(shape)
        expected = -0.5 * np.sum(x**2 + np.log(2 * np.pi))
        got_lp = float(tr.nodes[name]["fn"].log_prob(torch.as_tensor(x)))
        assert got_lp == pytest.approx(expected)


def test_simulate_has_no_sites_and_is_keyed() -> None:
    sde = NeuralSDE(lambda t, z, a: -z, lambda t, z, a: 0.3 * z, dt=0.1, brownian="simulate")
    times = [0.0, 0.5, 1.0]
    a = sde(torch.ones(5), times, key=3)
    b = sde(torch.ones(5), times, key=torch.Generator().manual_seed(3))
    c = sde(torch.ones(5), times, key=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)

    def model():
        return sde(torch.ones(5), times)  # no key: torch's RNG, seeded like pyro.sample

    tr = _trace(model)
    assert [n for n, s in tr.nodes.items() if s["type"] == "sample"] == ["sde.failed"]
    same = poutine.seed(model, rng_seed=0)(), poutine.seed(model, rng_seed=0)()
    torch.testing.assert_close(*same, rtol=0, atol=0)
    assert not torch.allclose(same[0], poutine.seed(model, rng_seed=1)())


def test_increments_of_another_grid_are_refused() -> None:
    sde = NeuralSDE(lambda t, z, a: -z, lambda t, z, a: 0.3 * z, dt=0.1)
    with pytest.raises(ValueError, match=r"'sde.noise' has shape \(5, 2\).*needs \(10, 2\)"):
        _solve_with(sde, np.ones(2), [0.0, 1.0], np.zeros((5, 2)))


def test_general_noise_with_diagonal_matrix_equals_diagonal_noise() -> None:
    noise = np.random.default_rng(0).standard_normal((10, 3))
    times = [0.0, 0.4, 1.0]

    def f(t, z, a):
        return torch.sin(z) - 0.5 * z

    diag = NeuralSDE(f, lambda t, z, a: 0.3 * torch.cos(z) + t, dt=0.1)
    general = NeuralSDE(
        f,
        lambda t, z, a: torch.diag(0.3 * torch.cos(z) + t),
        dt=0.1,
        noise="general",
        brownian_size=3,
    )
    z0 = np.array([0.1, -0.4, 0.8])
    np.testing.assert_allclose(
        _solve_with(general, z0, times, noise),
        _solve_with(diag, z0, times, noise),
        rtol=1e-14,
        atol=1e-14,
    )


def test_milstein_gradient_matches_finite_differences() -> None:
    noise = torch.as_tensor(np.random.default_rng(1).standard_normal((8, 2)))

    def loss(p):
        sde = NeuralSDE(
            lambda t, z, a: -a[0] * z,
            lambda t, z, a: a[1] * torch.sin(z),
            dt=0.25,
            solver="milstein",
        )

        def model():
            return sde(torch.tensor([1.0, 0.5]), [0.0, 2.0], p)

        return (poutine.condition(model, data={"sde.noise": noise})() ** 2).sum()

    p = torch.tensor([0.7, 0.4], requires_grad=True)
    (grad,) = torch.autograd.grad(loss(p), p)
    eps = 1e-6
    with torch.no_grad():
        fd = [
            (loss(p + eps * torch.eye(2)[i]) - loss(p - eps * torch.eye(2)[i])) / (2 * eps)
            for i in range(2)
        ]
    np.testing.assert_allclose(grad.numpy(), np.array([float(v) for v in fd]), rtol=1e-6)


# -- the stable families ----------------------------------------------------------------------


def test_families_are_their_parameterisations() -> None:
    noise = np.random.default_rng(2).standard_normal((10, 2))
    z0, times = np.array([0.4, 1.3]), [0.0, 0.3, 1.0]

    def drift(t, z, a):
        return torch.tanh(z) - 0.2 * z * t

    def sigma(t, a):
        return 0.3 + 0.1 * t

    pairs = [
        (
            NeuralSDE.langevin(lambda z, a: drift(0.0, z, a), sigma, dt=0.1),
            NeuralSDE(
                lambda t, z, a: drift(0.0, z, a), lambda t, z, a: sigma(t, a) + 0 * z, dt=0.1
            ),
        ),
        (
            NeuralSDE.linear_noise(drift, sigma, dt=0.1, solver="milstein"),
            NeuralSDE(drift, lambda t, z, a: sigma(t, a) * z, dt=0.1, solver="milstein"),
        ),
    ]
    for family, plain in pairs:
        np.testing.assert_allclose(
            _solve_with(family, z0, times, noise), _solve_with(plain, z0, times, noise), rtol=1e-14
        )


def test_geometric_is_exact_for_constant_coefficients_and_stays_positive() -> None:
    rate, vol, dt = 0.3, 0.5, 0.25
    times = np.array([0.4, 1.0, 2.5])
    grid, index = time_grid(0.0, times, dt, 100)
    noise = np.random.default_rng(3).standard_normal((len(grid) - 1, 2))
    sde = NeuralSDE.geometric(lambda t, z, a: rate, lambda t, a: vol, dt=dt)
    z = _solve_with(sde, np.array([1.0, 2.0]), times, noise, t0=0.0)
    w = np.concatenate([np.zeros((1, 2)), np.cumsum(np.sqrt(np.diff(grid))[:, None] * noise, 0)])
    exact = gbm_solution(np.array([1.0, 2.0]), rate, vol, times[:, None], w[index])
    np.testing.assert_allclose(z, exact, rtol=1e-12)
    wild = NeuralSDE.geometric(lambda t, z, a: -z, lambda t, a: 3.0, dt=0.5, brownian="simulate")
    assert bool((wild(torch.ones(200), np.linspace(0.0, 5.0, 11), key=0) > 0).all())


# -- NUTS on the latent increments (a short run: the sampler sees the sites) -------------------

OBS_TIMES = np.sort(np.random.default_rng(1).uniform(0.2, 6.0, 15))


def ou_model(times, y=None):
    theta = pyro.sample("theta", dist.LogNormal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    sde = NeuralSDE.langevin(lambda z, a: -a[0] * z, lambda t, a: a[1], dt=0.5)
    z = sde(torch.ones(1), times, (theta, sigma), t0=0.0)
    pyro.sample("y", dist.Normal(z[:, 0], 0.1).to_event(1), obs=y)


# Pyro's initial step-size search can propose an extreme theta, whose Euler chain
# overflows: that solve fails and the proposal is rejected, by design (see the
# failed-solve test below), and fit warns about it.
@pytest.mark.filterwarnings(r"ignore:\d+ .*solve\(s\) failed:RuntimeWarning")
def test_nuts_runs_on_latent_increments() -> None:
    truth = {"theta": torch.tensor(1.0), "sigma": torch.tensor(0.5)}
    times = torch.as_tensor(OBS_TIMES)
    y = _trace(poutine.condition(ou_model, truth), times).nodes["y"]["value"]
    engine = probdyn.NUTS(15, 15, max_tree_depth=4, progress_bar=False)
    post = probdyn.fit(ou_model, times, y, engine=engine, key=0)
    steps = len(time_grid(0.0, OBS_TIMES, 0.5, 100)[0]) - 1
    assert post.samples["sde.noise"].shape == (1, 15, steps, 1)
    for name in ("theta", "sigma", "sde.noise"):
        assert np.all(np.isfinite(post.samples[name]))
    assert np.unique(post.samples["sde.noise"][0, :, 0, 0]).size > 1  # the sites moved


# -- failed solves and errors ------------------------------------------------------------------


def exploding(times, y=None):
    k = pyro.sample("k", dist.Normal(0.0, 1.0))
    sde = NeuralSDE(lambda t, z, a: a * z**3, lambda t, z, a: 0.1 * z, dt=0.5)
    z = sde(torch.ones(1), times, k)
    pyro.sample("y", dist.Normal(z[:, 0], 0.1).to_event(1), obs=y)


def test_failed_solve_gives_zeros_minus_infinity_and_is_counted() -> None:
    times, y = torch.linspace(0.0, 5.0, 6), torch.ones(6)

    def log_density(k: float) -> float:
        data = {"k": torch.tensor(k), "sde.noise": torch.zeros(10, 1)}
        tr = poutine.trace(poutine.condition(exploding, data=data)).get_trace(times, y)
        return float(tr.log_prob_sum())

    ok = log_density(-0.1)
    reset_failed_solves()
    blown = log_density(5.0)
    assert math.isfinite(ok) and blown == -math.inf
    assert failed_solves() == 1
    sde = NeuralSDE(lambda t, z, a: 5.0 * z**3, lambda t, z, a: 0.1 * z, dt=0.5)
    torch.testing.assert_close(sde(torch.ones(1), times, key=0), torch.zeros(6, 1))


def _f(t, z, a):
    return -z


def _g(t, z, a):
    return 0.1 * z


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"solver": "rk4", "dt": 0.1}, r"solver='rk4'.*\['euler', 'milstein', 'srk'\]"),
        ({"dt": 0.0}, r"dt=0.0.*positive"),
        ({"dt": -1.0}, r"dt=-1.0"),
        ({"dt": 0.1, "noise": "scalar"}, r"noise='scalar'"),
        ({"dt": 0.1, "brownian": "tree"}, r"brownian='tree'.*'latent'.*'simulate'"),
        ({"dt": 0.1, "solver": "milstein", "noise": "general", "brownian_size": 2}, r"euler"),
        ({"dt": 0.1, "solver": "srk"}, r"additive"),
        ({"dt": 0.1, "noise": "general"}, r"brownian_size"),
        ({"dt": 0.1, "brownian_size": 2}, r"brownian_size=2"),
    ],
)
def test_bad_options_are_refused(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        NeuralSDE(_f, _g, **kwargs)


def test_bad_calls_are_refused() -> None:
    sde = NeuralSDE(_f, _g, dt=0.1)
    with pytest.raises(ValueError, match=r"strictly increasing.*unsorted"):
        sde(torch.ones(2), [0.0, 0.5, 0.3], key=0)
    with pytest.raises(ValueError, match="duplicate"):
        sde(torch.ones(2), [0.0, 0.5, 0.5], key=0)
    with pytest.raises(ValueError, match=r"t0=1\.0 is after"):
        sde(torch.ones(2), [0.5, 0.7], t0=1.0, key=0)
    with pytest.raises(TypeError, match="key"):
        sde(torch.ones(2), [0.0, 0.5], key="seed")
    with pytest.raises(ValueError, match="max_steps"):
        NeuralSDE(_f, _g, dt=1e-6, max_steps=100)(torch.ones(2), [0.0, 1.0], key=0)
    bad_shape = NeuralSDE(_f, lambda t, z, a: torch.ones(3), dt=0.1)
    with pytest.raises(ValueError, match=r"diffusion returns shape \(3,\).*\(2,\)"):
        bad_shape(torch.ones(2), [0.0, 0.5], key=0)
    general = NeuralSDE(_f, _g, dt=0.1, noise="general", brownian_size=2)
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        general(torch.ones(2), [0.0, 0.5], key=0)
    not_additive = NeuralSDE(_f, _g, dt=0.1, noise="additive")
    with pytest.raises(ValueError, match="depends on the state"):
        not_additive(torch.ones(2), [0.0, 0.5], key=0)
    geometric = NeuralSDE.geometric(lambda t, z, a: 0.1, lambda t, a: 0.2, dt=0.1)
    with pytest.raises(ValueError, match="positive"):
        geometric(torch.tensor([1.0, -1.0]), [0.0, 0.5], key=0)
    with pytest.raises(ValueError, match="fixes the noise"):
        NeuralSDE.langevin(lambda z, a: -z, lambda t, a: 1.0, dt=0.1, noise="diagonal")
