"""``probdyn.compare``: several engines, one model, one table of held-out scores.

Every engine is fitted with `probdyn.fit` and scored on the same held-out data
with the same functions (`probdyn.diagnostics.calibration`), so the rows of the table differ
only by the engine. An engine that fails becomes a row with its error message.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from probdyn import calibration
from probdyn.core.engines import HMC, NUTS, SMC, AbstractEngine
from probdyn.core.fit import fit
from probdyn.core.posterior import Posterior
from probdyn.diagnostics.markdown import format_markdown

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["Comparison", "compare"]

# Engines whose draws form Markov chains (SMC: after its final resample-move
# stage; see `compare`), so that an effective sample size means something.
_ESS_ENGINES = (NUTS, HMC, SMC)


@dataclasses.dataclass(eq=False)
class Comparison:
    """The result of `compare`: one row per engine, the posteriors and the draws behind it.

    Attributes:
        table: ``pandas.DataFrame`` indexed by engine name; columns are listed in
            `compare`. Undefined entries (ESS for VI, log evidence for NUTS, every
            metric of a failed engine) are NaN.
        posteriors: engine name -> `Posterior` (None where the fit failed).
        predictions: engine name -> predictive draws of the scored site at the test
            inputs, ``(chain, draw, *observations.shape)`` (None where missing).
        errors: engine name -> the full traceback of the failure, for failed rows.
        observations: the held-out observations.
        site: the scored site (the observed site, unless ``predict_site`` was given).
        test_arguments: the model's arguments at the test inputs, by parameter name
            (the observed argument holds ``observations``).
        train_arguments: the model's arguments used for fitting, by parameter name.
        observed_arg: the model argument that carries observations.

    Example:
        >>> result = probdyn.compare(model, x, y, engines=[probdyn.NUTS(), probdyn.VI()],
        ...                          test=((x_test,), y_test))  # doctest: +SKIP
        >>> print(result.to_markdown())  # doctest: +SKIP
    """

    table: pd.DataFrame
    posteriors: dict[str, Posterior | None]
    predictions: dict[str, np.ndarray | None]
    errors: dict[str, str]
    observations: np.ndarray
    site: str
    test_arguments: dict[str, Any] = dataclasses.field(repr=False)
    train_arguments: dict[str, Any] = dataclasses.field(repr=False)
    observed_arg: str = "y"
    model: Callable[..., Any] | None = dataclasses.field(default=None, repr=False)

    def to_markdown(self, path: str | os.PathLike[str] | None = None, *, digits: int = 3) -> str:
        """The table as GitHub-flavoured markdown (no ``tabulate`` needed).

        Numbers get ``digits`` significant digits without exponents where
        possible; undefined entries print as ``n/a``.

        Args:
            path: also write the markdown to this file.
            digits: significant digits of the numbers.

        Returns:
            The markdown text.
        """
        text = format_markdown(self.table, digits=digits)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        return text

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the table to a CSV file (full precision, empty cells for NaN)."""
        self.table.to_csv(path, index_label="name")

    def plot(
        self,
        inputs: Any = None,
        *,
        x: Any = None,
        site: str | None = None,
        levels: Sequence[float] = (0.5, 0.9),
        key: Any = 1,
        output_names: Sequence[str] | None = None,
        show_train: bool = True,
        path: str | os.PathLike[str] | None = None,
    ) -> Figure:
        """Predictive bands of every engine side by side.

        One column per engine and one row per output dimension (the observations'
        elements after the first axis, e.g. the two species of a trajectory). The
        bands are central intervals at ``levels`` around the median; the held-out
        observations are red crosses and, where they share the x axis, the
        training observations black dots.

        Args:
            inputs: new inputs to predict at, in the form of ``test`` in `compare`
                (e.g. ``(t_grid,)``): a dense grid draws smooth bands. Default: the
                test inputs (no new predictions are made). With new inputs the
                model is called with ``None`` for the observed argument.
            x: the horizontal axis, one value per input point. Default: the first
                argument that is one value per point (e.g. times, or one-feature
                ``x``); failing that, the held-out points sorted by observed value.
            site: the site to draw (default: the scored site). With a site other
                than the observed one (e.g. a latent trajectory), pass ``inputs``.
            levels: central interval levels of the bands.
            key: int seed or backend key for new predictions.
            output_names: a label per output dimension.
            show_train: draw the training observations where they fit on the axis.
            path: also save the figure there.

        Returns:
            A ``matplotlib.figure.Figure``.

        Example:
            >>> fig = result.plot((t_grid,), x=t_grid, path="bands.png")  # doctest: +SKIP
        """
        from probdyn.diagnostics.compare_plot import _plot_bands

        return _plot_bands(
            self, inputs, x=x, site=site, levels=levels, key=key,
            output_names=output_names, show_train=show_train, path=path,
        )  # fmt: skip


