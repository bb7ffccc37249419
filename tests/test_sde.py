"""NeuralSDE on both backends: strong orders, weak moments, sites, keys, families, errors.

Every test here runs on NumPyro and on Pyro (the ``backend`` fixture,
tests/solver_backends.py); what only one backend has (gradients through its own
autodiff, NUTS, its kinds of key) is in test_sde_numpyro.py and test_sde_pyro.py,
and the two backends' paths and log densities are compared in test_sde_parity.py.

Monte-Carlo error models:

* Strong order: the error at step h is ``E|Z_h(T) - Z(T)|``, estimated over
  ``N`` paths that share one Brownian path across step sizes (coarse increments
  are sums of fine ones). The log-log slope's Monte-Carlo standard error comes
  from the delta method with the paths' error covariance
  (`sde_reference.log_log_slope`). The slope is also biased by the next
  term of the error expansion, ``e(h) = C h^p (1 + O(h^{1/2}))``; over the step
  sizes used here that moves the fitted slope by a few hundredths. The test
  asks ``|slope - p| <= 0.1 + 4 se``: 0.1 is the resolution we need (the
  orders 0.5, 1.0 and 1.5 are 0.5 apart), and a slope off by one order fails.
* Weak moments (OU): the paths are Gaussian (a linear SDE driven by Gaussian
  increments), so the sample mean has standard error ``sd / sqrt(N)`` and the
  sample variance ``var * sqrt(2 / (N - 1))``; each is checked to 4 standard
  errors (two-sided false-failure rate 6e-5 per check). Euler is compared with
  the exact law of the Euler chain (no discretisation bias at all); SRA1 with
  the continuous law, its weak error at h = 0.05 (O(h^2), about 1e-3 relative)
  being far below the Monte-Carlo error.
"""

from __future__ import annotations

import doctest
import functools

import numpy as np
import pytest
import sde_reference
from sde_reference import (
    coarsen,
    gbm_solution,
    log_log_slope,
    ou_euler_chain_moments,
    ou_mean_cov,
)
from solver_backends import BACKENDS, Backend, backend_context

from probdyn.primitives.sde import time_grid


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    """Each backend in turn (Pyro skipped where it is not installed)."""
    with backend_context(request.param) as b:
        yield b


def _times(backend: Backend, times: list[float]):
    """Times as each backend's tests have always passed them: a JAX array, a list."""
    return backend.asarray(times) if backend.name == "numpyro" else times


def test_the_reference_examples_hold() -> None:
    assert doctest.testmod(sde_reference).failed == 0


# -- strong convergence on geometric Brownian motion ------------------------------------------

MU, SIGMA, T, PATHS = 0.5, 0.8, 1.0, 2000
LEVELS = (5, 6, 7, 8, 9)  # dt = 2^-5 ... 2^-9
GBM_SEEDS = {"numpyro": 20240501, "pyro": 20240502}


