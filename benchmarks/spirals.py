"""Latent ODE on irregularly sampled 2-D spirals (issue #5): Chen et al. (2018), Table 2.

Data: ``probdyn.data.spirals`` (torchdiffeq ``examples/latent_ode.py``: clockwise
and counter-clockwise spirals ``r = 0.3 theta`` on a 1000-point grid over
``[0, 6 pi]``, a 100-point window from a random start, noise sd 0.3). The model
sees 30, 50 or 100 of the window's 100 points (without replacement) and is scored
on the next 100 points against the noise-free spiral.

Model: ``probdyn.numpyro.LatentODE`` with Chen et al.'s sizes (latent 4; ODE field
4 -> 20 -> 20 -> 4, ELU; encoder 25 units, read backwards in time; decoder
4 -> 20 -> 2, ReLU; fixed observation sd 0.3), fitted by
``probdyn.fit(lode.model, ..., engine=probdyn.VI(guide=lode.guide, ...))``.
Differences from Chen et al.: the encoder is a GRU that also reads the time of each
observation and skips nothing (theirs: a tanh RNN reading values only); the ELBO's
KL term is a one-sample Monte-Carlo estimate (theirs: analytic); Adam's learning
rate 0.01 decays exponentially to 0.001 (the ``VI`` engine's default; theirs:
constant 0.01); a fixed-step Heun solver (``dt = 0.05``; theirs: dopri5) keeps
CPU runs affordable.

Figures per ``num_observed`` (on the fitted spirals, as in Chen et al.; the
extrapolation points were never seen in fitting):

* extrapolation RMSE of the posterior-mean trajectory over the next 100 points,
  against the noise-free spiral, beside the published latent-ODE figure;
* interpolation RMSE over all 100 window points (observed and not), noise-free;
* two baselines: the last observed point held constant, and the series' mean;
* 90 % coverage of the extrapolation: of the noisy extrapolation observations by
  the posterior predictive (decoded trajectory plus N(0, 0.3^2) noise), and of the
  noise-free spiral by the band of the decoded trajectory alone;
* the same extrapolation RMSE on held-out spirals (encoded by the fitted guide).

Sizes: the default is Chen et al.'s data size (1000 spirals) with 2000 full-batch
Adam steps, as theirs (on a shared 2-core CPU about 0.4 s a step: some 15 minutes
per ``num_observed``, 45 in all); ``--medium`` uses 200 spirals and 1500 steps
(about 12 minutes in all); ``--quick`` (smoke) 64 spirals and 400 steps (about 4
minutes). Held-out spirals: 200 / 100 / 32.

Run ``python benchmarks/spirals.py [--quick | --medium] [--json out.json]``. Options
for studying the gap to Chen et al. (each overrides the chosen size's setting):
``--steps N``, ``--series N``, ``--observed 30,50``, ``--lr-fraction F`` (the learning
rate's final fraction: 1.0 is Chen et al.'s constant rate), ``--solver NAME`` and
``--dt0 X`` (e.g. ``--solver dopri5 --dt0 0.05``: adaptive, as Chen et al.),
``--checkpoint PREFIX`` (a resumable fit per column, ``PREFIX-<observed>.ckpt``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from typing import Any

import _harness as h
import numpy as np

import probdyn
from probdyn.data._spirals import SpiralData, spirals
from probdyn.numpyro.primitives.latent_ode import LatentODE

SEED = 0
PUBLISHED = {30: 0.1642, 50: 0.1502, 100: 0.1346}  # Chen et al. (2018), Table 2, latent ODE
LEVEL = 0.9


@dataclasses.dataclass(frozen=True)
class Settings:
    """Benchmark size; the default is Chen et al.'s data size and number of Adam steps."""

    num_series: int = 1000
    num_steps: int = 2000
    learning_rate: float = 0.01
    num_draws: int = 100
    num_heldout: int = 200
    dt0: float = 0.05
    observed: tuple[int, ...] = (30, 50, 100)
    final_lr_fraction: float = 0.1
    solver: str = "heun"
    checkpoint: str | None = None

    @classmethod
    def medium(cls) -> Settings:
        return cls(num_series=200, num_steps=1500, num_heldout=100)

    @classmethod
    def quick(cls) -> Settings:
        return cls(num_series=64, num_steps=400, num_draws=50, num_heldout=32)


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    """Root mean squared error over every element."""
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def coverage(draws: np.ndarray, target: np.ndarray, level: float = LEVEL) -> float:
    """Share of ``target`` elements inside the central ``level`` interval of ``draws`` (axis 0)."""
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return float(np.mean((target >= lo) & (target <= hi)))


def make_model(dt0: float, solver: str = "heun") -> LatentODE:
    """Chen et al.'s sizes (see the module docstring)."""
    return LatentODE(
        obs_dim=2,
        latent_dim=4,
        field_sizes=(20, 20),
        decoder_sizes=(20,),
        encoder_hidden=25,
        obs_scale=0.3,
        solver=solver,
        dt0=dt0,
    )


def scores(data: SpiralData, decoded: np.ndarray, key: int) -> dict[str, float]:
    """The figures for one set of series; ``decoded`` is ``(draws, N, 2 window, 2)``."""
    w = data.window
    mean = decoded.mean(0)
    noise = data.noise_sd * np.random.default_rng(key).standard_normal(decoded[:, :, w:].shape)
    last = data.values[:, -1:]
    return {
        "extrap_rmse": rmse(mean[:, w:], data.extrap_truth),
        "interp_rmse": rmse(mean[:, :w], data.window_truth),
        "extrap_rmse_last": rmse(last, data.extrap_truth),
        "extrap_rmse_mean": rmse(data.values.mean(1, keepdims=True), data.extrap_truth),
        "coverage_predictive": coverage(decoded[:, :, w:] + noise, data.extrap_values),
        "coverage_trajectory": coverage(decoded[:, :, w:], data.extrap_truth),
        "band_width": float(
            np.mean(np.diff(np.quantile(decoded[:, :, w:], [0.05, 0.95], axis=0), axis=0))
        ),
    }


