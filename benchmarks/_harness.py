"""Shared helpers for the benchmark scripts (not part of the probdyn package).

Conventions every script follows:

* ``python benchmarks/<name>.py`` runs the default size (the figures the docs
  report); ``--quick`` runs a smoke-test size (few draws; on CPU compiling still
  takes a minute or two); ``--json PATH`` also
  writes every figure to ``PATH``; ``--repeats N`` sets how many times each runner
  is timed (runners alternate, hand-written first, and the median is reported).
* Every runner returns a `RunResult`: wall times, compile times, draws of the
  quantities whose ESS is reported, and the sampler's per-draw statistics.
* JAX's in-memory compile caches are cleared before every run, so a runner never
  reuses what another runner compiled.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "RunResult",
    "alternate",
    "block",
    "compile_timer",
    "ess",
    "fresh_caches",
    "grad_eval_seconds",
    "machine_info",
    "min_bulk_ess",
    "parse_args",
    "print_table",
    "report",
    "same_density",
    "spread",
    "summarise",
    "unconstrained_draws",
    "warm_up_process",
    "warmup_probe",
    "write_json",
]


# -- command line ---------------------------------------------------------------------
def parse_args(
    description: str, default_repeats: int = 2, flags: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """``--quick``, ``--json PATH`` and ``--repeats N``, the flags every script takes.

    ``flags`` adds a script's own on/off flags (name -> help).
    """
    parser = argparse.ArgumentParser(description=description)
    for flag, text in (flags or {}).items():
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke-test size: few draws (compiling still takes minutes)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed runs per runner, alternating (default {default_repeats}; 1 with --quick)",
    )
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else default_repeats
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


# -- timing ---------------------------------------------------------------------------
def block(x: Any) -> Any:
    """Wait for every array in ``x`` (JAX dispatches asynchronously)."""
    return jax.block_until_ready(x)


def compile_timer() -> Any:
    """probdyn's `CompileTimer`: seconds spent tracing, lowering and compiling in a block.

    The same JAX monitoring events measure both runners, so their compile times
    compare like for like.
    """
    from probdyn.numpyro.engines.timing import CompileTimer

    return CompileTimer()


def fresh_caches() -> None:
    """Forget every compiled program, so that the next run compiles from scratch."""
    jax.clear_caches()
    gc.collect()


@dataclasses.dataclass
class RunResult:
    """What one timed run of one runner produced.

    Attributes:
        total: seconds for the whole user-facing job (fit, its post-processing and
            the prediction at the ESS inputs), compile included.
        sampling: seconds inside ``MCMC.run`` (warmup + sampling, compile included).
        compile_total: seconds tracing/lowering/compiling during ``total``.
        compile_sampling: the same, during ``MCMC.run`` only.
        stages: further named wall times (e.g. ``"map"``, ``"postprocess"``, ``"predict"``).
        quantities: name -> draws ``(chain, draw, ...)`` whose ESS is reported.
        latent: latent site -> draws ``(chain, draw, ...)``.
        num_steps: gradient evaluations per kept draw ``(chain, draw)``.
        diverging: ``(chain, draw)`` booleans.
        step_size: adapted step size per chain.
        extra: anything else worth keeping (floats only, for JSON).
    """

    total: float
    sampling: float
    compile_total: float
    compile_sampling: float
    stages: dict[str, float]
    quantities: dict[str, np.ndarray]
    latent: dict[str, np.ndarray]
    num_steps: np.ndarray
    diverging: np.ndarray
    step_size: np.ndarray
    extra: dict[str, float] = dataclasses.field(default_factory=dict)


def alternate(
    runners: Mapping[str, Callable[[], RunResult]], repeats: int, *, verbose: bool = True
) -> dict[str, list[RunResult]]:
    """Run the runners in turn ``repeats`` times (A, B, A, B, ...), caches cleared before each.

    Alternating cancels slow drift in the machine's load; the median over the
    repeats is what `summarise` reports.
    """
    out: dict[str, list[RunResult]] = {name: [] for name in runners}
    for rep in range(repeats):
        for name, run in runners.items():
            fresh_caches()
            start = time.perf_counter()
            res = run()
            if verbose:
                print(
                    f"  [{rep + 1}/{repeats}] {name}: {res.total:.2f} s total, "
                    f"{res.sampling:.2f} s in MCMC.run (compile {res.compile_sampling:.2f} s), "
                    f"{time.perf_counter() - start:.2f} s for the call",
                    flush=True,
                )
            out[name].append(res)
    return out


def grad_eval_seconds(
    models: Mapping[str, tuple[Callable[..., Any], tuple[Any, ...], Sequence[dict[str, Any]]]],
    *,
    inner: int = 20,
    repeats: int = 15,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Seconds per evaluation of each model's potential energy and its gradient.

    ``models`` maps a name to ``(model, args, points)``. The potential is NumPyro's
    ``potential_energy(model, args, {}, ·)``, the function
    ``numpyro.infer.util.initialize_model(...).potential_fn`` returns (built
    directly, which skips the model's eager initialisation runs). Its
    ``value_and_grad`` is jitted and called ``inner`` times inside one compiled
    ``scan``, as NUTS calls it inside its compiled loop, so the Python dispatch of
    a lone call is not counted. ``points`` are unconstrained parameters (posterior
    draws: an adaptive ODE solve costs more in some places than in others). The
    models are timed in turn, ``repeats`` rounds, so that a change in the
    machine's load hits them alike; per point the median over rounds is taken,
    then the mean over points.

    Returns ``(seconds, potentials)``: name -> seconds per evaluation, and name ->
    the potential energy at each point (to check that two models are the same).
    """
    from numpyro.infer.util import potential_energy

    loops = {}
    potentials = {}
    for name, (model, args, points) in models.items():
        value_and_grad = jax.value_and_grad(partial(potential_energy, model, args, {}))

        def body(z: Any, _: None, value_and_grad: Any = value_and_grad) -> tuple[Any, Any]:
            v, g = value_and_grad(z)
            # A dependence on the gradient (far below one ulp of z) keeps every
            # evaluation in the loop, so XLA cannot hoist or drop any of them.
            z = jax.tree.map(lambda a, b: jnp.where(jnp.isfinite(b), a + 1e-30 * b, a), z, g)
            return z, v

        loop = jax.jit(lambda z, body=body: jax.lax.scan(body, z, None, length=inner)[1])
        # The first call compiles and warms up; its first value is the potential at z.
        potentials[name] = np.array([float(block(loop(z))[0]) for z in points])
        loops[name] = (loop, points)
    times: dict[str, list[list[float]]] = {n: [[] for _ in p] for n, (_, p) in loops.items()}
    for _ in range(repeats):
        for name, (loop, points) in loops.items():
            for i, z in enumerate(points):
                start = time.perf_counter()
                block(loop(z))
                times[name][i].append(time.perf_counter() - start)
    seconds = {
        name: float(np.mean([statistics.median(t) / inner for t in per_point]))
        for name, per_point in times.items()
    }
    return seconds, potentials


