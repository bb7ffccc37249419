"""Backend parity of NeuralSDE: the same API, the same sites, and given the same
Brownian increments the same path and the same log density (float64). The same
messages for the same bad input are checked in test_sde.py.

Both backends step on the same grid with the same schemes (Euler–Maruyama,
diagonal Itô–Milstein ``y + f h + g dW + J_g^T (g (dW^2 - h) / 2)``, Rößler's
SRA1), so the only differences are in the order of floating-point operations:
a few ulps per step, ~1e-14 over these short solves. 1e-10 is far above that
and far below any difference in the maths (one step's drift is ~1e-2 here).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
pytest.importorskip("torchsde")
jax = pytest.importorskip("jax")
pytest.importorskip("numpyro")

import jax.numpy as jnp  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as ndist  # noqa: E402
import pyro.distributions as pdist  # noqa: E402
from numpyro import handlers  # noqa: E402
from numpyro.infer.util import log_density  # noqa: E402
from pyro import poutine  # noqa: E402

from probdyn.numpyro.primitives.sde import NeuralSDE as JaxSDE  # noqa: E402
from probdyn.primitives.sde import time_grid  # noqa: E402
from probdyn.pyro.primitives.sde import NeuralSDE as TorchSDE  # noqa: E402

TOL = 1e-10


pytestmark = pytest.mark.usefixtures("torch_float64_one_thread")


# -- the same API ------------------------------------------------------------------------------


def _parameters(fn) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize(
    "member", ["__init__", "__call__", "langevin", "linear_noise", "geometric"]
)
def test_same_signatures(member: str) -> None:
    assert _parameters(getattr(TorchSDE, member)) == _parameters(getattr(JaxSDE, member))


# -- the same numbers --------------------------------------------------------------------------

# case -> (how `_build` writes it, NeuralSDE options).
CASES = {
    "euler": ("plain", {"solver": "euler"}),
    "milstein": ("plain", {"solver": "milstein"}),
    "srk": ("additive", {"solver": "srk", "noise": "additive"}),
    "general": ("general", {"solver": "euler", "noise": "general", "brownian_size": 2}),
    "langevin": ("langevin", {"solver": "srk"}),
    "linear_noise": ("linear_noise", {"solver": "milstein"}),
    "geometric": ("geometric", {"solver": "euler"}),
}


def _build(backend, case: str):
    """The same SDE, written once against the backend's array module."""
    cls, xp = (JaxSDE, jnp) if backend == "jax" else (TorchSDE, torch)
    kind, options = CASES[case]

    def drift(t, z, a):
        return a * xp.sin(z) - z**3 + xp.cos(t)

    def sigma(t, a):
        return 0.3 + 0.1 * xp.sin(t)

    if kind == "plain":
        return cls(drift, lambda t, z, a: 0.3 * xp.cos(z) + 0.1 * t, dt=0.1, **options)
    if kind == "additive":
        return cls(drift, lambda t, z, a: sigma(t, a) * xp.ones_like(z), dt=0.1, **options)
    if kind == "general":

        def diffusion(t, z, a):
            return xp.stack([0.3 * xp.cos(z), 0.2 * xp.sin(z) + t], -1)

        return cls(drift, diffusion, dt=0.1, **options)
    if kind == "langevin":
        return cls.langevin(lambda z, a: a * xp.sin(z) - z**3, sigma, dt=0.1, **options)
    if kind == "linear_noise":
        return cls.linear_noise(drift, sigma, dt=0.1, **options)
    return cls.geometric(lambda t, z, a: a * xp.cos(z) - 0.1 * z, sigma, dt=0.1, **options)


TIMES = np.array([0.3, 0.45, 1.0, 1.7, 2.0])  # irregular, and t0 = 0 before the first


def _z0(case: str) -> np.ndarray:
    if case == "general":
        return np.array([[0.5, -0.3, 1.2], [0.1, 0.2, -0.4]])
    return np.array([0.5, 0.3, 1.2]) if case == "geometric" else np.array([0.5, -0.3, 1.2])


