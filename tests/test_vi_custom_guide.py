"""`probdyn.VI(guide=<function>)`: a guide of the user's own (e.g. an amortised encoder).

On the conjugate normal model a Gaussian guide with a free location and scale
contains the exact posterior, so the fitted guide is that posterior up to the
optimiser's noise: the draws are checked with `check_accuracy` (4 MCSE of the
draws), with the VI settings of the conformance suite. The params kept on the
posterior must be the ones the draws came from: the draws' mean and sd are
checked against ``q.loc`` and ``q.scale`` (4 Monte-Carlo standard errors of a
sample mean and a sample sd of i.i.d. Gaussian draws).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from engine_backends import BACKENDS, use_backend

import probdyn
from probdyn.testing import check_accuracy, check_layout, normal_data, reference_model

ENGINE = dict(
    num_steps=3000,
    learning_rate=0.02,
    num_particles=8,
    final_learning_rate_fraction=0.02,
    num_draws=2000,
    progress_bar=False,
)


def numpyro_guide(y: Any, prior_loc: float = 0.0, prior_scale: float = 2.0, noise: float = 1.0):  # type: ignore[no-untyped-def]
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    loc = numpyro.param("q.loc", 0.0)
    scale = numpyro.param("q.scale", 1.0, constraint=constraints.positive)
    numpyro.sample("mu", dist.Normal(loc, scale))


def pyro_guide(y: Any, prior_loc: float = 0.0, prior_scale: float = 2.0, noise: float = 1.0):  # type: ignore[no-untyped-def]
    import pyro
    import pyro.distributions as dist
    import torch
    from torch.distributions import constraints

    loc = pyro.param("q.loc", torch.tensor(0.0))
    scale = pyro.param("q.scale", torch.tensor(1.0), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale))


GUIDES = {"numpyro": numpyro_guide, "pyro": pyro_guide}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return use_backend(request, request.param)


def test_custom_guide_fits_the_exact_posterior(backend: str) -> None:
    problem = normal_data()
    model = reference_model("normal", backend)
    engine = probdyn.VI(guide=GUIDES[backend], **ENGINE)
    post = probdyn.fit(model, *problem.args, engine=engine, key=0)
    check_layout(post, {"mu": ()}, num_chains=1, num_draws=2000)
    check_accuracy(post, "mu", float(problem.mean), float(problem.sd), num_mcse=4.0)
    # The guide's params are fitted and kept on the posterior.
    assert set(post.params) == {"q.loc", "q.scale"}
    loc, scale, draws = (
        float(post.params["q.loc"]),
        float(post.params["q.scale"]),
        post.samples["mu"],
    )
    assert abs(draws.mean() - loc) < 4 * scale / np.sqrt(draws.size)
    assert abs(draws.std() - scale) < 4 * scale / np.sqrt(2 * draws.size)
    assert post.attrs["engine"]["guide"].startswith("<function")
    # Predicting works as for the automatic guides.
    pred = post.predict(*problem.args, key=1, sites=["y"])
    assert pred["y"].shape == (1, 2000, 20)


def test_a_guide_that_misses_a_latent_site_is_refused(backend: str) -> None:
    problem = normal_data()

    def empty_guide(*args: Any, **kwargs: Any) -> None:
        pass

    engine = probdyn.VI(guide=empty_guide, **ENGINE)
    with pytest.raises(ValueError, match=r"does not sample the model's latent site\(s\) \['mu'\]"):
        probdyn.fit(reference_model("normal", backend), *problem.args, engine=engine, key=0)


def test_init_does_not_apply_to_a_custom_guide() -> None:
    with pytest.raises(ValueError, match="init applies to the automatic guides only"):
        probdyn.VI(guide=numpyro_guide, init="map")
    with pytest.raises(ValueError, match="guide"):
        probdyn.VI(guide="normall")
