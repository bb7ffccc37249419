"""One row of `probdyn.compare`: fit an engine, predict the held-out data and score the
predictions with the functions of `probdyn.calibration`; a failure becomes the row's error."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from probdyn import calibration
from probdyn.core.engines import HMC, NUTS, SMC, AbstractEngine
from probdyn.core.fit import fit
from probdyn.core.posterior import Posterior

# Engines whose draws form Markov chains (SMC: after its final resample-move
# stage; see `compare`), so that an effective sample size means something.
_ESS_ENGINES = (NUTS, HMC, SMC)


def _run_one(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: AbstractEngine,
    key: Any,
    backend: str | None,
    call: tuple[tuple[Any, ...], dict[str, Any]],
    observations: np.ndarray,
    *,
    score_key: Any,
    observed_site: str | None,
    predict_site: str | None,
    levels: Sequence[float],
    width_level: float,
) -> tuple[dict[str, Any], Posterior | None, np.ndarray | None, str, str | None]:
    """Fit and score one engine; an exception becomes the row's ``error``."""
    row = _empty_row(engine, levels, width_level)
    post = None
    site = None
    stage = "fit"
    try:
        post = fit(model, *args, engine=engine, key=key, backend=backend, **kwargs)
        row.update(_fit_columns(post, engine))
        stage = "scoring"
        start = time.perf_counter()
        loglik, replicates = _heldout_draws(post, call, score_key)
        site = _observed_site(loglik, observed_site)
        if predict_site is None or predict_site == site:
            pred = replicates[site]
        else:
            new = post.predict(*call[0], key=score_key, sites=[predict_site], **call[1])
            pred = new[predict_site]
        row.update(_score_columns(pred, loglik[site], observations, levels, width_level))
        if isinstance(engine, _ESS_ENGINES):
            row["ess"] = _min_bulk_ess(loglik[site])
            row["ess_per_s"] = row["ess"] / row["wall_time"]
        row["score_time"] = time.perf_counter() - start
        return row, post, pred, "", site
    except Exception as err:  # a failing engine is a row, not a crash
        row["error"] = f"{stage} failed: {type(err).__name__}: {err}".replace("\n", " ")
        return row, post, None, traceback.format_exc(), site


def _heldout_draws(
    post: Posterior, call: tuple[tuple[Any, ...], dict[str, Any]], key: Any
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Pointwise log likelihood of the held-out observations and replicated
    observations, per draw.

    `Posterior.log_likelihood_at` and `Posterior.predict` would each run the
    model (and solve any ODE in it) once per draw; the backend's forward pass,
    which both are built on, gives the two from one run.
    """
    _, loglik, replicates = post._forward_draws(call[0], call[1], key)
    if not loglik:
        raise ValueError(
            "the model has no observed site at the test inputs; check that observed_arg names "
            "the argument used as obs=."
        )
    return loglik, replicates


def _empty_row(
    engine: AbstractEngine, levels: Sequence[float], width_level: float
) -> dict[str, Any]:
    """The row of an engine before its fit: every metric NaN, no error."""
    nan = float("nan")
    row: dict[str, Any] = {"engine": type(engine).__name__, "backend": "", "draws": nan}
    for name in ("wall_time", "compile_time", "ess", "ess_per_s", "divergences"):
        row[name] = nan
    for name in ("nlpd", "crps", "rmse"):
        row[name] = nan
    for level in levels:
        row[_coverage_column(level)] = nan
    row[_width_column(width_level)] = nan
    row.update({"log_evidence": nan, "score_time": nan, "error": ""})
    return row


def _fit_columns(post: Posterior, engine: AbstractEngine) -> dict[str, Any]:
    """The columns read from the fitted posterior: backend, draws, times, divergences, evidence."""
    diverging = post.sample_stats.get("diverging")
    evidence = post.log_evidence
    return {
        "backend": post.backend,
        "draws": post.num_chains * post.num_draws,
        "wall_time": float(post.attrs.get("wall_time", float("nan"))),
        "compile_time": float(post.attrs.get("compile_time", float("nan"))),
        "divergences": float("nan") if diverging is None else int(np.sum(diverging)),
        "log_evidence": float("nan") if evidence is None else evidence,
    }


def _score_columns(
    pred: np.ndarray,
    loglik: np.ndarray,
    observations: np.ndarray,
    levels: Sequence[float],
    width_level: float,
) -> dict[str, Any]:
    """The scores of the predictive draws ``pred`` of the held-out ``observations``."""
    pred = np.asarray(pred, dtype=float)
    if pred.shape[2:] != observations.shape:
        raise ValueError(
            f"the predictive draws have shape {pred.shape[2:]} per draw but the test "
            f"observations have shape {observations.shape}; they must match (check "
            "predict_site and test=(inputs, observations))."
        )
    cov = calibration.coverage(pred, observations, tuple(levels))
    out: dict[str, Any] = {
        # Exact given the observation distribution: -log mean_s p(y_i | theta_s).
        "nlpd": float(calibration.nlpd(pred, observations, log_likelihood=loglik)),
        "crps": float(calibration.crps(pred, observations)),
        "rmse": float(calibration.rmse(pred, observations)),
        _width_column(width_level): float(calibration.interval_width(pred, width_level)),
    }
    for level in levels:
        out[_coverage_column(level)] = float(cov[float(level)])
    return out


def _min_bulk_ess(values: np.ndarray) -> float:
    """Smallest bulk ESS over the elements of ``(chain, draw, *shape)`` values."""
    import arviz as az

    values = np.asarray(values, dtype=float)
    if values.ndim == 2:
        values = values[..., None]
    ess = az.ess(az.convert_to_dataset({"v": values}), method="bulk")["v"].values
    ess = ess[np.isfinite(ess)]
    return float(ess.min()) if ess.size else float("nan")


def _observed_site(loglik: Mapping[str, np.ndarray], wanted: str | None) -> str:
    """The observed site to score: ``wanted``, or the only one."""
    if wanted is not None:
        if wanted not in loglik:
            raise ValueError(
                f"compare(observed_site={wanted!r}): the model's observed sites at the test "
                f"inputs are {sorted(loglik)}; pick one of them."
            )
        return wanted
    if len(loglik) != 1:
        raise ValueError(
            f"the model has several observed sites ({sorted(loglik)}); pass "
            "compare(observed_site=...) to choose the one to score."
        )
    return next(iter(loglik))


def _coverage_column(level: float) -> str:
    """The name of the coverage column of ``level`` (``coverage_90`` for 0.9)."""
    return f"coverage_{100 * float(level):g}"


def _width_column(level: float) -> str:
    """The name of the interval-width column of ``level`` (``width_90`` for 0.9)."""
    return f"width_{100 * float(level):g}"


def _progress_line(name: str, row: Mapping[str, Any]) -> str:
    """The line ``verbose=True`` prints when an engine's row is done."""
    if row["error"]:
        return f"{name}: {row['error']}"
    return (
        f"{name}: {row['wall_time']:.1f} s (compile {row['compile_time']:.1f} s), "
        f"NLPD {row['nlpd']:.3f}, CRPS {row['crps']:.3f}"
    )
