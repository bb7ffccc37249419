"""probdyn.numpyro NeuralSDE: strong orders, weak moments, sites, NUTS, families, errors.

Monte-Carlo error models:

* Strong order: the error at step h is ``E|Z_h(T) - Z(T)|``, estimated over
  ``N`` paths that share one Brownian path across step sizes (coarse increments
  are sums of fine ones). The log-log slope's Monte-Carlo standard error comes
  from the delta method with the paths' error covariance
  (`probdyn.primitives.sde.log_log_slope`). The slope is also biased by the next
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
* NUTS: one dataset simulated from the model at known theta, sigma (fixed
  seed); the true values must lie in the posterior's central 99 % interval, which
  a calibrated posterior misses with probability 1 % per parameter. A thorough
  SBC-style check over many datasets is separate (issue #5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer.util import log_density

import probdyn
from probdyn.numpyro.primitives.ode import failed_solves, reset_failed_solves
from probdyn.numpyro.primitives.sde import NeuralSDE
from probdyn.primitives.sde import gbm_solution, log_log_slope, ou_mean_cov, time_grid


def _solve_with(sde: NeuralSDE, z0, times, noise, levy=None, args=None, t0=None):
    """Solve with the given standard-normal increments (the latent sites' values)."""
    data = {f"{sde.name}.noise": jnp.asarray(noise)}
    if levy is not None:
        data[f"{sde.name}.levy"] = jnp.asarray(levy)

    def model():
        return sde(jnp.asarray(z0), jnp.asarray(times), args, t0=t0)

    return handlers.substitute(handlers.seed(model, 0), data=data)()


def _trace(model, *args):
    return handlers.trace(handlers.seed(model, 0)).get_trace(*args)


# -- strong convergence on geometric Brownian motion ------------------------------------------

MU, SIGMA, T, PATHS = 0.5, 0.8, 1.0, 2000
LEVELS = (5, 6, 7, 8, 9)  # dt = 2^-5 ... 2^-9


@pytest.fixture(scope="module")
def gbm_paths() -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal increments on the finest grid and the exact Z(T)."""
    rng = np.random.default_rng(20240501)
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
        errors.append(np.abs(np.asarray(z[-1]) - exact))
        steps.append(h)
    slope, se = log_log_slope(np.array(errors).T, steps)
    assert se < 0.03  # enough paths for the slope to mean something
    assert abs(slope - order) <= 0.1 + 4 * se, (slope, se)


def _coarsen(w: np.ndarray, u: np.ndarray, h_fine: float, k: int):
    """Fine (W, U) -> standard normals of the coarse steps' W and Lévy area H.

    ``U_{s,t} = int_s^t (W_r - W_s) dr`` adds up as ``U_{s,t} = U_{s,u} + U_{u,t}
    + (t - u) W_{s,u}``; ``H = U / h - W / 2`` has variance ``h / 12``.
    """
    n = w.shape[0] // k
    wb, ub = w.reshape(n, k, -1), u.reshape(n, k, -1)
    after = h_fine * np.arange(k - 1, -1, -1)[None, :, None]  # time left in the block
    W = wb.sum(axis=1)
    U = ub.sum(axis=1) + (after * wb).sum(axis=1)
    h = h_fine * k
    return W / np.sqrt(h), (U / h - 0.5 * W) / np.sqrt(h / 12)


# Slow suite: six compiled solves. The fast suite covers SRK's order on torch
# (test_sde_pyro.py), and test_sde_parity.py shows that both backends take the
# same SRA1 steps (to 1e-10).
@pytest.mark.slow
def test_srk_has_strong_order_one_and_a_half_for_additive_noise() -> None:
    # No closed form: the reference is SRA1 itself on a grid 16 times finer than
    # the finest tested one, driven by the same (W, H); its error (16^-1.5 = 1.6 %
    # of the finest tested error) barely moves the slope.
    paths, ref_level, levels = 1000, 12, (4, 5, 6, 7, 8)
    rng = np.random.default_rng(7)
    h_fine = T / 2**ref_level
    w = rng.standard_normal((2**ref_level, paths)) * np.sqrt(h_fine)
    u = h_fine * (0.5 * w + rng.standard_normal(w.shape) * np.sqrt(h_fine / 12))

    def solve(level: int) -> np.ndarray:
        sde = NeuralSDE.langevin(
            lambda z, a: -z + jnp.sin(z) ** 2,
            lambda t, a: 1.0 + t,  # time-dependent: exercises both diffusion evaluations
            dt=T / 2**level,
            solver="srk",
        )
        xi, eta = _coarsen(w, u, h_fine, 2 ** (ref_level - level))
        return np.asarray(_solve_with(sde, 0.5 * np.ones(paths), [0.0, T], xi, eta)[-1])

    reference = solve(ref_level)
    errors = np.array([np.abs(solve(level) - reference) for level in levels]).T
    slope, se = log_log_slope(errors, [T / 2**level for level in levels])
    assert se < 0.03
    assert abs(slope - 1.5) <= 0.1 + 4 * se, (slope, se)


# -- weak moments of Ornstein–Uhlenbeck with the simulated path ---------------------------------

THETA, OU_MU, OU_SIGMA, X0 = 1.0, 0.5, 0.6, 2.0
OU_TIMES = np.array([0.73, 2.0])  # one off-grid time
OU_PATHS = 4000


def _ou(solver: str, dt: float) -> NeuralSDE:
    return NeuralSDE.langevin(
        lambda z, a: THETA * (OU_MU - z),
        lambda t, a: OU_SIGMA,
        dt=dt,
        solver=solver,
        brownian="simulate",
    )


def _euler_chain_moments(times: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and variance of the Euler chain on probdyn's grid."""
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
    z = np.asarray(_ou(solver, dt)(X0 * jnp.ones(OU_PATHS), OU_TIMES, t0=0.0, key=11))
    if solver == "euler":
        mean, var = _euler_chain_moments(OU_TIMES, dt)
    else:
        mean, cov = ou_mean_cov(OU_TIMES, X0, THETA, OU_MU, OU_SIGMA)
        var = np.diag(cov)
    sd = np.sqrt(var)
    np.testing.assert_array_less(np.abs(z.mean(axis=1) - mean), 4 * sd / np.sqrt(OU_PATHS))
    var_se = var * np.sqrt(2 / (OU_PATHS - 1))
    np.testing.assert_array_less(np.abs(z.var(axis=1, ddof=1) - var), 4 * var_se)


# -- the grid, the sites and the key -----------------------------------------------------------


def test_steps_land_on_irregular_times() -> None:
    # No noise: Euler on dz = -z is the product of (1 - h) over the grid's steps,
    # and the grid holds every output time exactly.
    times = np.array([0.13, 0.5, 0.52, 1.37])
    sde = NeuralSDE(lambda t, z, a: -z, lambda t, z, a: 0.0 * z, dt=0.2)
    grid, index = time_grid(0.0, times, 0.2, 100)
    expected = np.cumprod(np.concatenate([[1.0], 1 - np.diff(grid)]))[index]
    z = sde(jnp.ones(1), times, t0=0.0, key=0)
    np.testing.assert_allclose(np.asarray(z[:, 0]), expected, rtol=1e-14)
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
def test_latent_sites_names_and_shapes(solver, noise, z0, size, sites) -> None:
    def diffusion(t, z, a):
        g = 0.1 * jnp.ones_like(z) if noise == "additive" else 0.1 * z
        return jnp.stack([g] * size, axis=-1) if noise == "general" else g

    sde = NeuralSDE(
        lambda t, z, a: -z, diffusion, dt=0.25, solver=solver, noise=noise, brownian_size=size
    )

    def model():
        return numpyro.deterministic("z", sde(jnp.asarray(z0), jnp.array([0.0, 0.6, 1.5])))

    tr = _trace(model)
    got = {n: tuple(s["value"].shape) for n, s in tr.items() if s["type"] == "sample"}
    assert got.pop("sde.failed") is not None  # the factor site is always there
    assert got == sites
    assert tr["z"]["value"].shape == (3, *z0.shape)
    for name, shape in sites.items():  # standard normal: log N(x) = -(x^2 + log 2 pi) / 2
        x = np.random.default_rng(0).standard_normal(shape)
        expected = -0.5 * np.sum(x**2 + np.log(2 * np.pi))
        assert float(tr[name]["fn"].log_prob(jnp.asarray(x))) == pytest.approx(expected)


def test_simulate_has_no_sites_and_is_keyed() -> None:
    sde = NeuralSDE(lambda t, z, a: -z, lambda t, z, a: 0.3 * z, dt=0.1, brownian="simulate")
    times = jnp.array([0.0, 0.5, 1.0])
    a, b = sde(jnp.ones(5), times, key=3), sde(jnp.ones(5), times, key=jax.random.key(3))
    c = sde(jnp.ones(5), times, key=4)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))

    def model():
        return sde(jnp.ones(5), times)  # no key: the model's PRNG

    tr = _trace(model)
    assert [n for n, s in tr.items() if s["type"] == "sample"] == ["sde.failed"]
    np.testing.assert_array_equal(
        np.asarray(handlers.seed(model, 0)()), np.asarray(handlers.seed(model, 0)())
    )
    assert not np.allclose(
        np.asarray(handlers.seed(model, 0)()), np.asarray(handlers.seed(model, 1)())
    )