def same_density(potentials: Mapping[str, np.ndarray], baseline: str) -> dict[str, float]:
    """Largest relative difference of each model's potential energy from ``baseline``'s
    over the same points (float32 rounding gives about 1e-6; a different model far more)."""
    base = potentials[baseline]
    return {
        name: float(np.max(np.abs(p - base) / np.maximum(np.abs(base), 1.0)))
        for name, p in potentials.items()
    }


def warm_up_process(extra: Callable[[], Any] | None = None) -> None:
    """Pay the process's one-time costs (lazy imports, backend start) before any timing.

    Runs a toy model through NUTS, Predictive, log_likelihood and SVI (and
    ``extra``), then clears the compile caches, so the first runner timed is not
    charged for what every later runner gets for free.
    """
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO, log_likelihood
    from numpyro.infer.autoguide import AutoDelta

    def toy(y: Any = None) -> None:
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = jnp.ones(())
    mcmc = MCMC(NUTS(toy), num_warmup=5, num_samples=5, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), y, extra_fields=("num_steps",))
    draws = mcmc.get_samples()
    block(Predictive(toy, draws)(jax.random.PRNGKey(1)))
    block(log_likelihood(toy, draws, y))
    svi = SVI(toy, AutoDelta(toy), numpyro.optim.Adam(0.01), Trace_ELBO())
    block(svi.run(jax.random.PRNGKey(2), 5, y, progress_bar=False).params)
    if extra is not None:
        block(extra())
    fresh_caches()


def unconstrained_draws(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    latent: Mapping[str, np.ndarray],
    k: int,
) -> list[dict[str, Any]]:
    """``k`` posterior draws, spread over chains and draws, in unconstrained space."""
    from numpyro.infer.util import unconstrain_fn

    flat = {n: np.reshape(v, (-1, *np.shape(v)[2:])) for n, v in latent.items()}
    n = len(next(iter(flat.values())))
    return [
        unconstrain_fn(model, args, kwargs, {s: jnp.asarray(v[i]) for s, v in flat.items()})
        for i in spread(n, k)
    ]


