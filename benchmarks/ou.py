"""Neural SDEs on an Ornstein–Uhlenbeck series with dropped points (issue #5), against the oracle.

Data: ``probdyn.data.ou_dataset`` (``dX = -0.2 X dt + 0.1 dW``, ``X(0) = 1``, 100
points 0.1 apart on (0, 10], observation noise sd 0.02) with 30 / 50 / 70 % of the
points dropped at random (the same path at every drop fraction, nested held-out
sets). ``probdyn.data.ou_oracle`` is the exact Gaussian predictive of the dropped
points given the kept ones, with the true parameters: no model can beat it in
expectation.

Part 1, fit quality. Each model is an SDE solved by Euler–Maruyama with
``dt = 0.1`` on the grid through all 100 times (``brownian="latent"``: the 100
standard-normal increments are sample sites, non-centred), ``X(0) = 1`` known,
and a Normal observation (sd 0.02, known) of the kept points only (the dropped
points are masked out of the likelihood, their values never passed to the fit).
Fitted by ``probdyn.fit`` with NUTS (the honest posterior of the path and the
parameters); the held-out points are scored with the pointwise log likelihood of
every draw (``Posterior.log_likelihood_at``, then ``calibration.nlpd``: exact up
to Monte-Carlo error), the CRPS and 90 % coverage of posterior-predictive draws.

* ``OU``: the mechanistic model ``dz = -theta z dt + sigma dW`` with unknown
  ``theta ~ LogNormal(0, 1)``, ``sigma ~ HalfNormal(0.5)`` (as ``NeuralSDE.langevin``):
  the well-specified reference.
* ``neural``: plain ``NeuralSDE``, drift ``MLP([t/10, z])`` and diffusion
  ``softplus(MLP([t/10, z]))``, both Bayesian [2, 8, 1] tanh MLPs (Normal(0, 1)).
* ``langevin``: ``NeuralSDE.langevin``, drift ``MLP(z)`` ([1, 8, 1]), constant
  ``sigma ~ HalfNormal(0.5)``.
* ``linear_noise``: ``NeuralSDE.linear_noise``, drift ``MLP([t/10, z])``, noise
  ``sigma * z``: misspecified for OU (its noise is additive and vanishes where
  the path crosses zero).
* ``geometric (X + 1)``: ``NeuralSDE.geometric`` is for positive processes; this OU
  path (and its noise) crosses zero, so the family is fitted to ``X + 1`` (kept
  positive: ``X < -1`` is six stationary sds away), growth rate ``MLP(z)``,
  volatility ``sigma ~ HalfNormal(0.5)``, observing ``z - 1``.

The target of issue #5 is a held-out NLL within 5 % of the oracle's. The NLLs
here are negative (densities above 1: predictive sds of 0.03-0.05), so the table
gives the ratio ``NLL / oracle NLL`` (below 1 is worse than the oracle) and the
relative gap ``|NLL - oracle| / |oracle|`` (the 5 % target applies to it).

Part 2, NUTS ESS/s on the ``OU`` model (50 % dropped) with unknown theta, sigma
and the 100 increments latent, on both backends, ``probdyn.fit`` against the
same model hand-written (same site names, shapes, priors and order; the same
Euler–Maruyama recursion): ``numpyro.infer.MCMC(NUTS)`` with a ``lax.scan``, and
``pyro.infer.MCMC(NUTS)`` with a Python loop over torch steps. ESS of theta,
sigma and of the path at three held-out times; ratios probdyn / hand-written.

Default NUTS settings (`Settings`): part 1, 500 warmup + 300 draws, one chain,
``max_tree_depth=10`` (the neural families need the deep trees: at depth 7 their
chains barely move); part 2, 300 + 300, one chain, ``max_tree_depth=7`` on NumPyro
and 100 + 100, ``max_tree_depth=5`` on Pyro (Pyro's NUTS steps the SDE from Python:
minutes per run). ``--quick``: one drop fraction (50 %), 100 + 100 draws, depth 6
(Pyro 15 + 15, depth 4). ``--skip-quality``, ``--skip-ess`` and ``--skip-pyro`` run
parts of it.

Run ``python benchmarks/ou.py [--quick] [--json out.json]``.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import _harness as h
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS, Predictive, init_to_median

import probdyn
from probdyn.calibration import coverage, crps, nlpd
from probdyn.data._ou import OUData, ou_dataset, ou_oracle
from probdyn.numpyro import BayesianMLP, NeuralSDE

SEED = 0
DT = 0.1
DROPS = (0.3, 0.5, 0.7)
FAMILIES = ("OU", "neural", "langevin", "linear_noise", "geometric (X + 1)")
HIDDEN = 8
SHIFT = 1.0  # the geometric family is fitted to X + SHIFT
NUM_ESS_TIMES = 3
EXTRA_FIELDS = ("num_steps", "adapt_state.step_size")
LATENT = ("theta", "sigma", "sde.noise")


@dataclasses.dataclass(frozen=True)
class Settings:
    """NUTS settings for part 1 (fit quality) and part 2 (ESS/s) on each backend."""

    fit_warmup: int = 500
    fit_samples: int = 300
    fit_chains: int = 1
    max_tree_depth: int = 10
    ess_warmup: int = 300
    ess_samples: int = 300
    ess_chains: int = 1
    ess_tree_depth: int = 7
    pyro_warmup: int = 100
    pyro_samples: int = 100
    pyro_tree_depth: int = 5
    drops: tuple[float, ...] = DROPS

    @classmethod
    def quick(cls) -> Settings:
        return cls(100, 100, 1, 6, 100, 100, 1, 6, 15, 15, 4, (0.5,))


# -- the probdyn models (NumPyro) ----------------------------------------------------------------
def _observe(z: Any, y: Any, mask: Any, noise_sd: float) -> None:
    numpyro.deterministic("z", z)
    with numpyro.plate("obs", z.shape[0]):
        numpyro.sample("y", dist.Normal(z, noise_sd).mask(mask), obs=y)


def make_model(family: str, data: OUData) -> Callable[..., None]:
    """The model of one family, ``model(times, y, mask)`` (``mask``: observed points)."""
    x0, s = data.x0, data.noise_sd
    t_scale = float(data.times[-1])

    def ou(times: Any, y: Any, mask: Any) -> None:
        theta = numpyro.sample("theta", dist.LogNormal(0.0, 1.0))
        sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
        sde = NeuralSDE.langevin(lambda z, a: -a[0] * z, lambda t, a: a[1], dt=DT)
        _observe(sde(jnp.full(1, x0), times, (theta, sigma), t0=0.0)[:, 0], y, mask, s)

    def neural(times: Any, y: Any, mask: Any) -> None:
        f = BayesianMLP("drift", [2, HIDDEN, 1])
        g = BayesianMLP("diffusion", [2, HIDDEN, 1])

        def tz(t: Any, z: Any) -> Any:
            return jnp.concatenate([jnp.broadcast_to(t / t_scale, z.shape), z], -1)

        sde = NeuralSDE(
            lambda t, z, a: f(tz(t, z)),
            lambda t, z, a: jax.nn.softplus(g(tz(t, z))),
            dt=DT,
        )
        _observe(sde(jnp.full(1, x0), times, t0=0.0)[:, 0], y, mask, s)

    def langevin(times: Any, y: Any, mask: Any) -> None:
        f = BayesianMLP("drift", [1, HIDDEN, 1])
        sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
        sde = NeuralSDE.langevin(lambda z, a: f(z), lambda t, a: a, dt=DT)
        _observe(sde(jnp.full(1, x0), times, sigma, t0=0.0)[:, 0], y, mask, s)

    def linear_noise(times: Any, y: Any, mask: Any) -> None:
        f = BayesianMLP("drift", [2, HIDDEN, 1])
        sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))

        def drift(t: Any, z: Any, a: Any) -> Any:
            return f(jnp.concatenate([jnp.broadcast_to(t / t_scale, z.shape), z], -1))

        sde = NeuralSDE.linear_noise(drift, lambda t, a: a, dt=DT)
        _observe(sde(jnp.full(1, x0), times, sigma, t0=0.0)[:, 0], y, mask, s)

    def geometric(times: Any, y: Any, mask: Any) -> None:
        f = BayesianMLP("drift", [1, HIDDEN, 1])
        sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
        sde = NeuralSDE.geometric(lambda t, z, a: f(z), lambda t, a: a, dt=DT)
        z = sde(jnp.full(1, x0 + SHIFT), times, sigma, t0=0.0)[:, 0]
        _observe(z - SHIFT, y, mask, s)

    models = {
        "OU": ou,
        "neural": neural,
        "langevin": langevin,
        "linear_noise": linear_noise,
        "geometric (X + 1)": geometric,
    }
    return models[family]


def fit_args(data: OUData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(times, y, mask)`` for fitting: the dropped observations are zeros, masked out."""
    y = np.where(data.train_mask, data.y, 0.0)
    return data.times, y, data.train_mask