def test_general_noise_with_diagonal_matrix_equals_diagonal_noise() -> None:
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((10, 3))
    times = [0.0, 0.4, 1.0]

    def f(t, z, a):
        return jnp.sin(z) - 0.5 * z

    diag = NeuralSDE(f, lambda t, z, a: 0.3 * jnp.cos(z) + t, dt=0.1)
    general = NeuralSDE(
        f,
        lambda t, z, a: jnp.diag(0.3 * jnp.cos(z) + t),
        dt=0.1,
        noise="general",
        brownian_size=3,
    )
    z0 = np.array([0.1, -0.4, 0.8])
    np.testing.assert_allclose(
        np.asarray(_solve_with(general, z0, times, noise)),
        np.asarray(_solve_with(diag, z0, times, noise)),
        rtol=1e-14,
        atol=1e-14,
    )


def test_milstein_gradient_matches_finite_differences() -> None:
    noise = np.random.default_rng(1).standard_normal((8, 2))

    def loss(p):
        sde = NeuralSDE(
            lambda t, z, a: -a[0] * z, lambda t, z, a: a[1] * jnp.sin(z), dt=0.25, solver="milstein"
        )
        return jnp.sum(_solve_with(sde, np.array([1.0, 0.5]), [0.0, 2.0], noise, args=p) ** 2)

    p = jnp.array([0.7, 0.4])
    grad = jax.grad(loss)(p)
    eps = 1e-6
    fd = [(loss(p.at[i].add(eps)) - loss(p.at[i].add(-eps))) / (2 * eps) for i in range(2)]
    np.testing.assert_allclose(np.asarray(grad), np.asarray(fd), rtol=1e-6)


