"""The main job: ``probdyn demo`` in smoke size writes its plot, tables and posterior;
``probdyn compare`` writes its table and figure. Each run writes to a new folder under
``--out`` and never overwrites an earlier run's files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import probdyn
from probdyn.cli import main


def _demo(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PROBDYN_NO_COMPILATION_CACHE": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "probdyn.cli", "demo", "--quick", "--out", str(tmp_path), *flags],
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
    assert "--quick: smoke-test sizes, not converged" in result.stdout
    assert "Shape validation failed" not in result.stderr
    (run,) = tmp_path.iterdir()  # a run folder named after the run
    engine, data = flags[1], flags[3] if len(flags) > 3 else "synthetic"
    assert run.name == f"{data}-numpyro-{engine}-quick"
    for name in ("posterior.nc", "predictive.png", "calibration.csv", "scores.csv", "summary.csv"):
        assert (run / name).stat().st_size > 0, name
    post = probdyn.load(run / "posterior.nc")
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
    run = tmp_path / "synthetic-pyro-vi-quick"
    for name in ("posterior.nc", "predictive.png", "calibration.csv", "scores.csv", "summary.csv"):
        assert (run / name).stat().st_size > 0, name
    post = probdyn.load(run / "posterior.nc")
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


# -- probdyn compare (in-process: main([...]) shares this process's warnings filter) -----

# In quick demo runs early warmup proposals can leave the ODE's stable region; the
# runner rejects them with a RuntimeWarning, which is expected here.
ODE_WARNING = "ignore:.*solve\\(s\\) failed during the run:RuntimeWarning"


@pytest.fixture
def no_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # main() would otherwise point this test process's JAX at a persistent cache.
    monkeypatch.setenv("PROBDYN_NO_COMPILATION_CACHE", "1")


def _read_outputs(out: Path) -> tuple[pd.DataFrame, str]:
    assert sorted(os.listdir(out)) == ["bands.png", "comparison.csv", "comparison.md"]
    for name in ("comparison.md", "comparison.csv", "bands.png"):
        assert (out / name).stat().st_size > 0, name
    table = pd.read_csv(out / "comparison.csv", index_col=0, keep_default_na=False)
    return table, (out / "comparison.md").read_text()


# NUTS on the neural ODE compiles for minutes on 2 cores (tests/test_compare.py
# runs compare on the demo model in the default suite): end to end.
@pytest.mark.e2e
@pytest.mark.filterwarnings(ODE_WARNING)
def test_compare_quick_demo_writes_table_and_bands(
    tmp_path: Path, no_cache: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["compare", "--quick", "--engines", "nuts,vi", "--out", str(tmp_path)])
    stdout = capsys.readouterr().out
    assert code == 0
    (run,) = tmp_path.iterdir()  # a run folder named after the run
    assert run.name == "synthetic-numpyro-nuts-vi-quick"
    table, markdown = _read_outputs(run)
    assert list(table.index) == ["NUTS", "VI"]
    assert (table["error"] == "").all()
    assert np.isfinite(table[["nlpd", "crps", "rmse", "coverage_90"]].to_numpy(float)).all()
    assert table.loc["NUTS", "ess"] != "" and table.loc["VI", "ess"] == ""
    assert markdown.startswith("# probdyn compare: synthetic Lotka-Volterra")
    assert "\n| engine | backend | draws | wall_time (s) |" in markdown  # no repeated column
    assert "| NUTS | numpyro | 30 |" in markdown and "| VI | numpyro | 60 |" in markdown
    assert "smoke-test sizes" in markdown and "times in seconds" in markdown
    assert markdown in stdout and "wrote" in stdout
    # The demo's plain-word checks and smoke-size line, in the terminal too.
    assert "(--quick: smoke-test sizes, not converged" in stdout
    assert "\nChecks:" in stdout and "NUTS: " in stdout


MODEL_FILE = """
import numpyro
import numpyro.distributions as dist


def linear(x, y=None, noise=1.0):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w, noise), obs=y)