def test_args(data: OUData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(times, y, mask)`` for scoring: the held-out observations, only they unmasked."""
    return data.times, data.y, ~data.train_mask


# -- part 1: fit quality ----------------------------------------------------------------------
def score_family(family: str, data: OUData, s: Settings) -> dict[str, Any]:
    model = make_model(family, data)
    engine = probdyn.NUTS(
        num_warmup=s.fit_warmup,
        num_samples=s.fit_samples,
        num_chains=s.fit_chains,
        max_tree_depth=s.max_tree_depth,
        progress_bar=False,
    )
    start = time.perf_counter()
    post = probdyn.fit(model, *fit_args(data), engine=engine, key=SEED)
    fit_s = time.perf_counter() - start
    held = data.test_index
    ll = post.log_likelihood_at(*test_args(data))["y"][..., held]
    y_draws = post.predict(*test_args(data), key=SEED + 1, sites=["y"])["y"][..., held]
    return {
        "nlpd": float(nlpd(None, data.y_test, log_likelihood=ll)),
        "nlpd_kde": float(nlpd(y_draws, data.y_test)),
        "crps": float(crps(y_draws, data.y_test)),
        "coverage90": float(coverage(y_draws, data.y_test, 0.9)[0.9]),
        "fit_s": fit_s,
        "divergences": int(np.sum(post.sample_stats["diverging"])),
        "min_ess_ll": float(np.min(h.ess(ll))),
        "median_ess_ll": float(np.median(h.ess(ll))),
        "grad_evals_per_draw": float(np.mean(post.sample_stats["n_steps"])),
    }


def bench_quality(s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for drop in s.drops:
        data = ou_dataset(drop=drop, key=SEED)
        oracle = ou_oracle(data, level=0.9)
        print(
            f"\nPart 1: drop {drop:.0%}: {len(data.train_index)} kept, "
            f"{len(data.test_index)} held out; NUTS {s.fit_warmup}+{s.fit_samples} x "
            f"{s.fit_chains} chain(s), max_tree_depth {s.max_tree_depth}",
            flush=True,
        )
        results: dict[str, dict[str, Any]] = {
            "oracle": {
                "nlpd": oracle.nlpd,
                "crps": oracle.mean_crps,
                "coverage90": oracle.coverage,
            }
        }
        for family in FAMILIES:
            r = score_family(family, data, s)
            r["nlpd_ratio"] = r["nlpd"] / oracle.nlpd
            r["nlpd_gap"] = abs(r["nlpd"] - oracle.nlpd) / abs(oracle.nlpd)
            r["crps_ratio"] = r["crps"] / oracle.mean_crps
            results[family] = r
            print(
                f"  {family}: NLL {r['nlpd']:.3f} (oracle {oracle.nlpd:.3f}, gap "
                f"{r['nlpd_gap']:.1%}), CRPS {r['crps']:.4f}, 90 % coverage "
                f"{r['coverage90']:.2f}, {r['fit_s']:.1f} s, {r['divergences']} divergences",
                flush=True,
            )
        names = list(results)

        def col(k: str, results: dict[str, Any] = results, names: list[str] = names) -> list[Any]:
            return [results[n].get(k) for n in names]

        rows = [
            ("held-out NLL / point (exact, log_likelihood_at)", col("nlpd")),
            ("  ratio to oracle (< 1: worse; NLLs < 0)", col("nlpd_ratio")),
            ("  |gap| / |oracle| (target <= 5 %)", col("nlpd_gap")),
            ("  within 5 % of the oracle", [None, *(v <= 0.05 for v in col("nlpd_gap")[1:])]),
            ("held-out NLL / point (KDE of draws)", col("nlpd_kde")),
            ("held-out CRPS", col("crps")),
            ("  ratio to oracle", col("crps_ratio")),
            ("90 % coverage", col("coverage90")),
            ("bulk ESS of held-out log lik.: min", col("min_ess_ll")),
            ("  median over held-out points", col("median_ess_ll")),
            ("gradient evals / draw", col("grad_evals_per_draw")),
            ("divergences", col("divergences")),
            ("fit wall time [s]", col("fit_s")),
        ]
        h.print_table(
            f"OU, {drop:.0%} dropped ({len(data.test_index)} held-out points): "
            "SDE families vs the exact predictive",
            names,
            rows,
        )
        out[f"{drop:.1f}"] = {"results": results, "table": rows}
    return out


# -- part 2: ESS/s, NumPyro ------------------------------------------------------------------
def make_hand_numpyro(data: OUData) -> Callable[..., None]:
    """The ``OU`` model written with ``lax.scan`` (same sites, priors, order and recursion)."""
    x0, s = data.x0, data.noise_sd

    def ou_hand(times: Any, y: Any, mask: Any) -> None:
        theta = numpyro.sample("theta", dist.LogNormal(0.0, 1.0))
        sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
        times = jnp.asarray(times)
        grid = jnp.concatenate([jnp.zeros(1, times.dtype), times])
        steps = jnp.diff(grid)
        xi = numpyro.sample(
            "sde.noise", dist.Normal(0.0, 1.0).expand([steps.shape[0], 1]).to_event(2)
        )
        dw = jnp.sqrt(steps)[:, None] * xi

        def step(z: Any, hw: tuple[Any, Any]) -> tuple[Any, Any]:
            hk, wk = hw
            z1 = z + (-theta * z * hk + sigma * wk)  # diffrax's Euler: y0 + (f h + g dW)
            return z1, z1

        _, zs = jax.lax.scan(step, jnp.full(1, x0, times.dtype), (steps, dw))
        failed = ~jnp.all(jnp.isfinite(zs))
        numpyro.factor("sde.failed", jnp.where(failed, -jnp.inf, 0.0))
        z = jnp.where(failed, 0.0, zs[:, 0])
        _observe(z, y, mask, s)

    return ou_hand


def run_hand_numpyro(data: OUData, t_idx: np.ndarray, s: Settings) -> h.RunResult:
    model = make_hand_numpyro(data)
    args = fit_args(data)
    key = jax.random.PRNGKey(SEED)
    with h.compile_timer() as whole:
        start = time.perf_counter()
        kernel = NUTS(model, max_tree_depth=s.ess_tree_depth, init_strategy=init_to_median)
        mcmc = MCMC(
            kernel,
            num_warmup=s.ess_warmup,
            num_samples=s.ess_samples,
            num_chains=s.ess_chains,
            chain_method="sequential",
            progress_bar=False,
        )
        t0 = time.perf_counter()
        with h.compile_timer() as in_run:
            mcmc.run(key, *args, extra_fields=EXTRA_FIELDS)
            samples = h.block(mcmc.get_samples(group_by_chain=True))
        t1 = time.perf_counter()
        extra = mcmc.get_extra_fields(group_by_chain=True)
        latent = {k: samples[k] for k in LATENT}
        pred = Predictive(model, latent, return_sites=["z"], batch_ndims=2)(
            jax.random.fold_in(key, 1), *args
        )
        z = np.asarray(pred["z"])[..., t_idx]
        end = time.perf_counter()
    return h.RunResult(
        total=end - start,
        sampling=t1 - t0,
        compile_total=whole.seconds,
        compile_sampling=in_run.seconds,
        stages={"predict": end - t1},
        quantities={"q": _quantities(latent, z)},
        latent={k: np.asarray(v) for k, v in latent.items()},
        num_steps=np.asarray(extra["num_steps"]),
        diverging=np.asarray(extra["diverging"]),
        step_size=np.asarray(extra["adapt_state.step_size"])[:, 0],
    )


def run_probdyn_numpyro(data: OUData, t_idx: np.ndarray, s: Settings) -> h.RunResult:
    model = make_model("OU", data)
    engine = probdyn.NUTS(
        num_warmup=s.ess_warmup,
        num_samples=s.ess_samples,
        num_chains=s.ess_chains,
        max_tree_depth=s.ess_tree_depth,
        progress_bar=False,
    )
    args = fit_args(data)
    with h.compile_timer() as whole:
        start = time.perf_counter()
        post = probdyn.fit(model, *args, engine=engine, key=SEED)
        t1 = time.perf_counter()
        z = post.predict(*args, key=SEED + 1, sites=["z"])["z"][..., t_idx]
        end = time.perf_counter()
    stats = post.sample_stats
    latent = {k: post.samples[k] for k in LATENT}
    return h.RunResult(
        total=end - start,
        sampling=post.attrs["wall_time"],
        compile_total=whole.seconds,
        compile_sampling=post.attrs["compile_time"],
        stages={"fit": t1 - start, "predict": end - t1},
        quantities={"q": _quantities(latent, z)},
        latent=latent,
        num_steps=stats["n_steps"],
        diverging=stats["diverging"],
        step_size=stats["step_size"][:, 0],
    )


def _quantities(latent: dict[str, Any], z: np.ndarray) -> np.ndarray:
    """``(chain, draw, 2 + NUM_ESS_TIMES)``: theta, sigma, the path at the ESS times."""
    theta, sigma = (np.asarray(latent[k], dtype=np.float64)[..., None] for k in ("theta", "sigma"))
    return np.concatenate([theta, sigma, np.asarray(z, dtype=np.float64)], -1)


def bench_numpyro(data: OUData, t_idx: np.ndarray, s: Settings, repeats: int) -> dict[str, Any]:
    print(
        f"\nPart 2a: NumPyro, OU model ({len(data.times)} latent increments + theta, sigma), "
        f"NUTS {s.ess_warmup}+{s.ess_samples} x {s.ess_chains} chain(s), max_tree_depth "
        f"{s.ess_tree_depth}, init median; "
        f"{repeats} repeat(s), alternating hand-written first",
        flush=True,
    )
    runs = h.alternate(
        {
            "hand-written": lambda: run_hand_numpyro(data, t_idx, s),
            "probdyn": lambda: run_probdyn_numpyro(data, t_idx, s),
        },
        repeats,
    )
    args = fit_args(data)
    models = {}
    for name, make in (
        ("hand-written", make_hand_numpyro),
        ("probdyn", lambda d: make_model("OU", d)),
    ):
        model = make(data)
        points = h.unconstrained_draws(model, args, {}, runs["hand-written"][0].latent, 3)
        models[name] = (model, args, points)
    grad_s, potentials = h.grad_eval_seconds(models, inner=20, repeats=15)
    density = h.same_density(potentials, "hand-written")
    summaries = {}
    base = runs["hand-written"][0].latent
    for name, results in runs.items():
        summ = h.summarise(results, num_warmup=s.ess_warmup, grad_seconds=grad_s[name])
        summ["same_draws"] = all(np.array_equal(results[0].latent[k], base[k]) for k in base)
        summ["density_rel_diff"] = density[name]
        summaries[name] = summ
    label = f"theta, sigma, path at t = {np.round(data.times[t_idx], 2).tolist()}"
    rows = h.report(
        "OU (latent increments), NumPyro: probdyn vs hand-written NumPyro "
        "(timings on a shared, loaded machine: compare within this run only)",
        summaries,
        "q",
        label,
    )
    for name in summaries:
        ess = summaries[name]["ess_bulk_q"]
        summaries[name]["ess_theta"], summaries[name]["ess_sigma"] = ess[0], ess[1]
        summaries[name]["min_ess_path"] = min(ess[2:])
    return {"results": summaries, "table": rows}


# -- part 2: ESS/s, Pyro ---------------------------------------------------------------------
def bench_pyro(data: OUData, t_idx: np.ndarray, s: Settings, repeats: int) -> dict[str, Any]:
    import pyro
    import pyro.distributions as pdist
    import torch
    from pyro.infer import MCMC as PyroMCMC
    from pyro.infer import NUTS as PyroNUTS
    from pyro.infer import Predictive as PyroPredictive
    from pyro.infer.autoguide import init_to_median as pyro_init_to_median

    from probdyn.pyro import NeuralSDE as TorchSDE
    from probdyn.pyro.bridge import sub_seed

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    x0, noise_sd = data.x0, data.noise_sd
    calls = [0]

    def observe(z: Any, y: Any, mask: Any) -> None:
        pyro.deterministic("z", z)
        with pyro.plate("obs", z.shape[0]):
            pyro.sample("y", pdist.Normal(z, noise_sd).mask(mask), obs=y)

    def ou_probdyn(times: Any, y: Any, mask: Any) -> None:
        calls[0] += 1
        theta = pyro.sample("theta", pdist.LogNormal(0.0, 1.0))
        sigma = pyro.sample("sigma", pdist.HalfNormal(0.5))
        sde = TorchSDE.langevin(lambda z, a: -a[0] * z, lambda t, a: a[1], dt=DT)
        observe(sde(torch.full((1,), x0), times, (theta, sigma), t0=0.0)[:, 0], y, mask)

    def ou_hand(times: Any, y: Any, mask: Any) -> None:
        calls[0] += 1
        theta = pyro.sample("theta", pdist.LogNormal(0.0, 1.0))
        sigma = pyro.sample("sigma", pdist.HalfNormal(0.5))
        grid = torch.cat([torch.zeros(1), times])
        steps = torch.diff(grid)
        xi = pyro.sample(
            "sde.noise", pdist.Normal(0.0, 1.0).expand([steps.shape[0], 1]).to_event(2)
        )
        dw = steps.sqrt()[:, None] * xi
        z, path = torch.full((1,), x0), []
        for k in range(steps.shape[0]):
            z = z + -theta * z * steps[k] + sigma * dw[k]
            path.append(z)
        zs = torch.stack(path)[:, 0]
        failed = not bool(torch.isfinite(zs).all())
        pyro.factor("sde.failed", torch.tensor(-torch.inf if failed else 0.0))
        observe(torch.zeros_like(zs) if failed else zs, y, mask)

    times, y, mask = (torch.as_tensor(a) for a in fit_args(data))

    def run_hand() -> dict[str, Any]:
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sub_seed(SEED, 0, 0))
            kernel = PyroNUTS(
                ou_hand, max_tree_depth=s.pyro_tree_depth, init_strategy=pyro_init_to_median
            )
            mcmc = PyroMCMC(
                kernel,
                num_samples=s.pyro_samples,
                warmup_steps=s.pyro_warmup,
                disable_progbar=True,
            )
            c0 = calls[0]
            t0 = time.perf_counter()
            mcmc.run(times, y, mask)
            t1 = time.perf_counter()
            evals = calls[0] - c0
            samples = mcmc.get_samples()
            latent = {k: samples[k] for k in LATENT}
            pred = PyroPredictive(ou_hand, posterior_samples=latent, return_sites=["z"])(
                times, y, mask
            )
            z = pred["z"].detach().numpy().reshape(s.pyro_samples, -1)[None][..., t_idx]
        end = time.perf_counter()
        np_latent = {k: v.detach().numpy()[None] for k, v in latent.items()}
        return {
            "total": end - start,
            "sampling": t1 - t0,
            "evals": evals,
            "q": _quantities(np_latent, z),
            "latent": np_latent,
        }

    def run_probdyn() -> dict[str, Any]:
        engine = probdyn.NUTS(
            num_warmup=s.pyro_warmup,
            num_samples=s.pyro_samples,
            max_tree_depth=s.pyro_tree_depth,
            progress_bar=False,
        )
        start = time.perf_counter()
        c0 = calls[0]
        post = probdyn.fit(ou_probdyn, times, y, mask, engine=engine, key=SEED)
        evals = calls[0] - c0
        z = post.predict(times, y, mask, key=SEED + 1, sites=["z"])["z"][..., t_idx]
        end = time.perf_counter()
        latent = {k: post.samples[k] for k in LATENT}
        return {
            "total": end - start,
            "sampling": post.attrs["wall_time"],
            "evals": evals,
            "q": _quantities(latent, z),
            "latent": latent,
        }

    print(
        f"\nPart 2b: Pyro (torch float64, 1 thread), the same OU model, NUTS "
        f"{s.pyro_warmup}+{s.pyro_samples}, 1 chain, max_tree_depth {s.pyro_tree_depth}, "
        f"init median; {repeats} repeat(s), alternating hand-written first",
        flush=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {"hand-written": [], "probdyn": []}
    for rep in range(repeats):
        for name, fn in (("hand-written", run_hand), ("probdyn", run_probdyn)):
            r = fn()
            runs[name].append(r)
            print(
                f"  [{rep + 1}/{repeats}] {name}: {r['total']:.2f} s total, "
                f"{r['sampling']:.2f} s in MCMC, {r['evals']} model runs",
                flush=True,
            )
    out: dict[str, Any] = {}
    base = runs["hand-written"][0]["latent"]
    for name, rs in runs.items():
        first = rs[0]
        bulk = h.ess(first["q"])
        total = float(statistics.median(r["total"] for r in rs))
        sampling = float(statistics.median(r["sampling"] for r in rs))
        out[name] = {
            "total_s": total,
            "total_s_each": [r["total"] for r in rs],
            "sampling_s": sampling,
            "model_runs": first["evals"],
            "ess_theta": float(bulk[0]),
            "ess_sigma": float(bulk[1]),
            "min_ess_path": float(np.min(bulk[2:])),
            "min_ess": float(np.min(bulk)),
            "min_ess_per_s": float(np.min(bulk)) / total,
            "same_draws": all(
                np.allclose(first["latent"][k], base[k], rtol=1e-9, atol=1e-12) for k in base
            ),
        }
    hw, pd = out["hand-written"], out["probdyn"]
    pd["total_ratio"] = pd["total_s"] / hw["total_s"]
    pd["sampling_ratio"] = pd["sampling_s"] / hw["sampling_s"]
    pd["ess_per_s_ratio"] = pd["min_ess_per_s"] / hw["min_ess_per_s"]
    names = list(out)
    col = lambda k: [out[n].get(k) for n in names]
    rows = [
        ("total wall time [s] (median)", col("total_s")),
        ("  each repeat [s]", col("total_s_each")),
        ("  ratio probdyn / hand-written", [None, pd["total_ratio"]]),
        ("MCMC wall time [s] (median)", col("sampling_s")),
        ("  ratio probdyn / hand-written", [None, pd["sampling_ratio"]]),
        ("model runs (first repeat)", col("model_runs")),
        ("bulk ESS theta", col("ess_theta")),
        ("bulk ESS sigma", col("ess_sigma")),
        ("min bulk ESS, path at the held-out times", col("min_ess_path")),
        ("min bulk ESS / s of total wall time", col("min_ess_per_s")),
        ("  ratio probdyn / hand-written", [None, pd["ess_per_s_ratio"]]),
        ("same draws as hand-written (1e-9)", col("same_draws")),
    ]
    h.print_table(
        "OU (latent increments), Pyro: probdyn vs hand-written Pyro "
        "(timings on a shared, loaded machine: compare within this run only)",
        names,
        rows,
    )
    return {"results": out, "table": rows}


def main() -> None:
    args = h.parse_args(
        __doc__.splitlines()[0],
        default_repeats=1,
        flags={
            "--skip-quality": "skip part 1 (fit quality)",
            "--skip-ess": "skip part 2 (ESS/s)",
            "--skip-pyro": "skip part 2's Pyro runs",
        },
    )
    s = Settings.quick() if args.quick else Settings()
    print(
        f"OU benchmark (issue #5); {os.cpu_count()} CPU cores; settings {s}",
        flush=True,
    )
    warnings.filterwarnings("ignore", message="There are not enough devices")
    warnings.filterwarnings("ignore", message=r".*solve\(s\) failed", category=RuntimeWarning)
    h.warm_up_process()
    payload: dict[str, Any] = {
        "benchmark": "ou",
        "settings": dataclasses.asdict(s),
        "machine": h.machine_info(),
    }
    if not args.skip_quality:
        payload["quality"] = bench_quality(s)
    if not args.skip_ess:
        data = ou_dataset(drop=0.5, key=SEED)
        t_idx = data.test_index[h.spread(len(data.test_index), NUM_ESS_TIMES)]
        payload["ess_numpyro"] = bench_numpyro(data, t_idx, s, args.repeats)
        if not args.skip_pyro:
            payload["ess_pyro"] = bench_pyro(data, t_idx, s, args.repeats)
    if args.json:
        h.write_json(args.json, payload)


if __name__ == "__main__":
    main()
