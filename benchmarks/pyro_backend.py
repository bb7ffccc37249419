"""The Pyro backend: probdyn against hand-written Pyro, and NumPyro against Pyro on the neural ODE.

Part 1, BNN regression (Pyro; the data of ``bnn_regression.py``, a smaller network):

* ``hand-written``: plain ``pyro.sample`` sites (the names, shapes, priors and order
  of ``probdyn.pyro.BayesianMLP``), ``pyro.infer.MCMC(NUTS(init_to_median))`` seeded
  inside ``torch.random.fork_rng`` with the seed probdyn derives for chain 0 (so both
  runners take the same draws), then the post-processing a user needs for what
  ``probdyn.fit`` returns: ``Predictive`` for the deterministic mean and the posterior
  predictive, the pointwise log likelihood from a trace per draw, and ``Predictive``
  for the mean at 5 new inputs.
* ``probdyn``: ``probdyn.fit(model, x, y, engine=probdyn.NUTS(...), key=0)`` with a
  ``probdyn.pyro.BayesianMLP``, then ``post.predict`` at the same 5 inputs.

Part 2, the demo's Bayesian neural ODE (``probdyn.demo._pyro.predator_prey_ude`` vs
``probdyn.demo._numpyro.predator_prey_ude`` on ``synthetic_predator_prey(seed=0)``),
both through ``probdyn.fit`` with the same NUTS settings: ESS/s of the trajectory at
held-out times, and seconds per log-density gradient at the same points. Pyro NUTS
on this model is far too slow for CI, so its figures are measured here only.

torch runs in float64 with ``torch.set_num_threads(1)``; JAX in its default float32,
with XLA's CPU thread pool limited to one thread (unless ``XLA_FLAGS`` is set).

Run ``python benchmarks/pyro_backend.py [--quick] [--json out.json]``.
"""

from __future__ import annotations

import os

# One CPU thread for XLA as for torch (must be set before jax is imported).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import dataclasses
import statistics
import time
import warnings
from typing import Any

import _harness as h
import jax
import jax.numpy as jnp
import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from bnn_regression import X_ESS, make_data
from pyro.infer import MCMC, NUTS, Predictive
from pyro.infer.autoguide import init_to_median

import probdyn
from probdyn.data import synthetic_predator_prey
from probdyn.pyro import BayesianMLP
from probdyn.pyro.bridge import sub_seed

SEED = 0
CHAIN_SEED = sub_seed(SEED, 0, 0)  # the seed probdyn's Pyro runner gives chain 0
NOISE_PRIOR = 1.0
NUM_ESS_TIMES = 4  # held-out times whose trajectory (both species) has its ESS reported
CALLS = [0]  # model evaluations (one per potential-energy evaluation under NUTS)


@dataclasses.dataclass(frozen=True)
class BNNSettings:
    hidden: int = 50
    num_warmup: int = 100
    num_samples: int = 100
    max_tree_depth: int = 6
    target_accept: float = 0.8

    @classmethod
    def quick(cls) -> BNNSettings:
        return cls(hidden=10, num_warmup=20, num_samples=20, max_tree_depth=4)


@dataclasses.dataclass(frozen=True)
class ODESettings:
    num_warmup: int = 30
    num_samples: int = 30
    max_tree_depth: int = 5

    @classmethod
    def quick(cls) -> ODESettings:
        return cls(num_warmup=5, num_samples=5, max_tree_depth=3)


def latent_names(hidden: int) -> tuple[str, ...]:
    del hidden  # the same names at every width
    return (*(f"f.layers.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")), "sigma")


# -- part 1: the two BNN models -----------------------------------------------------------------
def make_probdyn_model(hidden: int) -> Any:
    def bnn_probdyn(x: Any, y: Any = None) -> None:
        CALLS[0] += 1
        net = BayesianMLP("f", [1, hidden, 1], activation="tanh", prior=dist.Normal(0.0, 1.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(NOISE_PRIOR))
        mean = pyro.deterministic("mean", net(x[:, None])[..., 0])
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(mean, sigma), obs=y)

    return bnn_probdyn