def warmup_probe(
    mcmc: Any, key: Any, args: tuple[Any, ...], init_params: Any = None
) -> dict[str, Any]:
    """Run only the warmup of a (hand-written) ``MCMC`` and count its gradient evaluations.

    ``MCMC.run`` keeps the sampler statistics of the kept draws only, so the
    gradient evaluations spent in warmup are counted here, by a separate run of
    the same kernel, seed and start. Its final step sizes identify the warmup
    path: a timed run whose step sizes are bitwise the same took the same path.

    Returns ``num_steps`` (warmup gradient evaluations, summed over chains),
    ``step_size`` (per chain, at the end of warmup), ``seconds`` and
    ``compile_seconds``.
    """
    with compile_timer() as timer:
        start = time.perf_counter()
        mcmc.warmup(
            key,
            *args,
            extra_fields=("num_steps",),
            collect_warmup=True,
            init_params=init_params,
        )
        steps = block(mcmc.get_extra_fields(group_by_chain=True)["num_steps"])
        seconds = time.perf_counter() - start
    return {
        "num_steps": int(np.sum(np.asarray(steps))),
        "step_size": np.ravel(np.asarray(mcmc.post_warmup_state.adapt_state.step_size)),
        "seconds": seconds,
        "compile_seconds": timer.seconds,
    }


def spread(n: int, k: int) -> np.ndarray:
    """``k`` indices spread evenly over ``range(n)``."""
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


# -- effective sample size --------------------------------------------------------------
def ess(draws: np.ndarray, method: str = "bulk") -> np.ndarray:
    """ArviZ's ESS of every element of ``draws`` shaped ``(chain, draw, ...)``."""
    import arviz as az

    draws = np.asarray(draws, dtype=np.float64)
    data = az.convert_to_dataset({"q": draws})
    return np.asarray(az.ess(data, method=method)["q"].values, dtype=np.float64)


def min_bulk_ess(latent: Mapping[str, np.ndarray]) -> float:
    """The smallest bulk ESS over every element of every latent site."""
    return float(min(np.min(ess(v)) for v in latent.values()))


