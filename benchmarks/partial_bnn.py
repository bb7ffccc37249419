"""Partial-BNN 1-D regression of Zhao et al. (AISTATS 2024): FK SMC against MAP-NUTS, VI, Ensemble.

Task (benchmark B1 of shared/papers.md): ``f(x) = x sin(x tanh x)``, ``x ~ U[-6, 6]``,
``y = f(x) + N(0, 1)``; 100 train / 100 validation / 100 test points per seed.
Network 1 -> 20 -> [20 -> 10 stochastic] -> 10 -> 1, GELU, N(0, 1) prior on the
stochastic layer, the other two layers deterministic (``param`` sites), float64.
The likelihood noise is the true one, 1.

Engines (all through ``probdyn.fit``):

* ``FK-SMC``: ``SMC(stream="minibatch")``, 1000 particles, batch 20, Adam 1e-2 for
  the deterministic layers (the paper's OHSMC; the paper runs 200 epochs and keeps
  the checkpoint with the best validation NLPD, we keep the final particles).
* ``MAP-NUTS``: ``NUTS(init="map")``: a MAP estimate of every weight, then NUTS on
  the stochastic layer with the deterministic layers held at their MAP values
  (the paper's MAP-HMC baseline).
* ``VI``: mean-field normal guide on the stochastic layer, deterministic layers
  fitted jointly.
* ``Ensemble``: 5 MAP members (each with its own deterministic layers), if the
  Ensemble engine is available.

Metrics on the test set: NLPD (Monte Carlo: the mean over test points of
``-log mean_draws N(y; f_draw(x), 1)``), the RMSE of each draw of ``f`` against the
true ``f`` averaged over draws, 90 % predictive-interval coverage of ``y``; the
validation NLPD; the wall time of ``probdyn.fit`` (compile included). Each figure
is the mean +- standard error over seeds. The oracle (the true ``f`` and noise)
has expected NLPD ``0.5 log(2 pi e) = 1.419``.

Run ``python benchmarks/partial_bnn.py [--seeds 10] [--epochs 200] [--quick]
[--engines FK-SMC,VI] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import _harness as h
import numpy as np
import numpyro
import numpyro.distributions as dist
from scipy.special import logsumexp

import probdyn
from probdyn.calibration import coverage
from probdyn.numpyro import BayesianMLP

numpyro.enable_x64()

NOISE = 1.0
ORACLE_NLPD = 0.5 * np.log(2 * np.pi * np.e)


def truth(x: np.ndarray) -> np.ndarray:
    return x * np.sin(x * np.tanh(x))


def make_data(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """100 train, 100 validation and 100 test points of the toy problem."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-6.0, 6.0, 300)
    y = truth(x) + NOISE * rng.standard_normal(300)
    return {
        "train": (x[:100], y[:100]),
        "val": (x[100:200], y[100:200]),
        "test": (x[200:], y[200:]),
    }


def pbnn(x: Any, y: Any = None) -> None:
    """The partial BNN: only the middle layer (index 1) has a prior."""
    net = BayesianMLP("f", [1, 20, 10, 1], activation="gelu", bayesian_layers=[1])
    mean = numpyro.deterministic("mean", net(x[:, None])[..., 0])
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(mean, NOISE), obs=y)


def engines(quick: bool, epochs: int) -> dict[str, probdyn.AbstractEngine]:
    off = {"progress_bar": False}
    if quick:
        return {
            "FK-SMC": probdyn.SMC(
                num_particles=200, stream="minibatch", batch_size=20, num_epochs=epochs, **off
            ),
            "MAP-NUTS": probdyn.NUTS(
                num_warmup=100, num_samples=100, init="map", max_tree_depth=6, **off
            ),
            "VI": probdyn.VI(num_steps=1000, num_draws=200, **off),
            "Ensemble": probdyn.Ensemble(num_members=5, num_steps=500, **off),
        }
    return {
        "FK-SMC": probdyn.SMC(
            num_particles=1000, stream="minibatch", batch_size=20, num_epochs=epochs, **off
        ),
        "MAP-NUTS": probdyn.NUTS(
            num_warmup=500, num_samples=1000, init="map", max_tree_depth=8, **off
        ),
        "VI": probdyn.VI(num_steps=5000, num_draws=1000, **off),
        "Ensemble": probdyn.Ensemble(num_members=5, num_steps=2000, **off),
    }