def compare(
    model: Callable[..., Any],
    *args: Any,
    engines: Sequence[AbstractEngine] | Mapping[str, AbstractEngine],
    test: tuple[Any, Any],
    observed_arg: str = "y",
    key: Any = 0,
    observed_site: str | None = None,
    predict_site: str | None = None,
    levels: Sequence[float] = (0.5, 0.9, 0.95),
    width_level: float = 0.9,
    backend: str | None = None,
    progress_bar: bool | None = None,
    verbose: bool = False,
    **model_kwargs: Any,
) -> Comparison:
    """Fit ``model`` with several engines and score each on held-out data.

    The training data are passed as to `probdyn.fit`. The held-out data are
    ``test=(inputs, observations)``: ``observations`` go into the model argument
    named ``observed_arg`` (default ``"y"``) and ``inputs`` replace the training
    values of the other arguments, either as a tuple of the model's positional
    arguments *with the observed argument left out* (``model(x, y)`` and
    ``model(times, y=None)`` both take ``test=((x_test,), y_test)``) or as a dict
    by argument name. Arguments not given keep their training values.

    Columns of ``Comparison.table`` (one row per engine, NaN where undefined):

    * ``engine``, ``backend``, ``draws`` (chains x draws);
    * ``wall_time``, ``compile_time``: seconds, from the posterior's ``attrs``;
    * ``ess``: the smallest bulk ESS (ArviZ) over held-out points of the pointwise
      log likelihood ``log p(y_i | theta)`` — a predictive quantity, and the one the
      NLPD is averaged from; ``ess_per_s = ess / wall_time``. Defined for NUTS and
      HMC, and for SMC, whose particles are treated as one chain: copies of an
      ancestor sit next to each other after resampling, so ArviZ's
      autocorrelation estimate discounts them (a rough guide, not a guarantee).
      VI and ensemble draws are not Markov chains: NaN;
    * ``divergences``: sum of ``sample_stats["diverging"]`` (NaN without it);
    * ``nlpd``: exact negative log predictive density, ``-log mean_s p(y_i |
      theta_s)`` from `Posterior.log_likelihood_at`, averaged over observations
      (over observed vectors when the likelihood has event dimensions);
    * ``crps``, ``rmse``: of the predictive draws of the observed site;
    * ``coverage_50``, ``coverage_90``, ``coverage_95`` (one per ``levels``): the
      fraction of observations inside the central predictive interval;
    * ``width_90``: mean width of the central interval at ``width_level``;
    * ``log_evidence``: `Posterior.log_evidence` (SMC);
    * ``score_time``: seconds spent predicting and scoring;
    * ``error``: the error message of a failed engine, else empty.

    Args:
        model: a NumPyro or Pyro model function.
        *args: the model's positional arguments for fitting (observations included).
        engines: engine configs, a list (rows named by engine type, e.g. ``"NUTS"``,
            ``"VI (2)"`` for a repeat) or a dict from row name to config.
        test: ``(inputs, observations)``, see above.
        observed_arg: name of the model argument that takes the observations.
        key: an int seed or a backend key, the same for every engine (int seeds
            ``key + 1`` predict and score).
        observed_site: the observed site to score when the model has several.
        predict_site: the site whose draws are compared with the observations
            (default: the observed site).
        levels: nominal levels of the coverage columns.
        width_level: level of the interval-width column.
        backend: ``"numpyro"`` or ``"pyro"``; detected when omitted.
        progress_bar: override every engine's ``progress_bar`` (None: as configured).
        verbose: print one line per engine as it finishes.
        **model_kwargs: the model's keyword arguments for fitting.

    Returns:
        A `Comparison`.

    Raises:
        TypeError: for an engine that is not an engine config, or a model whose
            signature cannot be read.
        ValueError: for empty ``engines``, a malformed ``test``, a level outside
            (0, 1), or an ``observed_arg`` the model does not take.

    Example:
        >>> import numpy as np, probdyn
        >>> from probdyn.testing import linear_regression_data, linear_regression_model
        >>> data = linear_regression_data()
        >>> x, y = data.args[:2]
        >>> result = probdyn.compare(
        ...     linear_regression_model, x[:20], y[:20], key=0, progress_bar=False,
        ...     engines={"vi": probdyn.VI(num_steps=300, num_draws=200)},
        ...     test=((x[20:],), y[20:]))
        >>> bool(result.table.loc["vi", "coverage_90"] > 0.5)
        True
    """
    named = _named_engines(engines, progress_bar)
    for name, value in [*(("levels", v) for v in levels), ("width_level", width_level)]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"compare({name}=...): {value!r} is not a probability in (0, 1).")
    if not isinstance(test, (tuple, list)) or len(test) != 2:
        raise ValueError(
            f"compare(test={_short(test)}): give test=(inputs, observations), e.g. "
            "test=((x_test,), y_test)."
        )
    binder = _Binder(model, observed_arg)
    train = binder.bind_train(args, model_kwargs)
    observations = np.asarray(_to_numpy(test[1]))
    test_args = binder.bind_test(train, test[0], observations)
    call = binder.call_of(test_args)
    score_key = key + 1 if isinstance(key, int) and not isinstance(key, bool) else key

    rows, posteriors, predictions, errors = [], {}, {}, {}
    site = predict_site or observed_site
    for name, engine in named.items():
        row, post, pred, err, used_site = _run_one(
            model, args, model_kwargs, engine, key, backend, call, observations,
            score_key=score_key, observed_site=observed_site, predict_site=predict_site,
            levels=levels, width_level=width_level,
        )  # fmt: skip
        site = site or used_site
        rows.append({"name": name, **row})
        posteriors[name], predictions[name] = post, pred
        if err:
            errors[name] = err
        if verbose:
            print(_progress_line(name, row))
    import pandas as pd

    table = pd.DataFrame(rows).set_index("name")
    table.index.name = None
    return Comparison(
        table=table,
        posteriors=posteriors,
        predictions=predictions,
        errors=errors,
        observations=observations,
        site=site or observed_arg,
        test_arguments=test_args,
        train_arguments=train,
        observed_arg=observed_arg,
        model=model,
    )