def make_hand_model(hidden: int) -> Any:
    def bnn_hand(x: Any, y: Any = None) -> None:
        # Same site names, shapes, priors and order as BayesianMLP("f", [1, hidden, 1]).
        CALLS[0] += 1
        normal = dist.Normal(0.0, 1.0)
        w0 = pyro.sample("f.layers.0.weight", normal.expand([1, hidden]).to_event(2))
        b0 = pyro.sample("f.layers.0.bias", normal.expand([hidden]).to_event(1))
        w1 = pyro.sample("f.layers.1.weight", normal.expand([hidden, 1]).to_event(2))
        b1 = pyro.sample("f.layers.1.bias", normal.expand([1]).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(NOISE_PRIOR))
        mean = pyro.deterministic("mean", (torch.tanh(x[:, None] @ w0 + b0) @ w1 + b1)[..., 0])
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(mean, sigma), obs=y)

    return bnn_hand


def run_hand(x_np: np.ndarray, y_np: np.ndarray, s: BNNSettings) -> dict[str, Any]:
    model = make_hand_model(s.hidden)
    kept_calls: list[int] = []
    divergences: list[int] = []

    def hook(kernel: Any, params: Any, stage: str, i: int) -> None:
        # Bookkeeping for the table only (two list appends per kept draw).
        if stage == "Sample":
            kept_calls.append(CALLS[0])
            divergences.append(len(kernel._divergences))

    start = time.perf_counter()
    x = torch.as_tensor(x_np, dtype=torch.float64)
    y = torch.as_tensor(y_np, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CHAIN_SEED)
        kernel = NUTS(
            model,
            target_accept_prob=s.target_accept,
            max_tree_depth=s.max_tree_depth,
            init_strategy=init_to_median,
        )
        mcmc = MCMC(
            kernel,
            num_samples=s.num_samples,
            warmup_steps=s.num_warmup,
            num_chains=1,
            disable_progbar=True,
            hook_fn=hook,
        )
        calls0 = CALLS[0]
        t0 = time.perf_counter()
        mcmc.run(x, y)
        t1 = time.perf_counter()
        calls_run = CALLS[0] - calls0
        samples = mcmc.get_samples()
        latent = {k: samples[k] for k in latent_names(s.hidden)}
        # What probdyn.fit also returns: the deterministic mean and posterior predictive ...
        pp = Predictive(model, posterior_samples=latent, return_sites=["mean", "y"])(x)
        # ... and the pointwise log likelihood of every draw.
        loglik = []
        with torch.no_grad():
            for i in range(s.num_samples):
                draw = {k: v[i] for k, v in latent.items()}
                tr = poutine.trace(poutine.condition(model, data=draw)).get_trace(x, y)
                loglik.append(tr.nodes["y"]["fn"].log_prob(tr.nodes["y"]["value"]))
        out = {k: v.detach().numpy() for k, v in pp.items()}
        out["log_likelihood"] = torch.stack(loglik).numpy()
        t2 = time.perf_counter()
        x_ess = torch.as_tensor(X_ESS, dtype=torch.float64)
        pred = Predictive(model, posterior_samples=latent, return_sites=["mean"])(x_ess)
        mean5 = pred["mean"].detach().numpy()[None]  # (chain, draw, 5)
        end = time.perf_counter()
    steps = np.diff(np.asarray(kept_calls))  # model evaluations per kept draw (first lost)
    return {
        "total": end - start,
        "sampling": t1 - t0,
        "postprocess": t2 - t1,
        "predict": end - t2,
        "mean5": mean5,
        "latent": {k: v.detach().numpy()[None] for k, v in latent.items()},
        "grad_evals_per_draw": float(np.mean(steps)) if steps.size else float("nan"),
        "grad_evals_run": calls_run,
        "divergences": divergences[-1] if divergences else 0,
    }