# -- summary -----------------------------------------------------------------------------
def summarise(
    results: Sequence[RunResult],
    *,
    num_warmup: int,
    grad_seconds: float | None = None,
    probe: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Median timings over the repeats plus the diagnostics of the first run.

    Every repeat of a runner uses the same seed, so the draws (and ESS) of the
    repeats are the same; only the timings differ.

    The share of sampling time spent in the log-density gradient is
    ``grad_seconds * (warmup + kept gradient evaluations) / (MCMC.run - compile)``.
    The warmup count comes from ``probe`` (see `warmup_probe`): exact when the run
    ended warmup with bitwise the same step sizes as the probe, otherwise the
    probe's count stands in for it; without a probe it is scaled from the kept
    draws (``num_warmup / num_samples`` times their count).
    """
    med = lambda f: float(statistics.median(f(r) for r in results))
    first = results[0]
    total, sampling = med(lambda r: r.total), med(lambda r: r.sampling)
    compile_sampling = med(lambda r: r.compile_sampling)
    executing = max(sampling - compile_sampling, 1e-9)
    n_steps = np.asarray(first.num_steps)
    n_draws = int(n_steps.size)
    out: dict[str, Any] = {
        "total_s": total,
        "total_s_each": [r.total for r in results],
        "sampling_s": sampling,
        "sampling_exec_s": executing,
        "sampling_exec_s_each": [r.sampling - r.compile_sampling for r in results],
        "outside_sampling_s": med(lambda r: r.total - r.sampling),
        "compile_total_s": med(lambda r: r.compile_total),
        "compile_sampling_s": compile_sampling,
        **{f"{k}_s": med(lambda r, k=k: r.stages[k]) for k in first.stages},
        "draws": n_draws,
        "divergences": int(np.sum(first.diverging)),
        "grad_evals_per_draw": float(np.mean(n_steps)),
        "mean_tree_depth": float(np.mean(np.floor(np.log2(np.maximum(n_steps, 1))) + 1)),
        "step_size": [float(s) for s in np.ravel(first.step_size)],
        "min_bulk_ess_latent": min_bulk_ess(first.latent),
        **{k: float(statistics.median(r.extra[k] for r in results)) for k in first.extra},
    }
    for name, draws in first.quantities.items():
        bulk, tail = ess(draws), ess(draws, "tail")
        out[f"ess_bulk_{name}"] = [float(v) for v in np.ravel(bulk)]
        out[f"ess_tail_{name}"] = [float(v) for v in np.ravel(tail)]
        out[f"min_ess_bulk_{name}"] = float(np.min(bulk))
        out[f"min_ess_bulk_{name}_per_s"] = float(np.min(bulk)) / total
        out[f"min_ess_bulk_{name}_per_sampling_s"] = float(np.min(bulk)) / executing
    out["min_bulk_ess_latent_per_s"] = out["min_bulk_ess_latent"] / total
    kept = int(np.sum(n_steps))
    if probe is not None and np.array_equal(
        np.ravel(probe["step_size"]), np.ravel(first.step_size)
    ):
        warm, source = int(probe["num_steps"]), "exact"
    elif probe is not None:
        warm, source = int(probe["num_steps"]), "~ hand-written warmup"
    else:
        warm = round(kept * num_warmup / n_steps.shape[-1])
        source = "~ scaled from kept"
    out["grad_evals_kept"] = kept
    out["grad_evals_warmup"] = warm
    out["grad_evals_warmup_source"] = source
    if grad_seconds is not None:
        out["grad_eval_us"] = grad_seconds * 1e6
        out["grad_share"] = grad_seconds * (warm + kept) / executing
    out["exec_per_grad_us"] = executing / max(warm + kept, 1) * 1e6
    return out


# -- output ------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (list, tuple)):
        return " ".join(_fmt(x) for x in v)
    v = float(v)
    if v == 0 or 0.01 <= abs(v) < 1e5:
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return f"{v:.2e}"


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[tuple[str, Sequence[Any]]],
) -> None:
    """A plain-text table: one row per figure, one column per runner."""
    cells = [[label, *(_fmt(v) for v in values)] for label, values in rows]
    head = ["", *columns]
    widths = [max(len(r[i]) for r in [head, *cells]) for i in range(len(head))]
    line = lambda r: "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
    )
    print(f"\n{title}")
    print(line(head))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print(line(r))


def report(
    title: str,
    summaries: Mapping[str, Mapping[str, Any]],
    quantity: str,
    quantity_label: str,
    baseline: str = "hand-written",
) -> list[tuple[str, list[Any]]]:
    """Print the standard table (one column per runner) and return its rows."""
    names = list(summaries)
    col = lambda key: [summaries[n].get(key) for n in names]
    base = summaries[baseline]
    ratio = lambda key: [summaries[n][key] / base[key] if base.get(key) else None for n in names]
    evals = [
        (summaries[n].get("grad_evals_warmup", 0), summaries[n].get("grad_evals_kept", 0))
        for n in names
    ]
    rows: list[tuple[str, list[Any]]] = [
        ("total wall time [s] (median)", col("total_s")),
        ("  each repeat [s]", col("total_s_each")),
        (f"  ratio to {baseline}", ratio("total_s")),
        ("MCMC.run wall time [s]", col("sampling_s")),
        ("  of which compile [s]", col("compile_sampling_s")),
        ("  executing (run - compile) [s]", col("sampling_exec_s")),
        ("    each repeat [s]", col("sampling_exec_s_each")),
        (f"  executing, ratio to {baseline}", ratio("sampling_exec_s")),
        ("outside MCMC.run [s] (init, post-proc., predict)", col("outside_sampling_s")),
        ("compile, whole job [s]", col("compile_total_s")),
        ("chains x draws", col("draws")),
        ("divergences", col("divergences")),
        ("gradient evals / draw", col("grad_evals_per_draw")),
        ("mean tree depth", col("mean_tree_depth")),
        ("step size (per chain)", col("step_size")),
        (f"min bulk ESS, {quantity_label}", col(f"min_ess_bulk_{quantity}")),
        ("  per second of total wall time", col(f"min_ess_bulk_{quantity}_per_s")),
        ("  per second executing MCMC", col(f"min_ess_bulk_{quantity}_per_sampling_s")),
        ("  bulk ESS of each", col(f"ess_bulk_{quantity}")),
        ("  tail ESS of each", col(f"ess_tail_{quantity}")),
        ("min bulk ESS over latent elements", col("min_bulk_ess_latent")),
        ("  per second of total wall time", col("min_bulk_ess_latent_per_s")),
        ("log-density gradient eval [us]", col("grad_eval_us")),
        ("gradient evals, warmup + kept", [warm + kept for warm, kept in evals]),
        ("  warmup count", col("grad_evals_warmup_source")),
        ("MCMC execution per gradient eval [us]", col("exec_per_grad_us")),
        ("share of MCMC execution in gradient", col("grad_share")),
        (f"same draws as {baseline}", col("same_draws")),
        ("same log density: max rel. difference", col("density_rel_diff")),
    ]
    print_table(title, names, rows)
    return rows


def machine_info() -> dict[str, Any]:
    """Where the figures were taken (they depend on it, and on the machine's load)."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("probdyn", "jax", "jaxlib", "numpyro", "diffrax", "equinox", "optax", "arviz"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "jax_devices": [str(d) for d in jax.devices()],
        "load_average": list(load) if load else None,
        "versions": versions,
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    return x


def write_json(path: str, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` (NumPy values converted) to ``path``."""
    with open(path, "w") as fh:
        json.dump(_jsonable(payload), fh, indent=2)
        fh.write("\n")
    print(f"\nwrote {path}")