# -- the stable families ----------------------------------------------------------------------


def test_families_are_their_parameterisations() -> None:
    noise = np.random.default_rng(2).standard_normal((10, 2))
    z0, times = np.array([0.4, 1.3]), [0.0, 0.3, 1.0]

    def drift(t, z, a):
        return jnp.tanh(z) - 0.2 * z * t

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
            np.asarray(_solve_with(family, z0, times, noise)),
            np.asarray(_solve_with(plain, z0, times, noise)),
            rtol=1e-14,
        )


def test_geometric_is_exact_for_constant_coefficients_and_stays_positive() -> None:
    rate, vol, dt = 0.3, 0.5, 0.25
    times = np.array([0.4, 1.0, 2.5])
    grid, index = time_grid(0.0, times, dt, 100)
    noise = np.random.default_rng(3).standard_normal((len(grid) - 1, 2))
    sde = NeuralSDE.geometric(lambda t, z, a: rate, lambda t, a: vol, dt=dt)
    z = np.asarray(_solve_with(sde, np.array([1.0, 2.0]), times, noise, t0=0.0))
    w = np.concatenate([np.zeros((1, 2)), np.cumsum(np.sqrt(np.diff(grid))[:, None] * noise, 0)])
    exact = gbm_solution(np.array([1.0, 2.0]), rate, vol, times[:, None], w[index])
    np.testing.assert_allclose(z, exact, rtol=1e-12)
    # A volatility under which Euler on z itself crosses zero within a few steps.
    wild = NeuralSDE.geometric(lambda t, z, a: -z, lambda t, a: 3.0, dt=0.5, brownian="simulate")
    assert np.all(np.asarray(wild(jnp.ones(200), jnp.linspace(0.0, 5.0, 11), key=0)) > 0)


# -- NUTS on the latent increments -------------------------------------------------------------

TRUE = {"theta": 1.0, "sigma": 0.5}
OBS_TIMES = np.sort(np.random.default_rng(1).uniform(0.2, 6.0, 15))


