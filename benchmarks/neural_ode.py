"""The demo's Bayesian neural ODE: probdyn.fit(NUTS) against the same model in hand-written NumPyro.

The model is the demo's universal differential equation
(``probdyn.demo._numpyro.predator_prey_ude``: Lotka–Volterra whose per-encounter
interaction rates are ``exp`` of a Bayesian [2, 8, 2] tanh MLP) on
``probdyn.data.synthetic_predator_prey(seed=0)``. The hand-written copy must be
kept in step with the demo model: the ``same log density`` row of the table
checks that both give the same potential energy at posterior draws.

Runners (same seed, same kernel settings, same start):

* ``hand-written``: the same model written with ``diffrax.diffeqsolve`` and plain
  ``numpyro.sample`` sites (no probdyn); a MAP start by SVI with ``AutoDelta``
  (the steps, schedule and jitter of ``probdyn.numpyro.engines.map`` and ``_mcmc``);
  ``numpyro.infer.MCMC(NUTS)``; then the post-processing a user needs for what
  ``probdyn.fit`` returns (posterior predictive, pointwise log likelihood) and
  the trajectory at held-out times with ``Predictive``.
* ``probdyn``: ``probdyn.fit(predator_prey_ude, t, y, engine=probdyn.NUTS(...,
  init="map"))`` as the demo runs it, then ``post.predict`` at the same times.

Run ``python benchmarks/neural_ode.py [--quick | --demo] [--json out.json]``.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any

import _harness as h
import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.infer import (
    MCMC,
    NUTS,
    SVI,
    Predictive,
    Trace_ELBO,
    init_to_median,
    log_likelihood,
)
from numpyro.infer.autoguide import AutoDelta
from numpyro.infer.util import constrain_fn, unconstrain_fn
from numpyro.optim import optax_to_numpyro

import probdyn
from probdyn.data import synthetic_predator_prey
from probdyn.demo._numpyro import predator_prey_ude
from probdyn.demo._run import DemoSettings

SEED = 0
HIDDEN = 8
MAP_STEPS, MAP_LR = (
    2000,
    0.01,
)  # probdyn.numpyro.engines.map: 2000 Adam steps, 0.01 decaying to 1e-3
EXTRA_FIELDS = ("accept_prob", "num_steps", "energy", "potential_energy", "adapt_state.step_size")
LATENT = (
    "alpha",
    "gamma",
    "z0",
    "sigma",
    "interaction.layers.0.weight",
    "interaction.layers.0.bias",
    "interaction.layers.1.weight",
    "interaction.layers.1.bias",
)
NUM_ESS_TIMES = 4  # held-out times whose trajectory (both species) has its ESS reported


@dataclasses.dataclass(frozen=True)
class Settings:
    """NUTS settings; the defaults are the demo's (``DemoSettings``) with a third of the draws."""

    num_warmup: int = 100
    num_samples: int = 100
    num_chains: int = DemoSettings().num_chains
    max_tree_depth: int = DemoSettings().max_tree_depth
    target_accept: float = 0.8

    @classmethod
    def demo(cls) -> Settings:
        d = DemoSettings()
        return cls(d.num_warmup, d.num_samples, d.num_chains, d.max_tree_depth)

    @classmethod
    def quick(cls) -> Settings:
        d = DemoSettings.quick()
        return cls(d.num_warmup, d.num_samples, d.num_chains, d.max_tree_depth)


