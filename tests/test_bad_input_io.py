"""Bad input and faults at the writers: `Posterior.save`, `Comparison`'s tables and
figure, the demo's outputs and the ``probdyn`` command line (issue 17, cases 1, 6, 10).

Every writer goes through a temporary file renamed onto its path: the fault tests make
a write fail half-way and check that the previous file is still there, byte for byte,
and that no temporary file is left beside it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from engine_backends import assert_same_posterior
from matplotlib.figure import Figure

import probdyn
import probdyn.core.io as pio
from probdyn.cli import main
from probdyn.diagnostics.compare import Comparison
from probdyn.diagnostics.markdown import format_markdown

pytestmark = pytest.mark.usefixtures("torch_float64_one_thread")


class WriteFailed(OSError):
    """The fault the tests inject (a full disk, say)."""


def _posterior(**names: Any) -> probdyn.Posterior:
    rng = np.random.default_rng(0)
    return probdyn.Posterior(
        samples={"a": rng.normal(size=(2, 5)), **names},
        params={"p": np.arange(3.0)},
        traces={"loss": np.linspace(3.0, 1.0, 7)},
        attrs={"backend": "numpyro", "seed": 0},
    )


def _only(directory: Path, *names: str) -> None:
    """``directory`` holds exactly ``names``: no temporary file was left behind."""
    assert sorted(os.listdir(directory)) == sorted(names)


# ---------------------------------------------------------------- Posterior.save
def _slash_model(backend: str) -> Any:
    if backend == "numpyro":
        import numpyro
        import numpyro.distributions as dist

        def model(x, y=None):
            slope = numpyro.sample("coef/slope", dist.Normal(0.0, 1.0))
            scale = numpyro.param("noise/scale", 0.5, constraint=dist.constraints.positive)
            numpyro.sample("obs/y", dist.Normal(slope * x, scale), obs=y)

        return model
    import pyro
    import pyro.distributions as pdist
    import torch

    def pyro_model(x, y=None):
        slope = pyro.sample("coef/slope", pdist.Normal(0.0, 1.0))
        scale = pyro.param("noise/scale", torch.tensor(0.5), constraint=pdist.constraints.positive)
        pyro.sample("obs/y", pdist.Normal(slope * x, scale).to_event(1), obs=y)

    return pyro_model


@pytest.mark.parametrize("backend", ["numpyro", "pyro"])
def test_names_with_a_slash_round_trip_bit_for_bit(backend: str, tmp_path: Path) -> None:
    # Both PPLs allow '/' in site and param names; HDF5 reads it as a group path.
    x = np.linspace(0.0, 1.0, 8)
    engine = probdyn.VI(num_steps=20, num_draws=10, progress_bar=False)
    post = probdyn.fit(_slash_model(backend), x, 2.0 * x, engine=engine, key=0)
    assert "coef/slope" in post.samples and "noise/scale" in post.params
    post.save(tmp_path / "p.nc")
    assert_same_posterior(post, probdyn.load(tmp_path / "p.nc"))
    _only(tmp_path, "p.nc")


def test_every_name_hdf5_cannot_hold_round_trips(tmp_path: Path) -> None:
    # '/' separates HDF5 groups, '.' names the group itself, '\0' ends a name; '%'
    # is the escape character; "a%2Fb" is what "a/b" is escaped to.
    odd = ["a/b", "a%2Fb", "%", ".", "", "x\0y", "/lead/", "a.b", "é"]
    rng = np.random.default_rng(1)
    post = _posterior(**{n: rng.normal(size=(2, 5, 2)) for n in odd})
    post = probdyn.Posterior(
        samples=post.samples,
        log_likelihood={"o/y": rng.normal(size=(2, 5, 3))},
        observed_data={"o/y": np.arange(3.0)},
        params={"w/0": np.ones(2)},
        traces={"l/oss": np.ones(4)},
        attrs=post.attrs,
    )
    post.save(tmp_path / "odd.nc")
    back = probdyn.load(tmp_path / "odd.nc")
    assert_same_posterior(post, back)
    assert list(back.samples) == list(post.samples)


@pytest.mark.parametrize("fault", [WriteFailed, KeyboardInterrupt])
def test_a_failed_save_leaves_the_old_file(
    fault: type[BaseException], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "p.nc"
    old = _posterior()
    old.save(path)
    before = path.read_bytes()

    def fail_half_way(values: Any) -> Any:
        # The ArviZ groups are in the temporary file already; the extra groups fail.
        assert len(os.listdir(tmp_path)) == 2
        raise fault("disk full")

    monkeypatch.setattr(pio, "dataset", fail_half_way)
    with pytest.raises(fault, match="disk full"):
        _posterior(b=np.ones((2, 5))).save(path)
    assert path.read_bytes() == before
    _only(tmp_path, "p.nc")
    monkeypatch.undo()
    assert_same_posterior(old, probdyn.load(path))


def test_save_replaces_an_existing_file(tmp_path: Path) -> None:
    _posterior().save(tmp_path / "p.nc")
    new = _posterior(b=np.ones((2, 5)))
    new.save(tmp_path / "p.nc")
    assert_same_posterior(new, probdyn.load(tmp_path / "p.nc"))
    _only(tmp_path, "p.nc")


def test_save_into_a_missing_directory_names_path_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    with pytest.raises(FileNotFoundError, match=r"Posterior.save\(path=.*the directory .*such"):
        _posterior().save(missing / "p.nc")
    with pytest.raises(IsADirectoryError, match=r"Posterior.save\(path=.*is a directory"):
        _posterior().save(tmp_path)
    assert not missing.exists()
    _only(tmp_path)


# ------------------------------------------------------------ compare's writers
def _comparison(nlpd: float = float("inf")) -> Comparison:
    """A Comparison of one engine with an infinite NLPD (a held-out point at 1e200),
    built by hand: the writers need only the table and the draws."""
    rng = np.random.default_rng(0)
    x_test = np.linspace(0.0, 1.0, 5)
    table = pd.DataFrame(
        {
            "engine": ["VI"],
            "draws": [60.0],
            "divergences": [np.nan],
            "nlpd": [nlpd],
            "rmse": [float("inf")],
            "log_evidence": [float("-inf")],
            "coverage_90": [0.8],
            "error": [""],
        },
        index=["VI"],
    )
    return Comparison(
        table=table,
        posteriors={"VI": None},
        predictions={"VI": rng.normal(size=(1, 60, 5))},
        errors={},
        observations=np.array([0.1, 0.2, 1e200, 0.3, 0.4]),
        site="y",
        test_arguments={"x": x_test},
        train_arguments={"x": x_test},
        observed_arg="y",
    )


def test_markdown_prints_infinite_and_missing_scores_as_text() -> None:
    text = _comparison().to_markdown()
    row = [c.strip() for c in text.splitlines()[2].strip("|").split("|")]
    # draws, divergences (n/a), nlpd, rmse, log_evidence: the whole-number columns
    # whose only value is infinite used to raise OverflowError in int(inf).
    # (the engine column, equal to the row name, is left out of the markdown)
    assert row[1:5] == ["60", "n/a", "inf", "inf"] and row[5] == "-inf"
    table = pd.DataFrame({"n": [3.0, float("inf"), float("-inf"), np.nan]}, index=list("abcd"))
    assert format_markdown(table).splitlines()[2:] == [
        "| a | 3 |",
        "| b | inf |",
        "| c | -inf |",
        "| d | n/a |",
    ]


def _fail_after_writing(monkeypatch: pytest.MonkeyPatch, owner: Any, method: str) -> None:
    """``owner.method`` writes a partial file to its path, then raises WriteFailed."""

    def partial(self: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        Path(target).write_text("partial")
        raise WriteFailed("disk full")

    monkeypatch.setattr(owner, method, partial)


class _PartialFile:
    """An open text file whose first write writes ten characters, then fails."""

    def __init__(self, path: Any, *args: Any, **kwargs: Any) -> None:
        self.file = open(path, *args, **kwargs)  # noqa: SIM115 (closed in __exit__)

    def __enter__(self) -> _PartialFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()

    def write(self, text: str) -> int:
        self.file.write(text[:10])
        raise WriteFailed("disk full")


def _break_open(monkeypatch: pytest.MonkeyPatch) -> None:
    import probdyn.diagnostics.compare as compare_module

    monkeypatch.setattr(compare_module, "open", _PartialFile, raising=False)


@pytest.mark.parametrize(
    "name, fault, write",
    [
        ("table.csv", lambda m: _fail_after_writing(m, pd.DataFrame, "to_csv"), "to_csv"),
        ("table.md", _break_open, "to_markdown"),
        ("bands.png", lambda m: _fail_after_writing(m, Figure, "savefig"), "plot"),
    ],
    ids=["to_csv", "to_markdown", "plot"],
)
def test_a_failed_comparison_write_leaves_the_old_file(
    name: str, fault: Any, write: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / name
    path.write_text("old")
    comparison = _comparison()
    fault(monkeypatch)
    with pytest.raises(WriteFailed, match="disk full"):
        if write == "plot":
            comparison.plot(path=str(path))
        else:
            getattr(comparison, write)(str(path))
    monkeypatch.undo()
    plt.close("all")
    assert path.read_text() == "old"
    _only(tmp_path, name)


@pytest.mark.parametrize(
    "write, call",
    [
        (lambda c, p: c.to_csv(p), "to_csv"),
        (lambda c, p: c.to_markdown(p), "to_markdown"),
        (lambda c, p: plt.close(c.plot(path=p)), "plot"),
    ],
    ids=["to_csv", "to_markdown", "plot"],
)
def test_comparison_writers_name_a_missing_directory(write: Any, call: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"Comparison.{call}\(path=.*missing.*Create"):
        write(_comparison(), tmp_path / "missing" / "out")
    plt.close("all")


# ----------------------------------------------------------- the command line
@pytest.fixture
def no_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROBDYN_NO_COMPILATION_CACHE", "1")


def _compare_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, result: Comparison) -> int:
    """``probdyn compare`` on a saved model, with the fitting replaced by ``result``."""
    import probdyn.diagnostics.compare as compare_module

    (tmp_path / "m.py").write_text("def model(x, y=None):\n    pass\n")
    np.savez(tmp_path / "d.npz", train_x=np.zeros(3), train_y=np.zeros(3), test_y=np.zeros(5))
    monkeypatch.setattr(compare_module, "compare", lambda *a, **k: result)
    argv = ["compare", "--model", f"{tmp_path / 'm.py'}:model", "--data", str(tmp_path / "d.npz")]
    return main([*argv, "--engines", "vi", "--out", str(tmp_path / "out")])


def test_cli_compare_writes_a_table_with_infinite_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_cache: None, capsys: Any
) -> None:
    assert _compare_cli(tmp_path, monkeypatch, _comparison()) == 0
    out = tmp_path / "out" / "model-numpyro-vi"
    _only(out, "comparison.csv", "comparison.md", "bands.png")
    assert "| VI | 60 | n/a | inf | inf | -inf |" in (out / "comparison.md").read_text()
    assert pd.read_csv(out / "comparison.csv", index_col=0).loc["VI", "nlpd"] == np.inf
    assert "| VI | 60 |" in capsys.readouterr().out


def test_cli_compare_writes_the_other_outputs_when_one_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_cache: None, capsys: Any
) -> None:
    def broken(self: Any, path: Any = None, **kwargs: Any) -> str:
        raise WriteFailed("disk full")

    monkeypatch.setattr(Comparison, "to_markdown", broken)
    assert _compare_cli(tmp_path, monkeypatch, _comparison(nlpd=1.5)) == 1
    _only(tmp_path / "out" / "model-numpyro-vi", "comparison.csv", "bands.png")
    assert "could not write" in capsys.readouterr().err


def test_cli_compare_refuses_an_out_that_is_a_file(
    tmp_path: Path, no_cache: None, capsys: Any
) -> None:
    (tmp_path / "taken").write_text("")
    argv = ["compare", "--engines", "vi", "--out", str(tmp_path / "taken")]
    assert main(argv) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "compare"])
@pytest.mark.parametrize(
    "seed, message",
    [
        ("-1", "-1 is out of range"),
        ("2147483648", "2147483648 is out of range"),
        ("one", "'one' is not an integer"),
    ],
)
def test_cli_seed_is_checked_by_argparse(
    command: str, seed: str, message: str, tmp_path: Path, capsys: Any
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--seed", seed, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"argument --seed: {message}" in capsys.readouterr().err
    _only(tmp_path)  # nothing was fitted or written


def test_run_demo_refuses_a_negative_seed(tmp_path: Path) -> None:
    from probdyn.demo._run import run_demo

    with pytest.raises(ValueError, match=r"run_demo\(seed=-1\)"):
        run_demo(seed=-1, out=str(tmp_path))


def test_a_failed_demo_plot_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from probdyn.data import synthetic_predator_prey
    from probdyn.demo._run import plot_predictive

    data = synthetic_predator_prey(seed=0)
    draws = np.exp(np.random.default_rng(0).normal(size=(1, 10, len(data.t_grid), 2)))
    path = tmp_path / "predictive.png"
    plot_predictive(data, {"z": draws, "y": draws}, str(path))
    before = path.read_bytes()
    _fail_after_writing(monkeypatch, Figure, "savefig")
    with pytest.raises(WriteFailed):
        plot_predictive(data, {"z": draws, "y": draws}, str(path))
    assert path.read_bytes() == before
    _only(tmp_path, "predictive.png")
    assert not plt.get_fignums()  # the figure was closed all the same
