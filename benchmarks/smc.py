"""Tempered SMC: probdyn.fit(engine=SMC) against hand-written BlackJAX SMC, and SMC against NUTS.

Part 1, overhead, on ``probdyn.testing``'s Bayesian linear regression (30 points,
3 correlated coefficients, exact posterior and exact log evidence). Runners
alternate (hand-written first); JAX's compile caches and probdyn's cache of
compiled SMC programs are cleared before every run; each run is two calls, the
first with key 0 (compiling) and a second with key 1 (probdyn serves it from its
compiled-program cache; the hand-written runner reuses its jitted functions):

* ``hand-written``: the log prior and log likelihood written with
  ``jax.scipy.stats.norm`` on the coefficient vector (the real line: no
  transform); prior draws as the initial particles;
  ``inner_kernel_tuning(adaptive_tempered_smc)`` with BlackJAX's HMC, the settings
  of ``probdyn.SMC``'s defaults (read from the engine, so both follow them) and
  probdyn's tuning rules from ``probdyn.engines.smc_math``: diagonal inverse mass
  matrix = the weighted particle variance, first step ``initial_step_size``, then
  ``step * exp(STEP_ADAPT_GAIN * (acceptance - TARGET_ACCEPTANCE))``, every
  particle's step times ``exp(U(-STEP_JITTER, STEP_JITTER))``; systematic
  resampling; a Python loop over one jitted stage until the temperature is 1,
  then one more stage at temperature 1 (resample and move, as probdyn does); then
  what ``probdyn.fit`` also returns: NumPyro ``Predictive`` (posterior predictive)
  and ``log_likelihood``.
* ``probdyn``: ``probdyn.fit(linear_regression_model, *args,
  engine=probdyn.SMC(num_particles=N), key=...)``.

Part 2, SMC against NUTS on the posteriordb Lotka-Volterra posterior (hare-lynx
pelts; the model, the reference loader and the comparison rule are those of
``tests/test_posteriordb.py``: every mean within 4 combined MCSE of the Stan
reference and every sd within 15 %): NUTS as the test runs it (2 x (400 + 500)
draws, vectorized chains), and SMC with 5 HMC moves per stage and 100, 200, 400
particles, stopping at the first particle count that passes. Skipped when
``../shared/data/posteriordb`` is absent, and with ``--quick`` unless ``--lv``.

Run ``python benchmarks/smc.py [--quick] [--lv] [--repeats N] [--json out.json]``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import _harness as h
import blackjax
import jax
import jax.numpy as jnp
import numpy as np
from blackjax.smc import inner_kernel_tuning, resampling
from blackjax.smc.inner_kernel_tuning import StateWithParameterOverride
from blackjax.smc.tempered import TemperedSMCState
from jax.scipy.stats import norm
from numpyro.infer import Predictive, log_likelihood

import probdyn
from probdyn.engines import smc_math as _smc_math
from probdyn.numpyro.engines import smc_program
from probdyn.testing import (
    ReferenceProblem,
    linear_regression_data,
    linear_regression_model,
    normal_data,
    normal_model,
)

SEED = 0
REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
POSTERIORDB = REPO.parent / "shared" / "data" / "posteriordb"
LV_DIR = POSTERIORDB / "hudson_lynx_hare-lotka_volterra"
LV_PARTICLES = (100, 200, 400)
LV_MCMC_STEPS = 5
LV_NUTS = {"num_warmup": 400, "num_samples": 500, "num_chains": 2, "chain_method": "vectorized"}
MAX_STAGES = _smc_math.MAX_STAGES


@dataclasses.dataclass(frozen=True)
class Settings:
    num_particles: int = 1000
    lv: bool = True

    @classmethod
    def quick(cls, lv: bool) -> Settings:
        return cls(num_particles=200, lv=lv)

    def engine(self) -> probdyn.SMC:
        return probdyn.SMC(num_particles=self.num_particles, progress_bar=False)


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def clear_all() -> None:
    """JAX's compile caches and probdyn's cache of compiled SMC programs."""
    smc_program.clear_cache()
    h.fresh_caches()


# -- Part 1: overhead on Bayesian linear regression ----------------------------------------
@dataclasses.dataclass
class Call:
    """One call of a runner: the whole user job (SMC and post-processing)."""

    total: float
    sampling: float
    compile_total: float
    compile_sampling: float
    num_stages: int
    log_evidence: float
    draws: np.ndarray  # (num_particles, d)
    acceptance: list[float]


@dataclasses.dataclass
class Run:
    first: Call  # key 0, compiling
    second: Call  # key 1, compiled programs reused


class HandSMC:
    """Adaptive tempered SMC on the linear regression, written directly with BlackJAX.

    The jitted functions are built once per instance; ``run`` may be called again
    with another key and then compiles nothing.
    """

    def __init__(self, data: ReferenceProblem, engine: probdyn.SMC) -> None:
        x_np, y_np, prior_scale, noise = data.args
        x, y = jnp.asarray(x_np), jnp.asarray(y_np)
        self.x, self.y, self.prior_scale, self.noise = x, y, prior_scale, noise
        n, d = engine.num_particles, x.shape[1]
        num_leapfrog = engine.num_leapfrog_steps
        target = _smc_math.target_acceptance("hmc", d)
        gain = _smc_math.step_adapt_gain("hmc")
        jitter_width = _smc_math.STEP_JITTER
        assert engine.kernel == "hmc" and engine.temperatures == "adaptive"

        def logprior(w: jax.Array) -> jax.Array:
            return jnp.sum(norm.logpdf(w, 0.0, prior_scale))

        def loglik(w: jax.Array) -> jax.Array:
            return jnp.sum(norm.logpdf(y, x @ w, noise))

        def hmc_step(
            key: jax.Array,
            state: Any,
            logdensity_fn: Callable[[jax.Array], jax.Array],
            step_size: jax.Array,
            jitter: jax.Array,
            inverse_mass_matrix: jax.Array,
        ) -> Any:
            kernel = blackjax.hmc.build_kernel()
            return kernel(
                key, state, logdensity_fn, step_size * jitter, inverse_mass_matrix, num_leapfrog
            )

        def parameters(
            key: jax.Array, step: jax.Array, particles: jax.Array, weights: jax.Array
        ) -> dict[str, jax.Array]:
            mean = weights @ particles
            var = jnp.maximum(weights @ (particles - mean) ** 2, _smc_math.MIN_VARIANCE)
            jitter = jnp.exp(
                jax.random.uniform(key, (n,), minval=-jitter_width, maxval=jitter_width)
            )
            # Leading axis 1: shared by every particle; n: one value per particle.
            return {"step_size": step, "jitter": jitter, "inverse_mass_matrix": var[None]}

        def init(key: jax.Array) -> StateWithParameterOverride:
            k_draw, k_params = jax.random.split(key)
            particles = prior_scale * jax.random.normal(k_draw, (n, d))
            # Explicit dtypes: a weakly typed start (jnp.full of a Python float) would
            # make the second stage compile again, its inputs then being strongly typed.
            dtype = particles.dtype
            weights = jnp.full((n,), 1.0 / n, dtype)
            step = jnp.full((1,), _smc_math.initial_step_size("hmc", d), dtype)
            smc_state = TemperedSMCState(particles, weights, jnp.zeros((), dtype))
            return StateWithParameterOverride(
                smc_state, parameters(k_params, step, particles, weights)
            )

        def stage(
            key: jax.Array, state: StateWithParameterOverride
        ) -> tuple[StateWithParameterOverride, jax.Array, jax.Array]:
            def tune(key: jax.Array, new: TemperedSMCState, info: Any) -> dict[str, jax.Array]:
                rate = jnp.mean(jnp.nan_to_num(info.update_info.acceptance_rate, nan=0.0))
                step = state.parameter_override["step_size"] * jnp.exp(gain * (rate - target))
                return parameters(key, step, new.particles, new.weights)

            kernel = inner_kernel_tuning.build_kernel(
                blackjax.adaptive_tempered_smc,
                logprior,
                loglik,
                hmc_step,
                blackjax.hmc.init,
                resampling.systematic,
                tune,
                num_mcmc_steps=engine.num_mcmc_steps,
                target_ess=engine.target_ess,
            )
            new, info = kernel(key, state)
            rate = jnp.mean(jnp.nan_to_num(info.update_info.acceptance_rate, nan=0.0))
            return new, info.log_likelihood_increment, rate

        self.init = jax.jit(init)
        self.stage = jax.jit(stage)

    def sample(self, key: jax.Array) -> tuple[jax.Array, int, float, list[float]]:
        """Particles at temperature 1 (unweighted), stages, log evidence, acceptance rates."""
        k_init, k_stages = jax.random.split(key)
        state = self.init(k_init)
        log_z, stages, acceptance = 0.0, 0, []
        while True:
            done = float(state.sampler_state.tempering_param) >= 1.0
            state, increment, rate = self.stage(jax.random.fold_in(k_stages, stages), state)
            log_z += float(increment)
            acceptance.append(float(rate))
            if done:  # that was the stage at temperature 1: resampled and moved
                break
            stages += 1
            if stages >= MAX_STAGES:
                raise RuntimeError(f"hand-written SMC: temperature below 1 after {stages} stages")
        return state.sampler_state.particles, stages, log_z, acceptance

    def run(self, key: jax.Array) -> Call:
        with h.compile_timer() as whole:
            start = time.perf_counter()
            with h.compile_timer() as in_smc:
                particles, stages, log_z, acceptance = self.sample(key)
                particles = h.block(particles)
            t1 = time.perf_counter()
            # What probdyn.fit also returns: posterior predictive and pointwise log likelihood.
            draws = {"w": particles[None]}
            rest = (self.prior_scale, self.noise)
            pp = Predictive(linear_regression_model, draws, return_sites=["y"], batch_ndims=2)(
                jax.random.fold_in(key, 1), self.x, None, *rest
            )
            ll = log_likelihood(
                linear_regression_model, draws, self.x, self.y, *rest, batch_ndims=2
            )
            jax.tree.map(np.asarray, (pp, ll))
            end = time.perf_counter()
        return Call(
            total=end - start,
            sampling=t1 - start,
            compile_total=whole.seconds,
            compile_sampling=in_smc.seconds,
            num_stages=stages,
            log_evidence=log_z,
            draws=np.asarray(particles),
            acceptance=acceptance,
        )


def run_hand(data: ReferenceProblem, s: Settings) -> Run:
    runner = HandSMC(data, s.engine())
    first = runner.run(jax.random.PRNGKey(SEED))
    second = runner.run(jax.random.PRNGKey(SEED + 1))
    return Run(first, second)


def probdyn_call(data: ReferenceProblem, engine: probdyn.SMC, key: int) -> Call:
    with h.compile_timer() as whole:
        start = time.perf_counter()
        post = probdyn.fit(linear_regression_model, *data.args, engine=engine, key=key)
        end = time.perf_counter()
    return Call(
        total=end - start,
        sampling=float(post.attrs["wall_time"]),
        compile_total=whole.seconds,
        compile_sampling=float(post.attrs["compile_time"]),
        num_stages=int(post.attrs["num_stages"]),
        log_evidence=float(post.attrs["log_evidence"]),
        draws=np.asarray(post.samples["w"][0]),
        acceptance=[float(a) for a in post.traces["acceptance_rate"]],
    )


def run_probdyn(data: ReferenceProblem, s: Settings) -> Run:
    engine = s.engine()
    return Run(probdyn_call(data, engine, SEED), probdyn_call(data, engine, SEED + 1))


def alternate(runners: Mapping[str, Callable[[], Run]], repeats: int) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {name: [] for name in runners}
    for rep in range(repeats):
        for name, run in runners.items():
            clear_all()
            res = run()
            print(
                f"  [{rep + 1}/{repeats}] {name}: first call {res.first.total:.2f} s "
                f"(compile {res.first.compile_total:.2f} s), second call "
                f"{res.second.total:.2f} s (compile {res.second.compile_total:.2f} s); "
                f"load average {load()}",
                flush=True,
            )
            out[name].append(res)
    return out


def accuracy(draws: np.ndarray, data: ReferenceProblem) -> tuple[float, float]:
    """Largest |mean error| in exact posterior sds, and largest |sd ratio - 1|."""
    mean, sd = data.exact
    z = np.abs(draws.mean(0) - mean) / sd
    ratio = np.abs(draws.std(0, ddof=1) / sd - 1.0)
    return float(z.max()), float(ratio.max())


def overhead(data: ReferenceProblem, s: Settings, repeats: int) -> dict[str, Any]:
    runs = alternate(
        {"hand-written": lambda: run_hand(data, s), "probdyn": lambda: run_probdyn(data, s)},
        repeats,
    )
    med = lambda rs, f: float(statistics.median(f(r) for r in rs))
    summ: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        out: dict[str, Any] = {}
        for which in ("first", "second"):
            get = lambda r, which=which: getattr(r, which)
            out[f"{which}_total_s"] = med(rs, lambda r, g=get: g(r).total)
            out[f"{which}_total_s_each"] = [get(r).total for r in rs]
            out[f"{which}_sampling_s"] = med(rs, lambda r, g=get: g(r).sampling)
            out[f"{which}_post_s"] = med(rs, lambda r, g=get: g(r).total - g(r).sampling)
            out[f"{which}_compile_total_s"] = med(rs, lambda r, g=get: g(r).compile_total)
            out[f"{which}_compile_sampling_s"] = med(rs, lambda r, g=get: g(r).compile_sampling)
            out[f"{which}_exec_s"] = med(rs, lambda r, g=get: g(r).total - g(r).compile_total)
            call = get(rs[0])
            out[f"{which}_stages"] = call.num_stages
            out[f"{which}_log_evidence"] = call.log_evidence
            out[f"{which}_log_evidence_error"] = call.log_evidence - data.log_evidence
            z, sd = accuracy(call.draws, data)
            out[f"{which}_max_mean_z"] = z
            out[f"{which}_max_sd_dev"] = sd
            out[f"{which}_mean_acceptance"] = float(np.mean(call.acceptance))
        summ[name] = out
    base = summ["hand-written"]
    for out in summ.values():
        for which in ("first", "second"):
            for k in ("total_s", "sampling_s", "exec_s"):
                out[f"{which}_{k}_ratio"] = out[f"{which}_{k}"] / base[f"{which}_{k}"]
            out[f"{which}_total_s_ratio_each"] = [
                a / b for a, b in zip(out[f"{which}_total_s_each"], base[f"{which}_total_s_each"])
            ]
    names = list(summ)
    col = lambda key: [summ[n][key] for n in names]
    rows: list[tuple[str, list[Any]]] = []
    for which, label in (("first", "first call (key 0)"), ("second", "second call (key 1)")):
        rows += [
            (f"{label}: whole job [s] (median)", col(f"{which}_total_s")),
            ("  each repeat [s]", col(f"{which}_total_s_each")),
            ("  ratio to hand-written (median)", col(f"{which}_total_s_ratio")),
            ("  ratio, each repeat", col(f"{which}_total_s_ratio_each")),
            ("  SMC sampling [s]", col(f"{which}_sampling_s")),
            ("    ratio to hand-written", col(f"{which}_sampling_s_ratio")),
            ("    of which compile [s]", col(f"{which}_compile_sampling_s")),
            ("  post-processing (+ probdyn's tracing) [s]", col(f"{which}_post_s")),
            ("  compile, whole job [s]", col(f"{which}_compile_total_s")),
            ("  executing (job - compile) [s]", col(f"{which}_exec_s")),
            ("    ratio to hand-written", col(f"{which}_exec_s_ratio")),
            ("  stages to temperature 1 (+1 at 1)", col(f"{which}_stages")),
            ("  log evidence", col(f"{which}_log_evidence")),
            ("    minus exact", col(f"{which}_log_evidence_error")),
            ("  max |mean - exact| / exact sd", col(f"{which}_max_mean_z")),
            ("  max |sd / exact sd - 1|", col(f"{which}_max_sd_dev")),
            ("  mean acceptance rate over stages", col(f"{which}_mean_acceptance")),
        ]
    h.print_table(
        f"Part 1: SMC(num_particles={s.num_particles}) on linear regression, probdyn vs "
        f"hand-written BlackJAX; exact log evidence {data.log_evidence:.4f} "
        "(timings on a shared, loaded machine: compare within this run only)",
        names,
        rows,
    )
    return {"summaries": summ, "table": rows}


# -- Part 2: SMC vs NUTS on the posteriordb Lotka-Volterra posterior -----------------------
def posteriordb_helpers() -> Any:
    """``tests/test_posteriordb.py`` as a module (its model, ``_reference``, ``_compare``)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import test_posteriordb

    return test_posteriordb