def run_probdyn(x_np: np.ndarray, y_np: np.ndarray, s: BNNSettings) -> dict[str, Any]:
    model = make_probdyn_model(s.hidden)
    engine = probdyn.NUTS(
        num_warmup=s.num_warmup,
        num_samples=s.num_samples,
        num_chains=1,
        max_tree_depth=s.max_tree_depth,
        target_accept=s.target_accept,
        chain_method="sequential",
        init="median",
        progress_bar=False,
    )
    start = time.perf_counter()
    post = probdyn.fit(model, x_np, y_np, engine=engine, key=SEED, backend="pyro")
    t1 = time.perf_counter()
    mean5 = post.predict(X_ESS, key=SEED + 2, sites=["mean"])["mean"]
    end = time.perf_counter()
    return {
        "total": end - start,
        "sampling": post.attrs["wall_time"],
        "fit": t1 - start,
        "predict": end - t1,
        "mean5": mean5,
        "latent": {k: post.samples[k] for k in latent_names(s.hidden)},
        "grad_evals_per_draw": float(np.mean(post.sample_stats["n_steps"])),
        "divergences": int(np.sum(post.sample_stats["diverging"])),
    }


def bench_bnn(s: BNNSettings, repeats: int) -> dict[str, Any]:
    x, y = make_data()
    print(
        f"\nPart 1: BNN regression (Pyro) [1, {s.hidden}, 1] tanh, {len(x)} points; NUTS {s}, "
        f"1 chain, init median; {repeats} repeat(s), alternating hand-written first",
        flush=True,
    )
    # One-time costs (imports, first autograd calls) before anything is timed.
    tiny = BNNSettings(hidden=4, num_warmup=3, num_samples=3, max_tree_depth=2)
    run_hand(x, y, tiny)
    run_probdyn(x, y, tiny)
    runs: dict[str, list[dict[str, Any]]] = {"hand-written": [], "probdyn": []}
    for rep in range(repeats):
        for name, fn in (("hand-written", run_hand), ("probdyn", run_probdyn)):
            r = fn(x, y, s)
            runs[name].append(r)
            print(
                f"  [{rep + 1}/{repeats}] {name}: {r['total']:.2f} s total, "
                f"{r['sampling']:.2f} s in MCMC.run",
                flush=True,
            )
    med = lambda name, k: float(statistics.median(r[k] for r in runs[name]))
    out: dict[str, Any] = {}
    base = runs["hand-written"][0]["latent"]
    for name, rs in runs.items():
        first = rs[0]
        bulk = h.ess(first["mean5"])
        out[name] = {
            "total_s": med(name, "total"),
            "total_s_each": [r["total"] for r in rs],
            "sampling_s": med(name, "sampling"),
            "sampling_s_each": [r["sampling"] for r in rs],
            "outside_sampling_s": float(statistics.median(r["total"] - r["sampling"] for r in rs)),
            "grad_evals_per_draw": first["grad_evals_per_draw"],
            "divergences": first["divergences"],
            "ess_bulk_mean": [float(v) for v in np.ravel(bulk)],
            "min_ess_bulk_mean": float(np.min(bulk)),
            "same_draws": all(np.array_equal(first["latent"][k], base[k]) for k in base),
        }
        out[name]["min_ess_bulk_mean_per_s"] = out[name]["min_ess_bulk_mean"] / out[name]["total_s"]
        out[name]["min_ess_bulk_mean_per_sampling_s"] = (
            out[name]["min_ess_bulk_mean"] / out[name]["sampling_s"]
        )
    hw, pd = out["hand-written"], out["probdyn"]
    pd["total_ratio"] = pd["total_s"] / hw["total_s"]
    pd["sampling_ratio"] = pd["sampling_s"] / hw["sampling_s"]
    pd["total_ratio_each"] = [
        a["total"] / b["total"] for a, b in zip(runs["probdyn"], runs["hand-written"])
    ]
    names = list(out)
    col = lambda k: [out[n].get(k) for n in names]
    rows = [
        ("total wall time [s] (median)", col("total_s")),
        ("  each repeat [s]", col("total_s_each")),
        ("  ratio probdyn / hand-written (median)", [None, pd["total_ratio"]]),
        ("  ratio, each repeat pair", [None, pd["total_ratio_each"]]),
        ("MCMC.run wall time [s] (median)", col("sampling_s")),
        ("  each repeat [s]", col("sampling_s_each")),
        ("  ratio probdyn / hand-written", [None, pd["sampling_ratio"]]),
        ("outside MCMC.run [s] (post-proc., predict)", col("outside_sampling_s")),
        ("gradient evals / kept draw", col("grad_evals_per_draw")),
        ("divergences", col("divergences")),
        (
            f"min bulk ESS, predictive mean at x = {np.round(X_ESS, 2).tolist()}",
            col("min_ess_bulk_mean"),
        ),
        ("  per second of total wall time", col("min_ess_bulk_mean_per_s")),
        ("  per second of MCMC.run", col("min_ess_bulk_mean_per_sampling_s")),
        ("  bulk ESS of each", col("ess_bulk_mean")),
        ("same draws as hand-written", col("same_draws")),
    ]
    h.print_table(
        "BNN regression, Pyro: probdyn vs hand-written Pyro (torch float64, 1 thread)",
        names,
        rows,
    )
    return {"settings": dataclasses.asdict(s), "repeats": repeats, "results": out, "table": rows}