# -- the hand-written model (a factory: every run gets fresh function objects) ----------------
def make_hand_model(hidden: int = HIDDEN) -> Any:
    """``predator_prey_ude`` written with diffrax and numpyro directly (same sites, same order)."""

    def vector_field(t: Any, z: Any, args: Any) -> Any:
        alpha, gamma, w0, b0, w1, b1 = args
        rates = jnp.exp(jnp.tanh(z @ w0 + b0) @ w1 + b1)  # log-rate network
        encounters = z[0] * z[1]
        return jnp.stack(
            [alpha * z[0] - encounters * rates[0], -gamma * z[1] + encounters * rates[1]]
        )

    term = dfx.ODETerm(vector_field)

    def ude_hand(times: Any, y: Any = None) -> None:
        alpha = numpyro.sample("alpha", dist.LogNormal(0.0, 1.0))
        gamma = numpyro.sample("gamma", dist.LogNormal(0.0, 1.0))
        z0 = numpyro.sample("z0", dist.LogNormal(0.0, 1.0).expand([2]).to_event(1))
        sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
        # The demo's interaction prior: N(0, 1) on the hidden layer and the output
        # bias, N(0, 0.1) on the output weights.
        normal, small = dist.Normal(0.0, 1.0), dist.Normal(0.0, 0.1)
        w0 = numpyro.sample("interaction.layers.0.weight", normal.expand([2, hidden]).to_event(2))
        b0 = numpyro.sample("interaction.layers.0.bias", normal.expand([hidden]).to_event(1))
        w1 = numpyro.sample("interaction.layers.1.weight", small.expand([hidden, 2]).to_event(2))
        b1 = numpyro.sample("interaction.layers.1.bias", normal.expand([2]).to_event(1))
        times = jnp.asarray(times)
        sol = dfx.diffeqsolve(
            term,
            dfx.Tsit5(),
            t0=jnp.asarray(0.0, dtype=times.dtype),
            t1=times[-1],
            dt0=None,
            y0=z0,
            args=(alpha, gamma, w0, b0, w1, b1),
            saveat=dfx.SaveAt(ts=times),
            stepsize_controller=dfx.PIDController(rtol=1e-5, atol=1e-5),
            adjoint=dfx.RecursiveCheckpointAdjoint(),
            max_steps=2048,
            throw=False,
        )
        # A failed solve must not crash the sampler: reject the proposal instead.
        failed = (sol.result != dfx.RESULTS.successful) | ~jnp.all(jnp.isfinite(sol.ys))
        numpyro.factor("ode.failed", jnp.where(failed, -jnp.inf, 0.0))
        z = numpyro.deterministic("z", jnp.where(failed, jnp.zeros_like(sol.ys), sol.ys))
        loc = jnp.log(jnp.clip(z, 1e-6))
        numpyro.sample("y", dist.LogNormal(loc, sigma), obs=y)

    return ude_hand


def make_probdyn_model() -> Any:
    """The demo model itself, wrapped so that every run gets a fresh function object."""

    def ude_probdyn(times: Any, y: Any = None) -> None:
        predator_prey_ude(times, y, hidden=HIDDEN)

    return ude_probdyn


def hand_map_starts(model: Any, args: tuple[Any, ...], key: Any, num_chains: int) -> Any:
    """MAP by Adam (SVI + AutoDelta from the prior medians), then one jittered start per chain.

    The same steps, schedule, keys and jitter as probdyn's ``init="map"``, so the
    chains start at the same points.
    """
    guide = AutoDelta(model, init_loc_fn=init_to_median)
    schedule = optax.exponential_decay(MAP_LR, MAP_STEPS, 0.1)
    svi = SVI(model, guide, optax_to_numpyro(optax.adam(schedule)), Trace_ELBO())
    state = svi.init(key, *args)

    @jax.jit
    def optimise(state: Any) -> Any:
        def body(s: Any, _: None) -> tuple[Any, None]:
            s, _loss = svi.stable_update(s, *args)
            return s, None

        return jax.lax.scan(body, state, None, length=MAP_STEPS)[0]

    values = guide.median(svi.get_params(optimise(state)))
    centre = unconstrain_fn(model, args, {}, {s: values[s] for s in LATENT})
    starts = []
    for k in jax.random.split(key, num_chains):
        leaves, tree = jax.tree.flatten(centre)
        ks = jax.random.split(k, len(leaves))
        jittered = [x + 1e-2 * jax.random.normal(kk, jnp.shape(x)) for x, kk in zip(leaves, ks)]
        # Through constrained space and back, as probdyn does: bitwise the same starts.
        value = constrain_fn(model, args, {}, jax.tree.unflatten(tree, jittered))
        starts.append(unconstrain_fn(model, args, {}, value))
    if num_chains == 1:
        return starts[0]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *starts)