def run_one(num_observed: int, s: Settings) -> dict[str, Any]:
    """Fit one latent ODE on ``num_observed`` of 100 points; score it."""
    data = spirals(s.num_series, num_observed=num_observed, key=SEED + num_observed)
    heldout = spirals(s.num_heldout, num_observed=num_observed, key=SEED + 1000 + num_observed)
    lode = make_model(s.dt0, s.solver)
    engine = probdyn.VI(
        guide=lode.guide,
        num_steps=s.num_steps,
        learning_rate=s.learning_rate,
        num_draws=s.num_draws,
        final_learning_rate_fraction=s.final_lr_fraction,
        progress_bar=False,
        checkpoint=f"{s.checkpoint}-{num_observed}.ckpt" if s.checkpoint else None,
    )
    target = np.concatenate([data.window_times, data.extrap_times])
    start = time.perf_counter()
    post = probdyn.fit(
        lode.model, data.times, data.values, data.mask, t0=0.0, engine=engine, key=SEED
    )
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    pred = post.predict(
        data.times,
        data.values,
        data.mask,
        t0=0.0,
        target_times=target,
        sites=["latent.forecast"],
    )
    decoded = np.asarray(pred["latent.forecast"])[0]  # (draws, N, 200, 2)
    ahead = lode.predict(
        post.params,
        heldout.times,
        heldout.values,
        heldout.mask,
        target_times=target,
        key=SEED + 1,
        num_draws=s.num_draws,
        t0=0.0,
    )["mean"]
    predict_s = time.perf_counter() - start
    losses = np.asarray(post.traces["loss"])
    out: dict[str, Any] = dict(scores(data, decoded, key=SEED + 2))
    held = scores(heldout, ahead, key=SEED + 3)
    out.update(
        {
            "published_extrap_rmse": PUBLISHED.get(num_observed),
            "heldout_extrap_rmse": held["extrap_rmse"],
            "heldout_interp_rmse": held["interp_rmse"],
            "loss_first_50": float(np.mean(losses[:50])),
            "loss_last_50": float(np.mean(losses[-50:])),
            "fit_s": fit_s,
            "compile_s": float(post.attrs.get("compile_time", float("nan"))),
            "predict_s": predict_s,
        }
    )
    print(f"  num_observed={num_observed}: done in {fit_s + predict_s:.0f} s", flush=True)
    return out


def _study_options() -> dict[str, Any]:
    """The study options of the module docstring given (they are removed from argv)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--steps", type=int, dest="num_steps")
    parser.add_argument("--series", type=int, dest="num_series")
    parser.add_argument("--observed", type=lambda v: tuple(int(x) for x in v.split(",")))
    parser.add_argument("--lr-fraction", type=float, dest="final_lr_fraction")
    parser.add_argument("--solver")
    parser.add_argument("--dt0", type=float)
    parser.add_argument("--checkpoint")
    known, sys.argv[1:] = parser.parse_known_args()
    return {k: v for k, v in vars(known).items() if v is not None}


def main() -> None:
    options = _study_options()
    args = h.parse_args(
        __doc__.splitlines()[0],
        default_repeats=1,
        flags={"--medium": "200 spirals, 1500 Adam steps (between --quick and the default)"},
    )
    s = Settings.quick() if args.quick else Settings.medium() if args.medium else Settings()
    s = dataclasses.replace(s, **options)
    print(f"spirals benchmark (issue #5); {os.cpu_count()} CPU cores; settings {s}", flush=True)
    warnings.filterwarnings("ignore", message=r".*solve\(s\) failed", category=RuntimeWarning)
    results = {n: run_one(n, s) for n in s.observed}
    col = lambda key: [results[n][key] for n in s.observed]
    rows: list[tuple[str, list[Any]]] = [
        ("extrapolation RMSE (next 100 points, noise-free)", col("extrap_rmse")),
        ("  published latent ODE (Chen et al. 2018)", col("published_extrap_rmse")),
        ("  baseline: last observed point held", col("extrap_rmse_last")),
        ("  baseline: the series' mean", col("extrap_rmse_mean")),
        ("  on held-out spirals", col("heldout_extrap_rmse")),
        ("interpolation RMSE (100 window points)", col("interp_rmse")),
        ("  on held-out spirals", col("heldout_interp_rmse")),
        (f"{LEVEL:.0%} coverage, extrapolation, predictive", col("coverage_predictive")),
        (f"{LEVEL:.0%} coverage, extrapolation, trajectory", col("coverage_trajectory")),
        ("  mean 90 % band width of the trajectory", col("band_width")),
        (
            "loss, first / last 50 steps",
            [[r["loss_first_50"], r["loss_last_50"]] for r in results.values()],
        ),
        ("fit wall time [s] (compile included)", col("fit_s")),
        ("  of which compile [s]", col("compile_s")),
        ("predict wall time [s]", col("predict_s")),
    ]
    h.print_table(
        f"Latent ODE on spirals: {s.num_series} spirals, {s.num_steps} Adam steps "
        "(timings on a shared machine)",
        [f"{n}/100 observed" for n in s.observed],
        rows,
    )
    if args.json:
        payload = {
            "benchmark": "spirals",
            "settings": dataclasses.asdict(s),
            "machine": h.machine_info(),
            "command": " ".join(sys.argv),
            "results": {str(n): r for n, r in results.items()},
            "table": rows,
        }
        h.write_json(args.json, payload)


if __name__ == "__main__":
    main()