# -- part 2: the neural ODE on both backends ----------------------------------------------------
def ode_model(backend: str) -> Any:
    if backend == "pyro":
        from probdyn.demo._pyro import predator_prey_ude
    else:
        from probdyn.demo._numpyro import predator_prey_ude
    return predator_prey_ude


def run_ode(backend: str, data: Any, s: ODESettings, t_ess: np.ndarray) -> dict[str, Any]:
    engine = probdyn.NUTS(
        num_warmup=s.num_warmup,
        num_samples=s.num_samples,
        num_chains=1,
        max_tree_depth=s.max_tree_depth,
        chain_method="sequential",
        init="median",
        progress_bar=False,
    )
    model = ode_model(backend)
    start = time.perf_counter()
    post = probdyn.fit(model, data.t_train, data.y_train, engine=engine, key=SEED, backend=backend)
    t1 = time.perf_counter()
    z = post.predict(t_ess, key=SEED + 3, sites=["z"])["z"]
    end = time.perf_counter()
    latent = {k: np.asarray(post.samples[k]) for k in post.attrs["latent_sites"]}
    return {
        "total": end - start,
        "fit": t1 - start,
        "sampling": float(post.attrs["wall_time"]),
        "compile": float(post.attrs["compile_time"]),
        "z": np.asarray(z),
        "latent": latent,
        "grad_evals_per_draw": float(np.mean(post.sample_stats["n_steps"])),
        "divergences": int(np.sum(post.sample_stats["diverging"])),
        "failed_solves": int(post.attrs.get("num_failed_solves", 0)),
    }