def _toy_solve() -> Any:
    """One small diffrax solve, to warm up diffrax and equinox before any timing."""
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, z, k: -k * z),
        dfx.Tsit5(),
        t0=0.0,
        t1=1.0,
        dt0=None,
        y0=jnp.ones(2),
        args=1.0,
        saveat=dfx.SaveAt(ts=jnp.linspace(0.0, 1.0, 3)),
        stepsize_controller=dfx.PIDController(rtol=1e-5, atol=1e-5),
    )
    return sol.ys


def hand_mcmc(model: Any, s: Settings) -> MCMC:
    kernel = NUTS(
        model,
        target_accept_prob=s.target_accept,
        max_tree_depth=s.max_tree_depth,
        init_strategy=init_to_median,
    )
    return MCMC(
        kernel,
        num_warmup=s.num_warmup,
        num_samples=s.num_samples,
        num_chains=s.num_chains,
        chain_method="sequential",
        progress_bar=False,
    )


# -- runners ------------------------------------------------------------------------------------
def run_hand(data: Any, t_ess: np.ndarray, s: Settings, keep: dict[str, Any]) -> h.RunResult:
    model = make_hand_model()
    t, y = data.t_train, data.y_train
    key = jax.random.PRNGKey(SEED)
    with h.compile_timer() as whole:
        start = time.perf_counter()
        init_params = hand_map_starts(model, (t, y), jax.random.fold_in(key, 2), s.num_chains)
        t_map = time.perf_counter()
        mcmc = hand_mcmc(model, s)
        t0 = time.perf_counter()
        with h.compile_timer() as in_run:
            mcmc.run(key, t, y, extra_fields=EXTRA_FIELDS, init_params=init_params)
            samples = h.block(mcmc.get_samples(group_by_chain=True))
        t1 = time.perf_counter()
        extra = mcmc.get_extra_fields(group_by_chain=True)
        latent = {k: samples[k] for k in LATENT}
        pp = Predictive(model, latent, return_sites=["y"], batch_ndims=2)(
            jax.random.fold_in(key, 1), t
        )
        loglik = log_likelihood(model, latent, t, y, batch_ndims=2)
        out = jax.tree.map(np.asarray, (samples, extra, pp, loglik))
        t2 = time.perf_counter()
        pred = Predictive(model, latent, return_sites=["z"], batch_ndims=2)(
            jax.random.fold_in(key, 3), t_ess
        )
        z_ess = np.asarray(pred["z"])
        end = time.perf_counter()
    keep["init_params"] = init_params
    samples, extra = out[0], out[1]
    return h.RunResult(
        total=end - start,
        sampling=t1 - t0,
        compile_total=whole.seconds,
        compile_sampling=in_run.seconds,
        stages={"map": t_map - start, "postprocess": t2 - t1, "predict": end - t2},
        quantities={"z": z_ess},
        latent={k: samples[k] for k in LATENT},
        num_steps=extra["num_steps"],
        diverging=extra["diverging"],
        step_size=extra["adapt_state.step_size"][:, 0],
    )


def run_probdyn(data: Any, t_ess: np.ndarray, s: Settings) -> h.RunResult:
    model = make_probdyn_model()
    engine = probdyn.NUTS(
        num_warmup=s.num_warmup,
        num_samples=s.num_samples,
        num_chains=s.num_chains,
        max_tree_depth=s.max_tree_depth,
        target_accept=s.target_accept,
        chain_method="sequential",
        init="map",
        progress_bar=False,
    )
    with h.compile_timer() as whole:
        start = time.perf_counter()
        post = probdyn.fit(model, data.t_train, data.y_train, engine=engine, key=SEED)
        t1 = time.perf_counter()
        z_ess = post.predict(t_ess, key=SEED + 3, sites=["z"])["z"]
        end = time.perf_counter()
    stats = post.sample_stats
    return h.RunResult(
        total=end - start,
        sampling=post.attrs["wall_time"],
        compile_total=whole.seconds,
        compile_sampling=post.attrs["compile_time"],
        stages={"fit": t1 - start, "predict": end - t1},
        quantities={"z": z_ess},
        latent={k: post.samples[k] for k in LATENT},
        num_steps=stats["n_steps"],
        diverging=stats["diverging"],
        step_size=stats["step_size"][:, 0],
        extra={"failed_solves": float(post.attrs["num_failed_solves"])},
    )


