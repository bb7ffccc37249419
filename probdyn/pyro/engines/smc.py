"""Likelihood-tempered sequential Monte Carlo for Pyro models.

The particles are rows of one ``(num_particles, D)`` tensor of unconstrained
coordinates (`probdyn.pyro.engines.ensemble.FlatModel`), whose log prior (with
``log|det J|``) and log likelihood are evaluated for all rows at once by
``torch.func.vmap`` where the model allows it, else row by row
(``attrs["batched"]``). Temperatures, weights, resampling, the evidence and every
tuning rule and constant of the move kernels come from `probdyn.engines.smc_math`, which
the NumPyro backend reads too, so both backends run the same algorithm:

1. draw the particles from the prior (``beta = 0``);
2. choose the next ``beta`` (bisection on the ESS, or the given sequence), add
   ``log mean exp((beta' - beta) * loglik)`` to the log evidence, and reweight the
   particles by the incremental weights; stop with an error if ``beta < 1`` after
   `_smc_math.MAX_STAGES` stages;
3. resample systematically, and move every particle by up to ``num_mcmc_steps``
   steps of the kernel targeting ``prior * likelihood**beta'`` (as many as
   `_smc_math.keep_moving` asks for with ``adaptive_moves``; none at ``beta = 0``,
   where the particles are exact prior draws), preconditioned by the
   weighted covariance of the cloud before resampling, dense or per coordinate
   (`probdyn.engines.smc_preconditioner`), with a step size that starts at
   `_smc_math.initial_step_size` and follows `_smc_math.adapt_step_size` (gain
   `_smc_math.step_adapt_gain`) from the previous stage's acceptance rate towards
   `_smc_math.target_acceptance`, times a per-particle factor ``exp(U(-j, j))``,
   ``j = _smc_math.STEP_JITTER``, drawn afresh for each move; repeat from 2 until
   ``beta = 1``, then resample and move once more at ``beta = 1``.

Factor sites (``pyro.factor``, and the rejection of a failed ODE solve) count as
likelihood: they are tempered.

``stream="minibatch"`` (Feynman–Kac SMC) is run by probdyn/pyro/engines/fksmc.py.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from probdyn.core.engines import SMC
from probdyn.core.posterior import Posterior
from probdyn.engines import smc_math as _smc_math
from probdyn.engines import smc_preconditioner as _precond
from probdyn.engines.smc_traces import BAR_FORMAT, StageTraces, tempered_attrs
from probdyn.pyro.bridge import (
    as_seed,
    check_observed,
    isolated,
    param_sites,
    sub_seed,
    to_torch_args,
    trace_model,
)
from probdyn.pyro.logdensity import FlatModel
from probdyn.pyro.postprocess import build_posterior
from probdyn.pyro.primitives.ode import reset_failed_solves

__all__ = ["run_smc"]


class _Cloud(NamedTuple):
    """Particles ``u`` ``(N, D)`` with their log prior (incl. ``log|det J|``), log
    likelihood and the gradient of the tempered target at the current ``beta``."""

    u: torch.Tensor
    prior: torch.Tensor
    lik: torch.Tensor
    grad: torch.Tensor | None


class _Mover:
    """The tempered target and one kernel's moves, for a whole cloud at once."""

    def __init__(self, flat_model: FlatModel, engine: SMC, gen: torch.Generator) -> None:
        self.fm, self.engine, self.gen = flat_model, engine, gen
        self.needs_grad = engine.kernel != "rw"

    def at(self, u: torch.Tensor, beta: float) -> _Cloud:
        """Evaluate the particles ``u`` under the target at ``beta``."""
        u = u.detach().requires_grad_(self.needs_grad)
        with torch.set_grad_enabled(self.needs_grad):
            t = self.fm.evaluate(u)
            prior = _finite_or_neginf(t[:, 0] + t[:, 1])
            lik = _finite_or_neginf(t[:, 2])
            grad = None
            if self.needs_grad:
                (grad,) = torch.autograd.grad(_tempered(prior, lik, beta).sum(), u)
                grad = torch.nan_to_num(grad.detach(), nan=0.0, posinf=0.0, neginf=0.0)
        return _Cloud(u.detach(), prior.detach(), lik.detach(), grad)

    def _normal(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.gen, dtype=like.dtype)

    def step(
        self, cloud: _Cloud, beta: float, step: torch.Tensor, metric: _Metric
    ) -> tuple[_Cloud, torch.Tensor]:
        """One Metropolis-Hastings step of every particle (step sizes ``(N, 1)``,
        preconditioner ``metric``); returns the new cloud and each particle's
        acceptance probability."""
        z = self._normal(cloud.u)
        if self.engine.kernel == "rw":
            new = self.at(cloud.u + step * metric.mul_l(z), beta)
            log_ratio = _target(new, beta) - _target(cloud, beta)
        elif self.engine.kernel == "mala":
            # u' = u + h L L^T grad + sqrt(2h) L xi, as BlackJAX's MALA in L^-1 u.
            assert cloud.grad is not None
            noise = torch.sqrt(2 * step)
            drift = metric.mul_l(metric.mul_lt(cloud.grad))
            new = self.at(cloud.u + step * drift + noise * metric.mul_l(z), beta)
            assert new.grad is not None
            drift = metric.mul_l(metric.mul_lt(new.grad))
            back = metric.whiten(cloud.u - new.u - step * drift) / noise
            log_q = -0.5 * (back**2).sum(-1) + 0.5 * (z**2).sum(-1)
            log_ratio = _target(new, beta) - _target(cloud, beta) + log_q
        else:
            new, log_ratio = self._leapfrog(cloud, beta, step, metric, z)
        log_ratio = torch.nan_to_num(log_ratio, nan=-math.inf)
        accept_prob = torch.exp(torch.clamp(log_ratio, max=0.0))
        uniform = torch.rand(accept_prob.shape, generator=self.gen, dtype=accept_prob.dtype)
        return _select(uniform < accept_prob, new, cloud), accept_prob

    def _leapfrog(
        self, cloud: _Cloud, beta: float, h: torch.Tensor, metric: _Metric, r: torch.Tensor
    ) -> tuple[_Cloud, torch.Tensor]:
        # Inverse mass matrix L L^T, in whitened momentum r ~ N(0, I): a position
        # step moves by h L r, a kick adds h L^T grad.
        kinetic0 = 0.5 * (r**2).sum(-1)
        new = cloud
        assert new.grad is not None
        r = r + 0.5 * h * metric.mul_lt(new.grad)
        for i in range(self.engine.num_leapfrog_steps):
            new = self.at(new.u + h * metric.mul_l(r), beta)
            assert new.grad is not None
            last = i + 1 == self.engine.num_leapfrog_steps
            r = r + (0.5 if last else 1.0) * h * metric.mul_lt(new.grad)
        kinetic1 = 0.5 * (r**2).sum(-1)
        return new, (_target(new, beta) - kinetic1) - (_target(cloud, beta) - kinetic0)