def compare(post: probdyn.Posterior, ref: Mapping[str, np.ndarray], tp: Any) -> dict[str, Any]:
    """The figures of the test's ``_compare`` rule, and its verdict (``tp._compare``)."""
    import arviz as az

    zs, ratios, ess, ess_stored = {}, {}, {}, {}
    perm = np.random.default_rng(SEED).permutation(post.num_draws)
    for name, ref_draws in ref.items():
        site, _, index = name.rstrip("]").partition("[")
        ours = post.samples[site] if not index else post.samples[site][..., int(index) - 1]
        ours = np.asarray(ours, dtype=np.float64)  # (chain, draw)
        mcse = np.hypot(float(az.mcse(ours, method="mean")), float(az.mcse(ref_draws)))
        zs[name] = float((ours.mean() - ref_draws.mean()) / mcse)
        ratios[name] = float(ours.std(ddof=1) / ref_draws.std(ddof=1))
        ess_stored[name] = float(h.ess(ours))
        # SMC: the particles as one chain, shuffled (their stored order follows the
        # ancestors of the last resampling); NUTS: the chains as they are.
        ess[name] = float(h.ess(ours[:, perm])) if post.num_chains == 1 else ess_stored[name]
    try:
        tp._compare(post, ref)
        passed, failures = True, ""
    except AssertionError as err:
        passed, failures = False, str(err)
    worst_z = max(zs, key=lambda k: abs(zs[k]))
    worst_sd = max(ratios, key=lambda k: abs(ratios[k] - 1))
    return {
        "passed": passed,
        "failures": failures,
        "z": zs,
        "sd_ratio": ratios,
        "worst_abs_z": abs(zs[worst_z]),
        "worst_z_param": worst_z,
        "worst_sd_ratio": ratios[worst_sd],
        "worst_sd_param": worst_sd,
        "min_bulk_ess": min(ess.values()),
        "min_bulk_ess_param": min(ess, key=ess.get),  # type: ignore[arg-type]
        "min_bulk_ess_stored_order": min(ess_stored.values()),
    }


