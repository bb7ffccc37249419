"""The metric of tempered SMC's moves (probdyn/engines/smc_preconditioner.py): its
maths against independent formulas, the NumPyro re-statement against the NumPy one,
and on both backends a correlated posterior that dense moves sample exactly and in
fewer moves than diagonal ones."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from engine_backends import BACKENDS, use_backend

import probdyn
from probdyn.engines import smc_preconditioner as sp
from probdyn.testing import ReferenceProblem, check_accuracy, reference_model


def _cloud(seed: int = 0, n: int = 400, d: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mix.T + 2.0, rng.normal(size=n)


def test_shrunk_covariance_against_numpy_cov() -> None:
    x, log_w = _cloud()
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    # np.cov with aweights and ddof=0 is the weighted population covariance.
    cov = np.cov(x, rowvar=False, aweights=w, ddof=0)
    lam = x.shape[1] / (x.shape[1] + 1.0 / np.sum(w**2))
    expected = (1 - lam) * cov + lam * np.diag(np.diag(cov))
    np.testing.assert_allclose(sp.shrunk_covariance(x, log_w), expected, rtol=1e-12)
    # Positive definite even from fewer particles than dimensions.
    few = sp.shrunk_covariance(x[:2], log_w[:2])
    assert np.linalg.eigvalsh(few).min() > 0


def test_factor_reproduces_the_covariance_and_the_diagonal_case() -> None:
    x, log_w = _cloud(1)
    chol = sp.factor(x, log_w, dense=True)
    assert np.allclose(chol, np.tril(chol))
    np.testing.assert_allclose(chol @ chol.T, sp.shrunk_covariance(x, log_w), rtol=1e-12)
    diag = sp.factor(x, log_w, dense=False)
    np.testing.assert_allclose(diag**2, np.diag(sp.shrunk_covariance(x, log_w)), rtol=1e-12)


def test_factor_falls_back_to_the_diagonal(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(a: np.ndarray) -> np.ndarray:
        raise np.linalg.LinAlgError("not positive definite")

    x, log_w = _cloud(2)
    monkeypatch.setattr(np.linalg, "cholesky", fail)
    out = sp.factor(x, log_w, dense=True)
    np.testing.assert_allclose(out, np.diag(sp.factor(x, log_w, dense=False)), rtol=1e-12)


def test_auto_is_dense_for_small_models_with_many_particles() -> None:
    assert sp.use_dense("auto", 8, 1000)
    assert not sp.use_dense("auto", sp.DENSE_MAX_DIM + 1, 10**6)
    assert not sp.use_dense("auto", 50, 10 * 50 - 1)
    assert sp.use_dense("dense", 500, 10) and not sp.use_dense("diagonal", 1, 1000)


def test_smc_refuses_an_unknown_preconditioner() -> None:
    with pytest.raises(ValueError, match="preconditioner"):
        probdyn.SMC(preconditioner="full")


@pytest.mark.parametrize("dense", [True, False])
def test_numpyro_stage_restates_the_numpy_factor(dense: bool) -> None:
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from probdyn.numpyro.engines.smc_program import _preconditioner

    x, log_w = _cloud(3)
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    got = _preconditioner(jnp.asarray(x), jnp.asarray(w), dense)
    np.testing.assert_allclose(np.asarray(got), sp.factor(x, log_w, dense), rtol=1e-5, atol=1e-6)


# A linear regression with near-collinear columns: the exact posterior of w has
# correlations up to -0.5 and a correlation matrix with condition number 255, so a
# diagonal metric is as narrow as the smallest principal axis in every direction.
def _collinear_problem() -> ReferenceProblem:
    rng = np.random.default_rng(0)
    n, d, noise = 30, 4, 0.5
    base = rng.normal(size=(n, d))
    x = base[:, :1] + 0.1 * base
    y = x @ rng.normal(size=d) + rng.normal(0.0, noise, n)
    cov = np.linalg.inv(x.T @ x / noise**2 + np.eye(d))
    mean = cov @ x.T @ y / noise**2
    return ReferenceProblem(args=(x, y, 1.0, noise), site="w", mean=mean, cov=cov)


@functools.cache
def _fit(backend: str, preconditioner: str) -> probdyn.Posterior:
    problem = _collinear_problem()
    engine = probdyn.SMC(num_particles=1000, preconditioner=preconditioner, progress_bar=False)
    model = reference_model("linear_regression", backend)
    return probdyn.fit(model, *problem.args, engine=engine, key=0, backend=backend)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return use_backend(request, request.param)


def test_dense_moves_sample_a_correlated_posterior_in_fewer_moves(backend: str) -> None:
    problem = _collinear_problem()
    dense, diagonal = _fit(backend, "dense"), _fit(backend, "diagonal")
    # Both metrics leave the target invariant: the draws match the exact posterior
    # (check_accuracy: mean and sd within ArviZ's Monte-Carlo error).
    for post in (dense, diagonal):
        check_accuracy(post, problem.site, *problem.exact)
    # The last stage moves until the draws have decorrelated from their resampled
    # starts. Whitened by the particles' covariance, the target is near-isotropic and
    # that takes a few moves; along the diagonal metric's narrow ridge, many more.
    last_dense = int(dense.traces["num_moves"][-1])
    last_diagonal = int(diagonal.traces["num_moves"][-1])
    assert 2 * last_dense <= last_diagonal, (last_dense, last_diagonal)
