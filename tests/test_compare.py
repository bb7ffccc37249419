"""``probdyn.compare``: one table of held-out scores for several engines."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from scipy import stats

import probdyn
from probdyn import calibration
from probdyn.demo._run import DemoSettings, _engine, _load_data, _model
from probdyn.diagnostics.compare import Comparison, compare, format_markdown
from probdyn.testing import (
    linear_regression_data,
    linear_regression_model,
    linear_regression_model_pyro,
)

COLUMNS = [
    "engine",
    "backend",
    "draws",
    "wall_time",
    "compile_time",
    "ess",
    "ess_per_s",
    "divergences",
    "nlpd",
    "crps",
    "rmse",
    "coverage_50",
    "coverage_90",
    "coverage_95",
    "width_90",
    "log_evidence",
    "score_time",
    "error",
]
ALWAYS = ["draws", "wall_time", "compile_time", "nlpd", "crps", "rmse", "coverage_50"]
ALWAYS += ["coverage_90", "coverage_95", "width_90", "score_time"]

# In short demo runs, early warmup proposals can leave the ODE's stable region:
# the runner rejects them and says so with a RuntimeWarning, which is expected
# here (the demo's own CLI test shows it too).
ODE_WARNING = "ignore:.*solve\\(s\\) failed during the run:RuntimeWarning"


pytestmark = pytest.mark.usefixtures("torch_float64_one_thread")


def _split(n_train: int = 30, n_test: int = 10) -> dict[str, Any]:
    data = linear_regression_data(n=n_train + n_test)
    x, y, prior_scale, noise = data.args
    return {
        "x": x[:n_train],
        "y": y[:n_train],
        "x_test": x[n_train:],
        "y_test": y[n_train:],
        "prior_scale": prior_scale,
        "noise": noise,
    }


def _exact_log_evidence(x: np.ndarray, y: np.ndarray, prior_scale: float, noise: float) -> float:
    # The model with w ~ N(0, prior_scale^2 I) integrated out:
    # y ~ N(0, noise^2 I + prior_scale^2 X X^T).
    cov = noise**2 * np.eye(len(y)) + prior_scale**2 * x @ x.T
    return float(stats.multivariate_normal(np.zeros(len(y)), cov).logpdf(y))


# The SMC run below has 400 particles. Error model for its log evidence: at 1000
# particles on this problem (tests/test_smc_numpyro.py) the estimate's sd over
# seeds is 0.05-0.1, and the sd scales as 1/sqrt(particles), so at 400 it is at
# most 0.1 * sqrt(1000 / 400) = 0.16; 4 sd is 0.63 nats. The bias of log Z-hat,
# -var / 2 = -0.013, is negligible next to that.
SMC_PARTICLES = 400
EVIDENCE_TOLERANCE = 4 * 0.1 * np.sqrt(1000 / SMC_PARTICLES)


@pytest.fixture(scope="module")
def linear() -> tuple[Comparison, dict[str, Any]]:
    d = _split()
    engines = {
        "nuts": probdyn.NUTS(num_warmup=200, num_samples=200, num_chains=2),
        "vi": probdyn.VI(num_steps=500, num_draws=300),
        "ensemble": probdyn.Ensemble(num_members=8, num_steps=300),
        "smc": probdyn.SMC(num_particles=SMC_PARTICLES),
    }
    result = compare(
        linear_regression_model,
        d["x"],
        d["y"],
        d["prior_scale"],
        d["noise"],
        engines=engines,
        test=((d["x_test"],), d["y_test"]),
        key=0,
        progress_bar=False,
    )
    return result, d


def test_linear_regression_table_is_complete(linear: tuple[Comparison, dict[str, Any]]) -> None:
    result, d = linear
    table = result.table
    assert list(table.index) == ["nuts", "vi", "ensemble", "smc"]
    assert list(table.columns) == COLUMNS
    assert (table["error"] == "").all(), table["error"]
    assert list(table["engine"]) == ["NUTS", "VI", "Ensemble", "SMC"]
    assert (table["backend"] == "numpyro").all()
    assert list(table["draws"]) == [400, 300, 8, SMC_PARTICLES]
    assert np.isfinite(table[ALWAYS].to_numpy(dtype=float)).all()
    assert (table["compile_time"] <= table["wall_time"]).all()
    # ESS where the draws are chains (NUTS, SMC), divergences only from NUTS.
    assert np.isfinite(table.loc[["nuts", "smc"], ["ess", "ess_per_s"]].to_numpy()).all()
    assert table.loc[["vi", "ensemble"], ["ess", "ess_per_s"]].isna().all().all()
    assert table.loc["nuts", "divergences"] == 0
    assert table.loc[["vi", "ensemble", "smc"], "divergences"].isna().all()
    ess = table.loc["nuts", "ess"]
    assert table.loc["nuts", "ess_per_s"] == pytest.approx(ess / table.loc["nuts", "wall_time"])
    # The scored arguments: the test inputs replace x, the rest keep their training values.
    args = result.test_arguments
    assert set(args) == {"x", "y", "prior_scale", "noise"}
    assert args["x"] is d["x_test"] and args["prior_scale"] == d["prior_scale"]
    np.testing.assert_array_equal(args["y"], d["y_test"])


def test_log_evidence_only_for_smc_and_close_to_exact(
    linear: tuple[Comparison, dict[str, Any]],
) -> None:
    result, d = linear
    evidence = result.table["log_evidence"]
    assert evidence[["nuts", "vi", "ensemble"]].isna().all()
    smc = result.posteriors["smc"]
    assert smc is not None and evidence["smc"] == smc.log_evidence
    exact = _exact_log_evidence(d["x"], d["y"], d["prior_scale"], d["noise"])
    assert abs(evidence["smc"] - exact) <= EVIDENCE_TOLERANCE, (evidence["smc"], exact)


def test_metrics_match_an_independent_computation(
    linear: tuple[Comparison, dict[str, Any]],
) -> None:
    result, d = linear
    for name, post in result.posteriors.items():
        assert post is not None
        row = result.table.loc[name]
        # Exact NLPD from the draws of w: y_i ~ N(x_i . w_s, noise), log-mean-exp over s.
        w = post.draws(flatten=True)["w"]
        ll = stats.norm.logpdf(d["y_test"], w @ d["x_test"].T, d["noise"])
        nlpd = -np.mean(np.logaddexp.reduce(ll, axis=0) - np.log(len(w)))
        assert row["nlpd"] == pytest.approx(nlpd, rel=1e-9), name
        pred = result.predictions[name]
        assert pred is not None and pred.shape == (post.num_chains, post.num_draws, 10)
        # The replicates are y draws: their spread around x . w_s is the noise sd.
        # Error model: S*10 residuals of sd 0.5; the sample sd has relative sd
        # 1/sqrt(2 S 10) <= 8 % (S = 8 members), so 4 sd is within 32 %.
        resid = pred.reshape(len(w), -1) - w @ d["x_test"].T
        assert resid.std() == pytest.approx(d["noise"], rel=4 / np.sqrt(2 * resid.size))
        assert row["crps"] == pytest.approx(calibration.crps(pred, d["y_test"]))
        assert row["rmse"] == pytest.approx(calibration.rmse(pred, d["y_test"]))
        cov = calibration.coverage(pred, d["y_test"], (0.5, 0.9, 0.95))
        assert [row["coverage_50"], row["coverage_90"], row["coverage_95"]] == list(cov.values())
        assert row["width_90"] == pytest.approx(calibration.interval_width(pred, 0.9))


def test_markdown_csv_and_plot_are_written(
    linear: tuple[Comparison, dict[str, Any]], tmp_path: Path
) -> None:
    result, _ = linear
    text = result.to_markdown(str(tmp_path / "table.md"))
    assert (tmp_path / "table.md").read_text() == text
    lines = text.strip().splitlines()
    assert len(lines) == 2 + 4
    # Rows named apart from their engines: the name column is headed, engine kept.
    units = {c: f"{c} (s)" for c in ("wall_time", "compile_time", "score_time")}
    assert lines[0] == "| name | " + " | ".join(units.get(c, c) for c in COLUMNS) + " |"
    nuts = [c.strip() for c in lines[2].strip("|").split("|")]
    assert nuts[0] == "nuts" and nuts[1] == "NUTS" and nuts[3] == "400"
    assert nuts[COLUMNS.index("log_evidence") + 1] == "n/a"
    assert float(nuts[COLUMNS.index("nlpd") + 1]) == pytest.approx(
        result.table.loc["nuts", "nlpd"], rel=5e-3
    )

    result.to_csv(str(tmp_path / "table.csv"))
    back = pd.read_csv(tmp_path / "table.csv", index_col=0, keep_default_na=False)
    assert list(back.index) == list(result.table.index)
    assert list(back.columns) == COLUMNS
    numeric = [c for c in COLUMNS if c not in ("engine", "backend", "error")]
    got = back[numeric].replace("", np.nan).to_numpy(dtype=float)
    np.testing.assert_allclose(got, result.table[numeric].to_numpy(dtype=float), rtol=1e-12)

    fig = result.plot(path=str(tmp_path / "bands.png"))
    assert (tmp_path / "bands.png").stat().st_size > 0
    # One panel per engine; three features, so the points are ranked by observed value.
    assert [ax.get_title() for ax in fig.axes] == ["nuts", "vi", "ensemble", "smc"]
    assert fig.axes[0].get_xlabel() == "held-out point (sorted by observed value)"
    assert fig.axes[0].get_ylabel() == "y"
    plt.close(fig)
    fig = result.plot(x_label="test point", output_names=["target"])
    assert fig.axes[0].get_xlabel() == "test point" and fig.axes[0].get_ylabel() == "target"
    plt.close(fig)


def test_markdown_formatter_without_tabulate() -> None:
    table = pd.DataFrame(
        {"n": [3.0, np.nan], "v": [0.123456, 1234.5], "s": ["a|b", ""]}, index=["p", "q"]
    )
    assert format_markdown(table, digits=3).splitlines() == [
        "|  | n | v | s |",
        "| --- | ---: | ---: | --- |",
        "| p | 3 | 0.123 | a\\|b |",
        "| q | n/a | 1234 |  |",
    ]


@dataclasses.dataclass(frozen=True)
class Broken(probdyn.AbstractEngine):
    """An engine whose runner raises ``error`` (registered below for NumPyro only)."""

    name: ClassVar[str] = "broken"
    error: type[BaseException] = RuntimeError

    def _validate(self) -> None:
        pass


def _broken_runner(model: Any, args: Any, kwargs: Any, engine: Any, key: Any) -> Any:
    raise engine.error("the sampler exploded")


probdyn.register_runner(Broken, "numpyro", _broken_runner)


def test_failing_engines_are_rows_with_their_errors() -> None:
    # One engine fails in its fit, the other (a working VI) when it is scored:
    # predict_site="w" gives draws shaped (3,), not like the 10 observations.
    d = _split()
    result = compare(
        linear_regression_model,
        d["x"],
        d["y"],
        engines=[Broken(), probdyn.VI(num_steps=200, num_draws=50)],
        test=({"x": d["x_test"]}, d["y_test"]),
        predict_site="w",
        progress_bar=False,
    )
    table = result.table
    assert list(table.index) == ["Broken", "VI"] and list(table.columns) == COLUMNS
    assert table.loc["Broken", "error"] == "fit failed: RuntimeError: the sampler exploded"
    assert table.loc["Broken", [*ALWAYS, "ess", "log_evidence"]].isna().all()
    assert result.posteriors["Broken"] is None and result.predictions["Broken"] is None
    assert "_broken_runner" in result.errors["Broken"]  # the traceback
    vi = table.loc["VI"]
    assert vi["error"].startswith("scoring failed: ValueError: the predictive draws have shape")
    assert np.isfinite(vi["wall_time"]) and vi["draws"] == 50 and np.isnan(vi["nlpd"])
    assert result.posteriors["VI"] is not None
    assert "fit failed: RuntimeError" in result.to_markdown()
    # The figure shows the failures in their panels instead of failing.
    fig = result.plot()
    assert [ax.get_title() for ax in fig.axes] == ["Broken", "VI"]
    assert "the sampler exploded" in fig.axes[0].texts[0].get_text().replace("\n", " ")
    plt.close(fig)


def test_keyboard_interrupt_is_not_swallowed() -> None:
    d = _split()
    with pytest.raises(KeyboardInterrupt):
        compare(
            linear_regression_model,
            d["x"],
            d["y"],
            engines=[Broken(error=KeyboardInterrupt)],
            test=((d["x_test"],), d["y_test"]),
        )


def test_pyro_backend() -> None:
    d = _split()
    result = compare(
        linear_regression_model_pyro,
        d["x"],
        d["y"],
        engines={"vi": probdyn.VI(num_steps=300, num_draws=200)},
        test=((d["x_test"],), d["y_test"]),
        progress_bar=False,
    )
    row = result.table.loc["vi"]
    assert row["error"] == "" and row["backend"] == "pyro"
    assert np.isfinite(row[ALWAYS].to_numpy(dtype=float)).all()
    post = result.posteriors["vi"]
    assert post is not None
    ll = post.log_likelihood_at(d["x_test"], d["y_test"], key=1)["y"]
    assert row["nlpd"] == pytest.approx(calibration.nlpd(None, d["y_test"], log_likelihood=ll))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"engines": []}, ValueError, "at least one engine"),
        ({"engines": [probdyn.NUTS, "vi"]}, TypeError, "not an engine config"),
        ({"engines": probdyn.VI()}, TypeError, "list of engine configs"),
        ({"test": ((np.ones((3, 3)),),)}, ValueError, r"test=\(inputs, observations\)"),
        ({"test": (np.ones((3, 3)), np.ones(3))}, ValueError, "must be a tuple"),
        ({"test": ((1, 2, 3, 4), np.ones(3))}, ValueError, "4 test inputs"),
        ({"test": ({"y": 1}, np.ones(3))}, ValueError, "set the observed argument"),
        ({"test": ({"z": 1}, np.ones(3))}, ValueError, r"no argument\(s\) \['z'\]"),
        ({"observed_arg": "obs"}, ValueError, "takes no argument of that name"),
        ({"levels": (0.5, 90)}, ValueError, r"compare\(levels=...\): 90 is not a probability"),
        ({"width_level": 1.0}, ValueError, "not a probability in"),
    ],
)
def test_bad_arguments_are_refused_before_fitting(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    d = _split()
    call: dict[str, Any] = {
        "engines": [Broken()],
        "test": ((d["x_test"],), d["y_test"]),
        **kwargs,
    }
    with pytest.raises(error, match=match):
        compare(linear_regression_model, d["x"], d["y"], **call)


def test_training_data_must_hold_the_observations() -> None:
    def model(x: Any, y: Any = None) -> None:
        pass

    with pytest.raises(ValueError, match="give no observations in the model argument 'y'"):
        compare(model, np.ones(3), engines=[Broken()], test=((np.ones(2),), np.ones(2)))


# About a minute of JAX compilation (NUTS and VI on the neural ODE): end to end.
@pytest.mark.e2e
@pytest.mark.filterwarnings(ODE_WARNING)
def test_demo_model_nuts_and_vi(tmp_path: Path) -> None:
    # The quick demo sizes, started at the prior medians rather than a MAP fit:
    # that saves compiling an optimiser per engine (~15 s), and this test checks
    # that the table is complete, not how good the fits are.
    settings = dataclasses.replace(DemoSettings.quick(), init="median")
    data = _load_data("synthetic", 0)
    result = compare(
        _model("numpyro"),
        data.t_train,
        data.y_train,
        engines=[_engine("nuts", settings), _engine("vi", settings)],
        test=((data.t_test,), data.y_test),
        key=0,
        progress_bar=False,
    )
    table = result.table
    assert list(table.index) == ["NUTS", "VI"] and list(table.columns) == COLUMNS
    assert (table["error"] == "").all(), table["error"]
    assert np.isfinite(table[ALWAYS].to_numpy(dtype=float)).all()
    assert np.isfinite(table.loc["NUTS", ["ess", "ess_per_s", "divergences"]].to_numpy()).all()
    assert table.loc["VI", ["ess", "ess_per_s", "divergences"]].isna().all()
    assert table["log_evidence"].isna().all()
    coverage = table[["coverage_50", "coverage_90", "coverage_95"]].to_numpy()
    assert ((coverage >= 0) & (coverage <= 1)).all()
    assert (table[["crps", "rmse", "width_90"]] > 0).all().all()
    assert result.site == "y"
    pred = result.predictions["VI"]
    assert pred is not None and pred.shape == (1, settings.num_draws, 8, 2)
    # Two species: one row of panels each, one column per engine, times on the x axis.
    fig = result.plot(path=str(tmp_path / "bands.png"), output_names=["prey", "predator"])
    assert len(fig.axes) == 4 and fig.axes[0].get_ylabel() == "prey"
    assert fig.axes[-1].get_xlabel() == "times"
    assert (tmp_path / "bands.png").stat().st_size > 0
    plt.close(fig)


def test_bands_wider_than_the_data_run_off_the_panel_not_squash_it() -> None:
    from probdyn.diagnostics.compare_plot import _clip_to_data

    fig, (wild, tame) = plt.subplots(1, 2)
    data = np.array([1.0, 2.0, 3.0])  # range 2: the y axis may reach 0 and 4
    wild.fill_between([0, 1], [-100, -100], [100, 100])
    _clip_to_data(wild, [data])
    assert wild.get_ylim() == pytest.approx((0.0, 4.0))
    tame.fill_between([0, 1], [0.5, 0.5], [3.5, 3.5])
    before = tame.get_ylim()
    _clip_to_data(tame, [data, np.array([np.nan])])  # within reach: left as it was
    assert tame.get_ylim() == before
    plt.close(fig)