# -- engines -----------------------------------------------------------------------


def _named_engines(
    engines: Sequence[AbstractEngine] | Mapping[str, AbstractEngine], progress_bar: bool | None
) -> dict[str, AbstractEngine]:
    if isinstance(engines, Mapping):
        items = [(str(k), v) for k, v in engines.items()]
    elif isinstance(engines, (list, tuple)):
        items = []
        counts: dict[str, int] = {}
        for engine in engines:
            base = type(engine).__name__
            counts[base] = counts.get(base, 0) + 1
            items.append((base if counts[base] == 1 else f"{base} ({counts[base]})", engine))
    else:
        raise TypeError(
            f"compare(engines={_short(engines)}): give a list of engine configs or a dict "
            "from name to config, e.g. engines=[probdyn.NUTS(), probdyn.VI()]."
        )
    if not items:
        raise ValueError("compare(engines=[]): give at least one engine config.")
    out = {}
    for name, engine in items:
        if not isinstance(engine, AbstractEngine):
            raise TypeError(
                f"compare(engines=...): entry {name!r} is {_short(engine)}, not an engine "
                "config; use e.g. probdyn.NUTS(...) or probdyn.VI(...)."
            )
        if progress_bar is not None and "progress_bar" in {
            f.name
            for f in dataclasses.fields(engine)  # type: ignore[arg-type]
        }:
            engine = dataclasses.replace(engine, progress_bar=progress_bar)  # type: ignore[type-var]
        out[name] = engine
    return out


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
    return f"coverage_{100 * float(level):g}"