def _jax_model(case: str):
    sde = _build("jax", case)
    return lambda: sde(jnp.asarray(_z0(case)), jnp.asarray(TIMES), 0.7, t0=0.0)


def _torch_model(case: str):
    sde = _build("torch", case)
    return lambda: sde(torch.as_tensor(_z0(case)), torch.as_tensor(TIMES), 0.7, t0=0.0)


@pytest.mark.parametrize("case", list(CASES))
def test_same_sites(case: str) -> None:
    tr_jax = handlers.trace(handlers.seed(_jax_model(case), 0)).get_trace()
    tr_torch = poutine.trace(_torch_model(case)).get_trace().nodes
    jax_sites = {n: tuple(s["value"].shape) for n, s in tr_jax.items() if n != "sde.failed"}
    torch_sites = {
        n: tuple(s["value"].shape)
        for n, s in tr_torch.items()
        if s["type"] == "sample" and n != "sde.failed"
    }
    assert jax_sites == torch_sites
    assert "sde.failed" in tr_jax and "sde.failed" in tr_torch


@pytest.mark.parametrize("case", list(CASES))
def test_same_increments_same_path(case: str) -> None:
    tr = handlers.trace(handlers.seed(_jax_model(case), 0)).get_trace()
    noise = {n: np.asarray(s["value"]) for n, s in tr.items() if n in ("sde.noise", "sde.levy")}
    z_jax = np.asarray(handlers.substitute(handlers.seed(_jax_model(case), 1), data=noise)())
    data = {n: torch.as_tensor(v.copy()) for n, v in noise.items()}
    with torch.no_grad():
        z_torch = poutine.condition(_torch_model(case), data=data)().numpy()
    assert np.all(np.isfinite(z_jax)) and z_jax.shape == (len(TIMES), *_z0(case).shape)
    np.testing.assert_allclose(z_torch, z_jax, rtol=TOL, atol=TOL)


# -- the same model log density ----------------------------------------------------------------

OBS_TIMES = np.array([0.4, 1.1, 1.5, 2.6, 3.0])


def _ou_model(sample, dist, sde_cls, ones):
    """The OU model with latent increments, written once against a backend's modules."""

    def model(times, y):
        theta = sample("theta", dist.LogNormal(0.0, 1.0))
        sigma = sample("sigma", dist.HalfNormal(1.0))
        sde = sde_cls.langevin(lambda z, a: -a[0] * z, lambda t, a: a[1], dt=0.25, solver="srk")
        z = sde(ones(1), times, (theta, sigma), t0=0.0)
        sample("y", dist.Normal(z[:, 0], 0.1).to_event(1), obs=y)

    return model


jax_ou = _ou_model(numpyro.sample, ndist, JaxSDE, jnp.ones)
torch_ou = _ou_model(pyro.sample, pdist, TorchSDE, torch.ones)


def test_ou_model_same_log_density_at_the_same_point() -> None:
    rng = np.random.default_rng(5)
    steps = len(time_grid(0.0, OBS_TIMES, 0.25, 100)[0]) - 1
    point = {
        "theta": np.array(0.8),
        "sigma": np.array(0.4),
        "sde.noise": rng.standard_normal((steps, 1)),
        "sde.levy": rng.standard_normal((steps, 1)),
    }
    y = rng.normal(size=5)
    lp_jax, _ = log_density(
        jax_ou,
        (jnp.asarray(OBS_TIMES), jnp.asarray(y)),
        {},
        {k: jnp.asarray(v) for k, v in point.items()},
    )
    data = {k: torch.as_tensor(v) for k, v in point.items()}
    tr = poutine.trace(poutine.condition(torch_ou, data=data)).get_trace(
        torch.as_tensor(OBS_TIMES), torch.as_tensor(y)
    )
    assert float(tr.log_prob_sum()) == pytest.approx(float(lp_jax), rel=TOL, abs=TOL)
