"""The ``probdyn`` command line."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

_DESCRIPTION = (
    "probdyn: probabilistic programming for dynamics. 'probdyn demo' fits a Bayesian "
    "neural ODE to predator-prey data; 'probdyn compare' fits several engines and scores "
    "them on held-out data. 'probdyn COMMAND --help' describes each."
)


def _configure_jax() -> None:
    # The CLI is an application, so it may set process-wide JAX options that a
    # library must not: a persistent compilation cache (repeat runs skip most
    # of the XLA compile time). PROBDYN_NO_COMPILATION_CACHE=1 turns it off.
    if os.environ.get("PROBDYN_NO_COMPILATION_CACHE"):
        return
    cache = os.environ.get(
        "PROBDYN_COMPILATION_CACHE",
        os.path.join(os.path.expanduser("~"), ".cache", "probdyn", "jax"),
    )
    try:
        import jax

        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    except Exception as err:  # the cache is an optimisation, never a failure
        print(f"(compilation cache disabled: {err})", file=sys.stderr)


# Measured (wall clock, whole command, cold compilation cache, 2-core machine shared
# with other jobs): NUTS synthetic 57 s and 63 s, VI hare-lynx 40 s and 83 s.
QUICK_TIME = "about a minute on a 2-core CPU, not seconds"
# Measured by a tester (issue 20): compare --quick with nuts,vi took 1 min 59 s, whole
# command, cold compilation cache, 2-core machine.
COMPARE_QUICK_TIME = "about 2 minutes for nuts,vi on a 2-core CPU"

# Seeds are used as seed, seed + 1 and seed + 2: below 2**31 they stay in the range
# every backend takes as a key.
_MAX_SEED = 2**31 - 1


def _seed(text: str) -> int:
    """The ``--seed`` argument: an integer in [0, 2**31 - 1]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= _MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"{value} is out of range: give an integer from 0 to {_MAX_SEED}"
        )
    return value


def _make_out(command: str, out: str) -> str | None:
    """Create the ``--out`` folder before any fitting; an error message if it cannot be."""
    if os.path.exists(out) and not os.path.isdir(out):
        return (
            f"probdyn {command}: --out {out!r} is a file, not a folder: give a folder "
            "(new or existing) to write the run's sub-folder into."
        )
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        return f"probdyn {command}: --out {out!r}: cannot create the output folder ({err})."
    return None


