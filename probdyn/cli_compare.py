"""``probdyn compare``: the command's run (engines, folder, outputs); its parser is in
`probdyn.cli`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from probdyn.cli import _COMPARE_ENGINES, _make_out


def _compare_engines(names: list[str], quick: bool, backend: str) -> dict[str, Any]:
    """Engine configs by row name (``"NUTS"``), sized like the demo's (``--quick``: smoke)."""
    import probdyn
    from probdyn.demo._run import DemoSettings, _engine

    s = DemoSettings.quick(backend) if quick else DemoSettings()
    out: dict[str, Any] = {}
    for name in names:
        if name in ("nuts", "vi"):
            engine = _engine(name, s)
        elif name == "hmc":
            engine = probdyn.HMC(
                num_warmup=s.num_warmup,
                num_samples=s.num_samples,
                num_chains=s.num_chains,
                init=s.init,
            )
        elif name == "ensemble":
            engine = probdyn.Ensemble(num_members=4 if quick else 10, num_steps=s.map_steps)
        else:
            engine = probdyn.SMC(
                num_particles=100 if quick else 500, num_mcmc_steps=2 if quick else 5
            )
        out[_COMPARE_ENGINES[name]] = engine
    return out


def run_compare(args: argparse.Namespace) -> int:
    names = [n.strip().lower() for n in args.engines.split(",") if n.strip()]
    unknown = [n for n in names if n not in _COMPARE_ENGINES]
    if not names:
        print(
            f"probdyn compare: --engines {args.engines!r}: no engine was given; name one or "
            f"more of {', '.join(_COMPARE_ENGINES)}, comma-separated (e.g. --engines nuts,vi).",
            file=sys.stderr,
        )
        return 2
    if args.model is None and str(args.data or "").endswith(".npz"):
        print(
            f"probdyn compare: --data {args.data!r} is an .npz file, which needs your model: "
            "add --model path/to/file.py:function (without --model, --data is the demo's "
            "synthetic or hare-lynx).",
            file=sys.stderr,
        )
        return 2
    if unknown:
        print(
            f"probdyn compare: --engines {args.engines!r}: unknown engine(s) {unknown}; "
            f"choose from {', '.join(_COMPARE_ENGINES)}, comma-separated.",
            file=sys.stderr,
        )
        return 2
    engines = _compare_engines(list(dict.fromkeys(names)), args.quick, args.backend)
    problem = _make_out("compare", args.out)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        if args.model is None:
            result, plot_kwargs, folder, heading = _compare_demo(args, engines)
        else:
            result, plot_kwargs, folder, heading = _compare_user_model(args, engines)
    except (OSError, ValueError, TypeError, AttributeError, ImportError) as err:
        print(f"probdyn compare: {err}", file=sys.stderr)
        return 2

    from probdyn.demo._checks import compare_checks, format_checks
    from probdyn.demo._plot import SMOKE_NOTE

    notes = [_COMPARE_NOTE]
    if args.quick:
        plot_kwargs = {**plot_kwargs, "note": SMOKE_NOTE}
        notes.insert(0, f"{SMOKE_NOTE}.")
    checks = compare_checks(result)
    markdown = {"title": heading, "notes": notes}
    written, failed = _write_compare_outputs(result, folder, plot_kwargs, markdown)
    print("\n" + format_checks(checks, "convergence, held-out coverage, failed solves"))
    if written:
        print("\nwrote " + ", ".join(written))
    for name, trace in result.errors.items():
        print(f"\n{name} failed:\n{trace}", file=sys.stderr)
    for path, error in failed.items():
        print(f"probdyn compare: could not write {path}: {error!r}", file=sys.stderr)
    return 1 if result.errors or failed else 0


