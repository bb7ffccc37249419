"""Cache-sized batches against one ``jax.vmap`` over SMC particles and ensemble members (CPU).

probdyn's NumPyro SMC and Ensemble runners map their per-particle (per-member) work in
batches sized by `probdyn.numpyro.engines.batching.batch_size`: on a CPU, as many items as keep
one batch's gradient temporaries within ``CPU_BATCH_BYTES`` (4 MiB). This script
measures why, on the UCI network (one hidden layer of 50 ReLU units, a Gaussian
likelihood with a learned noise scale) fitted to synthetic data of the UCI sizes.

Part 1, gradient sweeps: 5 gradients of the log likelihood for each of ``P`` items
(256 particles, or 5 members), written by hand in jax.numpy, as one ``jax.vmap`` (the
hand-written way) and as ``jax.lax.map`` with every batch size in ``--batches``; the
batch ``batch_size`` picks is marked. Each timing is the median of 5 calls after one
compiling call.

Part 2, whole fits through ``probdyn.fit`` on the largest set of part 1, the automatic
batch against ``particles_per_batch`` / ``members_per_batch`` equal to the count (one
vmap), alternating, compile included: ``SMC(num_particles=64, num_mcmc_steps=2)`` and
``Ensemble(num_members=5, num_steps=500)``. Reports the wall-time ratio
(automatic / one vmap).

Run ``python benchmarks/batching.py [--quick] [--batches 1,2,4,8,16,32,64]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpyro
import numpyro.distributions as dist

import probdyn
from probdyn.numpyro import BayesianMLP
from probdyn.numpyro.engines.batching import CPU_BATCH_BYTES, batch_size

HIDDEN = 50
# (name, rows, inputs, items mapped over): kin8nm-, wine- and yacht-sized SMC clouds, and
# a naval-sized ensemble.
CASES = [
    ("yacht-size SMC", 277, 6, 256),
    ("wine-size SMC", 1439, 11, 256),
    ("power-size SMC", 8611, 4, 256),
    ("naval-size Ensemble", 10740, 16, 5),
]


def data(rows: int, inputs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, inputs)).astype(np.float32)
    y = np.sin(x.sum(axis=1)) + 0.1 * rng.normal(size=rows)
    return x, y.astype(np.float32)


def loglik_fn(x: np.ndarray, y: np.ndarray) -> tuple[Callable[[jax.Array], jax.Array], int]:
    """The network's Gaussian log likelihood of a flat parameter vector, by hand."""
    d = x.shape[1]
    dim = d * HIDDEN + 2 * HIDDEN + 2
    xs, ys = jnp.asarray(x), jnp.asarray(y)

    def loglik(u: jax.Array) -> jax.Array:
        w1 = u[: d * HIDDEN].reshape(d, HIDDEN)
        b1 = u[d * HIDDEN : d * HIDDEN + HIDDEN]
        w2 = u[d * HIDDEN + HIDDEN : d * HIDDEN + 2 * HIDDEN]
        b2, log_s = u[-2], u[-1]
        f = jax.nn.relu(xs @ w1 + b1) @ w2 + b2
        return jnp.sum(-0.5 * ((ys - f) / jnp.exp(log_s)) ** 2 - log_s)

    return loglik, dim


def timed(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sweep_case(
    name: str, rows: int, inputs: int, count: int, batches: list[int], repeats: int
) -> None:
    loglik, dim = loglik_fn(*data(rows, inputs))
    grad = jax.grad(loglik)

    def five(u: jax.Array) -> jax.Array:
        return jax.lax.fori_loop(0, 5, lambda _, v: v + 1e-4 * grad(v), u)

    u = jnp.asarray(0.1 * np.random.default_rng(1).normal(size=(count, dim)), jnp.float32)
    chosen = batch_size(grad, (u[0],), count, None)
    temp = jax.jit(grad).lower(u[0]).compile().memory_analysis().temp_size_in_bytes
    whole_fn = jax.jit(jax.vmap(five))
    whole = timed(lambda: whole_fn(u), repeats)
    print(
        f"  {name}: {rows} rows x {inputs} inputs, {count} items, "
        f"{temp / 1e6:.2f} MB of temporaries per item; one vmap {whole:.4f} s"
    )
    for b in sorted(set(batches) | ({chosen} if chosen else set())):
        if b >= count:
            continue
        f = jax.jit(lambda v, b=b: jax.lax.map(five, v, batch_size=b))
        t = timed(lambda f=f: f(u), repeats)
        mark = "  <- batch_size picks this" if b == chosen else ""
        print(f"    batches of {b:3d}: {t:.4f} s, {whole / t:4.2f}x faster than one vmap{mark}")
    if chosen == 0:
        print("    batch_size picks one vmap")


def sweeps(batches: list[int], repeats: int) -> None:
    print("Part 1: 5 gradients per item, seconds per sweep (median of", repeats, "calls)")
    for case in CASES:
        sweep_case(*case, batches, repeats)


def bnn(x: np.ndarray, y: np.ndarray) -> None:
    f = BayesianMLP("f", [x.shape[1], HIDDEN, 1], activation="relu")
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("data", len(y)):
        numpyro.sample("y", dist.Normal(f(x)[:, 0], sigma), obs=y)


def fits(quick: bool) -> None:
    _, rows, inputs, _ = CASES[2]
    x, y = data(rows, inputs)
    smc = dict(num_particles=64, num_mcmc_steps=2, progress_bar=False)
    ens = dict(num_members=5, num_steps=100 if quick else 500, progress_bar=False)
    engines = {
        "SMC": (probdyn.SMC(**smc), probdyn.SMC(**smc, particles_per_batch=64)),
        "Ensemble": (probdyn.Ensemble(**ens), probdyn.Ensemble(**ens, members_per_batch=5)),
    }
    print(f"\nPart 2: probdyn.fit on {rows} rows x {inputs} inputs, compile included")
    for name, (auto, vmap) in engines.items():
        times: dict[str, list[float]] = {"auto": [], "vmap": []}
        for repeat in range(1 if quick else 2):
            for label, engine in (("vmap", vmap), ("auto", auto)):
                jax.clear_caches()
                start = time.perf_counter()
                post = probdyn.fit(bnn, x, y, engine=engine, key=repeat)
                times[label].append(time.perf_counter() - start)
                if label == "auto" and name == "SMC":
                    batch = post.attrs["particles_per_batch"]
        a, v = statistics.median(times["auto"]), statistics.median(times["vmap"])
        extra = f" (batches of {batch})" if name == "SMC" else ""
        print(f"  {name}: automatic{extra} {a:.1f} s, one vmap {v:.1f} s, ratio {a / v:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, shorter fits")
    p.add_argument("--batches", default="1,2,4,8,16,32,64", help="batch sizes to time")
    args = p.parse_args()
    print(
        f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPU cores, "
        f"CPU_BATCH_BYTES = {CPU_BATCH_BYTES / 2**20:.0f} MiB"
    )
    sweeps([int(b) for b in args.batches.split(",")], 2 if args.quick else 5)
    fits(args.quick)


if __name__ == "__main__":
    main()