class _Metric:
    """The preconditioner's ``L`` (`_precond.factor`: ``(D,)`` diagonal or ``(D, D)``
    lower triangular) as maps of rows ``(N, D)``: ``x L^T``, ``g L`` and ``x L^-T``."""

    def __init__(self, factor: np.ndarray, dtype: torch.dtype) -> None:
        self.f = torch.as_tensor(factor, dtype=dtype)
        self.dense = self.f.dim() == 2
        if self.dense:
            eye = torch.eye(len(self.f), dtype=dtype)
            self.inv = torch.linalg.solve_triangular(self.f, eye, upper=False)

    def mul_l(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.f.T if self.dense else x * self.f

    def mul_lt(self, g: torch.Tensor) -> torch.Tensor:
        return g @ self.f if self.dense else g * self.f

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.inv.T if self.dense else x / self.f


def _finite_or_neginf(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(x) | (x == math.inf), -math.inf, x)


def _tempered(prior: torch.Tensor, lik: torch.Tensor, beta: float) -> torch.Tensor:
    # At beta = 0 the likelihood is left out, so that 0 * -inf (an impossible or
    # failed likelihood) cannot make the prior's density NaN.
    return prior if beta == 0.0 else prior + beta * lik


def _target(cloud: _Cloud, beta: float) -> torch.Tensor:
    return _tempered(cloud.prior, cloud.lik, beta)


def _select(keep: torch.Tensor, new: _Cloud, old: _Cloud) -> _Cloud:
    def pick(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        if a is None or b is None:
            return None
        mask = keep.reshape(keep.shape + (1,) * (a.dim() - 1))
        return torch.where(mask, a, b)

    u, prior, lik = (pick(a, b) for a, b in zip(new[:3], old[:3]))
    assert u is not None and prior is not None and lik is not None
    return _Cloud(u, prior, lik, pick(new.grad, old.grad))


def _prior_draws(flat_model: FlatModel, num: int, seed: int) -> torch.Tensor:
    """``num`` prior draws (one model run each), as unconstrained rows ``(num, D)``."""
    torch.default_generator.manual_seed(seed)
    rows = []
    for _ in range(num):
        tr = trace_model(flat_model.model, flat_model.args, flat_model.kwargs)
        rows.append(flat_model.unconstrain({n: tr[n]["value"] for n in flat_model.latent}))
    return torch.stack(rows)


class _Schedule:
    """The next temperature: by bisection on the ESS, or from the given sequence."""

    def __init__(self, engine: SMC) -> None:
        self.engine = engine
        self.given = None if isinstance(engine.temperatures, str) else list(engine.temperatures)

    def next(self, lik: np.ndarray, beta: float, stage: int) -> float:
        n = len(lik)
        if not np.isfinite(lik).any():
            raise RuntimeError(
                f"SMC: at temperature {beta:.4g} (stage {stage + 1}) all {n} particles have a "
                "non-finite log likelihood; check the model (failed ODE solves, NaN) or its "
                "priors."
            )
        if self.given is not None:
            new_beta = float(self.given.pop(0))
        else:
            new_beta = _smc_math.next_temperature(lik, beta, self.engine.target_ess)
        _smc_math.check_stage_limit(stage + 1, new_beta, self.engine.target_ess, n)
        return new_beta


def _move(
    mover: _Mover, cloud: _Cloud, beta: float, step_size: float, factor: np.ndarray
) -> tuple[_Cloud, float, int]:
    """Up to ``num_mcmc_steps`` moves at ``beta``, preconditioned by the covariance
    factor ``L`` (`_precond.factor`), each particle with its own step, jittered per move (see
    `_smc_math.STEP_JITTER`), as many as `_smc_math.keep_moving` asks for; none at
    ``beta = 0``, where the particles are exact prior draws; at ``beta = 1`` (the
    last stage) up to `_smc_math.final_max_moves`, until decorrelated from the start.
    Returns the cloud, the mean acceptance probability (NaN without moves) and the
    number of moves."""
    engine = mover.engine
    final = beta >= 1.0  # the last stage moves until decorrelated from its start
    if final:
        max_moves = _smc_math.final_max_moves(engine.num_mcmc_steps, engine.adaptive_moves)
    else:
        max_moves = engine.num_mcmc_steps if beta > 0.0 else 0
    if max_moves == 0:
        return cloud, math.nan, 0
    dtype = cloud.u.dtype
    metric = _Metric(factor, dtype)
    start, accepted = cloud.u, list[float]()
    distance = previous = 0.0
    correlation = 1.0 if final else None
    while _smc_math.keep_moving(
        len(accepted),
        distance,
        previous,
        max_moves,
        adaptive=engine.adaptive_moves,
        correlation=correlation,
    ):
        # Each move's step of each particle: jittered afresh (_smc_math.STEP_JITTER).
        uniform = torch.rand(len(cloud.u), generator=mover.gen, dtype=dtype)
        steps = step_size * torch.exp(_smc_math.STEP_JITTER * (2 * uniform - 1))[:, None]
        cloud, accept_prob = mover.step(cloud, beta, steps, metric)
        accepted.append(float(accept_prob.mean()))
        previous = distance
        distance = float((metric.whiten(cloud.u - start) ** 2).sum(-1).mean())
        if final:
            rho = _smc_math.start_correlation(cloud.u.numpy(), start.numpy())
            correlation = float(rho.max())
    return cloud, float(np.mean(accepted)), len(accepted)


def _temper(
    mover: _Mover, u: torch.Tensor, rng: np.random.Generator
) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Stages from the prior draws ``u`` (``beta = 0``) until ``beta = 1``, then one
    more resampling and move at 1. Returns the final particles and the traces.

    Stage ``i`` resamples, moves the particles at ``beta_i`` and reweights them to
    ``beta_{i+1}``, as BlackJAX's tempered SMC on the NumPyro backend; the traces
    are indexed by the temperature the particles were moved at, ``beta_0 = 0, ...,
    beta_K = 1``.
    """
    engine, n = mover.engine, len(u)
    schedule = _Schedule(engine)
    target = _smc_math.target_acceptance(engine.kernel, u.shape[1])
    gain = _smc_math.step_adapt_gain(engine.kernel)
    step_size = _smc_math.initial_step_size(engine.kernel, u.shape[1])
    dense = _precond.use_dense(engine.preconditioner, u.shape[1], n)
    beta, log_w, cloud = 0.0, np.zeros(n), mover.at(u, 0.0)
    traces = StageTraces(n)
    with tqdm(total=1.0, desc="SMC", disable=not engine.progress_bar, bar_format=BAR_FORMAT) as bar:
        for stage in itertools.count():
            # The preconditioner comes from the weighted cloud, before resampling.
            factor = _precond.factor(cloud.u.numpy(), log_w, dense)
            idx = torch.as_tensor(_smc_math.systematic_resample(log_w, rng))
            if beta > 0.0:  # the gradient depends on beta; none is needed at 0
                cloud = mover.at(cloud.u[idx], beta)
            cloud, rate, num_moves = _move(mover, cloud, beta, step_size, factor)
            traces.moved(rate, step_size, num_moves)
            step_size = _smc_math.adapt_step_size(step_size, rate, target, gain=gain)
            if beta >= 1.0:
                break
            lik = cloud.lik.numpy()
            new_beta = schedule.next(lik, beta, stage)
            incremental = np.where(np.isfinite(lik), (new_beta - beta) * lik, -np.inf)
            log_increment = _smc_math.log_evidence_increment(np.zeros(n), incremental)
            log_w = _smc_math.normalize_log_weights(incremental)
            traces.reweighted(new_beta, _smc_math.ess(log_w), log_increment)
            bar.update(new_beta - beta)
            bar.set_postfix(stage=stage + 1, moves=num_moves)
            beta = new_beta
    return cloud.u, traces.arrays()


def run_smc(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: SMC,
    key: int | torch.Generator,
) -> Posterior:
    """Likelihood-tempered SMC; the particles are the draws of one chain.

    See the module docstring for the algorithm. ``attrs["log_evidence"]`` is the
    estimate of ``log p(y)``; ``traces`` hold the per-stage ``temperature`` (ending
    at 1.0), ``acceptance_rate``, ``step_size`` and ``ess`` (before resampling);
    ``sample_stats["log_weight"]`` the particles' normalised log weights (uniform:
    every stage ends with a resampling and a move).

    ``stream="minibatch"`` is registered to `probdyn.pyro.engines.fksmc.run_fksmc`.

    Raises:
        ValueError: for a model with ``param`` sites or without latent sites, or
            NaN/inf in observed data.
    """
    seed = as_seed(key)
    targs, tkwargs = to_torch_args(args, kwargs)
    with isolated(seed):
        trace = trace_model(model, targs, tkwargs)
        observed = check_observed(trace)
        params = sorted(param_sites(trace))
        if params:
            raise ValueError(
                f"SMC(stream='tempered'): the model has param site(s) {params}, which tempered "
                "SMC cannot fit. Give them priors (make them sample sites), fix them with "
                "pyro.poutine.condition/substitute, or use Ensemble or VI."
            )
        flat_model = FlatModel(model, targs, tkwargs, trace, include_params=False)
        if flat_model.dim == 0:
            raise ValueError("fit: the model has no latent sample sites; nothing to infer.")
        begin = time.perf_counter()
        particles = _prior_draws(flat_model, engine.num_particles, sub_seed(seed, 0))
        flat_model.choose_batching(particles)
        reset_failed_solves()
        mover = _Mover(flat_model, engine, torch.Generator().manual_seed(sub_seed(seed, 2)))
        rng = np.random.default_rng(sub_seed(seed, 3))
        final, traces = _temper(mover, particles, rng)
        values = flat_model.constrain(final)[0]
        wall = time.perf_counter() - begin
    n = engine.num_particles
    return build_posterior(
        model=model,
        args=args,
        kwargs=kwargs,
        engine=engine,
        seed=seed,
        latent={name: v.detach().unsqueeze(0) for name, v in values.items()},
        params={},
        observed=observed,
        sample_stats={"log_weight": np.full((1, n), -math.log(n))},
        traces=traces,
        wall_time=wall,
        extra_attrs=tempered_attrs(traces, batched=flat_model.batched),
    )