def _write_compare_outputs(
    result: Any, out: str, plot_kwargs: dict[str, Any], markdown: dict[str, Any] | None = None
) -> tuple[list[str], dict[str, Exception]]:
    """Write the table (CSV first: it needs nothing but the numbers), the markdown and
    the figure, each on its own: one that fails does not keep the others from being
    written. Returns the paths written and the errors by path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {name: os.path.join(out, name) for name in _COMPARE_OUTPUTS}
    writers = {
        "comparison.csv": lambda path: result.to_csv(path),
        "comparison.md": lambda path: print(
            "\n" + result.to_markdown(path, **(markdown or {})).rstrip("\n")
        ),
        "bands.png": lambda path: plt.close(_bands(result, path, plot_kwargs)),
    }
    written: list[str] = []
    failed: dict[str, Exception] = {}
    for name in _COMPARE_OUTPUTS:
        try:
            writers[name](paths[name])
            written.append(paths[name])
        except Exception as err:
            failed[paths[name]] = err
    return written, failed


_COMPARE_OUTPUTS = ("comparison.csv", "comparison.md", "bands.png")

_COMPARE_NOTE = (
    "One row per engine, scored on the held-out observations: times in seconds "
    "(compile included in wall_time); ess is the smallest bulk ESS of the pointwise "
    "log likelihood (n/a for VI and ensembles, whose draws are not a Markov chain); "
    "nlpd (negative log predictive density), crps and rmse: lower is better; "
    "coverage_L: the fraction of observations inside the central L % predictive "
    "interval, to compare with L / 100; width_90: that interval's mean width. "
    "comparison.csv holds the same table at full precision."
)


def _bands(result: Any, path: str, plot_kwargs: dict[str, Any]) -> Any:
    """``Comparison.plot`` with the demo data's axes labelled (for the hare-lynx table,
    whose time 0 is 1900, years and pelts in thousands) and, for ``--quick`` runs, the
    smoke-test note, written to ``path``."""
    kwargs = dict(plot_kwargs)
    year0, y_unit = kwargs.pop("year0", None), kwargs.pop("y_unit", None)
    note = kwargs.pop("note", "")
    fig = result.plot(**kwargs)
    from matplotlib.ticker import FuncFormatter

    for ax in fig.axes:
        if year0 is not None:  # whole years every 5 from year0: a tick at 2.5 must not read "1902"
            from matplotlib.ticker import MultipleLocator

            from probdyn.demo._plot import YEAR_STEP

            ax.xaxis.set_major_locator(MultipleLocator(YEAR_STEP))
            ax.xaxis.set_minor_locator(MultipleLocator(1))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v + year0:.0f}"))
        if y_unit is not None:  # the data were divided by y_unit for fitting
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * y_unit:g}"))
    top = 1.0
    if note:  # a line above the title, as on the demo's figure
        top -= 0.2 / fig.get_figheight()  # 0.2 inches
        fig.suptitle(fig.get_suptitle(), fontsize=10, y=top - 0.02)
        fig.text(0.5, 0.99, note, ha="center", va="top", fontsize=8, color="C3")
    # Lay out again: the new tick labels are wider; the legend stays below the panels.
    fig.canvas.draw()
    legend_top = max((g.get_window_extent().y1 for g in fig.legends), default=0.0)
    fig.tight_layout(rect=(0, legend_top / fig.bbox.height, 1, top))

    from probdyn.core.io import write_output

    try:
        write_output(path, lambda target: fig.savefig(target, dpi=120), "probdyn compare: --out")
    except BaseException:
        import matplotlib.pyplot as plt

        plt.close(fig)
        raise
    return fig


def _compare_folder(args: argparse.Namespace, data: str, engines: dict[str, Any]) -> str:
    """A new folder for this run under ``--out`` (the demo's rule: never one that exists),
    named ``<data>-<backend>-<engines>[-quick]``; made once the arguments are checked."""
    from probdyn.demo._run import run_folder, run_name

    names = "-".join(name.lower() for name in engines)
    return run_folder(args.out, run_name(data, args.backend, names, args.quick))


def _compare_demo(
    args: argparse.Namespace, engines: dict[str, Any]
) -> tuple[Any, dict[str, Any], str, str]:
    from probdyn.demo._run import _load_data, _model
    from probdyn.diagnostics.compare import compare

    dataset = _load_data(args.data or "synthetic", args.seed)
    model = _model(args.backend)
    folder = _compare_folder(args, args.data or "synthetic", engines)
    heading = (
        f"probdyn compare: {dataset.name}, {len(dataset.t_train)} training observations, "
        f"{len(dataset.t_test)} held out; engines={','.join(engines)}, backend={args.backend}"
    )
    _say_heading(heading, args.quick)
    result = compare(
        model,
        dataset.t_train,
        dataset.y_train,
        engines=engines,
        test=((dataset.t_test,), dataset.y_test),
        key=args.seed,
        backend=args.backend,
        verbose=True,
    )
    grid = {
        "inputs": (dataset.t_grid,),
        "x": dataset.t_grid,
        "x_split": (float(dataset.t_train[-1]) + float(dataset.t_test[0])) / 2,
        "key": args.seed + 2,
    }
    if args.data == "hare-lynx":  # time is years since 1900, counts were divided by scale
        labels = {
            "x_label": "year",
            "year0": 1900.0,
            "y_unit": dataset.scale,
            "output_names": ("hare pelts (thousands)", "lynx pelts (thousands)"),
        }
    else:
        labels = {
            "x_label": "time (arbitrary units)",
            "output_names": ("prey (arbitrary units)", "predator (arbitrary units)"),
        }
    return result, {**grid, **labels}, folder, heading


def _compare_user_model(
    args: argparse.Namespace, engines: dict[str, Any]
) -> tuple[Any, dict[str, Any], str, str]:
    import inspect

    from probdyn.diagnostics.compare import compare

    if args.data is None or not str(args.data).endswith(".npz"):
        raise ValueError(
            f"--model {args.model!r} needs --data FILE.npz with train_* and test_* arrays "
            f"(got --data {args.data!r})."
        )
    model = _load_model(args.model)
    train, test = _load_npz(args.data, args.observed)
    try:
        bound = inspect.signature(model).bind(**train)
    except TypeError as err:
        raise ValueError(
            f"--data {args.data!r}: the train_* arrays do not fit the arguments of "
            f"{args.model!r}: {err}"
        ) from err
    observations = test.pop(args.observed)
    folder = _compare_folder(args, args.model.rpartition(":")[2], engines)
    heading = (
        f"probdyn compare: {args.model} on {args.data}; engines={','.join(engines)}, "
        f"backend={args.backend}"
    )
    _say_heading(heading, args.quick)
    result = compare(
        model,
        *bound.args,
        engines=engines,
        test=(test, observations),
        observed_arg=args.observed,
        key=args.seed,
        backend=args.backend,
        verbose=True,
        **bound.kwargs,
    )
    return result, {}, folder, heading


def _say_heading(heading: str, quick: bool) -> None:
    """The run's first lines, as the demo prints them (the smoke-size line for --quick)."""
    from probdyn.demo._plot import SMOKE_NOTE

    print(heading)
    if quick:
        print(f"({SMOKE_NOTE})")


def _load_model(spec: str) -> Any:
    import importlib.util

    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ValueError(f"--model {spec!r}: write it as path/to/file.py:function_name.")
    if not os.path.isfile(path):
        raise ValueError(f"--model {spec!r}: no file {path!r}.")
    module_name = "_probdyn_user_model_" + os.path.splitext(os.path.basename(path))[0]
    spec_obj = importlib.util.spec_from_file_location(module_name, path)
    if spec_obj is None or spec_obj.loader is None:
        raise ValueError(f"--model {spec!r}: cannot import {path!r} as a Python file.")
    module = importlib.util.module_from_spec(spec_obj)
    spec_obj.loader.exec_module(module)
    model = getattr(module, name, None)
    if not callable(model):
        raise ValueError(f"--model {spec!r}: {path!r} defines no function {name!r}.")
    return model


def _load_npz(path: str, observed: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``train_<name>`` / ``test_<name>`` arrays by argument name; unprefixed go to both."""
    import numpy as np

    def value(a: Any) -> Any:
        return a.item() if a.ndim == 0 else a  # scalars (noise levels, sizes) as numbers

    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    shared = {k: value(v) for k, v in arrays.items() if not k.startswith(("train_", "test_"))}
    train = {k[6:]: value(v) for k, v in arrays.items() if k.startswith("train_")}
    test = {k[5:]: value(v) for k, v in arrays.items() if k.startswith("test_")}
    for part, found in (("train", train), ("test", test)):
        if observed not in found:
            raise ValueError(
                f"--data {path!r} has no array {part}_{observed} (the observations; found "
                f"{sorted(arrays)}). Save them with np.savez(path, train_{observed}=..., "
                f"test_{observed}=..., ...), or name the argument with --observed."
            )
    return {**shared, **train}, test
