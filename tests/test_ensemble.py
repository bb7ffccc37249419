"""The Ensemble runners of both backends: what they share (Pyro's cases are skipped
without torch). Each backend's own behaviour is in tests/test_ensemble_numpyro.py and
tests/test_ensemble_pyro.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from engine_backends import BACKENDS, models, use_backend
from scipy import stats

import probdyn
from probdyn.testing import check_finite


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return use_backend(request, request.param)


def test_non_finite_members_are_kept_with_a_warning(backend: str) -> None:
    engine = probdyn.Ensemble(num_members=16, num_steps=5, progress_bar=False)
    with pytest.warns(RuntimeWarning, match=r"member\(s\) end with a non-finite loss"):
        post = probdyn.fit(models(backend).only_positive, engine=engine, key=0, backend=backend)
    bad = ~np.isfinite(post.sample_stats["lp"][0])
    negative = post.samples["x"][0] <= 0  # a non-finite loss skips the step: x stays there
    assert bad.any() and np.array_equal(bad, negative)
    assert post.samples["x"].shape == (1, 16)


_POISSON_X = np.linspace(0.0, 1.0, 10)
# backend -> (model, its data, engine, the latent site, what the warning names).
NON_GAUSSIAN = {
    "numpyro": (
        "poisson_rate",
        (np.array([1.0, 3.0, 2.0]),),
        probdyn.Ensemble(num_members=3, num_steps=10, anchored=True, progress_bar=False),
        "rate",
        r"\['y'\].*approximation",
    ),
    "pyro": (
        "poisson_counts",
        (_POISSON_X, np.random.default_rng(0).poisson(np.exp(0.5 * _POISSON_X)).astype(float)),
        probdyn.Ensemble(
            num_members=8,
            num_steps=50,
            learning_rate=0.2,
            final_learning_rate_fraction=0.01,
            anchored=True,
            progress_bar=False,
        ),
        "a",
        r"\['counts'\] are not Gaussian",
    ),
}


def test_anchored_warns_for_non_gaussian_likelihood(backend: str) -> None:
    name, args, engine, site, match = NON_GAUSSIAN[backend]
    with pytest.warns(UserWarning, match=match):
        post = probdyn.fit(
            getattr(models(backend), name), *args, engine=engine, key=0, backend=backend
        )
    assert post.samples[site].shape == (1, engine.num_members)
    check_finite(post)


HIERARCHY_Y = np.array([2.0, 2.5, 1.5])


def test_hierarchical_start_is_the_median_down_the_model_for_every_key_and_backend(
    request: pytest.FixtureRequest,
) -> None:
    # With init_scale=0 every member starts at the prior median, z's taken with mu at
    # its median (mu = 0, so z = 0), not at a random prior draw of mu: the first loss
    # is -log p(mu=0, z=0, y) for every key, and the path after it is deterministic
    # (no subsampling), so a few plain steps end at one point for every key, on both
    # backends (the same Adam formulas and float64 learning rate; NumPyro runs in
    # float64 here: tests/conftest.py enables x64).
    use_backend(request, "pyro")
    engine = probdyn.Ensemble(num_members=3, num_steps=5, init_scale=0.0, progress_bar=False)
    start = -(
        stats.norm.logpdf(0.0, 0.0, 10.0)
        + stats.norm.logpdf(0.0, 0.0, 1.0)
        + stats.norm.logpdf(HIERARCHY_Y, 0.0, 1.0).sum()
    )
    fits: dict[str, list[Any]] = {
        b: [
            probdyn.fit(models(b).hierarchy, HIERARCHY_Y, engine=engine, key=k, backend=b)
            for k in (0, 1)
        ]
        for b in BACKENDS
    }
    for post in [*fits["numpyro"], *fits["pyro"]]:
        np.testing.assert_allclose(post.traces["loss"][:, 0], start, rtol=1e-14)
        assert np.ptp(post.samples["z"]) == 0.0 and np.ptp(post.samples["mu"]) == 0.0
    for b in BACKENDS:
        assert fits[b][0].samples["z"][0, 0] > 0.01  # the steps moved towards the data
    jax_fit, torch_fit = fits["numpyro"][0], fits["pyro"][0]
    for site in ("mu", "z"):
        for b in BACKENDS:
            np.testing.assert_array_equal(fits[b][1].samples[site], fits[b][0].samples[site])
        # Float64 rounding differs between XLA and torch (measured 2e-18).
        np.testing.assert_allclose(torch_fit.samples[site], jax_fit.samples[site], rtol=1e-12)
    np.testing.assert_allclose(torch_fit.traces["loss"], jax_fit.traces["loss"], rtol=1e-12)
