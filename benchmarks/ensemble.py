"""Deep ensembles: probdyn.fit(engine=Ensemble) against hand-written ensembles, NumPyro and Pyro.

The problem is the one of ``bnn_regression.py`` (its data and models are imported
from there): 100 points of ``sin(1.5 x) + 0.3 x`` plus N(0, 0.2^2) noise, a
[1, 50, 1] tanh MLP with Normal(0, 1) weights and a HalfNormal(1) noise scale.
Every member is a MAP fit: it maximises the log joint density in constrained
space (no Jacobian) over the unconstrained coordinates, with the engine's
optimiser (Adam, learning rate decayed exponentially to a fraction of itself)
from ``prior median + init_scale * N(0, 1)`` in unconstrained space. The settings
are read from ``probdyn.Ensemble``'s defaults, so both runners follow them.

Part 1, NumPyro / JAX (runners alternate, hand-written first; JAX's compile
caches cleared before every run):

* ``hand-written``: the model of ``bnn_regression.make_hand_model``; the objective
  ``numpyro.infer.util.log_density`` at ``exp`` of the noise scale's coordinate;
  optax Adam with ``optax.exponential_decay``; ``jax.vmap`` over members,
  ``lax.scan`` over steps, one ``jax.jit`` for the optimiser's init, the steps and
  the final log joint; the starts drawn (eagerly) from the keys probdyn's runner
  uses, so both runners start every member at the same point; then what
  ``probdyn.fit`` also returns:
  ``Predictive`` (deterministic mean and posterior predictive at the training
  inputs) and ``log_likelihood``. Then ``Predictive`` of the mean on the test grid.
* ``probdyn E(K)``: ``probdyn.fit(model, x, y, engine=Ensemble(num_members=K))``
  with a ``BayesianMLP``, then ``post.predict`` on the test grid.
* ``probdyn E(1)``: the same with one member.
* ``probdyn K x E(1)``: a Python loop of K one-member fits (keys 0..K-1), what a
  user without the batched engine would write (fits only, no prediction).

Part 2, Pyro / torch (float64, one torch thread, as the Pyro tests):

* ``hand-written``: the same model in plain ``pyro.sample`` sites, a loop of K
  MAP fits, each ``SVI(model, AutoDelta(model), ExponentialLR(Adam), Trace_ELBO())``
  for the same number of steps, started at the points probdyn's runner starts
  its members (same seeds); then ``Predictive`` (mean and posterior predictive),
  the pointwise log likelihood and the log joint of each member from a trace, and
  ``Predictive`` of the mean on the test grid.
* ``probdyn E(K)``: ``probdyn.fit(..., backend="pyro")``, members batched with
  ``torch.func.vmap``; then ``post.predict`` on the test grid.

Quality, on a test grid of 200 points on [-3, 3] (the training range): RMSE of
the ensemble's predictive mean (the mean over members of the network's output)
against the true function, and NLPD of noisy test targets ``y* = f(x*) + N(0,
0.2^2)`` (seed 1) under the ensemble's predictive, the equal-weight mixture of the
members' ``Normal(mean_k(x*), sigma_k)``: ``NLPD = -mean_i log(1/K sum_k
N(y*_i; mean_k(x*_i), sigma_k^2))``. The true model's NLPD is printed as a floor.

Run ``python benchmarks/ensemble.py [--quick] [--repeats N] [--json out.json]``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import _harness as h
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as ndist
import optax
import pyro
import pyro.distributions as pdist
import pyro.poutine as poutine
import torch
from bnn_regression import HIDDEN, LATENT, NOISE_PRIOR, SEED, make_data, make_hand_model
from bnn_regression import make_probdyn_model as make_numpyro_probdyn_model
from jax.flatten_util import ravel_pytree
from numpyro.infer import Predictive, log_likelihood
from numpyro.infer.util import log_density
from pyro.infer import SVI, Trace_ELBO
from pyro.infer import Predictive as PyroPredictive
from pyro.infer.autoguide import AutoDelta, init_to_value

import probdyn
from probdyn.pyro import BayesianMLP as PyroBayesianMLP
from probdyn.pyro.bridge import sub_seed

NOISE_SD = 0.2  # the noise of make_data
X_TEST = np.linspace(-3.0, 3.0, 200).astype(np.float32)


def true_function(x: np.ndarray) -> np.ndarray:
    """The curve ``make_data`` draws its data around."""
    return np.sin(1.5 * x) + 0.3 * x


F_TEST = true_function(X_TEST.astype(np.float64))
Y_TEST = F_TEST + NOISE_SD * np.random.default_rng(1).standard_normal(X_TEST.shape)


@dataclasses.dataclass(frozen=True)
class Settings:
    num_members: int = 10
    num_steps: int = 2000

    @classmethod
    def quick(cls) -> Settings:
        return cls(num_members=4, num_steps=200)

    def engine(self, num_members: int | None = None) -> probdyn.Ensemble:
        return probdyn.Ensemble(
            num_members=self.num_members if num_members is None else num_members,
            num_steps=self.num_steps,
            progress_bar=False,
        )


@dataclasses.dataclass
class Result:
    """One timed run of one runner.

    Attributes:
        fit: seconds for the job ``probdyn.fit`` does (starts, optimisation, final
            log joint, posterior predictive and log likelihood), compile included.
        total: ``fit`` plus the prediction on the test grid.
        optimise: seconds of the optimisation proper, compile included: drawing the
            starts, the steps and the final log joint (probdyn: ``attrs["wall_time"]``;
            hand-written Pyro: the loop of SVI fits).
        compile_fit: seconds tracing/lowering/compiling during ``fit`` (JAX only).
        compile_optimise: the same during ``optimise`` (JAX only).
        mean_test: member predictive means on the test grid ``(K, len(X_TEST))``.
        sigma: member noise scales ``(K,)``.
        lp: member log joint at the end ``(K,)``.
        first_loss: member loss before the first step ``(K,)`` (the same start gives
            the same value).
    """

    fit: float
    total: float
    optimise: float | None = None
    compile_fit: float | None = None
    compile_optimise: float | None = None
    mean_test: np.ndarray | None = None
    sigma: np.ndarray | None = None
    lp: np.ndarray | None = None
    first_loss: np.ndarray | None = None


def alternate(
    runners: Mapping[str, Callable[[], Result]], repeats: int, *, jax_caches: bool
) -> dict[str, list[Result]]:
    """Run the runners in turn ``repeats`` times, clearing JAX's caches before each."""
    out: dict[str, list[Result]] = {name: [] for name in runners}
    for rep in range(repeats):
        for name, run in runners.items():
            if jax_caches:
                h.fresh_caches()
            res = run()
            comp = "" if res.compile_fit is None else f" (compile {res.compile_fit:.2f} s)"
            print(
                f"  [{rep + 1}/{repeats}] {name}: fit job {res.fit:.2f} s{comp}, "
                f"total {res.total:.2f} s; load average {os.getloadavg()[0]:.2f}",
                flush=True,
            )
            out[name].append(res)
    return out


