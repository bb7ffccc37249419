"""The ``probdyn`` command line."""

from __future__ import annotations

import argparse
import os
import sys


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``probdyn`` console script."""
    parser = argparse.ArgumentParser(prog="probdyn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="fit a Bayesian neural ODE to sparse predator-prey data",
        description="Fit a Bayesian universal differential equation (Lotka-Volterra with a "
        "Bayesian MLP for the interaction rates) to sparse, noisy, irregular data; print "
        "the ArviZ summary and a calibration table; write a plot and the posterior.",
    )
    demo.add_argument("--engine", choices=["nuts", "vi"], default="nuts")
    demo.add_argument("--backend", choices=["numpyro", "pyro"], default="numpyro")
    demo.add_argument("--data", choices=["synthetic", "hare-lynx"], default="synthetic")
    demo.add_argument("--out", default="probdyn-demo", help="output folder")
    demo.add_argument("--quick", action="store_true", help="smoke-test sizes (seconds)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "demo":
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
        except NotImplementedError as err:
            print(f"probdyn demo: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