def ode_grad_seconds(
    data: Any, latent: dict[str, np.ndarray], k: int, repeats: int
) -> dict[str, Any]:
    """Seconds per potential-energy value and gradient, each backend, at the same points.

    The points are ``k`` of the Pyro run's draws, mapped to the unconstrained space by
    Pyro's transforms (both backends use the same bijections for these supports).
    """
    from numpyro.infer.util import initialize_model as np_initialize
    from pyro.infer.mcmc.util import initialize_model as pyro_initialize

    t = torch.as_tensor(data.t_train, dtype=torch.float64)
    y = torch.as_tensor(data.y_train, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        _, pyro_pe, transforms, _ = pyro_initialize(
            ode_model("pyro"), model_args=(t, y), init_strategy=init_to_median
        )
    n = len(next(iter(latent.values()))[0])
    points = [
        {
            name: transforms[name](torch.as_tensor(v[0, i], dtype=torch.float64)).detach()
            for name, v in latent.items()
        }
        for i in h.spread(n, k)
    ]

    def pyro_vg(z: dict[str, torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        z = {name: v.clone().requires_grad_(True) for name, v in z.items()}
        pe = pyro_pe(z)
        return float(pe.detach()), list(torch.autograd.grad(pe, list(z.values())))

    info = np_initialize(
        jax.random.PRNGKey(SEED), ode_model("numpyro"), model_args=(data.t_train, data.y_train)
    )
    np_vg = jax.jit(jax.value_and_grad(info.potential_fn))
    np_points = [{name: jnp.asarray(v.numpy()) for name, v in z.items()} for z in points]

    pe_pyro = [pyro_vg(z)[0] for z in points]  # also warms up
    pe_np = [float(h.block(np_vg(z))[0]) for z in np_points]  # also compiles
    times: dict[str, list[list[float]]] = {"pyro": [[] for _ in points], "numpyro": []}
    times["numpyro"] = [[] for _ in points]
    for _ in range(repeats):
        for i, (zp, zn) in enumerate(zip(points, np_points)):
            t0 = time.perf_counter()
            pyro_vg(zp)
            t1 = time.perf_counter()
            h.block(np_vg(zn))
            t2 = time.perf_counter()
            times["pyro"][i].append(t1 - t0)
            times["numpyro"][i].append(t2 - t1)
    sec = {b: float(np.mean([statistics.median(ts) for ts in per])) for b, per in times.items()}
    rel = [abs(a - b) / max(abs(a), 1.0) for a, b in zip(pe_pyro, pe_np)]
    return {
        "seconds": sec,
        "potential_pyro": pe_pyro,
        "potential_numpyro": pe_np,
        "density_rel_diff": float(max(rel)),
        "points": len(points),
        "repeats": repeats,
    }


def bench_ode(s: ODESettings, quick: bool) -> dict[str, Any]:
    data = synthetic_predator_prey(seed=0)
    t_ess = data.t_test[h.spread(len(data.t_test), NUM_ESS_TIMES)]
    print(
        f"\nPart 2: neural ODE (demo UDE, [2, 8, 2] tanh interaction net) on "
        f"synthetic_predator_prey(seed=0); NUTS {s}, 1 chain, init median, via probdyn.fit",
        flush=True,
    )
    h.warm_up_process()
    runs = {}
    for backend in ("numpyro", "pyro"):
        h.fresh_caches()
        r = run_ode(backend, data, s, t_ess)
        runs[backend] = r
        print(
            f"  {backend}: {r['total']:.2f} s total, {r['sampling']:.2f} s in MCMC "
            f"(compile {r['compile']:.2f} s)",
            flush=True,
        )
    grad = ode_grad_seconds(data, runs["pyro"]["latent"], k=2 if quick else 3, repeats=5)
    out: dict[str, Any] = {}
    for backend, r in runs.items():
        bulk = h.ess(r["z"])
        executing = r["sampling"] - r["compile"]
        out[backend] = {
            "total_s": r["total"],
            "sampling_s": r["sampling"],
            "compile_s": r["compile"],
            "sampling_exec_s": executing,
            "grad_evals_per_draw": r["grad_evals_per_draw"],
            "divergences": r["divergences"],
            "failed_solves": r["failed_solves"],
            "ess_bulk_z": [float(v) for v in np.ravel(bulk)],
            "min_ess_bulk_z": float(np.min(bulk)),
            "min_ess_bulk_z_per_sampling_s": float(np.min(bulk)) / r["sampling"],
            "min_ess_bulk_z_per_exec_s": float(np.min(bulk)) / executing,
            "grad_eval_ms": grad["seconds"][backend] * 1e3,
            "exec_per_grad_eval_ms": executing
            / max(r["grad_evals_per_draw"] * s.num_samples, 1)
            * 1e3,
        }
    npy, py = out["numpyro"], out["pyro"]
    ratios = {
        "ess_per_sampling_s": npy["min_ess_bulk_z_per_sampling_s"]
        / py["min_ess_bulk_z_per_sampling_s"],
        "ess_per_exec_s": npy["min_ess_bulk_z_per_exec_s"] / py["min_ess_bulk_z_per_exec_s"],
        "grad_time_pyro_over_numpyro": py["grad_eval_ms"] / npy["grad_eval_ms"],
    }
    names = list(out)
    col = lambda k: [out[n].get(k) for n in names]
    rows = [
        ("total wall time, fit + predict [s]", col("total_s")),
        ("MCMC wall time [s] (compile included)", col("sampling_s")),
        ("  of which compile [s]", col("compile_s")),
        ("gradient evals / kept draw", col("grad_evals_per_draw")),
        ("divergences", col("divergences")),
        ("failed ODE solves", col("failed_solves")),
        (
            f"min bulk ESS, z at held-out t = {np.round(t_ess, 2).tolist()}",
            col("min_ess_bulk_z"),
        ),
        ("  per second of MCMC wall time", col("min_ess_bulk_z_per_sampling_s")),
        ("  per second of MCMC, compile excluded", col("min_ess_bulk_z_per_exec_s")),
        ("  bulk ESS of each (time, species)", col("ess_bulk_z")),
        ("log-density value+gradient [ms] (same points)", col("grad_eval_ms")),
        (
            "MCMC execution / kept-draw grad evals [ms] (warmup uncounted)",
            col("exec_per_grad_eval_ms"),
        ),
    ]
    h.print_table(
        "Neural ODE: NumPyro vs Pyro backend (JAX float32, torch float64; 1 thread each)",
        names,
        rows,
    )
    h.print_table(
        "Ratios (NumPyro over Pyro)",
        ["value"],
        [
            ("ESS/s NumPyro / Pyro, MCMC wall time (noisy)", [ratios["ess_per_sampling_s"]]),
            ("ESS/s NumPyro / Pyro, compile excluded (noisy)", [ratios["ess_per_exec_s"]]),
            (
                "per-gradient time Pyro / NumPyro (robust)",
                [ratios["grad_time_pyro_over_numpyro"]],
            ),
            ("same log density: max rel. difference", [grad["density_rel_diff"]]),
        ],
    )
    print(
        f"  ESS from {s.num_samples} draws of 1 chain is very noisy; the per-gradient time "
        f"ratio (median of {grad['repeats']} timings at {grad['points']} posterior draws) is "
        "the robust figure.",
        flush=True,
    )
    return {
        "settings": dataclasses.asdict(s),
        "t_ess": t_ess,
        "results": out,
        "ratios": ratios,
        "grad": grad,
        "table": rows,
    }


def main() -> None:
    args = h.parse_args(__doc__.splitlines()[0])
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="There are not enough devices")
    print(
        f"{os.cpu_count()} CPU cores; torch float64, torch.set_num_threads(1); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}",
        flush=True,
    )
    quick = args.quick
    bnn = bench_bnn(BNNSettings.quick() if quick else BNNSettings(), args.repeats)
    ode = bench_ode(ODESettings.quick() if quick else ODESettings(), quick)
    if args.json:
        h.write_json(
            args.json,
            {
                "benchmark": "pyro_backend",
                "quick": quick,
                "torch": {"dtype": "float64", "num_threads": torch.get_num_threads()},
                "xla_flags": os.environ.get("XLA_FLAGS"),
                "machine": h.machine_info(),
                "bnn": bnn,
                "neural_ode": ode,
            },
        )


if __name__ == "__main__":
    main()