def _width_column(level: float) -> str:
    return f"width_{100 * float(level):g}"


def _progress_line(name: str, row: Mapping[str, Any]) -> str:
    if row["error"]:
        return f"{name}: {row['error']}"
    return (
        f"{name}: {row['wall_time']:.1f} s (compile {row['compile_time']:.1f} s), "
        f"NLPD {row['nlpd']:.3f}, CRPS {row['crps']:.3f}"
    )


# -- arguments -----------------------------------------------------------------------


class _Binder:
    """Maps training and test data onto the model's parameters by name."""

    def __init__(self, model: Callable[..., Any], observed_arg: str) -> None:
        try:
            self.signature = inspect.signature(model)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"compare(model={_short(model)}): cannot read the model's signature ({err}); "
                "pass a plain Python model function."
            ) from err
        params = self.signature.parameters
        if observed_arg not in params:
            raise ValueError(
                f"compare(observed_arg={observed_arg!r}): the model takes no argument of that "
                f"name; its arguments are {list(params)}. Name the one that receives the "
                "observations."
            )
        self.observed_arg = observed_arg
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.positional = [n for n, p in params.items() if p.kind in positional]

    def bind_train(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"compare: the training arguments do not fit the model: {err}") from err
        bound.apply_defaults()
        if bound.arguments.get(self.observed_arg) is None:
            raise ValueError(
                f"compare: the training data give no observations in the model argument "
                f"{self.observed_arg!r}; pass them as to probdyn.fit, or set observed_arg to "
                "the argument that takes them."
            )
        return dict(bound.arguments)

    def bind_test(self, train: dict[str, Any], inputs: Any, observations: Any) -> dict[str, Any]:
        if isinstance(inputs, Mapping):
            given = dict(inputs)
            unknown = sorted(set(given) - set(self.signature.parameters))
            if unknown:
                raise ValueError(
                    f"compare(test=(inputs, ...)): the model takes no argument(s) {unknown}; "
                    f"its arguments are {list(self.signature.parameters)}."
                )
        elif isinstance(inputs, (tuple, list)):
            slots = [n for n in self.positional if n != self.observed_arg]
            if len(inputs) > len(slots):
                raise ValueError(
                    f"compare(test=(inputs, ...)): {len(inputs)} test inputs, but the model has "
                    f"only {len(slots)} positional arguments besides {self.observed_arg!r}: "
                    f"{slots}."
                )
            given = dict(zip(slots, inputs))
        else:
            raise ValueError(
                f"compare(test=({_short(inputs)}, ...)): the test inputs must be a tuple of the "
                "model's positional arguments (without the observations), e.g. (x_test,), or "
                "a dict by argument name."
            )
        if self.observed_arg in given:
            raise ValueError(
                f"compare(test=(inputs, ...)): the inputs set the observed argument "
                f"{self.observed_arg!r}; pass the observations as the second element of test."
            )
        return {**train, **given, self.observed_arg: observations}

    def call_of(self, arguments: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` that call the model with ``arguments``."""
        bound = inspect.BoundArguments(self.signature, dict(arguments))  # type: ignore[arg-type]
        return tuple(bound.args), dict(bound.kwargs)


def _to_numpy(value: Any) -> Any:
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
