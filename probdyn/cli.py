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
        from probdyn.cli_compare import run_compare

        return run_compare(args)
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


if __name__ == "__main__":
    raise SystemExit(main())