def nlpd(f_draws: np.ndarray, y: np.ndarray) -> float:
    """Mean over points of ``-log mean_draws N(y; f, NOISE)``."""
    f = f_draws.reshape(-1, len(y))
    lp = -0.5 * np.log(2 * np.pi * NOISE**2) - 0.5 * ((y - f) / NOISE) ** 2
    return float(-np.mean(logsumexp(lp, axis=0) - np.log(len(f))))


def evaluate(post: probdyn.Posterior, data: dict[str, Any], seed: int) -> dict[str, float]:
    x_test, y_test = data["test"]
    x_val, y_val = data["val"]
    pred = post.predict(x_test, key=seed + 1, sites=["mean", "y"])
    f = pred["mean"].reshape(-1, len(x_test))
    val = post.predict(x_val, key=seed + 2, sites=["mean"])["mean"]
    return {
        "test NLPD": nlpd(f, y_test),
        "val NLPD": nlpd(val, y_val),
        "RMSE vs f": float(np.mean(np.sqrt(np.mean((f - truth(x_test)) ** 2, axis=1)))),
        "90% coverage": coverage(pred["y"], y_test, levels=(0.9,))[0.9],
    }


def run_one(
    name: str, engine: probdyn.AbstractEngine, data: dict[str, Any], seed: int
) -> dict[str, float] | str:
    """Fit and score one engine on one seed; a string says why it was skipped."""
    x, y = data["train"]
    start = time.perf_counter()
    try:
        post = probdyn.fit(pbnn, x, y, engine=engine, key=seed)
    except (ImportError, NotImplementedError) as err:
        return f"{name} skipped: {type(err).__name__}: {err}"
    wall = time.perf_counter() - start
    return {**evaluate(post, data, seed), "wall time [s]": wall}


def mean_se(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return f"{v.mean():.3f}"
    return f"{v.mean():.3f} +- {v.std(ddof=1) / np.sqrt(len(v)):.3f}"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="data/algorithm seeds (10)")
    parser.add_argument("--epochs", type=int, default=None, help="FK-SMC epochs (200)")
    parser.add_argument("--quick", action="store_true", help="smoke-test size")
    parser.add_argument("--engines", default=None, help="comma-separated subset of engines")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args()
    if args.seeds is None:
        args.seeds = 1 if args.quick else 10
    if args.epochs is None:
        args.epochs = 20 if args.quick else 200
    return args


def main() -> None:
    args = parse()
    configs = engines(args.quick, args.epochs)
    if args.engines:
        wanted = args.engines.split(",")
        unknown = [w for w in wanted if w not in configs]
        if unknown:
            raise SystemExit(f"--engines: unknown {unknown}; choose from {list(configs)}")
        configs = {k: v for k, v in configs.items() if k in wanted}
    print(f"Partial BNN 1-D regression, {args.seeds} seed(s); FK-SMC {args.epochs} epochs")
    for name, engine in configs.items():
        print(f"  {name}: {engine}")
    h.warm_up_process()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    skipped: dict[str, str] = {}
    for seed in range(args.seeds):
        data = make_data(seed)
        for name, engine in configs.items():
            if name in skipped:
                continue
            out = run_one(name, engine, data, seed)
            if isinstance(out, str):
                skipped[name] = out
                print(f"  {out}", flush=True)
                continue
            results[name].append(out)
            figures = ", ".join(f"{k} {v:.3f}" for k, v in out.items())
            print(f"  seed {seed} {name}: {figures}", flush=True)
    metrics = ["test NLPD", "val NLPD", "RMSE vs f", "90% coverage", "wall time [s]"]
    names = [n for n in configs if results[n]]
    rows: list[tuple[str, list[Any]]] = [
        (m, [mean_se([r[m] for r in results[n]]) for n in names]) for m in metrics
    ]
    rows.append(("seeds", [len(results[n]) for n in names]))
    h.print_table(
        f"Test figures, mean +- standard error over seeds (oracle NLPD {ORACLE_NLPD:.3f})",
        names,
        rows,
    )
    for reason in skipped.values():
        print(reason)
    if args.json:
        h.write_json(
            args.json,
            {
                "benchmark": "partial_bnn",
                "seeds": args.seeds,
                "epochs": args.epochs,
                "quick": args.quick,
                "engines": {n: configs[n].to_dict() for n in configs},
                "machine": h.machine_info(),
                "oracle_nlpd": ORACLE_NLPD,
                "results": results,
                "skipped": skipped,
            },
        )


if __name__ == "__main__":
    main()