def ou_model(times, y=None):
    theta = numpyro.sample("theta", dist.LogNormal(0.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    sde = NeuralSDE.langevin(lambda z, a: -a[0] * z, lambda t, a: a[1], dt=0.25)
    z = sde(jnp.ones(1), times, (theta, sigma), t0=0.0)
    numpyro.sample("y", dist.Normal(z[:, 0], 0.1).to_event(1), obs=y)


def test_nuts_on_latent_increments_covers_the_truth() -> None:
    truth = {k: jnp.asarray(v) for k, v in TRUE.items()}
    simulated = handlers.seed(handlers.condition(ou_model, truth), 3)
    y = _trace(simulated, jnp.asarray(OBS_TIMES))["y"]["value"]
    engine = probdyn.NUTS(300, 300, progress_bar=False)
    post = probdyn.fit(ou_model, jnp.asarray(OBS_TIMES), y, engine=engine, key=0)
    assert post.samples["sde.noise"].shape == (1, 300, 37, 1)
    for name, value in TRUE.items():
        lo, hi = np.quantile(np.asarray(post.samples[name]), [0.005, 0.995])
        assert lo < value < hi, (name, lo, hi)
    assert post.predict(jnp.asarray(OBS_TIMES), sites=["y"])["y"].shape == (1, 300, 15)
    # The increments belong to the fit's grid: new times are refused, with the fix.
    with pytest.raises(ValueError, match=r"'sde.noise' has shape \(37, 1\).*second NeuralSDE"):
        post.predict(jnp.linspace(0.5, 9.0, 5), sites=["y"])


# -- failed solves and errors ------------------------------------------------------------------


def exploding(times, y=None):
    k = numpyro.sample("k", dist.Normal(0.0, 1.0))
    sde = NeuralSDE(lambda t, z, a: a * z**3, lambda t, z, a: 0.1 * z, dt=0.5)
    z = sde(jnp.ones(1), times, k)
    numpyro.sample("y", dist.Normal(z[:, 0], 0.1).to_event(1), obs=y)


def test_failed_solve_gives_zeros_minus_infinity_and_is_counted() -> None:
    times, y = jnp.linspace(0.0, 5.0, 6), jnp.ones(6)
    noise = jnp.zeros((10, 1))
    ok, _ = log_density(exploding, (times, y), {}, {"k": -0.1, "sde.noise": noise})
    reset_failed_solves()
    blown, _ = log_density(exploding, (times, y), {}, {"k": 5.0, "sde.noise": noise})
    jax.effects_barrier()
    assert np.isfinite(ok) and blown == -np.inf
    assert failed_solves() == 1
    sde = NeuralSDE(lambda t, z, a: 5.0 * z**3, lambda t, z, a: 0.1 * z, dt=0.5)
    np.testing.assert_array_equal(np.asarray(sde(jnp.ones(1), times, key=0)), np.zeros((6, 1)))


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
        sde(jnp.ones(2), jnp.array([0.0, 0.5, 0.3]), key=0)
    with pytest.raises(ValueError, match="duplicate"):
        sde(jnp.ones(2), jnp.array([0.0, 0.5, 0.5]), key=0)
    with pytest.raises(ValueError, match=r"t0=1\.0 is after"):
        sde(jnp.ones(2), jnp.array([0.5, 0.7]), t0=1.0, key=0)
    with pytest.raises(ValueError, match="key"):
        sde(jnp.ones(2), jnp.array([0.0, 0.5]))
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda t: sde(jnp.ones(2), t, key=0))(jnp.array([0.0, 0.5]))
    with pytest.raises(ValueError, match="max_steps"):
        NeuralSDE(_f, _g, dt=1e-6, max_steps=100)(jnp.ones(2), jnp.array([0.0, 1.0]), key=0)
    bad_shape = NeuralSDE(_f, lambda t, z, a: jnp.ones(3), dt=0.1)
    with pytest.raises(ValueError, match=r"diffusion returns shape \(3,\).*\(2,\)"):
        bad_shape(jnp.ones(2), jnp.array([0.0, 0.5]), key=0)
    general = NeuralSDE(_f, _g, dt=0.1, noise="general", brownian_size=2)
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        general(jnp.ones(2), jnp.array([0.0, 0.5]), key=0)
    not_additive = NeuralSDE(_f, _g, dt=0.1, noise="additive")
    with pytest.raises(ValueError, match="depends on the state"):
        not_additive(jnp.ones(2), jnp.array([0.0, 0.5]), key=0)
    geometric = NeuralSDE.geometric(lambda t, z, a: 0.1, lambda t, a: 0.2, dt=0.1)
    with pytest.raises(ValueError, match="positive"):
        geometric(jnp.array([1.0, -1.0]), jnp.array([0.0, 0.5]), key=0)
    with pytest.raises(ValueError, match="fixes the noise"):
        NeuralSDE.langevin(lambda z, a: -z, lambda t, a: 1.0, dt=0.1, noise="diagonal")
