"""Bayesian MLP regression: probdyn.fit(MCLMC) against hand-written BlackJAX MCLMC.

The model and data are those of ``bnn_regression.py`` (one hidden layer of 50 tanh
units, Normal(0, 1) weights, HalfNormal(1) noise scale, 100 points).

Runners (same settings: MILE's tuning split 80/10/10 %, 100 effective samples in the
step-size average, no preconditioning, MILE's desired energy variance 0.1, thinning 10):

* ``hand-written``: the model as plain ``numpyro.sample`` sites; NumPyro's
  ``initialize_model`` (prior median start) for the potential; per chain the
  first step size halved from ``sqrt(dim) / 4`` until a trial step's energy error is
  on target (as probdyn does), ``blackjax.mclmc_find_L_and_step_size`` from it, then
  ``num_samples * thinning`` steps of ``blackjax.mcmc.mclmc.build_kernel()`` in a
  ``lax.scan``, chains ``vmap``-ed in one ``jit``; then what ``probdyn.fit`` also
  returns (constrained draws, posterior predictive and pointwise log likelihood) and
  the predictive mean at 5 new inputs.
* ``probdyn``: ``probdyn.fit(model, x, y, engine=probdyn.MCLMC(...))`` with a
  `BayesianMLP`, then ``post.predict`` at the same 5 inputs.
* ``probdyn init=ensemble`` (not with ``--quick``): the MILE recipe, one chain per
  member of a deep ensemble fitted first (its time included), timed once.

The two runners derive their keys differently, so their draws differ; ESS per second
compares them. Run ``python benchmarks/mclmc.py [--quick] [--json out.json]``.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any

import _harness as h
import blackjax
import bnn_regression as bnn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from numpyro.infer import Predictive, init_to_median, log_likelihood
from numpyro.infer.util import constrain_fn, initialize_model

import probdyn

PHASES = (0.8, 0.1, 0.1)  # MILE's phase_ratio
NUM_EFFECTIVE_SAMPLES = 100  # MILE's


@dataclasses.dataclass(frozen=True)
class Settings:
    num_warmup: int = 20000
    num_samples: int = 500
    num_chains: int = 2
    thinning: int = 10
    desired_energy_variance: float = 0.1

    @classmethod
    def quick(cls) -> Settings:
        return cls(num_warmup=1000, num_samples=100, num_chains=1)


def _hand_chain(logdensity: Any, s: Settings) -> Any:
    kernel = blackjax.mcmc.mclmc.build_kernel()

    def chain(u0: jax.Array, key: jax.Array) -> Any:
        k_init, k_tune, k_run = jax.random.split(key, 3)
        state = blackjax.mcmc.mclmc.init(u0, logdensity, k_init)
        dim = u0.shape[0]
        ones = jnp.ones(dim, u0.dtype)

        # The tuner's first step size: BlackJAX's guess sqrt(dim) / 4, halved (at most
        # 40 times) until one trial step from the start has energy error^2 <= dim *
        # desired_energy_variance, as probdyn does (MILE starts from a fixed 0.001).
        def ok(eps: jax.Array) -> jax.Array:
            _, info = kernel(k_init, state, logdensity, ones, jnp.sqrt(dim), eps)
            de = info.energy_change
            bound = dim * s.desired_energy_variance
            return info.nonans & jnp.isfinite(de) & (de**2 <= bound)

        eps0 = jnp.asarray(jnp.sqrt(dim) / 4, u0.dtype)
        eps0, _, _ = jax.lax.while_loop(
            lambda c: ~c[2] & (c[1] < 40),
            lambda c: (c[0] / 2, c[1] + 1, ok(c[0] / 2)),
            (eps0, jnp.asarray(0), ok(eps0)),
        )
        first = blackjax.adaptation.mclmc_adaptation.MCLMCAdaptationState(jnp.sqrt(dim), eps0, ones)
        state, params, _ = blackjax.mclmc_find_L_and_step_size(
            mclmc_kernel=kernel,
            num_steps=s.num_warmup,
            state=state,
            rng_key=k_tune,
            logdensity_fn=logdensity,
            frac_tune1=PHASES[0],
            frac_tune2=PHASES[1],
            frac_tune3=PHASES[2],
            desired_energy_var=s.desired_energy_variance,
            num_effective_samples=NUM_EFFECTIVE_SAMPLES,
            diagonal_preconditioning=False,
            params=first,
        )

        def step(state: Any, k: jax.Array) -> Any:
            state, info = kernel(
                k, state, logdensity, params.inverse_mass_matrix, params.L, params.step_size
            )
            return state, ~info.nonans

        def draw(state: Any, k: jax.Array) -> Any:
            state, bad = jax.lax.scan(step, state, jax.random.split(k, s.thinning))
            return state, (state.position, jnp.any(bad))

        keys = jax.random.split(k_run, s.num_samples)
        _, (positions, diverging) = jax.lax.scan(draw, state, keys)
        return positions, diverging, params.step_size

    return chain


def run_hand(x: np.ndarray, y: np.ndarray, s: Settings) -> h.RunResult:
    model = bnn.make_hand_model()
    key = jax.random.PRNGKey(bnn.SEED)
    with h.compile_timer() as whole:
        start = time.perf_counter()
        k_init, k_run = jax.random.split(key)
        info = initialize_model(
            jax.random.split(k_init, s.num_chains),
            model,
            init_strategy=init_to_median,
            model_args=(x, y),
        )
        z0 = info.param_info.z
        flat0 = jax.vmap(lambda z: ravel_pytree(z)[0])(z0)
        unravel = ravel_pytree(jax.tree.map(lambda a: a[0], z0))[1]
        logdensity = lambda u: -info.potential_fn(unravel(u))
        t0 = time.perf_counter()
        with h.compile_timer() as in_run:
            run = jax.jit(jax.vmap(_hand_chain(logdensity, s)))
            flat, diverging, step_size = h.block(run(flat0, jax.random.split(k_run, s.num_chains)))
        t1 = time.perf_counter()
        constrain = jax.jit(
            jax.vmap(jax.vmap(lambda u: constrain_fn(model, (x, y), {}, unravel(u))))
        )
        latent = {k: v for k, v in constrain(flat).items() if k in bnn.LATENT}
        pp = Predictive(model, latent, return_sites=["y"], batch_ndims=2)(
            jax.random.fold_in(key, 1), x
        )
        loglik = log_likelihood(model, latent, x, y, batch_ndims=2)
        latent, _, _ = jax.tree.map(np.asarray, (latent, pp, loglik))
        t2 = time.perf_counter()
        pred = Predictive(model, latent, return_sites=["mean"], batch_ndims=2)(
            jax.random.fold_in(key, 2), bnn.X_ESS
        )
        mean5 = np.asarray(pred["mean"])
        end = time.perf_counter()
    return h.RunResult(
        total=end - start,
        sampling=t1 - t0,
        compile_total=whole.seconds,
        compile_sampling=in_run.seconds,
        stages={"postprocess": t2 - t1, "predict": end - t2},
        quantities={"mean": mean5},
        latent=latent,
        num_steps=np.full(np.shape(diverging), 2 * s.thinning),
        diverging=np.asarray(diverging),
        step_size=np.asarray(step_size),
    )


def run_probdyn(x: np.ndarray, y: np.ndarray, s: Settings, init: str) -> h.RunResult:
    model = bnn.make_probdyn_model()
    engine = probdyn.MCLMC(
        num_warmup=s.num_warmup,
        num_samples=s.num_samples,
        num_chains=s.num_chains,
        thinning=s.thinning,
        desired_energy_variance=s.desired_energy_variance,
        init=init,
        progress_bar=False,
    )
    with h.compile_timer() as whole:
        start = time.perf_counter()
        post = probdyn.fit(model, x, y, engine=engine, key=bnn.SEED)
        t1 = time.perf_counter()
        mean5 = post.predict(bnn.X_ESS, key=bnn.SEED + 2, sites=["mean"])["mean"]
        end = time.perf_counter()
    stats = post.sample_stats
    return h.RunResult(
        total=end - start,
        sampling=post.attrs["wall_time"],
        compile_total=whole.seconds,
        compile_sampling=post.attrs["compile_time"],
        stages={"fit": t1 - start, "predict": end - t1},
        quantities={"mean": mean5},
        latent={k: post.samples[k] for k in bnn.LATENT},
        num_steps=np.full(stats["diverging"].shape, 2 * s.thinning),
        diverging=stats["diverging"],
        step_size=stats["step_size"][:, 0],
        extra={"init_s": float(post.attrs.get("init_wall_time", 0.0))},
    )


def main() -> None:
    args = h.parse_args(__doc__.splitlines()[0])
    s = Settings.quick() if args.quick else Settings()
    x, y = bnn.make_data()
    print(
        f"BNN regression [1, {bnn.HIDDEN}, 1] tanh, {len(x)} points; MCLMC {s}; "
        f"{args.repeats} repeat(s), alternating; {os.cpu_count()} CPU cores",
        flush=True,
    )
    warnings.filterwarnings("ignore", message="There are not enough devices")
    h.warm_up_process()
    runs = h.alternate(
        {
            "hand-written": lambda: run_hand(x, y, s),
            "probdyn": lambda: run_probdyn(x, y, s, "median"),
        },
        args.repeats,
    )
    if not args.quick:
        runs.update(
            h.alternate({"probdyn init=ensemble": lambda: run_probdyn(x, y, s, "ensemble")}, 1)
        )

    models = {}
    for name, make in (("hand-written", bnn.make_hand_model), ("probdyn", bnn.make_probdyn_model)):
        model = make()
        points = h.unconstrained_draws(model, (x, y), {}, runs["hand-written"][0].latent, 3)
        models[name] = (model, (x, y), points)
    grad_s, potentials = h.grad_eval_seconds(models, inner=50, repeats=15)
    density = h.same_density(potentials, "hand-written")

    summaries = {}
    for name, results in runs.items():
        # summarise scales warmup evaluations from kept ones by num_warmup / num_samples
        # (draws); an MCLMC draw is `thinning` steps, a tuning step is one step.
        summ = h.summarise(
            results,
            num_warmup=round(s.num_warmup / s.thinning),
            grad_seconds=grad_s[name.split(" ")[0]],
        )
        summ["density_rel_diff"] = density[name.split(" ")[0]]
        summ["same_draws"] = False  # the runners derive their keys differently
        summaries[name] = summ

    rows = h.report(
        "BNN regression, MCLMC: probdyn vs hand-written BlackJAX "
        "(timings on a shared, loaded machine: compare within this run only)",
        summaries,
        "mean",
        f"predictive mean at x = {np.round(bnn.X_ESS, 2).tolist()}",
    )
    if args.json:
        h.write_json(
            args.json,
            {
                "benchmark": "mclmc",
                "settings": dataclasses.asdict(s),
                "repeats": args.repeats,
                "x_ess": bnn.X_ESS,
                "machine": h.machine_info(),
                "results": summaries,
                "table": rows,
            },
        )


if __name__ == "__main__":
    main()