def with_shift(x, y=None, noise=1.0):  # a param site, which tempered SMC refuses
    shift = numpyro.param("shift", 0.0)
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w + shift, noise), obs=y)
"""


def _user_model(tmp_path: Path, **arrays: np.ndarray) -> tuple[str, str]:
    (tmp_path / "my_model.py").write_text(MODEL_FILE)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2))
    y = x @ np.array([1.0, -0.5]) + rng.normal(0.0, 0.3, 40)
    data = {"train_x": x[:30], "train_y": y[:30], "test_x": x[30:], "test_y": y[30:]}
    data["noise"] = np.array(0.3)  # no prefix: for training and test alike
    np.savez(tmp_path / "data.npz", **{**data, **arrays})
    return f"{tmp_path / 'my_model.py'}:linear", str(tmp_path / "data.npz")


def test_compare_a_saved_model_and_npz_data(tmp_path: Path, no_cache: None) -> None:
    model, data = _user_model(tmp_path)
    out = tmp_path / "out"
    argv = ["compare", "--model", model, "--data", data, "--engines", "vi,ensemble"]
    assert main([*argv, "--quick", "--out", str(out)]) == 0
    table, markdown = _read_outputs(out / "linear-numpyro-vi-ensemble-quick")
    assert list(table.index) == ["VI", "Ensemble"]
    assert (table["error"] == "").all()
    assert list(table["draws"]) == [60, 4]
    # Ten held-out points with noise sd 0.3 around a line the fit recovers.
    assert (table["rmse"].astype(float) < 1.0).all()
    assert "| Ensemble | numpyro | 4 |" in markdown


def test_compare_never_overwrites_an_earlier_run(
    tmp_path: Path, no_cache: None, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = _user_model(tmp_path)
    out = tmp_path / "out"
    argv = ["compare", "--model", model, "--data", data, "--engines", "vi", "--quick"]
    assert main([*argv, "--out", str(out)]) == 0
    first = out / "linear-numpyro-vi-quick"
    _read_outputs(first)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    assert main([*argv, "--seed", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [first.name, first.name + "-2"]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before  # untouched
    table, _ = _read_outputs(out / (first.name + "-2"))
    assert list(table.index) == ["VI"]
    assert str(out / (first.name + "-2")) in capsys.readouterr().out  # says where it wrote


def test_compare_exits_1_when_an_engine_fails(
    tmp_path: Path, no_cache: None, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = _user_model(tmp_path)
    model = model.replace(":linear", ":with_shift")
    out = tmp_path / "out"
    argv = ["compare", "--model", model, "--data", data, "--engines", "smc", "--out", str(out)]
    assert main(argv) == 1
    table, _ = _read_outputs(out / "with_shift-numpyro-smc")  # written all the same
    assert table.loc["SMC", "error"].startswith("fit failed: ValueError:")
    assert "param sites ['shift']" in table.loc["SMC", "error"]
    assert "SMC failed:" in capsys.readouterr().err  # with the traceback


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--engines", "nuts,mcmc"], "unknown engine(s) ['mcmc']"),
        (["--model", "m.py:f"], "needs --data FILE.npz"),
        (["--model", "missing.py:f", "--data", "d.npz"], "no file 'missing.py'"),
        (["--model", "no-function-name", "--data", "d.npz"], "write it as path/to/file.py"),
        (["--data", "d.npz"], "is an .npz file, which needs your model: add --model"),
        (["--data", "nope"], "choose 'synthetic' or 'hare-lynx'"),
        (["--engines", ""], "no engine was given"),
        (["--engines", " , "], "no engine was given"),
    ],
)
def test_compare_rejects_bad_arguments(
    argv: list[str],
    message: str,
    tmp_path: Path,
    no_cache: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["compare", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing fitted, no run folder


def test_compare_needs_test_observations_in_the_npz(
    tmp_path: Path, no_cache: None, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = _user_model(tmp_path)
    with np.load(data) as f:
        arrays = {k: f[k] for k in f.files if k != "test_y"}
    np.savez(data, **arrays)
    assert main(["compare", "--model", model, "--data", data, "--out", str(tmp_path)]) == 2
    assert "has no array test_y" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "compare"])
def test_out_that_is_a_file_is_called_a_file(
    command: str, tmp_path: Path, no_cache: None, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "results").write_text("not a folder")
    assert main([command, "--out", str(tmp_path / "results")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "results").read_text() == "not a folder"