@functools.cache
def _gbm_paths(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal increments on the finest grid and the exact Z(T)."""
    rng = np.random.default_rng(seed)
    n = 2 ** LEVELS[-1]
    w = rng.standard_normal((n, PATHS)) * np.sqrt(T / n)
    return w, gbm_solution(1.0, MU, SIGMA, T, w.sum(axis=0))


@pytest.mark.parametrize("solver, order", [("euler", 0.5), ("milstein", 1.0)])
def test_strong_order_on_geometric_brownian_motion(
    backend: Backend, solver: str, order: float
) -> None:
    w, exact = _gbm_paths(GBM_SEEDS[backend.name])
    errors, steps = [], []
    for level in LEVELS:
        n, h = 2**level, T / 2**level
        sde = backend.NeuralSDE(
            lambda t, z, a: MU * z, lambda t, z, a: SIGMA * z, dt=h, solver=solver
        )
        coarse = w.reshape(n, -1, PATHS).sum(axis=1)
        z = backend.solve_with(sde, np.ones(PATHS), [0.0, T], coarse / np.sqrt(h))
        errors.append(np.abs(z[-1] - exact))
        steps.append(h)
    slope, se = log_log_slope(np.array(errors).T, steps)
    assert se < 0.03  # enough paths for the slope to mean something
    assert abs(slope - order) <= 0.1 + 4 * se, (slope, se)


# NumPyro: slow suite (six compiled solves); test_sde_parity.py shows that both
# backends take the same SRA1 steps (to 1e-10).
@pytest.mark.parametrize(
    "backend, seed",
    [pytest.param("numpyro", 7, marks=pytest.mark.slow), pytest.param("pyro", 8)],
    indirect=["backend"],
)
def test_srk_has_strong_order_one_and_a_half_for_additive_noise(
    backend: Backend, seed: int
) -> None:
    # No closed form: the reference is SRA1 itself on a grid 16 times finer than
    # the finest tested one, driven by the same (W, H); its error (16^-1.5 = 1.6 %
    # of the finest tested error) barely moves the slope.
    paths, ref_level, levels = 1000, 12, (4, 5, 6, 7, 8)
    rng = np.random.default_rng(seed)
    h_fine = T / 2**ref_level
    w = rng.standard_normal((2**ref_level, paths)) * np.sqrt(h_fine)
    u = h_fine * (0.5 * w + rng.standard_normal(w.shape) * np.sqrt(h_fine / 12))
    xp = backend.xp

    def solve(level: int) -> np.ndarray:
        sde = backend.NeuralSDE.langevin(
            lambda z, a: -z + xp.sin(z) ** 2,
            lambda t, a: 1.0 + t,  # time-dependent: exercises both diffusion evaluations
            dt=T / 2**level,
            solver="srk",
        )
        xi, eta = coarsen(w, u, h_fine, 2 ** (ref_level - level))
        return backend.solve_with(sde, 0.5 * np.ones(paths), [0.0, T], xi, eta)[-1]

    reference = solve(ref_level)
    errors = np.array([np.abs(solve(level) - reference) for level in levels]).T
    slope, se = log_log_slope(errors, [T / 2**level for level in levels])
    assert se < 0.03
    assert abs(slope - 1.5) <= 0.1 + 4 * se, (slope, se)


# -- weak moments of Ornstein–Uhlenbeck with the simulated path ---------------------------------

THETA, OU_MU, OU_SIGMA, X0 = 1.0, 0.5, 0.6, 2.0
OU_TIMES = np.array([0.73, 2.0])  # one off-grid time
OU_PATHS = 4000


@pytest.mark.parametrize("solver", ["euler", "srk"])
def test_ou_moments_with_simulated_path(backend: Backend, solver: str) -> None:
    dt = 0.05
    sde = backend.NeuralSDE.langevin(
        lambda z, a: THETA * (OU_MU - z),
        lambda t, a: OU_SIGMA,
        dt=dt,
        solver=solver,
        brownian="simulate",
    )
    z = backend.to_numpy(sde(X0 * backend.xp.ones(OU_PATHS), OU_TIMES, t0=0.0, key=11))
    if solver == "euler":
        mean, var = ou_euler_chain_moments(OU_TIMES, dt, X0, THETA, OU_MU, OU_SIGMA)
    else:
        mean, cov = ou_mean_cov(OU_TIMES, X0, THETA, OU_MU, OU_SIGMA)
        var = np.diag(cov)
    sd = np.sqrt(var)
    np.testing.assert_array_less(np.abs(z.mean(axis=1) - mean), 4 * sd / np.sqrt(OU_PATHS))
    var_se = var * np.sqrt(2 / (OU_PATHS - 1))
    np.testing.assert_array_less(np.abs(z.var(axis=1, ddof=1) - var), 4 * var_se)


# -- the grid, the sites and the key -----------------------------------------------------------


def test_steps_land_on_irregular_times(backend: Backend) -> None:
    # No noise: Euler on dz = -z is the product of (1 - h) over the grid's steps,
    # and the grid holds every output time exactly.
    times = np.array([0.13, 0.5, 0.52, 1.37])
    sde = backend.NeuralSDE(lambda t, z, a: -z, lambda t, z, a: 0.0 * z, dt=0.2)
    grid, index = time_grid(0.0, times, 0.2, 100)
    expected = np.cumprod(np.concatenate([[1.0], 1 - np.diff(grid)]))[index]
    z = backend.to_numpy(sde(backend.xp.ones(1), times, t0=0.0, key=0))
    np.testing.assert_allclose(z[:, 0], expected, rtol=1e-14)
    np.testing.assert_array_equal(grid[index], times)


@pytest.mark.parametrize(
    "solver, noise, z0, size, sites",
    [
        ("euler", "diagonal", np.ones((4, 2)), None, {"sde.noise": (7, 4, 2)}),
        ("milstein", "diagonal", np.ones(3), None, {"sde.noise": (7, 3)}),
        ("srk", "additive", np.ones(3), None, {"sde.noise": (7, 3), "sde.levy": (7, 3)}),
        ("euler", "general", np.ones((4, 3)), 2, {"sde.noise": (7, 4, 2)}),
    ],
)
def test_latent_sites_names_and_shapes(backend: Backend, solver, noise, z0, size, sites) -> None:
    xp = backend.xp

    def diffusion(t, z, a):
        g = 0.1 * xp.ones_like(z) if noise == "additive" else 0.1 * z
        return xp.stack([g] * size, -1) if noise == "general" else g

    sde = backend.NeuralSDE(
        lambda t, z, a: -z, diffusion, dt=0.25, solver=solver, noise=noise, brownian_size=size
    )

    def model():
        return sde(backend.asarray(z0), backend.asarray([0.0, 0.6, 1.5]))

    tr, returned = backend.sample_sites(model)
    got = {n: tuple(s["value"].shape) for n, s in tr.items()}
    assert got.pop("sde.failed") is not None  # the factor site is always there
    assert got == sites
    assert tuple(returned.shape) == (3, *z0.shape)
    for name, shape in sites.items():  # standard normal: log N(x) = -(x^2 + log 2 pi) / 2
        x = np.random.default_rng(0).standard_normal(shape)
        expected = -0.5 * np.sum(x**2 + np.log(2 * np.pi))
        assert float(tr[name]["fn"].log_prob(backend.asarray(x))) == pytest.approx(expected)


def test_simulate_has_no_sites_and_is_keyed(backend: Backend) -> None:
    sde = backend.NeuralSDE(
        lambda t, z, a: -z, lambda t, z, a: 0.3 * z, dt=0.1, brownian="simulate"
    )
    times = _times(backend, [0.0, 0.5, 1.0])
    ones = backend.xp.ones(5)
    a, b = sde(ones, times, key=3), sde(ones, times, key=backend.key(3))
    c = sde(ones, times, key=4)
    backend.assert_equal(a, b)
    assert not backend.allclose(a, c)

    def model():
        return sde(backend.xp.ones(5), times)  # no key: the model's PRNG (torch's RNG, seeded)

    tr, _ = backend.sample_sites(model)
    assert list(tr) == ["sde.failed"]
    backend.assert_equal(backend.seeded(model, 0), backend.seeded(model, 0))
    assert not backend.allclose(backend.seeded(model, 0), backend.seeded(model, 1))


def test_increments_of_another_grid_are_refused(backend: Backend) -> None:
    sde = backend.NeuralSDE(lambda t, z, a: -z, lambda t, z, a: 0.3 * z, dt=0.1)
    with pytest.raises(ValueError, match=r"'sde.noise' has shape \(5, 2\).*needs \(10, 2\)"):
        backend.solve_with(sde, np.ones(2), [0.0, 1.0], np.zeros((5, 2)))


def test_general_noise_with_diagonal_matrix_equals_diagonal_noise(backend: Backend) -> None:
    noise = np.random.default_rng(0).standard_normal((10, 3))
    times = [0.0, 0.4, 1.0]
    xp = backend.xp

    def f(t, z, a):
        return xp.sin(z) - 0.5 * z

    diag = backend.NeuralSDE(f, lambda t, z, a: 0.3 * xp.cos(z) + t, dt=0.1)
    general = backend.NeuralSDE(
        f,
        lambda t, z, a: xp.diag(0.3 * xp.cos(z) + t),
        dt=0.1,
        noise="general",
        brownian_size=3,
    )
    z0 = np.array([0.1, -0.4, 0.8])
    np.testing.assert_allclose(
        backend.solve_with(general, z0, times, noise),
        backend.solve_with(diag, z0, times, noise),
        rtol=1e-14,
        atol=1e-14,
    )


# -- the stable families ----------------------------------------------------------------------


def test_families_are_their_parameterisations(backend: Backend) -> None:
    noise = np.random.default_rng(2).standard_normal((10, 2))
    z0, times = np.array([0.4, 1.3]), [0.0, 0.3, 1.0]
    NeuralSDE, xp = backend.NeuralSDE, backend.xp

    def drift(t, z, a):
        return xp.tanh(z) - 0.2 * z * t

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
            backend.solve_with(family, z0, times, noise),
            backend.solve_with(plain, z0, times, noise),
            rtol=1e-14,
        )


def test_geometric_is_exact_for_constant_coefficients_and_stays_positive(
    backend: Backend,
) -> None:
    rate, vol, dt = 0.3, 0.5, 0.25
    times = np.array([0.4, 1.0, 2.5])
    grid, index = time_grid(0.0, times, dt, 100)
    noise = np.random.default_rng(3).standard_normal((len(grid) - 1, 2))
    sde = backend.NeuralSDE.geometric(lambda t, z, a: rate, lambda t, a: vol, dt=dt)
    z = backend.solve_with(sde, np.array([1.0, 2.0]), times, noise, t0=0.0)
    w = np.concatenate([np.zeros((1, 2)), np.cumsum(np.sqrt(np.diff(grid))[:, None] * noise, 0)])
    exact = gbm_solution(np.array([1.0, 2.0]), rate, vol, times[:, None], w[index])
    np.testing.assert_allclose(z, exact, rtol=1e-12)
    # A volatility under which Euler on z itself crosses zero within a few steps.
    wild = backend.NeuralSDE.geometric(
        lambda t, z, a: -z, lambda t, a: 3.0, dt=0.5, brownian="simulate"
    )
    out = wild(backend.xp.ones(200), np.linspace(0.0, 5.0, 11), key=0)
    assert np.all(backend.to_numpy(out) > 0)


# -- failed solves and errors ------------------------------------------------------------------


def test_failed_solve_gives_zeros_minus_infinity_and_is_counted(backend: Backend) -> None:
    NeuralSDE, xp = backend.NeuralSDE, backend.xp

    def exploding(times, y=None):
        k = backend.sample("k", backend.dist.Normal(0.0, 1.0))
        sde = NeuralSDE(lambda t, z, a: a * z**3, lambda t, z, a: 0.1 * z, dt=0.5)
        z = sde(xp.ones(1), times, k)
        backend.sample("y", backend.dist.Normal(z[:, 0], 0.1).to_event(1), obs=y)

    times, y = xp.linspace(0.0, 5.0, 6), xp.ones(6)
    noise = np.zeros((10, 1))
    ok = backend.log_density(exploding, (times, y), {"k": -0.1, "sde.noise": noise})
    backend.reset_failed_solves()
    blown = backend.log_density(exploding, (times, y), {"k": 5.0, "sde.noise": noise})
    backend.sync()
    assert np.isfinite(ok) and blown == -np.inf
    assert backend.failed_solves() == 1
    sde = NeuralSDE(lambda t, z, a: 5.0 * z**3, lambda t, z, a: 0.1 * z, dt=0.5)
    backend.assert_equal(sde(xp.ones(1), times, key=0), xp.zeros((6, 1)))


def _f(t, z, a):
    return -z


def _g(t, z, a):
    return 0.1 * z


BAD_OPTIONS = [
    ({"solver": "rk4", "dt": 0.1}, r"solver='rk4'.*\['euler', 'milstein', 'srk'\]"),
    ({"dt": 0.0}, r"dt=0.0.*positive"),
    ({"dt": -1.0}, r"dt=-1.0"),
    ({"dt": 0.1, "noise": "scalar"}, r"noise='scalar'"),
    ({"dt": 0.1, "brownian": "tree"}, r"brownian='tree'.*'latent'.*'simulate'"),
    ({"dt": 0.1, "solver": "milstein", "noise": "general", "brownian_size": 2}, r"euler"),
    ({"dt": 0.1, "solver": "srk"}, r"additive"),
    ({"dt": 0.1, "noise": "general"}, r"brownian_size"),
    ({"dt": 0.1, "brownian_size": 2}, r"brownian_size=2"),
]
BAD_TIMES = [([0.0, 0.5, 0.3], None), ([0.0, 0.5, 0.5], None), ([0.5, 0.7], 1.0)]


@pytest.mark.parametrize("kwargs, match", BAD_OPTIONS)
def test_bad_options_are_refused(backend: Backend, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        backend.NeuralSDE(_f, _g, **kwargs)


def test_bad_calls_are_refused(backend: Backend) -> None:
    NeuralSDE, xp = backend.NeuralSDE, backend.xp
    sde = NeuralSDE(_f, _g, dt=0.1)
    with pytest.raises(ValueError, match=r"strictly increasing.*unsorted"):
        sde(xp.ones(2), _times(backend, [0.0, 0.5, 0.3]), key=0)
    with pytest.raises(ValueError, match="duplicate"):
        sde(xp.ones(2), _times(backend, [0.0, 0.5, 0.5]), key=0)
    with pytest.raises(ValueError, match=r"t0=1\.0 is after"):
        sde(xp.ones(2), _times(backend, [0.5, 0.7]), t0=1.0, key=0)
    with pytest.raises(ValueError, match="max_steps"):
        NeuralSDE(_f, _g, dt=1e-6, max_steps=100)(xp.ones(2), _times(backend, [0.0, 1.0]), key=0)
    bad_shape = NeuralSDE(_f, lambda t, z, a: xp.ones(3), dt=0.1)
    with pytest.raises(ValueError, match=r"diffusion returns shape \(3,\).*\(2,\)"):
        bad_shape(xp.ones(2), _times(backend, [0.0, 0.5]), key=0)
    general = NeuralSDE(_f, _g, dt=0.1, noise="general", brownian_size=2)
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        general(xp.ones(2), _times(backend, [0.0, 0.5]), key=0)
    not_additive = NeuralSDE(_f, _g, dt=0.1, noise="additive")
    with pytest.raises(ValueError, match="depends on the state"):
        not_additive(xp.ones(2), _times(backend, [0.0, 0.5]), key=0)
    geometric = NeuralSDE.geometric(lambda t, z, a: 0.1, lambda t, a: 0.2, dt=0.1)
    with pytest.raises(ValueError, match="positive"):
        geometric(backend.asarray([1.0, -1.0]), _times(backend, [0.0, 0.5]), key=0)
    with pytest.raises(ValueError, match="fixes the noise"):
        NeuralSDE.langevin(lambda z, a: -z, lambda t, a: 1.0, dt=0.1, noise="diagonal")


# -- the same refusals, word for word, on both backends --------------------------------------


@pytest.fixture
def both():
    """NumPyro's and Pyro's backends together (skipped without Pyro)."""
    with backend_context("numpyro") as jax_backend, backend_context("pyro") as torch_backend:
        yield jax_backend, torch_backend


@pytest.mark.parametrize("kwargs", [kwargs for kwargs, _ in BAD_OPTIONS])
def test_same_messages_for_bad_options(both, kwargs) -> None:
    jax_backend, torch_backend = both
    with pytest.raises(ValueError) as jax_error:
        jax_backend.NeuralSDE(_f, _g, **kwargs)
    with pytest.raises(ValueError) as torch_error:
        torch_backend.NeuralSDE(_f, _g, **kwargs)
    assert str(torch_error.value) == str(jax_error.value)


@pytest.mark.parametrize("times, t0", BAD_TIMES)
def test_same_messages_for_bad_times(both, times, t0) -> None:
    jax_backend, torch_backend = both
    with pytest.raises(ValueError) as jax_error:
        jax_backend.NeuralSDE(_f, _g, dt=0.1)(
            jax_backend.xp.ones(2), jax_backend.asarray(times), t0=t0, key=0
        )
    with pytest.raises(ValueError) as torch_error:
        torch_backend.NeuralSDE(_f, _g, dt=0.1)(torch_backend.xp.ones(2), times, t0=t0, key=0)
    assert str(torch_error.value) == str(jax_error.value)