def lv_fit(name: str, engine: Any, args: tuple[Any, ...], ref: Any, tp: Any) -> dict[str, Any]:
    clear_all()
    print(f"  {name}: running (load average {load()})", flush=True)
    with h.compile_timer() as whole:
        start = time.perf_counter()
        try:
            post = probdyn.fit(tp.lotka_volterra_model, *args, engine=engine, key=SEED)
        except RuntimeError as err:  # SMC whose tempering degenerated
            print(f"  {name}: failed: {err}", flush=True)
            return {"passed": False, "error": str(err), "wall_s": time.perf_counter() - start}
        wall = time.perf_counter() - start
    out: dict[str, Any] = {
        "wall_s": wall,
        "sampling_s": float(post.attrs["wall_time"]),
        "compile_sampling_s": float(post.attrs["compile_time"]),
        "compile_total_s": whole.seconds,
        "failed_solves": int(post.attrs.get("num_failed_solves", 0)),
        "draws": post.num_chains * post.num_draws,
        **compare(post, ref, tp),
    }
    out["ess_per_s"] = out["min_bulk_ess"] / wall
    if "num_stages" in post.attrs:  # SMC
        out["stages"] = int(post.attrs["num_stages"])
        out["log_evidence"] = float(post.attrs["log_evidence"])
        flat = np.concatenate(
            [np.reshape(post.samples[k][0], (post.num_draws, -1)) for k in ("theta", "z_init")],
            axis=1,
        )
        out["unique_particles"] = int(np.unique(flat, axis=0).shape[0])
        out["mean_acceptance"] = float(np.mean(post.traces["acceptance_rate"]))
    else:
        out["divergences"] = int(np.sum(post.sample_stats["diverging"]))
    print(
        f"  {name}: {wall:.1f} s (compile {out['compile_total_s']:.1f} s), "
        f"{'PASS' if out['passed'] else 'FAIL'}, worst |z| {out['worst_abs_z']:.2f} "
        f"({out['worst_z_param']}), worst sd ratio {out['worst_sd_ratio']:.3f} "
        f"({out['worst_sd_param']}); load average {load()}",
        flush=True,
    )
    return out


