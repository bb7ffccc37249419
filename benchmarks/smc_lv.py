"""Tempered SMC against NUTS on the posteriordb Lotka-Volterra posterior (hare-lynx ODE).

The model, data and Stan reference draws are those of ``tests/test_posteriordb.py``
(``../shared/data/posteriordb``). Two parts:

* ``--profile N [N ...]``: one ``sample_smc`` run per particle count (key 0, caches
  cleared first), timing every stage of the compiled program: the batch of particles
  one evaluation takes, compile time, wall time per stage, moves and evaluations of
  the cloud per stage (an evaluation is one gradient of the model per particle).
* the comparison (default): ``SMC(num_particles=1000)`` and then NUTS 4 x (1000
  warm-up + 1000) draws, each ``probdyn.fit`` timed with compile included, in the
  same process; SMC matches the reference when for every parameter and every
  level q in 5/25/50/75/95 % the reference's empirical CDF at SMC's q-quantile is
  within q +- 0.05 (NUTS is scored by the same rule). Then the log evidence of SMC
  over ``--keys`` keys (0, 1, ...; the first is the timed fit, the others reuse its
  compiled program).

Run ``python benchmarks/smc_lv.py [--profile 100 200 500 1000] [--particles 1000]
[--keys 5] [--first-key 0] [--no-nuts] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

import probdyn
from probdyn.numpyro.engines import smc as smc_runner
from probdyn.numpyro.engines import smc_program

REPO = Path(__file__).resolve().parents[1]
LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)
TOLERANCE = 0.05


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def helpers() -> Any:
    """``tests/test_posteriordb.py`` as a module (its model and reference loader)."""
    sys.path.insert(0, str(REPO / "tests"))
    import test_posteriordb

    return test_posteriordb


def quantile_check(post: probdyn.Posterior, ref: dict[str, np.ndarray]) -> dict[str, Any]:
    """For every reference parameter: the reference's CDF at our q-quantiles, minus q."""
    worst, where, table = 0.0, "", {}
    for name, ref_draws in ref.items():
        site, _, index = name.rstrip("]").partition("[")
        ours = post.samples[site] if not index else post.samples[site][..., int(index) - 1]
        ours = np.asarray(ours, dtype=float).ravel()
        flat = np.sort(np.asarray(ref_draws, dtype=float).ravel())
        errs = []
        for q in LEVELS:
            cdf = np.searchsorted(flat, np.quantile(ours, q), side="right") / flat.size
            errs.append(float(cdf - q))
        table[name] = errs
        m = max(errs, key=abs)
        if abs(m) > abs(worst):
            worst, where = m, name
    return {
        "passed": abs(worst) <= TOLERANCE,
        "worst": worst,
        "worst_param": where,
        "cdf_minus_q": table,
    }


def profile(counts: list[int], args: tuple[Any, ...], tp: Any) -> list[dict[str, Any]]:
    rows = []
    for n in counts:
        smc_program.clear_cache()
        jax.clear_caches()
        stages: list[dict[str, float]] = []
        build = smc_program._build_program

        def timed(
            *a: Any, build: Any = build, stages: list[dict[str, float]] = stages, **k: Any
        ) -> smc_program.Program:
            program = build(*a, **k)

            def step(key: Any, state: Any, temperature: Any) -> Any:
                t = time.perf_counter()
                out = jax.block_until_ready(program.step(key, state, temperature))
                stats = {k: float(v) for k, v in jax.device_get(out[1]).items()}
                stages.append({"wall_s": time.perf_counter() - t, **stats})
                return out

            return program._replace(step=step)

        engine = probdyn.SMC(num_particles=n, progress_bar=False)
        smc_program._build_program = timed  # type: ignore[assignment]
        try:
            from probdyn.numpyro.engines.timing import CompileTimer

            start = time.perf_counter()
            with CompileTimer() as timer:
                res = smc_runner.sample_smc(tp.lotka_volterra_model, args, {}, engine, 0)
            wall = time.perf_counter() - start
        finally:
            smc_program._build_program = build  # type: ignore[assignment]
        later = [s["wall_s"] for s in stages[2:]]  # stage 0 and 1 compile
        row = {
            "particles": n,
            "per_batch": res.particles_per_batch,
            "wall_s": wall,
            "compile_s": timer.seconds,
            "stages": len(stages),
            "stage0_s": stages[0]["wall_s"],
            "median_stage_s_after_2": float(np.median(later)) if later else float("nan"),
            "moves": [int(s["num_moves"]) for s in stages],
            "evaluations": [int(s["num_evaluations"]) for s in stages],
            "stage_s": [round(s["wall_s"], 2) for s in stages],
            "log_evidence": res.log_evidence,
        }
        evals = sum(row["evaluations"])
        row["gradients_per_particle"] = evals
        row["ms_per_particle_gradient_after_2"] = (
            1e3 * sum(later) / max(sum(row["evaluations"][2:]), 1) / n
        )
        print(json.dumps(row), f"load {load()}", flush=True)
        rows.append(row)
    return rows


