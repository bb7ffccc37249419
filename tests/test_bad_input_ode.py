"""ODE solves that fail inside a sampler: counted and rejected, never fatal (issue #17, case 9).

* NumPyro's implicit solver (``solver="kvaerno5"``): lineax raises, instead of
  returning a failure code, when a linear solve of the Newton iteration or of the
  gradient receives NaN or inf, which aborted a whole NUTS run. Each way such
  input arises is pinned: a field that is NaN at the proposal (a failed solve), a
  likelihood that is non-finite at a valid solution, a field whose derivative is
  infinite where its value is finite, and a step size that becomes NaN after a
  step fails badly. Then the same inside NUTS.
* Pyro's continuous adjoint (``adjoint="backsolve"``): torchdiffeq raises from
  its backward solve, after `NeuralODE` has returned; that failure is counted too.
* A model whose every solve fails at the initial point: the sampler's error names
  the ODE and its factor site, on both backends.
* Slow: the posteriordb one-compartment pharmacokinetic model (half-Cauchy priors),
  solved with kvaerno5 under NUTS, against the Stan reference draws.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import probdyn
from probdyn.numpyro import NeuralODE as NumPyroNeuralODE
from probdyn.numpyro.primitives.ode import failed_solves, reset_failed_solves

PK = (
    Path(__file__).parents[2]
    / "shared"
    / "data"
    / "posteriordb"
    / "one_comp_mm_elim_abs-one_comp_mm_elim_abs"
)
TIMES = jnp.linspace(0.5, 10.0, 20)


def pk_field(t, c, theta):
    """dC/dt of the posteriordb PK model (dose D = 30, volume V = 2)."""
    k_a, K_m, V_m = theta[0], theta[1], theta[2]
    return 30.0 * k_a / 2.0 * jnp.exp(-k_a * t) - V_m / 2.0 * c / (K_m + c)


def _sqrt_decay(t, z, theta):
    return -z * jnp.sqrt(1.0 - theta[0])  # NaN for theta[0] > 1


def _linear_fall(t, z, theta):
    return -theta[0] * jnp.ones_like(z)  # crosses zero at t = 1 / theta[0]


# name: (field, z0, parameters, loss of the solution). Each raised lineax's
# "non-finite input" error from jax.grad before the fix.
NON_FINITE_CASES = {
    # the field is NaN at this proposal: the solve fails
    "nan_field": (_sqrt_decay, 1.0, [2.0, 0.0, 0.0], jnp.sum),
    # a valid solution that goes negative; log(<0)**2 sends a NaN cotangent back
    "nan_likelihood": (_linear_fall, 1.0, [1.0, 0.0, 0.0], lambda ys: jnp.sum(jnp.log(ys) ** 2)),
    # d/dC of C / (K_m + C) at C = 0 is 1 / K_m = inf in float64; the value is finite
    "infinite_derivative": (pk_field, 0.0, [1.0, 1e-300, 1.0], jnp.sum),
    # a step to an infinite state makes the controller's next step size NaN
    "nan_step_size": (pk_field, 0.0, [1.0, 1e-30, 1e300], jnp.sum),
}


@pytest.mark.parametrize("case", sorted(NON_FINITE_CASES))
def test_kvaerno5_gradient_survives_non_finite_input(case: str) -> None:
    field, z0, theta, loss = NON_FINITE_CASES[case]
    ode = NumPyroNeuralODE(field, solver="kvaerno5", name="pk")
    reset_failed_solves()
    _, grad = jax.value_and_grad(lambda p: loss(ode(jnp.asarray(z0), TIMES, args=p, t0=0.0)))(
        jnp.asarray(theta)
    )
    assert grad.shape == (3,)
    if case in ("nan_field", "nan_step_size"):
        assert failed_solves() == 1  # a failed solve, reported as one
    else:
        assert failed_solves() == 0  # the solve itself succeeded


def decay_model(times, y=None):
    """Decay at rate 5 sqrt(1 - a): the data put ``a`` near 0.97, so NUTS proposes
    a > 1, where the field is NaN and the kvaerno5 solve fails."""
    a = numpyro.sample("a", dist.Normal(0.8, 0.3))
    ode = NumPyroNeuralODE(
        lambda t, z, a: -5.0 * z * jnp.sqrt(1.0 - a), solver="kvaerno5", name="decay"
    )
    z = ode(jnp.ones(1), times, args=a)
    numpyro.sample("y", dist.Normal(z[:, 0], 0.05), obs=y)


def test_kvaerno5_failed_solves_under_nuts_are_counted_and_the_run_finishes() -> None:
    times = np.linspace(0.2, 2.0, 6)
    y = np.exp(-5.0 * np.sqrt(1.0 - 0.97) * times)
    engine = probdyn.NUTS(num_warmup=30, num_samples=30, progress_bar=False)
    with pytest.warns(RuntimeWarning, match=r"solve\(s\) failed"):
        post = probdyn.fit(decay_model, times, y, engine=engine, key=0)
    assert post.attrs["num_failed_solves"] > 0
    assert np.all(np.isfinite(post.samples["a"])) and np.all(post.samples["a"] <= 1.0)


# -- every solve fails at the initial point: the error names the ODE, both backends ----------


def _numpyro_never_solvable(times, y=None):
    a = numpyro.sample("a", dist.Uniform(2.0, 3.0))
    ode = NumPyroNeuralODE(lambda t, z, a: -z * jnp.sqrt(1.0 - a), max_steps=16, name="decay")
    z = ode(jnp.ones(1), times, args=a)
    numpyro.sample("y", dist.Normal(z[:, 0], 0.1), obs=y)


def _pyro_never_solvable(times, y=None):
    import pyro
    import pyro.distributions as pdist
    import torch

    from probdyn.pyro import NeuralODE as PyroNeuralODE

    a = pyro.sample("a", pdist.Uniform(2.0, 3.0))
    ode = PyroNeuralODE(lambda t, z, a: -z * torch.sqrt(1.0 - a), max_steps=16, name="decay")
    z = ode(torch.ones(1), times, args=a)
    pyro.sample("y", pdist.Normal(z[:, 0], 0.1).to_event(1), obs=y)


@pytest.mark.parametrize("backend", ["numpyro", "pyro"])
def test_all_failing_solves_at_init_name_the_ode(backend: str, request) -> None:
    if backend == "pyro":
        pytest.importorskip("torchdiffeq")
        request.getfixturevalue("torch_float64_one_thread")
    model = _numpyro_never_solvable if backend == "numpyro" else _pyro_never_solvable
    times = np.linspace(0.1, 1.0, 5)
    engine = probdyn.NUTS(num_warmup=5, num_samples=5, progress_bar=False)
    with pytest.raises(RuntimeError, match=r"every solve of the ODE/SDE 'decay'") as info:
        probdyn.fit(model, times, np.exp(-times), engine=engine, key=0)
    message = str(info.value)
    assert "factor site 'decay.failed'" in message and "initial point" in message
    assert "kvaerno5" in message and "max_steps" in message and "init=" in message


# -- Pyro's continuous adjoint: a failed backward solve ---------------------------------------


def test_pyro_backsolve_failure_in_the_backward_solve_is_counted(request) -> None:
    pytest.importorskip("torchdiffeq")
    request.getfixturevalue("torch_float64_one_thread")
    import torch

    from probdyn.pyro import NeuralODE as PyroNeuralODE
    from probdyn.pyro.primitives.ode import failed_solves as pyro_failed
    from probdyn.pyro.primitives.ode import reset_failed_solves as pyro_reset

    def field(t, z, a):
        # The value is -a z; the derivative of sqrt at 0 is inf, so the adjoint
        # state becomes NaN and torchdiffeq's backward solve raises.
        return -a * z + 0.0 * torch.sqrt(z - z.detach())

    ode = PyroNeuralODE(field, adjoint="backsolve", solver="dopri5")
    a = torch.tensor(1.0, requires_grad=True)
    ys = ode(torch.ones(1), torch.linspace(0.0, 1.0, 5), args=a)
    pyro_reset()
    (grad,) = torch.autograd.grad(ys.sum(), a)
    assert pyro_failed() == 1
    assert float(grad) == 0.0  # a failed backward solve contributes no gradient


# -- slow: the posteriordb PK model with kvaerno5 under NUTS ----------------------------------


def pk_model(times, D, V, C_hat=None):
    """posteriordb ``one_comp_mm_elim_abs``: the model of its info.json."""
    k_a = numpyro.sample("k_a", dist.HalfCauchy(1.0))
    K_m = numpyro.sample("K_m", dist.HalfCauchy(1.0))
    V_m = numpyro.sample("V_m", dist.HalfCauchy(1.0))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(1.0))

    def field(t, c, theta):
        k_a, K_m, V_m = theta
        return D * k_a / V * jnp.exp(-k_a * t) - V_m / V * c / (K_m + c)

    ode = NumPyroNeuralODE(field, solver="kvaerno5", rtol=1e-6, atol=1e-6, name="pk")
    c = ode(jnp.zeros(()), times, args=(k_a, K_m, V_m), t0=0.0)
    numpyro.sample("C_hat", dist.LogNormal(jnp.log(c), sigma), obs=C_hat)


@pytest.mark.slow
@pytest.mark.skipif(not PK.is_dir(), reason="../shared/data/posteriordb is not present")
def test_pk_model_with_kvaerno5_under_nuts_matches_stan_reference() -> None:
    # Each mean within 4 Monte-Carlo standard errors of the reference mean: the
    # reference posterior's sd over the square root of our run's ESS, combined
    # with the reference mean's own MCSE (the same sd over the square root of the
    # reference draws' ESS).
    from probdyn.core.arviz import import_arviz

    az = import_arviz()
    data = json.loads((PK / "data.json").read_text())
    chains = json.loads((PK / "reference_draws.json").read_text())
    ref = {name: np.array([c[name] for c in chains]) for name in chains[0]}  # (chain, draw)
    engine = probdyn.NUTS(
        num_warmup=500,
        num_samples=500,
        num_chains=2,
        chain_method="vectorized",
        progress_bar=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        post = probdyn.fit(
            pk_model,
            np.asarray(data["times"], dtype=float),
            float(data["D"]),
            float(data["V"]),
            np.asarray(data["C_hat"], dtype=float),
            engine=engine,
            key=0,
        )
    # The run finished; its failed solves are counted, and reported iff there are any.
    failed = post.attrs["num_failed_solves"]
    reported = [str(w.message) for w in caught if "solve(s) failed" in str(w.message)]
    assert reported == ([] if failed == 0 else [reported[0]])
    assert failed == 0 or reported[0].startswith(f"{failed} ODE/SDE solve(s) failed")
    failures = []
    for name, draws in ref.items():
        ours = post.samples[name]
        sd = draws.std(ddof=1)
        ess_ours = float(az.ess(ours, method="mean"))
        ess_ref = float(az.ess(draws, method="mean"))
        mcse = sd * np.hypot(1 / np.sqrt(ess_ours), 1 / np.sqrt(ess_ref))
        z = (ours.mean() - draws.mean()) / mcse
        if abs(z) > 4:
            failures.append(f"{name}: mean {ours.mean():.4g} vs {draws.mean():.4g}, z = {z:.2f}")
    assert not failures, failures
