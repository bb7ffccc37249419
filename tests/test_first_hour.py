"""The first hour of a new user (issue 20): runs that never overwrite each other, the
install command for a missing backend, help text without markup, and a summary that
explains itself and says in plain words when the draws look unconverged."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from probdyn.cli import build_parser, main
from probdyn.core.posterior import Posterior
from probdyn.demo._checks import coverage_checks, coverage_tolerance, summary_with_checks
from probdyn.demo._run import run_folder, run_name


@pytest.fixture
def no_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # main() would otherwise point this test process's JAX at a persistent cache.
    monkeypatch.setenv("PROBDYN_NO_COMPILATION_CACHE", "1")


# -- run folders ---------------------------------------------------------------------


def test_each_run_gets_a_new_folder_and_old_files_stay(tmp_path: Path) -> None:
    name = run_name("hare-lynx", "pyro", "vi", quick=True)
    assert name == "hare-lynx-pyro-vi-quick"
    first = Path(run_folder(str(tmp_path / "probdyn-demo"), name))
    (first / "posterior.nc").write_text("first run")
    second = Path(run_folder(str(tmp_path / "probdyn-demo"), name))
    assert (first.name, second.name) == (name, name + "-2")
    assert (first / "posterior.nc").read_text() == "first run"
    assert list(second.iterdir()) == []


def test_runs_started_at_once_get_distinct_folders(tmp_path: Path) -> None:
    found: list[str] = []
    threads = [
        threading.Thread(target=lambda: found.append(run_folder(str(tmp_path), "run")))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(found)) == 8


# -- a missing backend ---------------------------------------------------------------


def test_demo_without_pyro_prints_the_install_command(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_cache: None,
) -> None:
    monkeypatch.setitem(sys.modules, "pyro", None)  # `import pyro` now fails
    monkeypatch.delitem(sys.modules, "probdyn.demo._pyro", raising=False)
    assert main(["demo", "--backend", "pyro", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs the package 'pyro', which is not installed" in err
    assert 'pip install "probdyn[pyro]"' in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing fitted, no run folder


# -- help text -----------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_has_no_markup_and_every_option_says_what_it_does() -> None:
    parser = build_parser()
    texts = [parser.format_help()]
    for name, sub in _subparsers(parser).items():
        texts.append(sub.format_help())
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"probdyn {name} {action.option_strings[0]} has no help"
    for text in texts:
        assert "``" not in text and ":func:" not in text, text


def test_quick_help_does_not_promise_seconds() -> None:
    demo = _subparsers(build_parser())["demo"]
    quick = next(a for a in demo._actions if "--quick" in a.option_strings)
    assert "(seconds)" not in quick.help and "about a minute on a 2-core CPU" in quick.help


# -- the summary ---------------------------------------------------------------------


def _posterior(engine: str, chains: int = 1, draws: int = 300, stuck: bool = False) -> Posterior:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(chains, draws))
    if stuck:  # a random walk: each half of the chain sits somewhere else
        a = np.cumsum(a, axis=1)
    samples = {"a": a, "w": rng.normal(size=(chains, draws, 16))}
    return Posterior(samples=samples, attrs={"engine": {"engine": engine}})


def test_one_chain_gets_split_rhat_and_arviz_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        table = _posterior("NUTS").summary()
    assert not [r for r in caplog.records if "Shape validation" in r.getMessage()]
    # Independent draws: split R-hat is 1 within Monte-Carlo error (its sd is about
    # 0.01 for 300 draws in four quarters; 1.05 is the flag).
    assert table["r_hat"].notna().all() and (table["r_hat"] < 1.05).all()
    assert "split R-hat" in repr(table)


def test_folded_sites_read_as_sites_not_elements() -> None:
    table = _posterior("NUTS").summary()
    assert "w (16 elements, worst)" in table.index
    assert "w[16]" not in table.index
    assert "(n elements, worst)" in repr(table)


def test_summary_prints_every_column_and_a_dash_for_no_rhat() -> None:
    text = repr(_posterior("VI").summary())
    header, first = text.splitlines()[0].split(), text.splitlines()[1].split()
    assert header[:2] == ["mean", "sd"] and header[-1] == "r_hat" and "..." not in text
    assert first[0] == "a" and first[-1] == "—" and "NaN" not in text
    assert "R-hat does not apply" in text


def test_unconverged_rows_are_flagged_with_a_plain_warning() -> None:
    post = _posterior("NUTS", stuck=True)
    with pytest.warns(UserWarning, match=r"1 of 2 summary rows look unconverged.*: a\. "):
        table = post.summary()
    assert table.loc["a", "flag"] == "r_hat > 1.05, ess < 100"
    assert table.loc["w (16 elements, worst)", "flag"] == ""


@pytest.mark.parametrize(
    "draws, limit_words",
    [
        (100, "ess < 100 means fewer than 100 effective draws, too few for reliable"),
        (4000, "ess < 400 means fewer than 400 effective draws, a tenth of the 4000 drawn"),
    ],
)
def test_the_flag_footnote_reads_as_a_sentence_for_any_draw_count(
    draws: int, limit_words: str
) -> None:
    with pytest.warns(UserWarning, match="unconverged"):
        text = repr(_posterior("NUTS", draws=draws, stuck=True).summary())
    (note,) = [line for line in text.splitlines() if line.startswith("flag:")]
    assert note.startswith("flag: r_hat > 1.05 means the chains, or the parts of one chain,")
    assert limit_words in note
    assert "(100, or 10 %" not in note and "of the 100 draws" not in note


def test_the_demo_collects_summary_warnings_as_sentences() -> None:
    table, messages = summary_with_checks(_posterior("NUTS", stuck=True).summary)
    assert len(messages) == 1 and "unconverged" in messages[0]
    assert "flag" in table


def test_few_effective_draws_alone_are_not_called_unconverged() -> None:
    rng = np.random.default_rng(0)
    a = np.repeat(rng.normal(size=(2, 30)), 10, axis=1)  # 600 draws, 60 distinct
    post = Posterior(samples={"a": a}, attrs={"engine": {"engine": "NUTS"}})
    with pytest.warns(UserWarning, match=r"1 of 1 summary rows have few effective draws"):
        table = post.summary()
    assert table.loc["a", "flag"].startswith("ess <") and table.loc["a", "r_hat"] < 1.05


def test_independent_draws_are_not_flagged_for_rhat_or_ess() -> None:
    # Four ensemble members have an ESS of about 4: not a mixing problem.
    post = _posterior("Ensemble", draws=4)
    table = post.summary()
    assert "flag" not in table and table["r_hat"].isna().all()


# -- held-out coverage ---------------------------------------------------------------


def test_coverage_is_flagged_beyond_three_binomial_standard_errors() -> None:
    import pandas as pd

    # n = 16 at 90 %: se = sqrt(0.9 * 0.1 / 16) = 0.075, so the tolerance is 0.225.
    assert coverage_tolerance(0.9, 16) == pytest.approx(0.225)
    table = pd.DataFrame(
        {"target": "held-out observations", "coverage": [0.5, 0.68], "n": 16},
        index=pd.Index([0.5, 0.9], name="nominal"),
    )
    assert coverage_checks(table) == []  # 0.9 - 0.68 = 0.22 < 0.225
    table.loc[0.9, "coverage"] = 0.625
    (message,) = coverage_checks(table)
    assert "90% intervals cover 0.62 of 16 points" in message
    assert "too narrow (over-confident)" in message


def test_gitignore_lists_both_output_folders() -> None:
    ignored = (Path(__file__).parents[1] / ".gitignore").read_text().split()
    assert "probdyn-demo/" in ignored and "probdyn-compare/" in ignored


def test_low_hare_lynx_coverage_is_explained_not_silent() -> None:
    from probdyn.data import hare_lynx
    from probdyn.demo._run import _calibration, _low_coverage_note

    data = hare_lynx()
    rng = np.random.default_rng(0)
    # Draws around the truth, but the prey's 1.6 times too high: its points fall below.
    shift = np.array([1.6, 1.0])
    y = data.y_test * shift * np.exp(0.1 * rng.normal(size=(1, 2000, *data.y_test.shape)))
    table = _calibration(data, {"y": y, "z": y})
    (note,) = _low_coverage_note("hare-lynx", data, y, table)
    assert "of the 10 held-out observations" in note
    assert "5 of 5 prey points lie below the band" in note and "predator" not in note
    assert "not of the noise model" in note  # the measured hare-lynx explanation
    good = _calibration(data, {"y": data.y_test * np.exp(0.3 * rng.normal(size=y.shape)), "z": y})
    assert _low_coverage_note("hare-lynx", data, y, good) == []