def fit(tp: Any, args: tuple[Any, ...], engine: Any, key: int) -> tuple[probdyn.Posterior, float]:
    start = time.perf_counter()
    post = probdyn.fit(tp.lotka_volterra_model, *args, engine=engine, key=key)
    return post, time.perf_counter() - start


def compare(
    args: tuple[Any, ...],
    ref: dict[str, np.ndarray],
    tp: Any,
    n: int,
    keys: range,
    nuts_too: bool = True,
) -> dict:
    out: dict[str, Any] = {"nuts": {"wall_s": float("nan")}}
    smc_program.clear_cache()
    jax.clear_caches()
    engine = probdyn.SMC(num_particles=n, progress_bar=False)
    evidence, walls, checks = [], [], []
    for key in keys:
        post, wall = fit(tp, args, engine, key)
        walls.append(wall)
        evidence.append(float(post.log_evidence))
        check = quantile_check(post, ref)
        checks.append({"key": key, "last_stage_moves": int(post.traces["num_moves"][-1]), **check})
        if key == keys[0]:
            out["smc"] = {
                "wall_s": wall,
                "compile_s": float(post.attrs["compile_time"]),
                "stages": int(post.attrs["num_stages"]),
                "num_moves": post.traces["num_moves"].tolist(),
                "particles_per_batch": int(post.attrs["particles_per_batch"]),
                **check,
            }
        print(
            f"  SMC key {key}: {wall:.1f} s (compile {float(post.attrs['compile_time']):.1f} s), "
            f"log evidence {evidence[-1]:.3f}, "
            f"{int(post.attrs['num_stages'])} stages, {int(post.attrs['num_moves'])} moves "
            f"({int(post.traces['num_moves'][-1])} in the last), "
            f"quantile rule {'PASS' if check['passed'] else 'FAIL'} "
            f"(worst {check['worst']:+.3f}, {check['worst_param']}) (load {load()})",
            flush=True,
        )
    if nuts_too:  # after SMC: a run cut short still has SMC's figures
        out.update(nuts_fit(args, ref, tp))
    out["smc"]["ratio_to_nuts"] = out["smc"]["wall_s"] / out["nuts"]["wall_s"]
    out["smc"]["quantile_rule_each_key"] = checks
    out["smc"]["log_evidence"] = evidence
    out["smc"]["log_evidence_mean"] = float(np.mean(evidence))
    out["smc"]["log_evidence_sd"] = float(np.std(evidence, ddof=1)) if len(keys) > 1 else None
    out["smc"]["wall_s_each_key"] = walls
    print(json.dumps({k: v for k, v in out["smc"].items() if k != "cdf_minus_q"}), flush=True)
    return out


def nuts_fit(args: tuple[Any, ...], ref: dict[str, np.ndarray], tp: Any) -> dict:
    out: dict[str, Any] = {}
    print(f"NUTS 4 x (1000 + 1000): running (load {load()})", flush=True)
    jax.clear_caches()
    nuts = probdyn.NUTS(num_warmup=1000, num_samples=1000, num_chains=4, progress_bar=False)
    post, wall = fit(tp, args, nuts, 0)
    out["nuts"] = {"wall_s": wall, **quantile_check(post, ref)}
    out["nuts"]["divergences"] = int(np.sum(post.sample_stats["diverging"]))
    brief = {k: v for k, v in out["nuts"].items() if k != "cdf_minus_q"}
    print(f"  NUTS {wall:.1f} s, {json.dumps(brief)} (load {load()})", flush=True)

    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=int, nargs="*", default=None)
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--keys", type=int, default=5)
    parser.add_argument("--first-key", type=int, default=0)
    parser.add_argument("--no-nuts", action="store_true")
    parser.add_argument("--json", default=None)
    opts = parser.parse_args()
    warnings.filterwarnings("ignore", message=r".*solve\(s\) failed", category=RuntimeWarning)
    warnings.filterwarnings("ignore", message="There are not enough devices")
    tp = helpers()
    if not tp.LV.is_dir():
        print(f"skipped: {tp.LV} is not present")
        return
    data, ref = tp._reference(tp.LV)
    args = tuple(np.asarray(data[k], dtype=float) for k in ("ts", "y_init", "y"))
    print(f"{os.cpu_count()} CPU cores, JAX devices {jax.devices()}, load {load()}", flush=True)
    result: dict[str, Any] = {}
    if opts.profile is not None:
        result["profile"] = profile(opts.profile or [100, 200, 500, 1000], args, tp)
    else:
        keys = range(opts.first_key, opts.first_key + opts.keys)
        result["compare"] = compare(args, ref, tp, opts.particles, keys, not opts.no_nuts)
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