def build_parser() -> argparse.ArgumentParser:
    """The ``probdyn`` argument parser, with its ``demo`` and ``compare`` commands."""
    from probdyn import __version__

    parser = argparse.ArgumentParser(prog="probdyn", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"probdyn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo_parser(sub)
    _add_compare_parser(sub)
    return parser


@contextlib.contextmanager
def plain_warnings() -> Iterator[None]:
    """Show warnings as one plain line, ``warning: <message>``, instead of Python's
    source path and code line (which point into probdyn, not at anything the user
    wrote). Only while the block runs: the CLI's, never a library default."""
    shown = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        print("warning: " + " ".join(str(message).split()), file=file or sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``probdyn`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare ``probdyn``: say what there is to run
        parser.print_help(sys.stderr)
        return 2
    with plain_warnings():
        return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        problem = _make_out("demo", args.out)
        if problem:
            print(problem, file=sys.stderr)
            return 2
        _configure_jax()
        from probdyn.demo._run import run_demo

        try:
            run_demo(
                engine=args.engine,
                backend=args.backend,
                data=args.data,
                out=args.out,
                quick=args.quick,
                seed=args.seed,
            )
        except (NotImplementedError, ModuleNotFoundError) as err:
            print(f"probdyn demo: {err}", file=sys.stderr)
            return 2
    if args.command == "compare":
        _configure_jax()
        return _run_compare(args)
    return 0


def _add_demo_parser(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="fit a Bayesian neural ODE to sparse predator-prey data",
        description="Fit a Bayesian universal differential equation (Lotka-Volterra with a "
        "Bayesian MLP for the interaction rates) to sparse, noisy, irregular data; print "
        "the posterior summary, a calibration table on held-out data and plain-word checks "
        "(convergence, coverage); write a plot, the tables and the posterior to a new "
        "folder under --out, so that no run overwrites another.",
    )
    demo.add_argument(
        "--engine",
        choices=["nuts", "vi"],
        default="nuts",
        help="nuts: Markov chain Monte Carlo (No-U-Turn sampler; slower, the reference); "
        "vi: variational inference (a Gaussian approximation; faster) (default: nuts)",
    )
    demo.add_argument(
        "--backend",
        choices=["numpyro", "pyro"],
        default="numpyro",
        help="numpyro (JAX) or pyro (PyTorch, needs the pyro extra) (default: numpyro)",
    )
    demo.add_argument(
        "--data",
        choices=["synthetic", "hare-lynx"],
        default="synthetic",
        help="synthetic: simulated Lotka-Volterra with known truth; hare-lynx: the Hudson's "
        "Bay pelt counts 1900-1920 (default: synthetic)",
    )
    demo.add_argument(
        "--out",
        default="probdyn-demo",
        help="parent folder; each run writes to a new sub-folder DATA-BACKEND-ENGINE "
        "(-quick, then -2, -3, ... if taken) (default: probdyn-demo)",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke-test sizes: checks the install, not converged ({QUICK_TIME})",
    )
    demo.add_argument(
        "--seed", type=_seed, default=0, help="random seed, 0 to 2**31 - 1 (default: 0)"
    )


# -- probdyn compare -------------------------------------------------------------------

# CLI name -> row name in the table.
_COMPARE_ENGINES = {"nuts": "NUTS", "hmc": "HMC", "vi": "VI", "ensemble": "Ensemble", "smc": "SMC"}


def _add_compare_parser(sub: Any) -> None:
    cmp = sub.add_parser(
        "compare",
        help="fit several engines and compare them on held-out data",
        description="Fit a model with several engines and score each on held-out data: "
        "writes comparison.md and comparison.csv (wall time, compile time, ESS/s, "
        "divergences, NLPD, CRPS, RMSE, coverage, interval width, log evidence) and "
        "bands.png (predictive bands side by side). Without --model: the demo's Bayesian "
        "neural ODE and data. With --model FILE.py:FUNCTION --data FILE.npz: your model, "
        "with the npz holding train_<argument> and test_<argument> arrays by model "
        "argument name (the observations under the --observed name, default y; "
        "arrays without a prefix go to both). Each run writes to a new folder under --out, "
        "so that no run overwrites another. Exit status 1 if an engine failed (its row "
        "holds the error), 2 for bad arguments.",
    )
    cmp.add_argument(
        "--engines",
        default="nuts,vi",
        help=f"comma-separated, from {', '.join(_COMPARE_ENGINES)} (default: nuts,vi)",
    )
    cmp.add_argument(
        "--backend",
        choices=["numpyro", "pyro"],
        default="numpyro",
        help="numpyro (JAX) or pyro (PyTorch, needs the pyro extra) (default: numpyro)",
    )
    cmp.add_argument(
        "--data",
        default=None,
        help="the demo's data (synthetic, hare-lynx; default synthetic), or with --model "
        "an .npz file",
    )
    cmp.add_argument("--model", default=None, help="your model: path/to/file.py:function")
    cmp.add_argument(
        "--observed", default="y", help="the model argument that takes the observations"
    )
    cmp.add_argument(
        "--out",
        default="probdyn-compare",
        help="parent folder; each run writes to a new sub-folder DATA-BACKEND-ENGINES, DATA "
        "being the model's function name with --model (-quick, then -2, -3, ... if taken) "
        "(default: probdyn-compare)",
    )
    cmp.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke-test sizes: checks the install, not converged ({COMPARE_QUICK_TIME})",
    )
    cmp.add_argument(
        "--seed", type=_seed, default=0, help="random seed, 0 to 2**31 - 1 (default: 0)"
    )


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


def _run_compare(args: argparse.Namespace) -> int:
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


if __name__ == "__main__":
    raise SystemExit(main())