def main() -> None:
    args = h.parse_args(
        __doc__.splitlines()[0],
        default_repeats=1,
        flags={"--demo": "the demo's exact NUTS settings (several minutes)"},
    )
    s = Settings.quick() if args.quick else Settings.demo() if args.demo else Settings()
    data = synthetic_predator_prey(seed=SEED)
    t_ess = data.t_test[h.spread(len(data.t_test), NUM_ESS_TIMES)]
    print(
        f"Neural ODE (demo UDE), {len(data.t_train)} observations; NUTS {s}, init='map'; "
        f"{args.repeats} repeat(s), alternating; {os.cpu_count()} CPU cores",
        flush=True,
    )
    warnings.filterwarnings("ignore", message="There are not enough devices")
    warnings.filterwarnings("ignore", message=r".*solve\(s\) failed", category=RuntimeWarning)
    h.warm_up_process(_toy_solve)

    keep: dict[str, Any] = {}
    runs = h.alternate(
        {
            "hand-written": lambda: run_hand(data, t_ess, s, keep),
            "probdyn": lambda: run_probdyn(data, t_ess, s),
        },
        args.repeats,
    )

    # Warmup gradient evaluations (MCMC.run keeps the statistics of kept draws only).
    h.fresh_caches()
    probe = h.warmup_probe(
        hand_mcmc(make_hand_model(), s),
        jax.random.PRNGKey(SEED),
        (data.t_train, data.y_train),
        init_params=keep["init_params"],
    )
    print(f"  warmup probe: {probe['num_steps']} gradient evaluations in warmup", flush=True)

    # Cost of one log-density gradient, for each runner's model, at the same posterior
    # draws (those of the hand-written run; an adaptive solve costs more in some
    # places than others, so 8 draws).
    models = {}
    fit_args = (data.t_train, data.y_train)
    for name, make in (("hand-written", make_hand_model), ("probdyn", make_probdyn_model)):
        model = make()
        points = h.unconstrained_draws(model, fit_args, {}, runs["hand-written"][0].latent, 8)
        models[name] = (model, fit_args, points)
    grad_s, potentials = h.grad_eval_seconds(models, inner=20, repeats=15)
    density = h.same_density(potentials, "hand-written")

    summaries = {}
    base = runs["hand-written"][0].latent
    for name, results in runs.items():
        summ = h.summarise(results, num_warmup=s.num_warmup, grad_seconds=grad_s[name], probe=probe)
        summ["same_draws"] = all(np.array_equal(results[0].latent[k], base[k]) for k in base)
        summ["density_rel_diff"] = density[name.split(" ")[0]]
        summaries[name] = summ

    rows = h.report(
        "Neural ODE (demo UDE): probdyn vs hand-written NumPyro + diffrax "
        "(timings on a shared, loaded machine: compare within this run only)",
        summaries,
        "z",
        f"trajectory (both species) at held-out t = {np.round(t_ess, 2).tolist()}",
    )
    extra_rows = [
        ("MAP start [s] (hand-written)", [summaries["hand-written"].get("map_s"), None]),
        ("failed ODE solves (probdyn)", [None, summaries["probdyn"].get("failed_solves")]),
        (
            "compile target <= 10 s: MCMC.run",
            [summaries[n]["compile_sampling_s"] <= 10 for n in summaries],
        ),
        (
            "compile target <= 10 s: whole job",
            [summaries[n]["compile_total_s"] <= 10 for n in summaries],
        ),
    ]
    h.print_table("Neural ODE: further figures", list(summaries), extra_rows)
    if args.json:
        h.write_json(
            args.json,
            {
                "benchmark": "neural_ode",
                "settings": dataclasses.asdict(s),
                "repeats": args.repeats,
                "t_ess": t_ess,
                "machine": h.machine_info(),
                "warmup_probe": dict(probe),
                "results": summaries,
                "table": rows + extra_rows,
            },
        )


if __name__ == "__main__":
    main()