def smc_vs_nuts() -> dict[str, Any] | None:
    if not LV_DIR.is_dir():
        print(f"\nPart 2 skipped: {LV_DIR} is not present.", flush=True)
        return None
    tp = posteriordb_helpers()
    data, ref = tp._reference(LV_DIR)
    args = tuple(np.asarray(data[k], dtype=float) for k in ("ts", "y_init", "y"))
    print(
        f"\nPart 2: SMC vs NUTS on posteriordb hudson_lynx_hare-lotka_volterra "
        f"(load average {load()}); rule of tests/test_posteriordb.py: every mean within 4 "
        "combined MCSE of the Stan reference, every sd within 15 %",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    nuts = probdyn.NUTS(**LV_NUTS, progress_bar=False)  # type: ignore[arg-type]
    results["NUTS 2x(400+500)"] = lv_fit("NUTS 2x(400+500)", nuts, args, ref, tp)
    passing = None
    for n in LV_PARTICLES:
        name = f"SMC {n} particles"
        engine = probdyn.SMC(num_particles=n, num_mcmc_steps=LV_MCMC_STEPS, progress_bar=False)
        results[name] = lv_fit(name, engine, args, ref, tp)
        if results[name]["passed"]:
            passing = name
            break

    names = list(results)
    col = lambda key: [results[n].get(key) for n in names]
    nuts_wall = results["NUTS 2x(400+500)"]["wall_s"]
    rows: list[tuple[str, list[Any]]] = [
        ("wall time, probdyn.fit [s]", col("wall_s")),
        ("  ratio to NUTS", [results[n]["wall_s"] / nuts_wall for n in names]),
        ("  sampling (attrs wall_time) [s]", col("sampling_s")),
        ("  compile in sampling [s]", col("compile_sampling_s")),
        ("  compile, whole fit [s]", col("compile_total_s")),
        ("draws", col("draws")),
        ("matches reference (test rule)", col("passed")),
        ("worst |mean z| [combined MCSE]", col("worst_abs_z")),
        ("  parameter", col("worst_z_param")),
        ("worst sd ratio", col("worst_sd_ratio")),
        ("  parameter", col("worst_sd_param")),
        ("min bulk ESS over parameters (*)", col("min_bulk_ess")),
        ("  parameter", col("min_bulk_ess_param")),
        ("  per second of wall time", col("ess_per_s")),
        ("  SMC: particles in stored order", col("min_bulk_ess_stored_order")),
        ("SMC stages to temperature 1 (+1 at 1)", col("stages")),
        ("SMC distinct particles", col("unique_particles")),
        ("SMC mean acceptance over stages", col("mean_acceptance")),
        ("SMC log evidence", col("log_evidence")),
        ("NUTS divergences", col("divergences")),
        ("failed ODE solves", col("failed_solves")),
    ]
    h.print_table(
        "Part 2: Lotka-Volterra, SMC (5 HMC moves per stage) vs NUTS "
        "(timings on a shared, loaded machine)",
        names,
        rows,
    )
    print(
        "(*) ArviZ bulk ESS. SMC particles are treated as one shuffled chain (a fixed random "
        "permutation; in their stored order neighbours share ancestors of the last "
        "resampling, the row 'particles in stored order'). NUTS: its 2 chains as they are. "
        "With a few hundred draws or fewer, a single chain's bulk ESS is a noisy estimate."
    )
    for n in names:
        if results[n].get("failures") or results[n].get("error"):
            print(f"  {n} misses the rule: {results[n].get('failures') or results[n]['error']}")
    smc_names = [n for n in names if n.startswith("SMC")]
    searched = sum(results[n]["wall_s"] for n in smc_names)
    ratio = results[passing]["wall_s"] / nuts_wall if passing else None
    print(
        f"\nSMC / NUTS wall time (smallest passing SMC, {passing or 'none passed'}): "
        f"{'-' if ratio is None else f'{ratio:.2f}'} (target <= 2); "
        f"whole search over {len(smc_names)} particle count(s): {searched:.1f} s = "
        f"{searched / nuts_wall:.2f} x NUTS; NUTS matched the reference: "
        f"{results['NUTS 2x(400+500)']['passed']}",
        flush=True,
    )
    return {
        "results": results,
        "passing_smc": passing,
        "smc_over_nuts": ratio,
        "smc_search_s": searched,
        "table": rows,
    }


# -- main ------------------------------------------------------------------------------------
def warm_up_extra() -> Any:
    """probdyn's SMC runner, BlackJAX and diffrax once (imports, first dispatches)."""
    import diffrax  # noqa: F401  (the ODE solver of part 2)

    tiny = probdyn.SMC(num_particles=16, num_mcmc_steps=1, progress_bar=False)
    post = probdyn.fit(normal_model, *normal_data().args, engine=tiny, key=SEED)
    hand = HandSMC(linear_regression_data(), probdyn.SMC(num_particles=16, num_mcmc_steps=1))
    return (post.samples["mu"], hand.run(jax.random.PRNGKey(SEED)).draws)


def main() -> None:
    args = h.parse_args(
        __doc__.splitlines()[0],
        flags={"--lv": "with --quick: run part 2 (Lotka-Volterra) too, at its full size"},
    )
    s = Settings.quick(args.lv) if args.quick else Settings()
    data = linear_regression_data()
    warnings.filterwarnings("ignore", message="There are not enough devices")
    # Early tempered stages propose far in the tails, where the solver hits
    # max_steps; those particles are rejected and counted (figure 'failed ODE solves').
    warnings.filterwarnings("ignore", message=r".*solve\(s\) failed", category=RuntimeWarning)
    info = h.machine_info()
    engine = s.engine()
    print(
        f"Tempered SMC benchmark; {platform.platform()}, {os.cpu_count()} CPU cores, JAX "
        f"devices {info['jax_devices']}. The machine is shared and loaded: timings drift by "
        f"tens of percent; load average (1, 5, 15 min) at start: {load()}",
        flush=True,
    )
    print(
        f"\nPart 1: linear regression ({data.args[0].shape[0]} points, {data.args[0].shape[1]} "
        f"coefficients); SMC(num_particles={engine.num_particles}, kernel={engine.kernel!r}, "
        f"num_mcmc_steps={engine.num_mcmc_steps}, num_leapfrog_steps="
        f"{engine.num_leapfrog_steps}, target_ess={engine.target_ess}); {args.repeats} "
        "repeat(s), alternating, hand-written first; caches cleared before every run; each run "
        "= first call (key 0, compiles) + second call (key 1)",
        flush=True,
    )
    h.warm_up_process(warm_up_extra)
    smc_program.clear_cache()
    part1 = overhead(data, s, args.repeats)
    print(f"\nload average after part 1: {load()}", flush=True)

    part2 = None
    if s.lv:
        part2 = smc_vs_nuts()
    else:
        print("\nPart 2 (Lotka-Volterra, SMC vs NUTS) skipped with --quick; add --lv to run it.")
    print(f"\nload average at the end: {load()}", flush=True)
    if args.json:
        h.write_json(
            args.json,
            {
                "benchmark": "smc",
                "settings": dataclasses.asdict(s),
                "repeats": args.repeats,
                "exact_log_evidence": data.log_evidence,
                "machine": info,
                "load_average_end": list(os.getloadavg()),
                "overhead": part1,
                "lotka_volterra": part2,
            },
        )


if __name__ == "__main__":
    main()
