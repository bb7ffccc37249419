"""Bayesian MLP regression: probdyn.fit(NUTS) against the same model in hand-written NumPyro.

The model: one hidden layer of 50 tanh units, every weight Normal(0, 1), a
HalfNormal(1) noise scale, 100 points of a noisy sine-like curve (fixed seed).

Runners (same seed, same kernel settings, same start):

* ``hand-written``: plain ``numpyro.sample`` sites, ``numpyro.infer.MCMC(NUTS)``,
  then the post-processing a user needs for what ``probdyn.fit`` returns
  (posterior predictive with ``Predictive``, pointwise ``log_likelihood``) and
  the predictive mean at 5 new inputs with ``Predictive``.
* ``probdyn``: ``probdyn.fit(model, x, y, engine=probdyn.NUTS(...))`` with a
  `BayesianMLP`, then ``post.predict`` at the same 5 inputs.
* ``probdyn init=map``: the same, starting every chain at a MAP estimate (the
  recommended start for BNNs), timed once.

Run ``python benchmarks/bnn_regression.py [--quick] [--json out.json]``.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any

import _harness as h
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS, Predictive, init_to_median, log_likelihood

import probdyn
from probdyn.numpyro import BayesianMLP

SEED = 0
HIDDEN = 50
NOISE_PRIOR = 1.0
EXTRA_FIELDS = ("accept_prob", "num_steps", "energy", "potential_energy", "adapt_state.step_size")
X_ESS = np.linspace(-2.5, 2.5, 5)  # the 5 inputs whose predictive mean's ESS is reported
LATENT = ("f.layers.0.weight", "f.layers.0.bias", "f.layers.1.weight", "f.layers.1.bias", "sigma")


@dataclasses.dataclass(frozen=True)
class Settings:
    num_warmup: int = 300
    num_samples: int = 300
    num_chains: int = 2
    max_tree_depth: int = 7
    target_accept: float = 0.8

    @classmethod
    def quick(cls) -> Settings:
        return cls(num_warmup=100, num_samples=100, num_chains=1, max_tree_depth=6)


def make_data(seed: int = SEED, n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """100 points on [-3, 3] of ``sin(1.5 x) + 0.3 x`` plus N(0, 0.2^2) noise."""
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(-3.0, 3.0, n))
    y = np.sin(1.5 * x) + 0.3 * x + 0.2 * rng.standard_normal(n)
    return x.astype(np.float32), y.astype(np.float32)


# -- the two models (factories: every run gets fresh function objects) --------------------
def make_probdyn_model() -> Any:
    def bnn_probdyn(x: Any, y: Any = None) -> None:
        net = BayesianMLP("f", [1, HIDDEN, 1], activation="tanh", prior=dist.Normal(0.0, 1.0))
        sigma = numpyro.sample("sigma", dist.HalfNormal(NOISE_PRIOR))
        mean = numpyro.deterministic("mean", net(x[:, None])[..., 0])
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", dist.Normal(mean, sigma), obs=y)

    return bnn_probdyn


def make_hand_model() -> Any:
    def bnn_hand(x: Any, y: Any = None) -> None:
        # Same site names, shapes, priors and order as BayesianMLP("f", [1, 50, 1]).
        normal = dist.Normal(0.0, 1.0)
        w0 = numpyro.sample("f.layers.0.weight", normal.expand([1, HIDDEN]).to_event(2))
        b0 = numpyro.sample("f.layers.0.bias", normal.expand([HIDDEN]).to_event(1))
        w1 = numpyro.sample("f.layers.1.weight", normal.expand([HIDDEN, 1]).to_event(2))
        b1 = numpyro.sample("f.layers.1.bias", normal.expand([1]).to_event(1))
        sigma = numpyro.sample("sigma", dist.HalfNormal(NOISE_PRIOR))
        hidden = jnp.tanh(x[:, None] @ w0 + b0)
        mean = numpyro.deterministic("mean", (hidden @ w1 + b1)[..., 0])
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", dist.Normal(mean, sigma), obs=y)

    return bnn_hand


# -- runners ---------------------------------------------------------------------------------
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


def run_hand(x: np.ndarray, y: np.ndarray, s: Settings) -> h.RunResult:
    model = make_hand_model()
    key = jax.random.PRNGKey(SEED)
    with h.compile_timer() as whole:
        start = time.perf_counter()
        mcmc = hand_mcmc(model, s)
        t0 = time.perf_counter()
        with h.compile_timer() as in_run:
            mcmc.run(key, x, y, extra_fields=EXTRA_FIELDS)
            samples = h.block(mcmc.get_samples(group_by_chain=True))
        t1 = time.perf_counter()
        extra = mcmc.get_extra_fields(group_by_chain=True)
        latent = {k: samples[k] for k in LATENT}
        # What probdyn.fit also returns: posterior predictive and pointwise log likelihood.
        pp = Predictive(model, latent, return_sites=["y"], batch_ndims=2)(
            jax.random.fold_in(key, 1), x
        )
        loglik = log_likelihood(model, latent, x, y, batch_ndims=2)
        out = jax.tree.map(np.asarray, (samples, extra, pp, loglik))
        t2 = time.perf_counter()
        pred = Predictive(model, latent, return_sites=["mean"], batch_ndims=2)(
            jax.random.fold_in(key, 2), X_ESS
        )
        mean5 = np.asarray(pred["mean"])
        end = time.perf_counter()
    samples, extra = out[0], out[1]
    return h.RunResult(
        total=end - start,
        sampling=t1 - t0,
        compile_total=whole.seconds,
        compile_sampling=in_run.seconds,
        stages={"postprocess": t2 - t1, "predict": end - t2},
        quantities={"mean": mean5},
        latent={k: samples[k] for k in LATENT},
        num_steps=extra["num_steps"],
        diverging=extra["diverging"],
        step_size=extra["adapt_state.step_size"][:, 0],
    )


def run_probdyn(x: np.ndarray, y: np.ndarray, s: Settings, init: str) -> h.RunResult:
    model = make_probdyn_model()
    engine = probdyn.NUTS(
        num_warmup=s.num_warmup,
        num_samples=s.num_samples,
        num_chains=s.num_chains,
        max_tree_depth=s.max_tree_depth,
        target_accept=s.target_accept,
        chain_method="sequential",
        init=init,
        progress_bar=False,
    )
    with h.compile_timer() as whole:
        start = time.perf_counter()
        post = probdyn.fit(model, x, y, engine=engine, key=SEED)
        t1 = time.perf_counter()
        mean5 = post.predict(X_ESS, key=SEED + 2, sites=["mean"])["mean"]
        end = time.perf_counter()
    stats = post.sample_stats
    return h.RunResult(
        total=end - start,
        sampling=post.attrs["wall_time"],
        compile_total=whole.seconds,
        compile_sampling=post.attrs["compile_time"],
        stages={"fit": t1 - start, "predict": end - t1},
        quantities={"mean": mean5},
        latent={k: post.samples[k] for k in LATENT},
        num_steps=stats["n_steps"],
        diverging=stats["diverging"],
        step_size=stats["step_size"][:, 0],
    )


def main() -> None:
    args = h.parse_args(__doc__.splitlines()[0])
    s = Settings.quick() if args.quick else Settings()
    x, y = make_data()
    print(
        f"BNN regression [1, {HIDDEN}, 1] tanh, {len(x)} points; NUTS {s}; "
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
    runs.update(h.alternate({"probdyn init=map": lambda: run_probdyn(x, y, s, "map")}, 1))

    # Warmup gradient evaluations (MCMC.run keeps the statistics of kept draws only).
    h.fresh_caches()
    probe = h.warmup_probe(hand_mcmc(make_hand_model(), s), jax.random.PRNGKey(SEED), (x, y))
    print(f"  warmup probe: {probe['num_steps']} gradient evaluations in warmup", flush=True)

    # Cost of one log-density gradient, for each runner's model, at the same posterior
    # draws (those of the hand-written run).
    models = {}
    for name, make in (("hand-written", make_hand_model), ("probdyn", make_probdyn_model)):
        model = make()
        points = h.unconstrained_draws(model, (x, y), {}, runs["hand-written"][0].latent, 3)
        models[name] = (model, (x, y), points)
    grad_s, potentials = h.grad_eval_seconds(models, inner=50, repeats=15)
    density = h.same_density(potentials, "hand-written")
    grad_s["probdyn init=map"] = grad_s["probdyn"]

    summaries = {}
    base = runs["hand-written"][0].latent
    for name, results in runs.items():
        summ = h.summarise(
            results,
            num_warmup=s.num_warmup,
            grad_seconds=grad_s[name],
            probe=probe if name != "probdyn init=map" else None,
        )
        summ["same_draws"] = all(np.array_equal(results[0].latent[k], base[k]) for k in base)
        summ["density_rel_diff"] = density[name.split(" ")[0]]
        summaries[name] = summ

    rows = h.report(
        "BNN regression: probdyn vs hand-written NumPyro "
        "(timings on a shared, loaded machine: compare within this run only)",
        summaries,
        "mean",
        f"predictive mean at x = {np.round(X_ESS, 2).tolist()}",
    )
    if args.json:
        h.write_json(
            args.json,
            {
                "benchmark": "bnn_regression",
                "settings": dataclasses.asdict(s),
                "repeats": args.repeats,
                "x_ess": X_ESS,
                "machine": h.machine_info(),
                "warmup_probe": {k: v for k, v in probe.items()},
                "results": summaries,
                "table": rows,
            },
        )


if __name__ == "__main__":
    main()
