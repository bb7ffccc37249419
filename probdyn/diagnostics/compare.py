"""``probdyn.compare``: several engines, one model, one table of held-out scores.

Every engine is fitted with `probdyn.fit` and scored on the same held-out data
with the same functions (`probdyn.diagnostics.calibration`), so the rows of the table differ
only by the engine. An engine that fails becomes a row with its error message.

Fitting and scoring one engine (a row of the table) is in `compare_score`, the mapping
of training and test data onto the model's arguments in `compare_args`, and the figure
of `Comparison.plot` in `compare_plot`, all under `probdyn.diagnostics`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from probdyn.core.engines import AbstractEngine
from probdyn.core.io import write_output
from probdyn.core.posterior import Posterior
from probdyn.diagnostics.compare_args import _Binder, _short, _to_numpy
from probdyn.diagnostics.compare_score import _progress_line, _run_one
from probdyn.diagnostics.markdown import format_markdown
from probdyn.engines.keys import KEY_BOUND, int_key

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["Comparison", "compare"]


# Markdown headers of the columns that have a unit.
_UNITS = {"wall_time": "wall_time (s)", "compile_time": "compile_time (s)",
          "score_time": "score_time (s)"}  # fmt: skip


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

    def to_markdown(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        digits: int = 3,
        title: str = "",
        notes: Sequence[str] = (),
    ) -> str:
        """The table as GitHub-flavoured markdown (no ``tabulate`` needed).

        Times carry their unit in the header (``wall_time (s)``). The first column is
        the row name; where every row is named after its engine (the usual case), it
        is headed ``engine`` and the ``engine`` column, which would repeat it, is left
        out. Numbers get ``digits`` significant digits without exponents where
        possible; undefined entries print as ``n/a``, infinite ones as ``inf`` or
        ``-inf``. The file is written beside ``path`` and renamed onto it, so a
        failed write leaves an existing file as it was.

        Args:
            path: also write the markdown to this file.
            digits: significant digits of the numbers.
            title: a ``#`` heading above the table (none if empty).
            notes: paragraphs below the table.

        Returns:
            The markdown text.

        Raises:
            FileNotFoundError: if the directory of ``path`` does not exist.
        """
        shown = self.table.rename(columns=_UNITS)
        if "engine" in shown and list(shown["engine"]) == [str(i) for i in shown.index]:
            shown = shown.drop(columns="engine").rename_axis("engine")
        else:
            shown = shown.rename_axis("name")
        text = format_markdown(shown, digits=digits)
        if title:
            text = f"# {title}\n\n{text}"
        text += "".join(f"\n{note}\n" for note in notes)
        if path is not None:

            def write(target: str) -> None:
                with open(target, "w", encoding="utf-8") as fh:
                    fh.write(text)

            write_output(path, write, "Comparison.to_markdown(path=...)")
        return text

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the table to a CSV file (full precision, empty cells for NaN).

        The first column, ``name``, is the row name and ``engine`` the engine's type:
        they differ for a dict of engines (its keys) and for repeats (``"VI (2)"``),
        so both are kept. Times are in seconds. The file is written beside ``path``
        and renamed onto it, so a failed write leaves an existing file as it was.

        Raises:
            FileNotFoundError: if the directory of ``path`` does not exist.
        """
        write_output(
            path,
            lambda target: self.table.to_csv(target, index_label="name"),
            "Comparison.to_csv(path=...)",
        )

    def plot(
        self,
        inputs: Any = None,
        *,
        x: Any = None,
        site: str | None = None,
        levels: Sequence[float] = (0.5, 0.9),
        key: Any = 1,
        output_names: Sequence[str] | None = None,
        x_label: str | None = None,
        x_split: float | None = None,
        show_train: bool = True,
        path: str | os.PathLike[str] | None = None,
    ) -> Figure:
        """Predictive bands of every engine side by side.

        One column per engine and one row per output dimension (the observations'
        elements after the first axis, e.g. the two species of a trajectory). The
        bands are central intervals at ``levels`` around the median; the held-out
        observations are red crosses and, where they share the x axis, the
        training observations black dots. Panels in a row share their y axis, which
        spans the observations and the bands, but no more than half the observations'
        range beyond them: a band far wider than the data (an unconverged engine) runs
        off its panel instead of squashing the others.

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
            output_names: a label per output dimension (the y axes).
            x_label: the x axis label (default: the name of the argument drawn on it).
            x_split: where the training data end on the x axis (e.g. the start of a
                forecast window): a dotted line, labelled in the legend.
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
            output_names=output_names, x_label=x_label, x_split=x_split,
            show_train=show_train, path=path,
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
    seed = int_key(key)
    score_key = key if seed is None else (seed + 1) % KEY_BOUND

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


def _named_engines(
    engines: Sequence[AbstractEngine] | Mapping[str, AbstractEngine], progress_bar: bool | None
) -> dict[str, AbstractEngine]:
    """Row name -> engine config (with ``progress_bar`` overridden unless None), checked."""
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
