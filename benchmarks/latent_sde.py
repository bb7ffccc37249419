"""Latent SDE training speed: probdyn's `LatentSDE` against hand-written diffrax and torchsde
latent SDEs on the stochastic Lorenz data, in one process (issue #5).

Data: Li et al.'s stochastic Lorenz system (``probdyn.data._lorenz.stochastic_lorenz``), 32
series on 21 times in [0, 1], normalised per coordinate, observation noise 0.01.
Every runner has the same sizes: latent 4, both drifts softplus MLPs with hidden (32, 32),
a diagonal diffusion (one softplus net of 16 units per latent dimension, sigmoid output), a GRU
encoder (32 units) run backwards in time giving ``q(z0)`` and a 16-dimensional context
for the posterior drift, a linear decoder, ``obs_scale`` 0.1, Euler–Maruyama with
``dt = 0.05`` (20 steps), Adam at 1e-2 decaying to 1e-3 over the run, one path per
series per step. The objective is the negative ELBO summed over the batch:
``-[log-likelihood - KL(q(z0) || N(0, I)) - 1/2 sum_k |u_k|^2 h_k]``.

* ``probdyn NumPyro``: ``probdyn.fit(lsde.model, ..., engine=probdyn.VI(guide=lsde.guide))``.
* ``hand diffrax``: the same model in plain JAX + diffrax + optax: ``diffeqsolve`` with
  ``Euler``, a drift/diffusion ``MultiTerm`` on the state augmented with the path KL, an
  Brownian path drawn on the Euler grid; one jitted ``value_and_grad`` + ``optax.adam`` step.
* ``probdyn Pyro``: the same ``fit`` with ``backend="pyro"``.
* ``hand torchsde``: an ``nn.Module`` SDE (``f`` posterior drift, ``h`` prior drift,
  ``g`` diagonal diffusion) in the style of torchsde's ``examples/latent_sde.py``,
  ``torchsde.sdeint(..., method="euler", dt=0.05, logqp=True)``, ``nn.GRU`` encoder,
  ``torch.optim.Adam`` with an exponential learning-rate decay.

Per-iteration time: for probdyn, two fits of ``N`` and ``2N`` steps; the difference of
their (wall time - compile time) over ``N`` (set-up, draws and compile cancel). For the
hand-written loops, a few warm-up steps (compile), then ``N`` timed steps. Runners
alternate (hand-written first) over ``--repeats`` rounds; medians are reported. The
final losses are the mean of the last 10 % of steps of the longer run; the hand-written
ones use the analytic ``z0`` KL and probdyn the Monte-Carlo one (same expectation), and
the networks start from different random weights, so losses agree only roughly.

Torch runs on one thread (``torch.set_num_threads(1)``); JAX uses its defaults.

Run ``python benchmarks/latent_sde.py`` (NumPyro/diffrax 400 steps, Pyro/torchsde 100) or
``--quick`` (100 and 20); ``--json PATH``; ``--repeats N``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import _harness as h
import diffrax
import jax
import jax.numpy as jnp
import lineax
import numpy as np
import numpyro
import optax
import torch
import torchsde
from torch import nn

import probdyn
from probdyn.data._lorenz import stochastic_lorenz
from probdyn.numpyro import LatentSDE as NumPyroLatentSDE
from probdyn.pyro import LatentSDE as PyroLatentSDE

numpyro.enable_x64(False)

NUM_SERIES, NUM_TIMES, OBS_DIM = 32, 21, 3
LATENT, HIDDEN, DIFF_HIDDEN, ENC_HIDDEN, CONTEXT = 4, 32, 16, 32, 16
DT, OBS_SCALE, LR, FINAL_FRACTION = 0.05, 0.1, 1e-2, 0.1
G_FLOOR = 1e-3
SIZES: dict[str, Any] = {
    "latent_dim": LATENT,
    "dt": DT,
    "drift_sizes": (HIDDEN, HIDDEN),
    "diffusion_hidden": DIFF_HIDDEN,
    "decoder_sizes": (),
    "encoder_hidden": ENC_HIDDEN,
    "context_dim": CONTEXT,
    "obs_scale": OBS_SCALE,
}


def lorenz_data() -> tuple[np.ndarray, np.ndarray]:
    """Times ``(B, T)`` and normalised, noisy values ``(B, T, 3)`` (float32)."""
    t = np.linspace(0.0, 1.0, NUM_TIMES)
    raw = stochastic_lorenz(NUM_SERIES, t, seed=0)
    mu, sd = raw.reshape(-1, 3).mean(0), raw.reshape(-1, 3).std(0)
    y = (raw - mu) / sd + 0.01 * np.random.default_rng(1).standard_normal(raw.shape)
    return np.tile(t, (NUM_SERIES, 1)).astype(np.float32), y.astype(np.float32)


def _tail_loss(losses: Any) -> float:
    arr = np.asarray(losses, dtype=np.float64)
    return float(np.mean(arr[-max(1, len(arr) // 10) :]))


# -- probdyn ------------------------------------------------------------------------------
def probdyn_run(backend: str, steps: int) -> tuple[float, float]:
    """Seconds per step of ``probdyn.fit`` (fits of N and 2N steps) and the final loss."""
    times, values = lorenz_data()
    cls = NumPyroLatentSDE if backend == "numpyro" else PyroLatentSDE
    lsde = cls(obs_dim=OBS_DIM, **SIZES)
    executing = []
    post = None
    for n in (steps, 2 * steps):
        engine = probdyn.VI(
            guide=lsde.guide,
            num_steps=n,
            learning_rate=LR,
            final_learning_rate_fraction=FINAL_FRACTION,
            num_draws=1,
            progress_bar=False,
        )
        post = probdyn.fit(lsde.model, times, values, t0=0.0, engine=engine, key=0, backend=backend)
        executing.append(float(post.attrs["wall_time"]) - float(post.attrs["compile_time"]))
    assert post is not None
    return (executing[1] - executing[0]) / steps, _tail_loss(post.traces["loss"])


# -- hand-written: JAX + diffrax + optax ----------------------------------------------------
def _np_layers(sizes: tuple[int, ...], rng: np.random.Generator) -> list[tuple[Any, Any]]:
    return [
        (jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), jnp.float32), jnp.zeros(b))
        for a, b in zip(sizes[:-1], sizes[1:])
    ]


def _mlp(layers: list[tuple[Any, Any]], x: Any) -> Any:
    for w, b in layers[:-1]:
        x = jax.nn.softplus(x @ w + b)
    w, b = layers[-1]
    return x @ w + b


def _jax_params(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    n_in = 2 * OBS_DIM + 1

    def arr(shape: tuple[int, ...], scale: float = 1.0) -> Any:
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

    return {
        "prior": _np_layers((LATENT, HIDDEN, HIDDEN, LATENT), rng),
        "post": _np_layers((LATENT + CONTEXT, HIDDEN, HIDDEN, LATENT), rng),
        "diff": (
            arr((LATENT, DIFF_HIDDEN)),
            jnp.zeros((LATENT, DIFF_HIDDEN)),
            arr((LATENT, DIFF_HIDDEN), 1 / math.sqrt(DIFF_HIDDEN)),
            jnp.zeros(LATENT),
        ),
        "dec": _np_layers((LATENT, OBS_DIM), rng),
        "gru": (
            arr((n_in + ENC_HIDDEN, 3 * ENC_HIDDEN), 1 / math.sqrt(n_in + ENC_HIDDEN)),
            jnp.zeros(3 * ENC_HIDDEN),
        ),
        "z0_head": _np_layers((ENC_HIDDEN, 2 * LATENT), rng),
        "ctx_head": _np_layers((ENC_HIDDEN, CONTEXT), rng),
    }


def _jax_diffusion(p: tuple[Any, ...], z: Any) -> Any:
    w1, b1, w2, b2 = p
    out = jnp.sum(jax.nn.softplus(z[..., None] * w1 + b1) * w2, axis=-1) + b2
    return G_FLOOR + (1.0 - G_FLOOR) * jax.nn.sigmoid(out)


def _jax_encode(params: dict[str, Any], times: Any, values: Any) -> tuple[Any, Any, Any]:
    """``q(z0)`` loc, scale ``(B, L)``; context rows ``(T + 1, B, C)`` (row j: obs >= j)."""
    w, b = params["gru"]
    x = jnp.concatenate([values, jnp.ones_like(values), times[..., None]], axis=-1)

    def step(hid: Any, xt: Any) -> tuple[Any, Any]:
        gates = jnp.concatenate([xt, hid], -1) @ w[:, : 2 * ENC_HIDDEN] + b[: 2 * ENC_HIDDEN]
        zg, r = jax.nn.sigmoid(gates[:, :ENC_HIDDEN]), jax.nn.sigmoid(gates[:, ENC_HIDDEN:])
        cand = jnp.tanh(
            jnp.concatenate([xt, r * hid], -1) @ w[:, 2 * ENC_HIDDEN :] + b[2 * ENC_HIDDEN :]
        )
        new = (1 - zg) * hid + zg * cand
        return new, new

    h0 = jnp.zeros((times.shape[0], ENC_HIDDEN))
    _, hs = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1), reverse=True)
    out = _mlp(params["z0_head"], hs[0])
    context = _mlp(params["ctx_head"], jnp.concatenate([hs, h0[None]]))
    return out[:, :LATENT], jax.nn.softplus(out[:, LATENT:]) + 1e-4, context


def _jax_loss(params: dict[str, Any], key: Any, times: Any, values: Any) -> Any:
    loc, scale, context = _jax_encode(params, times, values)
    k0, kw = jax.random.split(key)
    z0 = loc + scale * jax.random.normal(k0, loc.shape)
    num_steps = NUM_TIMES - 1
    size = NUM_SERIES * (LATENT + 1)

    def drift(t: Any, y: Any, args: Any) -> Any:
        z = y.reshape(NUM_SERIES, LATENT + 1)[:, :LATENT]
        k = jnp.clip(jnp.round(t / DT).astype(jnp.int32), 0, num_steps - 1)
        fq = _mlp(params["post"], jnp.concatenate([z, context[k + 1]], -1))
        u = (fq - _mlp(params["prior"], z)) / _jax_diffusion(params["diff"], z)
        return jnp.concatenate([fq, 0.5 * jnp.sum(u**2, -1, keepdims=True)], -1).reshape(-1)

    def diffusion(t: Any, y: Any, args: Any) -> Any:
        z = y.reshape(NUM_SERIES, LATENT + 1)[:, :LATENT]
        g = jnp.concatenate([_jax_diffusion(params["diff"], z), jnp.zeros((NUM_SERIES, 1))], -1)
        return lineax.DiagonalLinearOperator(g.reshape(-1))

    # The Brownian path on the Euler grid (a linear interpolant of its values there):
    # every Euler step reads exactly one Gaussian increment of variance h.
    grid = jnp.linspace(0.0, 1.0, num_steps + 1)
    increments = math.sqrt(DT) * jax.random.normal(kw, (num_steps, size))
    path = jnp.concatenate([jnp.zeros((1, size)), jnp.cumsum(increments, 0)])
    brownian = diffrax.LinearInterpolation(ts=grid, ys=path)
    terms = diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, brownian))
    y0 = jnp.concatenate([z0, jnp.zeros((NUM_SERIES, 1))], -1).reshape(-1)
    sol = diffrax.diffeqsolve(
        terms,
        diffrax.Euler(),
        0.0,
        1.0,
        DT,
        y0,
        saveat=diffrax.SaveAt(ts=times[0]),
        max_steps=num_steps + 2,
    )
    ys = sol.ys.reshape(NUM_TIMES, NUM_SERIES, LATENT + 1)  # type: ignore[union-attr]
    mean = _mlp(params["dec"], jnp.swapaxes(ys[..., :LATENT], 0, 1))
    norm = math.log(OBS_SCALE) + 0.5 * math.log(2 * math.pi)
    loglik = jnp.sum(-0.5 * ((values - mean) / OBS_SCALE) ** 2 - norm)
    kl_z0 = jnp.sum(0.5 * (loc**2 + scale**2 - 1.0) - jnp.log(scale))
    return -(loglik - kl_z0 - jnp.sum(ys[-1, :, LATENT]))


def diffrax_run(steps: int) -> tuple[float, float]:
    """Seconds per step of the hand-written diffrax loop and its final loss."""
    times, values = (jnp.asarray(a) for a in lorenz_data())
    params = _jax_params(0)
    optim = optax.adam(optax.exponential_decay(LR, 2 * steps, FINAL_FRACTION))
    state = optim.init(params)

    @jax.jit
    def update(params: Any, state: Any, key: Any) -> tuple[Any, Any, Any]:
        loss, grads = jax.value_and_grad(_jax_loss)(params, key, times, values)
        upd, state = optim.update(grads, state, params)
        return optax.apply_updates(params, upd), state, loss

    keys = jax.random.split(jax.random.PRNGKey(0), 2 * steps + 3)
    losses = []
    for i in range(3):  # compile and warm up
        params, state, loss = update(params, state, keys[i])
        losses.append(loss)
    h.block(params)
    start = time.perf_counter()
    for i in range(3, steps + 3):
        params, state, loss = update(params, state, keys[i])
        losses.append(loss)
    h.block(params)
    per_step = (time.perf_counter() - start) / steps
    for i in range(steps + 3, 2 * steps):  # the rest of the 2N steps, for the final loss
        params, state, loss = update(params, state, keys[i])
        losses.append(loss)
    return per_step, _tail_loss([float(v) for v in losses])


# -- hand-written: torchsde ------------------------------------------------------------------
class _TorchLatentSDE(nn.Module):
    """Posterior drift ``f``, prior drift ``h``, diagonal diffusion ``g``; GRU encoder."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self) -> None:
        super().__init__()

        def mlp(n_in: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(n_in, HIDDEN),
                nn.Softplus(),
                nn.Linear(HIDDEN, HIDDEN),
                nn.Softplus(),
                nn.Linear(HIDDEN, LATENT),
            )

        self.prior_drift = mlp(LATENT)
        self.posterior_drift = mlp(LATENT + CONTEXT)
        self.w1 = nn.Parameter(torch.randn(LATENT, DIFF_HIDDEN))
        self.b1 = nn.Parameter(torch.zeros(LATENT, DIFF_HIDDEN))
        self.w2 = nn.Parameter(torch.randn(LATENT, DIFF_HIDDEN) / math.sqrt(DIFF_HIDDEN))
        self.b2 = nn.Parameter(torch.zeros(LATENT))
        self.gru = nn.GRU(2 * OBS_DIM + 1, ENC_HIDDEN)
        self.z0_head = nn.Linear(ENC_HIDDEN, 2 * LATENT)
        self.ctx_head = nn.Linear(ENC_HIDDEN, CONTEXT)
        self.decoder = nn.Linear(LATENT, OBS_DIM)
        self._context = torch.zeros(())

    def f(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = min(max(round(float(t) / DT), 0), NUM_TIMES - 2)
        return self.posterior_drift(torch.cat([y, self._context[k + 1]], dim=-1))

    def h(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.prior_drift(y)

    def g(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.softplus(y[..., None] * self.w1 + self.b1)
        out = torch.sum(hidden * self.w2, dim=-1) + self.b2
        return G_FLOOR + (1.0 - G_FLOOR) * torch.sigmoid(out)

    def loss(self, ts: torch.Tensor, times: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        x = torch.cat([values, torch.ones_like(values), times[..., None]], dim=-1)
        out, _ = self.gru(torch.flip(x.transpose(0, 1), dims=(0,)))
        hs = torch.flip(out, dims=(0,))  # (T, B, H): row j summarises obs >= j
        self._context = self.ctx_head(torch.cat([hs, torch.zeros_like(hs[:1])]))
        head = self.z0_head(hs[0])
        loc, scale = head[:, :LATENT], nn.functional.softplus(head[:, LATENT:]) + 1e-4
        z0 = loc + scale * torch.randn_like(loc)
        zs, log_ratio = torchsde.sdeint(self, z0, ts, method="euler", dt=DT, logqp=True)
        mean = self.decoder(zs).transpose(0, 1)
        loglik = torch.distributions.Normal(mean, OBS_SCALE).log_prob(values).sum()
        kl_z0 = torch.sum(0.5 * (loc**2 + scale**2 - 1.0) - torch.log(scale))
        return -(loglik - kl_z0 - log_ratio.sum())


def torchsde_run(steps: int) -> tuple[float, float]:
    """Seconds per step of the hand-written torchsde loop and its final loss."""
    t_np, y_np = lorenz_data()
    times, values = torch.as_tensor(t_np), torch.as_tensor(y_np)
    ts = times[0]
    gen_state = torch.get_rng_state()
    torch.manual_seed(0)
    try:
        sde = _TorchLatentSDE()
        optim = torch.optim.Adam(sde.parameters(), lr=LR)
        decay = torch.optim.lr_scheduler.ExponentialLR(
            optim, gamma=FINAL_FRACTION ** (1.0 / (2 * steps))
        )

        def one_step() -> float:
            optim.zero_grad()
            loss = sde.loss(ts, times, values)
            loss.backward()
            optim.step()
            decay.step()
            return float(loss.detach())

        losses = [one_step()]  # warm-up
        start = time.perf_counter()
        losses += [one_step() for _ in range(steps)]
        per_step = (time.perf_counter() - start) / steps
        losses += [one_step() for _ in range(steps - 1)]
    finally:
        torch.set_rng_state(gen_state)
    return per_step, _tail_loss(losses)


# -- main ------------------------------------------------------------------------------------
def main() -> None:
    args = h.parse_args(__doc__.splitlines()[0], default_repeats=2)
    jax_steps, torch_steps = (100, 20) if args.quick else (400, 100)
    # One torch thread (as the Pyro tests): on a small, shared CPU machine torch's
    # intra-op threads fight JAX's and other processes' for the cores (measured here:
    # 2 threads made the torchsde step ~30x slower under load).
    torch.set_num_threads(1)
    h.warm_up_process()
    runners: dict[str, Callable[[], tuple[float, float]]] = {
        "hand diffrax": lambda: diffrax_run(jax_steps),
        "probdyn NumPyro": lambda: probdyn_run("numpyro", jax_steps),
        "hand torchsde": lambda: torchsde_run(torch_steps),
        "probdyn Pyro": lambda: probdyn_run("pyro", torch_steps),
    }
    seconds: dict[str, list[float]] = {n: [] for n in runners}
    losses: dict[str, float] = {}
    for rep in range(args.repeats):
        for name, run in runners.items():
            h.fresh_caches()
            start = time.perf_counter()
            per_step, loss = run()
            seconds[name].append(per_step)
            losses[name] = loss
            print(
                f"  [{rep + 1}/{args.repeats}] {name}: {1e3 * per_step:.2f} ms/step, "
                f"final loss {loss:.1f}, {time.perf_counter() - start:.1f} s for the call",
                flush=True,
            )
    ms = {n: 1e3 * statistics.median(v) for n, v in seconds.items()}
    names = list(runners)
    ratio = [
        None,
        ms["probdyn NumPyro"] / ms["hand diffrax"],
        None,
        ms["probdyn Pyro"] / ms["hand torchsde"],
    ]
    steps = [jax_steps, jax_steps, torch_steps, torch_steps]
    rows: list[tuple[str, list[Any]]] = [
        ("ms per training step (median)", [ms[n] for n in names]),
        ("  each repeat [ms]", [[1e3 * s for s in seconds[n]] for n in names]),
        ("ratio probdyn / hand-written", ratio),
        ("timed steps (N; probdyn: 2N - N)", steps),
        ("final loss (-ELBO, last 10 % of 2N)", [losses[n] for n in names]),
    ]
    h.print_table(
        f"Latent SDE training, {NUM_SERIES} series x {NUM_TIMES} times, latent {LATENT}, "
        f"hidden {HIDDEN}, dt {DT} (torch threads: {torch.get_num_threads()})",
        names,
        rows,
    )
    if args.json:
        payload = {
            "ms_per_step": ms,
            "ms_per_step_each": {n: [1e3 * s for s in v] for n, v in seconds.items()},
            "ratio_numpyro_to_diffrax": ratio[1],
            "ratio_pyro_to_torchsde": ratio[3],
            "final_loss": losses,
            "steps": dict(zip(names, steps)),
            "torch_threads": torch.get_num_threads(),
            "torchsde": torchsde.__version__,
            **h.machine_info(),
        }
        h.write_json(args.json, payload)


if __name__ == "__main__":
    main()
