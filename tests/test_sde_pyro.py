"""probdyn.pyro NeuralSDE: what only the Pyro backend has (torch gradients, Pyro's
NUTS on the latent increments, torch generators as keys). The tests both backends
share are in test_sde.py.

The posterior-coverage check with NUTS runs on the NumPyro backend (fast to
sample); test_sde_parity.py shows that the two backends' OU models have the same
log density at the same point, and here Pyro's NUTS is only run briefly on it.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
pytest.importorskip("torchsde")

import numpy as np  # noqa: E402
import pyro.distributions as dist  # noqa: E402
from pyro import poutine  # noqa: E402

import probdyn  # noqa: E402
from probdyn.primitives.sde import time_grid  # noqa: E402
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


def _trace(model, *args):
    return poutine.trace(poutine.seed(model, rng_seed=0)).get_trace(*args)


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
# failed-solve test in test_sde.py), and fit warns about it.
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


# -- errors only torch can meet ----------------------------------------------------------------


def test_a_key_that_is_not_a_seed_or_a_generator_is_refused() -> None:
    sde = NeuralSDE(lambda t, z, a: -z, lambda t, z, a: 0.1 * z, dt=0.1)
    with pytest.raises(TypeError, match="key"):
        sde(torch.ones(2), [0.0, 0.5], key="seed")
