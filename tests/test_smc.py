"""Tempered SMC on both backends: what the runners share (Pyro's cases are skipped
without torch). Each backend's own behaviour and accuracy runs are in
tests/test_smc_numpyro.py and tests/test_smc_pyro.py."""

from __future__ import annotations

import pytest
from engine_backends import BACKENDS, use_backend

import probdyn
from probdyn.engines import smc_math as _smc_math
from probdyn.testing import normal_data, reference_model


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return use_backend(request, request.param)


def _run_short(backend: str) -> object:
    """A short tempered run of the normal model: NumPyro's sampling half (no
    post-processing) with 1000 particles, Pyro's whole fit with 100."""
    data = normal_data()
    if backend == "numpyro":
        from probdyn.numpyro.engines.smc import sample_smc

        engine = probdyn.SMC(num_particles=1000, progress_bar=False)
        return sample_smc(reference_model("normal", backend), data.args, {}, engine, 0)
    engine = probdyn.SMC(num_particles=100, num_mcmc_steps=2, progress_bar=False)
    model = reference_model("normal", backend)
    return probdyn.fit(model, *data.args, engine=engine, key=0, backend=backend)


def test_stage_limit_raises(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_smc_math, "MAX_STAGES", 2)  # the limit both backends read
    with pytest.raises(RuntimeError, match="after 2 stages"):
        _run_short(backend)