# -- Part 1: NumPyro ---------------------------------------------------------------------------
def numpyro_starts(num_members: int) -> tuple[Any, jax.Array]:
    """The members' unconstrained starts, from the keys probdyn's NumPyro runner uses.

    The prior medians: 0 for the Normal(0, 1) weights, ``log`` of the HalfNormal
    median for the noise scale; the noise ``N(0, 1)`` per member and element,
    drawn (as probdyn draws it) for the flattened sites in sorted-name order.
    """
    centre = {
        "f.layers.0.weight": jnp.zeros((1, HIDDEN)),
        "f.layers.0.bias": jnp.zeros((HIDDEN,)),
        "f.layers.1.weight": jnp.zeros((HIDDEN, 1)),
        "f.layers.1.bias": jnp.zeros((1,)),
        "sigma": jnp.log(ndist.HalfNormal(NOISE_PRIOR).icdf(0.5)),
    }
    flat, unravel = ravel_pytree(centre)
    _, k_start, _, _ = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(SEED), 3), 4)
    noise = jax.random.normal(k_start, (num_members, flat.size), flat.dtype)
    return unravel, flat + noise  # init_scale = 1 (checked in main)


def run_numpyro_hand(x: np.ndarray, y: np.ndarray, s: Settings) -> Result:
    model = make_hand_model()
    engine = s.engine()
    key = jax.random.PRNGKey(SEED)
    constrain = lambda u: {**u, "sigma": jnp.exp(u["sigma"])}
    neg_log_joint = lambda u: -log_density(model, (x, y), {}, constrain(u))[0]
    lr, frac, n = engine.learning_rate, engine.final_learning_rate_fraction, engine.num_steps

    def schedule(count: jax.Array) -> jax.Array:
        # The exponential decay in the working precision (optax's decays in float32).
        return lr * frac ** (jnp.asarray(count, jnp.result_type(float)) / n)

    optimizer = optax.adam(schedule)

    @jax.jit
    def fit(flat0: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
        u0 = jax.vmap(unravel)(flat0)

        def step(carry: tuple[Any, Any], _: None) -> tuple[tuple[Any, Any], jax.Array]:
            u, opt_state = carry
            loss, grad = jax.vmap(jax.value_and_grad(neg_log_joint))(u)
            updates, opt_state = jax.vmap(optimizer.update)(grad, opt_state, u)
            return (optax.apply_updates(u, updates), opt_state), loss

        init = (u0, jax.vmap(optimizer.init)(u0))
        (u, _), losses = jax.lax.scan(step, init, None, length=engine.num_steps)
        return jax.vmap(constrain)(u), -jax.vmap(neg_log_joint)(u), losses.T

    with h.compile_timer() as c_fit:
        start = time.perf_counter()
        with h.compile_timer() as c_opt:
            # Timed as probdyn's attrs["wall_time"]: starts, optimisation, final log joint.
            unravel, flat0 = numpyro_starts(s.num_members)
            values, lp, losses = h.block(fit(flat0))
        t1 = time.perf_counter()
        # What probdyn.fit also returns: deterministic sites and posterior predictive,
        # pointwise log likelihood (the members are the draws of one chain).
        latent = {n: v[None] for n, v in values.items()}
        pp = Predictive(model, latent, return_sites=["mean", "y"], batch_ndims=2)(
            jax.random.fold_in(key, 1), x
        )
        loglik = log_likelihood(model, latent, x, y, batch_ndims=2)
        jax.tree.map(np.asarray, (values, lp, losses, pp, loglik))
        t2 = time.perf_counter()
    pred = Predictive(model, latent, return_sites=["mean"], batch_ndims=2)(
        jax.random.fold_in(key, 2), X_TEST
    )
    mean_test = np.asarray(pred["mean"])[0]
    end = time.perf_counter()
    return Result(
        fit=t2 - start,
        total=end - start,
        optimise=t1 - start,
        compile_fit=c_fit.seconds,
        compile_optimise=c_opt.seconds,
        mean_test=mean_test,
        sigma=np.asarray(values["sigma"]),
        lp=np.asarray(lp),
        first_loss=np.asarray(losses)[:, 0],
    )


def run_numpyro_probdyn(
    x: np.ndarray, y: np.ndarray, s: Settings, num_members: int | None = None
) -> Result:
    model = make_numpyro_probdyn_model()
    with h.compile_timer() as c_fit:
        start = time.perf_counter()
        post = probdyn.fit(model, x, y, engine=s.engine(num_members), key=SEED)
        t1 = time.perf_counter()
    mean_test = post.predict(X_TEST, key=SEED + 2, sites=["mean"])["mean"][0]
    end = time.perf_counter()
    return Result(
        fit=t1 - start,
        total=end - start,
        optimise=post.attrs["wall_time"],
        compile_fit=c_fit.seconds,
        compile_optimise=post.attrs["compile_time"],
        mean_test=np.asarray(mean_test),
        sigma=np.asarray(post.samples["sigma"])[0],
        lp=np.asarray(post.sample_stats["lp"])[0],
        first_loss=np.asarray(post.traces["loss"])[:, 0],
    )


def run_numpyro_loop(x: np.ndarray, y: np.ndarray, s: Settings) -> Result:
    model = make_numpyro_probdyn_model()
    lp, optimise = [], 0.0
    with h.compile_timer() as c_fit:
        start = time.perf_counter()
        for k in range(s.num_members):
            post = probdyn.fit(model, x, y, engine=s.engine(1), key=SEED + k)
            lp.append(float(np.asarray(post.sample_stats["lp"])[0, 0]))
            optimise += post.attrs["wall_time"]
        end = time.perf_counter()
    return Result(
        fit=end - start,
        total=end - start,
        optimise=optimise,
        compile_fit=c_fit.seconds,
        lp=np.asarray(lp),
    )


# -- Part 2: Pyro ------------------------------------------------------------------------------
def make_pyro_probdyn_model() -> Any:
    def bnn_probdyn(x: Any, y: Any = None) -> None:
        net = PyroBayesianMLP("f", [1, HIDDEN, 1], activation="tanh", prior=pdist.Normal(0.0, 1.0))
        sigma = pyro.sample("sigma", pdist.HalfNormal(NOISE_PRIOR))
        mean = pyro.deterministic("mean", net(x[:, None])[..., 0])
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", pdist.Normal(mean, sigma), obs=y)

    return bnn_probdyn


def make_pyro_hand_model() -> Any:
    def bnn_hand(x: Any, y: Any = None) -> None:
        # Same site names, shapes, priors and order as BayesianMLP("f", [1, HIDDEN, 1]).
        normal = pdist.Normal(0.0, 1.0)
        w0 = pyro.sample("f.layers.0.weight", normal.expand([1, HIDDEN]).to_event(2))
        b0 = pyro.sample("f.layers.0.bias", normal.expand([HIDDEN]).to_event(1))
        w1 = pyro.sample("f.layers.1.weight", normal.expand([HIDDEN, 1]).to_event(2))
        b1 = pyro.sample("f.layers.1.bias", normal.expand([1]).to_event(1))
        sigma = pyro.sample("sigma", pdist.HalfNormal(NOISE_PRIOR))
        mean = pyro.deterministic("mean", (torch.tanh(x[:, None] @ w0 + b0) @ w1 + b1)[..., 0])
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", pdist.Normal(mean, sigma), obs=y)

    return bnn_hand


PYRO_SHAPES = {
    "f.layers.0.weight": (1, HIDDEN),
    "f.layers.0.bias": (HIDDEN,),
    "f.layers.1.weight": (HIDDEN, 1),
    "f.layers.1.bias": (1,),
    "sigma": (),
}


def pyro_starts(num_members: int) -> list[dict[str, torch.Tensor]]:
    """Constrained starts per member, as probdyn's Pyro runner draws them: prior
    median plus N(0, 1) in unconstrained space, the noise from ``sub_seed(seed, 4)``
    over the sites flattened in trace order."""
    median_u = torch.cat(
        [
            torch.zeros(HIDDEN * 2 + HIDDEN + 1, dtype=torch.float64),
            torch.log(pdist.HalfNormal(NOISE_PRIOR).icdf(torch.tensor(0.5))).reshape(1),
        ]
    )
    gen = torch.Generator().manual_seed(sub_seed(SEED, 4))
    noise = torch.randn((num_members, median_u.numel()), generator=gen, dtype=torch.float64)
    rows = median_u + noise  # init_scale = 1 (checked in main)
    starts = []
    for row in rows:
        start, member = 0, {}
        for name, shape in PYRO_SHAPES.items():
            size = int(np.prod(shape, dtype=np.int64))
            u = row[start : start + size].reshape(shape)
            member[name] = torch.exp(u) if name == "sigma" else u
            start += size
        starts.append(member)
    return starts


def run_pyro_hand(x_np: np.ndarray, y_np: np.ndarray, s: Settings) -> Result:
    model = make_pyro_hand_model()
    engine = s.engine()
    gamma = engine.final_learning_rate_fraction ** (1.0 / engine.num_steps)
    start = time.perf_counter()
    x = torch.as_tensor(x_np, dtype=torch.float64)
    y = torch.as_tensor(y_np, dtype=torch.float64)
    members, first_loss = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        for init in pyro_starts(s.num_members):
            pyro.clear_param_store()
            guide = AutoDelta(model, init_loc_fn=init_to_value(values=init))
            optim = pyro.optim.ExponentialLR(
                {
                    "optimizer": torch.optim.Adam,
                    "optim_args": {"lr": engine.learning_rate},
                    "gamma": gamma,
                }
            )
            svi = SVI(model, guide, optim, Trace_ELBO())
            for i in range(engine.num_steps):
                loss = svi.step(x, y)
                optim.step()
                if i == 0:
                    first_loss.append(loss)
            with torch.no_grad():
                members.append({k: v.detach().clone() for k, v in guide.median().items()})
        t1 = time.perf_counter()
        latent = {n: torch.stack([m[n] for m in members]) for n in LATENT}
        # What probdyn.fit also returns: deterministic mean and posterior predictive ...
        pp = PyroPredictive(model, posterior_samples=latent, return_sites=["mean", "y"])(x)
        # ... the pointwise log likelihood and the log joint of every member.
        loglik, lp = [], []
        with torch.no_grad():
            for m in members:
                tr = poutine.trace(poutine.condition(model, data=m)).get_trace(x, y)
                loglik.append(tr.nodes["y"]["fn"].log_prob(tr.nodes["y"]["value"]))
                lp.append(float(tr.log_prob_sum()))
        outputs = ({k: v.detach().numpy() for k, v in pp.items()}, torch.stack(loglik).numpy())
        del outputs
        t2 = time.perf_counter()
        x_test = torch.as_tensor(X_TEST, dtype=torch.float64)
        pred = PyroPredictive(model, posterior_samples=latent, return_sites=["mean"])(x_test)
        # Predictive stacks the draws on a new leading axis, (K, 1, n) here.
        mean_test = pred["mean"].detach().numpy().reshape(s.num_members, -1)
        end = time.perf_counter()
    return Result(
        fit=t2 - start,
        total=end - start,
        optimise=t1 - start,
        mean_test=mean_test,
        sigma=latent["sigma"].numpy(),
        lp=np.asarray(lp),
        first_loss=np.asarray(first_loss),
    )


def run_pyro_probdyn(x: np.ndarray, y: np.ndarray, s: Settings) -> tuple[Result, bool]:
    model = make_pyro_probdyn_model()
    start = time.perf_counter()
    post = probdyn.fit(model, x, y, engine=s.engine(), key=SEED, backend="pyro")
    t1 = time.perf_counter()
    mean_test = post.predict(X_TEST, key=SEED + 2, sites=["mean"])["mean"][0]
    end = time.perf_counter()
    res = Result(
        fit=t1 - start,
        total=end - start,
        optimise=post.attrs["wall_time"],
        mean_test=np.asarray(mean_test),
        sigma=np.asarray(post.samples["sigma"])[0],
        lp=np.asarray(post.sample_stats["lp"])[0],
        first_loss=np.asarray(post.traces["loss"])[:, 0],
    )
    return res, bool(post.attrs["batched"])


# -- figures -----------------------------------------------------------------------------------
def quality(mean_test: np.ndarray, sigma: np.ndarray) -> dict[str, float]:
    """Test RMSE of the ensemble mean against the true function, and NLPD of the noisy
    test targets under the equal-weight mixture of the members' Normal predictives."""
    mean = np.asarray(mean_test, dtype=np.float64)
    sd = np.asarray(sigma, dtype=np.float64)[:, None]
    rmse = float(np.sqrt(np.mean((mean.mean(axis=0) - F_TEST) ** 2)))
    logp = -0.5 * ((Y_TEST - mean) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)
    peak = logp.max(axis=0)
    mix = peak + np.log(np.mean(np.exp(logp - peak), axis=0))
    return {"rmse": rmse, "nlpd": float(-np.mean(mix))}


def oracle_nlpd() -> float:
    z = (Y_TEST - F_TEST) / NOISE_SD
    return float(np.mean(0.5 * z**2 + np.log(NOISE_SD) + 0.5 * np.log(2 * np.pi)))


def median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(statistics.median(vals)) if vals else None


def summarise(results: Sequence[Result]) -> dict[str, Any]:
    """Median timings over the repeats; the fit figures of the first run (every repeat
    uses the same seed)."""
    first = results[0]
    out: dict[str, Any] = {
        "fit_s": median([r.fit for r in results]),
        "fit_s_each": [r.fit for r in results],
        "compile_fit_s": median([r.compile_fit for r in results]),
        "optimise_s": median([r.optimise for r in results]),
        "compile_optimise_s": median([r.compile_optimise for r in results]),
        "predict_s": median([r.total - r.fit for r in results if r.mean_test is not None]),
        "total_s": median([r.total for r in results]),
    }
    if out["compile_fit_s"] is not None:
        out["fit_exec_s"] = median([r.fit - (r.compile_fit or 0.0) for r in results])
    if out["compile_optimise_s"] is not None:
        out["optimise_exec_s"] = median(
            [(r.optimise or 0.0) - (r.compile_optimise or 0.0) for r in results]
        )
    if first.lp is not None:
        out["lp_median"] = float(np.median(first.lp))
        out["lp_min"] = float(np.min(first.lp))
    if first.mean_test is not None and first.sigma is not None:
        out.update(quality(first.mean_test, first.sigma))
    return out


def compare(
    runs: Mapping[str, Sequence[Result]], summaries: dict[str, dict[str, Any]], base: str
) -> None:
    """Ratios to ``base`` (of the medians, and per repeat pair) and how close the fits are."""
    ref, ref_runs = summaries[base], runs[base]
    for name, summ in summaries.items():
        rs = runs[name]
        summ["fit_ratio"] = summ["fit_s"] / ref["fit_s"]
        summ["fit_ratio_each"] = [a.fit / b.fit for a, b in zip(rs, ref_runs)]
        summ["total_ratio"] = summ["total_s"] / ref["total_s"]
        if summ.get("fit_exec_s") and ref.get("fit_exec_s"):
            summ["fit_exec_ratio"] = summ["fit_exec_s"] / ref["fit_exec_s"]
        a, b = rs[0], ref_runs[0]
        fa, fb = a.first_loss, b.first_loss
        if fa is not None and fb is not None and fa.shape == fb.shape:
            diff = np.abs(fa - fb) / np.maximum(np.abs(fb), 1.0)
            summ["start_rel_diff"] = float(np.max(diff))
        ma, mb = a.mean_test, b.mean_test
        if ma is not None and mb is not None and ma.shape == mb.shape:
            summ["mean_test_max_diff"] = float(np.max(np.abs(ma - mb)))


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def table(
    title: str, summaries: Mapping[str, Mapping[str, Any]], rows: Sequence[tuple[str, str]]
) -> list[tuple[str, list[Any]]]:
    names = list(summaries)
    out = [(label, [summaries[n].get(key) for n in names]) for label, key in rows]
    h.print_table(title, names, out)
    return out


COMMON_ROWS = [
    ("fit job wall time [s] (median)", "fit_s"),
    ("  each repeat [s]", "fit_s_each"),
    ("  ratio to hand-written (medians)", "fit_ratio"),
    ("  ratio, each repeat pair", "fit_ratio_each"),
    ("  of which compile [s]", "compile_fit_s"),
    ("  executing (fit - compile) [s]", "fit_exec_s"),
    ("  executing, ratio to hand-written", "fit_exec_ratio"),
    ("optimisation wall time [s]", "optimise_s"),
    ("  of which compile [s]", "compile_optimise_s"),
    ("  executing [s]", "optimise_exec_s"),
    ("predict on test grid [s]", "predict_s"),
    ("total (fit job + predict) [s]", "total_s"),
    ("  ratio to hand-written", "total_ratio"),
    ("test RMSE of ensemble mean vs true f", "rmse"),
    ("test NLPD (mixture of members)", "nlpd"),
    ("final log joint: median over members", "lp_median"),
    ("  minimum over members", "lp_min"),
    ("same starts: max rel. diff. of first loss", "start_rel_diff"),
    ("max |diff| of member means on test grid", "mean_test_max_diff"),
]


def main() -> None:
    args = h.parse_args(__doc__.splitlines()[0])
    s = Settings.quick() if args.quick else Settings()
    k = s.num_members
    engine = s.engine()
    assert engine.optimizer == "adam" and engine.init_scale == 1.0 and not engine.anchored
    x, y = make_data()
    warnings.filterwarnings("ignore", message="There are not enough devices")
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    info = h.machine_info()
    info["versions"].update({"torch": torch.__version__, "pyro-ppl": pyro.__version__})
    info["torch_threads"] = torch.get_num_threads()
    print(
        f"Deep ensembles on BNN regression [1, {HIDDEN}, 1] tanh, {len(x)} points; "
        f"Ensemble(num_members={k}, num_steps={s.num_steps}, learning_rate="
        f"{engine.learning_rate}, optimizer={engine.optimizer!r}, final_learning_rate_fraction="
        f"{engine.final_learning_rate_fraction}); {args.repeats} repeat(s), alternating, "
        f"hand-written first",
        flush=True,
    )
    print(
        f"machine: {platform.platform()}, Python {info['python']}, {os.cpu_count()} CPU cores "
        f"(shared with other users and loaded: timings drift), JAX devices "
        f"{info['jax_devices']}, torch {torch.__version__} float64, "
        f"{torch.get_num_threads()} thread; load average (1, 5, 15 min) at start: {load()}",
        flush=True,
    )

    # One-time costs (lazy imports, backend start, torch.optim's first import) first.
    tiny = Settings(num_members=2, num_steps=4)
    h.warm_up_process(lambda: (run_numpyro_hand(x, y, tiny).lp, run_numpyro_probdyn(x, y, tiny).lp))
    run_pyro_hand(x, y, tiny)
    run_pyro_probdyn(x, y, tiny)

    print(f"\nPart 1: NumPyro / JAX (load average {load()})", flush=True)
    jax_runs = alternate(
        {
            "hand-written": lambda: run_numpyro_hand(x, y, s),
            f"probdyn E({k})": lambda: run_numpyro_probdyn(x, y, s),
            "probdyn E(1)": lambda: run_numpyro_probdyn(x, y, s, 1),
            f"probdyn {k} x E(1)": lambda: run_numpyro_loop(x, y, s),
        },
        args.repeats,
        jax_caches=True,
    )
    jax_load = load()
    print(f"\nPart 2: Pyro / torch (load average {jax_load})", flush=True)
    batched: list[bool] = []

    def pyro_probdyn() -> Result:
        res, was_batched = run_pyro_probdyn(x, y, s)
        batched.append(was_batched)
        return res

    pyro_runs = alternate(
        {"hand-written": lambda: run_pyro_hand(x, y, s), f"probdyn E({k})": pyro_probdyn},
        args.repeats,
        jax_caches=False,
    )
    end_load = load()

    jax_summ = {name: summarise(rs) for name, rs in jax_runs.items()}
    compare(jax_runs, jax_summ, "hand-written")
    pyro_summ = {name: summarise(rs) for name, rs in pyro_runs.items()}
    compare(pyro_runs, pyro_summ, "hand-written")

    one = jax_summ["probdyn E(1)"]
    scaling: dict[str, Any] = {}
    for name in (f"probdyn E({k})", f"probdyn {k} x E(1)"):
        runs_k, runs_1 = jax_runs[name], jax_runs["probdyn E(1)"]
        scaling[name] = {
            "fit_ratio_to_e1": jax_summ[name]["fit_s"] / one["fit_s"],
            "fit_ratio_to_e1_each": [a.fit / b.fit for a, b in zip(runs_k, runs_1)],
            "optimise_ratio_to_e1": jax_summ[name]["optimise_s"] / one["optimise_s"],
            "exec_ratio_to_e1": (
                jax_summ[name]["fit_exec_s"] / one["fit_exec_s"]
                if jax_summ[name].get("fit_exec_s") and one.get("fit_exec_s")
                else None
            ),
        }
    loop = jax_summ[f"probdyn {k} x E(1)"]
    scaling["loop_over_ensemble"] = loop["fit_s"] / jax_summ[f"probdyn E({k})"]["fit_s"]

    oracle = oracle_nlpd()
    title = "(timings on a shared, loaded machine: compare within this run only)"
    rows_jax = table(f"Part 1, NumPyro / JAX {title}", jax_summ, COMMON_ROWS)
    scale_rows = [
        (
            f"fit job, ratio to E(1) (target for E({k}) <= 2)",
            [scaling[n]["fit_ratio_to_e1"] for n in scaling if n != "loop_over_ensemble"],
        ),
        (
            "  each repeat",
            [scaling[n]["fit_ratio_to_e1_each"] for n in scaling if n != "loop_over_ensemble"],
        ),
        (
            "executing (fit - compile), ratio to E(1)",
            [scaling[n]["exec_ratio_to_e1"] for n in scaling if n != "loop_over_ensemble"],
        ),
        (
            "optimisation wall, ratio to E(1)",
            [scaling[n]["optimise_ratio_to_e1"] for n in scaling if n != "loop_over_ensemble"],
        ),
        (f"loop of {k} fits / E({k}), fit job", [None, scaling["loop_over_ensemble"]]),
    ]
    h.print_table(
        f"Part 1b, members: E({k}) and a loop of {k} one-member fits against E(1)",
        [f"probdyn E({k})", f"probdyn {k} x E(1)"],
        scale_rows,
    )
    rows_pyro = table(
        f"Part 2, Pyro / torch (float64, 1 thread; probdyn batched by torch.func.vmap: "
        f"{all(batched)}) {title}",
        pyro_summ,
        [r for r in COMMON_ROWS if "compile" not in r[1] and "exec" not in r[1]],
    )
    print(
        f"\ntest grid: {len(X_TEST)} points on [-3, 3]; RMSE of the mean over members against "
        f"sin(1.5 x) + 0.3 x; NLPD of y* = f(x*) + N(0, {NOISE_SD}^2) (seed 1) under the "
        f"members' equal-weight mixture; the true model's NLPD on the same y*: {oracle:.3f}"
    )
    start_load = " ".join(f"{v:.2f}" for v in info["load_average"])
    print(
        f"load average (1, 5, 15 min) on {os.cpu_count()} cores: start {start_load}, "
        f"after Part 1 {jax_load}, end {end_load}"
    )
    if args.json:
        h.write_json(
            args.json,
            {
                "benchmark": "ensemble",
                "settings": dataclasses.asdict(s),
                "engine": dataclasses.asdict(engine),
                "repeats": args.repeats,
                "machine": info,
                "load_average_after_part1": jax_load,
                "load_average_end": end_load,
                "oracle_nlpd": oracle,
                "numpyro": {"results": jax_summ, "scaling": scaling, "table": rows_jax},
                "numpyro_scaling_table": scale_rows,
                "pyro": {"results": pyro_summ, "batched": all(batched), "table": rows_pyro},
            },
        )


if __name__ == "__main__":
    main()
