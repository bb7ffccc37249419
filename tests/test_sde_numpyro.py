"""probdyn.numpyro NeuralSDE: what only the NumPyro backend has (JAX gradients, NUTS
coverage, JAX keys and traced times). The tests both backends share are in
test_sde.py.

Monte-Carlo error model (NUTS): one dataset simulated from the model at known
theta, sigma (fixed seed); the true values must lie in the posterior's central
99 % interval, which a calibrated posterior misses with probability 1 % per
parameter. A thorough SBC-style check over many datasets is separate (issue #5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers

import probdyn
from probdyn.numpyro.primitives.sde import NeuralSDE


def _trace(model, *args):
    return handlers.trace(handlers.seed(model, 0)).get_trace(*args)


def test_milstein_gradient_matches_finite_differences() -> None:
    noise = jnp.asarray(np.random.default_rng(1).standard_normal((8, 2)))

    def loss(p):
        sde = NeuralSDE(
            lambda t, z, a: -a[0] * z, lambda t, z, a: a[1] * jnp.sin(z), dt=0.25, solver="milstein"
        )

        def model():
            return sde(jnp.array([1.0, 0.5]), jnp.asarray([0.0, 2.0]), p)

        z = handlers.substitute(handlers.seed(model, 0), data={"sde.noise": noise})()
        return jnp.sum(z**2)

    p = jnp.array([0.7, 0.4])
    grad = jax.grad(loss)(p)
    eps = 1e-6
    fd = [(loss(p.at[i].add(eps)) - loss(p.at[i].add(-eps))) / (2 * eps) for i in range(2)]
    np.testing.assert_allclose(np.asarray(grad), np.asarray(fd), rtol=1e-6)


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


# -- errors only JAX can meet ------------------------------------------------------------------


def test_a_missing_key_and_traced_times_are_refused() -> None:
    sde = NeuralSDE(lambda t, z, a: -z, lambda t, z, a: 0.1 * z, dt=0.1)
    with pytest.raises(ValueError, match="key"):
        sde(jnp.ones(2), jnp.array([0.0, 0.5]))
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda t: sde(jnp.ones(2), t, key=0))(jnp.array([0.0, 0.5]))
