"""The main job: ``probdyn demo`` in smoke size writes its plot, tables and posterior."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import probdyn


def _demo(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PROBDYN_NO_COMPILATION_CACHE": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "probdyn._cli", "demo", "--quick", "--out", str(tmp_path), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    "flags",
    [
        # NUTS on the neural ODE compiles for about two minutes on 2 cores: end to end.
        pytest.param(("--engine", "nuts"), marks=pytest.mark.e2e),
        ("--engine", "vi", "--data", "hare-lynx"),
    ],
    ids=["nuts-synthetic", "vi-hare-lynx"],
)
def test_demo_quick_writes_outputs(tmp_path: Path, flags: tuple[str, ...]) -> None:
    result = _demo(tmp_path, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Calibration on the held-out extrapolation window" in result.stdout
    assert "held-out observations" in result.stdout
    for name in ("posterior.nc", "predictive.png", "calibration.csv", "summary.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    post = probdyn.load(tmp_path / "posterior.nc")
    assert post.backend == "numpyro"
    assert {"alpha", "gamma", "sigma", "z0", "z"} <= set(post.samples)
    assert np.all(np.isfinite(post.samples["alpha"]))


def test_demo_quick_pyro_backend(tmp_path: Path) -> None:
    # VI only: a quick Pyro NUTS run of this neural ODE takes over a minute on
    # 2 CPU cores (every leapfrog step is a torchdiffeq solve run from Python).
    result = _demo(tmp_path, "--backend", "pyro", "--engine", "vi")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "engine=vi, backend=pyro" in result.stdout
    assert "Calibration on the held-out extrapolation window" in result.stdout
    for name in ("posterior.nc", "predictive.png", "calibration.csv", "summary.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    post = probdyn.load(tmp_path / "posterior.nc")
    assert post.backend == "pyro" and post.attrs["engine"]["engine"] == "VI"
    assert {"alpha", "gamma", "sigma", "z0", "z"} <= set(post.samples)
    assert post.samples["z"].shape == (1, 60, 16, 2)
    assert np.all(np.isfinite(post.samples["alpha"]))


def test_cli_rejects_unknown_backend(tmp_path: Path) -> None:
    result = _demo(tmp_path, "--backend", "tensorflow")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_cli_rejects_unknown_engine(tmp_path: Path) -> None:
    result = _demo(tmp_path, "--engine", "smc")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
