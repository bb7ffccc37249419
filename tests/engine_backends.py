"""What lets one engine test run on both backends, and checks the engine tests share.

A test module that parametrises over `BACKENDS` sets each case up with `use_backend`
(Pyro's case is skipped without torch and runs with ``torch_float64_one_thread``) and
takes its models from `models` (tests/engine_models_numpyro.py and
tests/engine_models_pyro.py: the same model under the same name in both PPLs; Pyro's
module is imported only for Pyro's cases).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import probdyn
from probdyn.engines import smc_math as _smc_math
from probdyn.testing import check_reproducible

BACKENDS = ["numpyro", "pyro"]

FK_Y = np.random.default_rng(0).normal(size=20)
"""Data of the Feynman–Kac SMC set-ups that must be refused (20 points)."""


def use_backend(request: pytest.FixtureRequest, backend: str) -> str:
    """Set a test up for ``backend``: Pyro needs torch and pyro (else the test is
    skipped) and runs in float64 on one thread (``torch_float64_one_thread``)."""
    if backend == "pyro":
        pytest.importorskip("torch")
        pytest.importorskip("pyro")
        request.getfixturevalue("torch_float64_one_thread")
    return backend


def models(backend: str) -> ModuleType:
    """The test models written for ``backend`` (``engine_models_<backend>``)."""
    return importlib.import_module(f"engine_models_{backend}")


def check_step_rule(post: probdyn.Posterior, kernel: str, dim: int) -> None:
    """The step sizes of a tempered SMC run follow the rule and constants of
    probdyn/engines/smc_math.py, on either backend: the first from
    `initial_step_size`, each next one from the previous stage's acceptance rate by
    `adapt_step_size` with `step_adapt_gain`."""
    steps, rates = post.traces["step_size"], post.traces["acceptance_rate"]
    assert steps[0] == pytest.approx(_smc_math.initial_step_size(kernel, dim), rel=1e-12)
    target = _smc_math.target_acceptance(kernel, dim)
    gain = _smc_math.step_adapt_gain(kernel)
    expected = [_smc_math.adapt_step_size(h, a, target, gain=gain) for h, a in zip(steps, rates)]
    np.testing.assert_allclose(steps[1:], expected[:-1], rtol=1e-10)


def check_tempered_traces(post: probdyn.Posterior) -> None:
    """A tempered SMC run's traces: temperatures from 0 to 1, strictly increasing, one
    entry per temperature in every curve, the evidence the last of its curve."""
    temps = post.traces["temperature"]
    assert temps[0] == 0.0 and temps[-1] == 1.0 and np.all(np.diff(temps) > 0)
    for name in ("acceptance_rate", "step_size", "ess", "log_evidence"):
        assert post.traces[name].shape == temps.shape, name
    assert post.log_evidence == post.traces["log_evidence"][-1]
    assert post.attrs["num_stages"] == len(temps) - 1


def check_keys_leave_torch_rng_alone(
    fit: Callable[[Any], probdyn.Posterior], x_new: Any, generator_seed: int, predict_key: int
) -> None:
    """A Pyro runner: the same key gives the same draws (`check_reproducible` of ``fit``,
    a function of the key), a ``torch.Generator`` works as a key, and neither the fits
    nor ``predict`` at ``x_new`` move the global torch RNG."""
    import torch

    before = torch.get_rng_state()
    check_reproducible(fit)
    post = fit(torch.Generator().manual_seed(generator_seed))
    post.predict(x_new, key=predict_key)
    assert torch.equal(torch.get_rng_state(), before)


POSTERIOR_GROUPS = (
    "samples",
    "sample_stats",
    "posterior_predictive",
    "log_likelihood",
    "observed_data",
    "params",
    "traces",
)


def assert_same_posterior(a: probdyn.Posterior, b: probdyn.Posterior) -> None:
    """Every group of ``a`` and ``b`` holds the same arrays, bit for bit and dtype for
    dtype, and their attrs are equal (a save/load round trip)."""
    for group in POSTERIOR_GROUPS:
        ga, gb = getattr(a, group), getattr(b, group)
        assert set(ga) == set(gb), group
        for name in ga:
            np.testing.assert_array_equal(ga[name], gb[name], err_msg=f"{group}[{name}]")
            assert np.asarray(ga[name]).dtype == np.asarray(gb[name]).dtype, (group, name)
    assert a.attrs == b.attrs


def run_on_four_cpu_devices(script: str, *argv: str) -> dict[str, Any]:
    """Run ``script`` in a fresh Python on 4 forced CPU devices in float64 (JAX reads
    the device count when it starts); the JSON report its last line prints."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4".strip()
    env["JAX_ENABLE_X64"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", script, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
