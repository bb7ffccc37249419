"""Deep ensembles for Pyro models: ``num_members`` MAP fits run side by side.

Every member is a row of one ``(num_members, D)`` tensor of unconstrained
coordinates (latent sites, then ``param`` sites, flattened; see `FlatModel`),
optimised by one vectorised Adam, AdamW or SGD update (`_MemberOptimizer`, the
formulas of optax, which the NumPyro runner uses) whose state (moments, step
counter, hence learning rate and bias correction) is per member, so the rows are
independent fits that share one backward pass. The loss of member ``k`` is minus
its log joint density in constrained space (log prior + log likelihood, no
Jacobian: a MAP estimate, as Pyro's ``AutoDelta``), computed here from a trace, so
that the anchored terms can replace the model's own.

Batching: all members' losses come from one ``torch.func.vmap`` over a single
member's log joint, which works for any model written for one draw (a network's
``x @ weight`` included) whose code has no data-dependent Python control flow. A
model that cannot be vmapped (an adaptive ODE solver decides its steps in Python)
or gives a different value under vmap than alone is run once per member instead;
``attrs["batched"]`` says which happened.

Initialisation and anchors follow the NumPyro runner: a member starts at ``m +
init_scale * N(0, 1)`` per unconstrained element, ``m`` the prior median (param
sites: their initial value). The median is exact where the prior's base
distribution is univariate with an ``icdf``, the mean for a multivariate one,
else the median of 2001 draws in unconstrained space; a site's median is taken
with its parents at their medians. Anchored member ``k`` draws ``theta_k`` from
the prior (under a seed of its own, so it does not depend on ``num_members``),
evaluates each latent prior term at ``T(u - T^-1(theta_k) + m)``, and shifts the
observations of every Gaussian site (Normal, MultivariateNormal,
LowRankMultivariateNormal, inside Independent / expand / mask) by one draw of
its noise at ``theta_k``; other observed sites and factors are left as they are,
with one ``UserWarning`` naming them. Steps whose loss or gradient is not finite
leave that member (its values and its whole optimiser state, step counter
included) unchanged, as in the NumPyro runner; members that end
non-finite are kept and counted in a ``RuntimeWarning``.

This module also holds `FlatModel`, the model as a function of a flat
unconstrained vector, which the SMC runner (``_smc.py``) shares.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro.distributions as dist
import torch
from pyro.infer.autoguide.initialization import InitMessenger
from torch.distributions import biject_to
from tqdm.auto import tqdm

from probdyn.core.engines import Ensemble
from probdyn.core.posterior import Posterior
from probdyn.engines.checks import check_ensemble_fittable
from probdyn.engines.ensemble_warnings import warn_non_finite, warn_not_jittered
from probdyn.engines.losses import check_final_loss, learning_rate_fix
from probdyn.pyro.bridge import (
    as_seed,
    check_observed,
    is_deterministic,
    is_factor,
    isolated,
    latent_sites,
    observed_sites,
    sub_seed,
    to_torch_args,
    trace_model,
)
from probdyn.pyro.logdensity import FlatModel
from probdyn.pyro.postprocess import build_posterior
from probdyn.pyro.primitives.ode import reset_failed_solves

__all__ = ["prior_medians", "run_ensemble"]

_WRAPPERS = (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)
_GAUSSIAN = (
    torch.distributions.Normal,
    torch.distributions.MultivariateNormal,
    torch.distributions.LowRankMultivariateNormal,
)
_MEDIAN_DRAWS = 2001


# -- Prior medians and anchors ---------------------------------------------------------


def _unwrap(fn: Any) -> Any:
    while isinstance(fn, _WRAPPERS):
        fn = fn.base_dist
    return fn


def _median(site: dict[str, Any]) -> torch.Tensor:
    """The prior median of a site: exact through ``icdf(0.5)`` where the base
    distribution is univariate and has one; the mean for a multivariate one (the
    median of a symmetric one); else the median of 2001 draws in unconstrained
    space. (An anchored member is exact only if its prior is centred exactly.)"""
    fn = site["fn"]
    shape = tuple(fn.shape())
    base = _unwrap(fn)
    with torch.no_grad():
        try:
            if base.event_shape:
                value = base.mean
            else:
                value = base.icdf(torch.full((), 0.5, dtype=base.mean.dtype))
            if bool(torch.isfinite(value).all()):
                return torch.broadcast_to(value, shape).clone()
        except (NotImplementedError, AttributeError, ValueError, RuntimeError):
            pass
        transform = biject_to(fn.support)
        draws = transform.inv(fn.sample((_MEDIAN_DRAWS,)))
        return transform(draws.median(dim=0).values)  # type: ignore[no-any-return]


def prior_medians(
    model: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Constrained prior medians of every latent site, down the model (a child's
    median is taken given its parents at their medians), and the ``param`` sites'
    initial values."""
    tr = trace_model(InitMessenger(_median)(model), args, kwargs)
    names = latent_sites(tr) + [n for n, s in tr.items() if s["type"] == "param"]
    return {n: tr[n]["value"].detach() for n in names}


def _is_gaussian(fn: Any) -> bool:
    return isinstance(_unwrap(fn), _GAUSSIAN)


def _anchors(
    flat_model: FlatModel, seed: int, num_members: int, median: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per member: the shift ``T^-1(theta_k) - m`` (unconstrained prior draw minus
    prior median; zero on param sites) and one draw of the observation noise,
    ``fn.sample() - fn.mean`` at ``theta_k``, of every Gaussian observed site."""
    shifts, jitters = [], []
    for k in range(num_members):
        torch.default_generator.manual_seed(
            sub_seed(seed, 5, k)
        )  # member k's anchor does not depend on K
        tr = trace_model(flat_model.model, flat_model.args, flat_model.kwargs)
        shift = torch.zeros_like(median)
        for b in flat_model.blocks:
            if not b.is_param:
                theta = b.transform.inv(tr[b.name]["value"]).reshape(-1)
                shift[b.start : b.stop] = theta - median[b.start : b.stop]
        shifts.append(shift)
        with torch.no_grad():
            jitters.append(
                {
                    n: s["fn"].sample() - s["fn"].mean
                    for n, s in observed_sites(tr).items()
                    if _is_gaussian(s["fn"])
                }
            )
    names = jitters[0].keys()
    return torch.stack(shifts), {n: torch.stack([j[n] for j in jitters]) for n in names}


def _warn_unjittered(trace: dict[str, Any]) -> None:
    others = sorted(
        n
        for n, s in trace.items()
        if s["type"] == "sample"
        and s["is_observed"]
        and not is_deterministic(s)
        and (is_factor(s) or not _is_gaussian(s["fn"]))
    )
    warn_not_jittered(others)


# -- The runner ------------------------------------------------------------------------


class _MemberOptimizer:
    """Adam, AdamW or SGD with every member's state its own, as optax's state is
    per member in the NumPyro runner (which vmaps ``optimizer.update``).

    Each member ``k`` has its own step counter ``c_k``, which sets both its
    learning rate ``lr * final_learning_rate_fraction ** (c_k / num_steps)`` and
    Adam's bias correction; a member whose step is skipped (non-finite loss or
    gradient) keeps its values, moments and counter, so it resumes exactly where
    it stopped. The updates follow optax's formulas (``adam``: b1 0.9, b2 0.999,
    eps 1e-8; ``adamw``: the same plus optax's default weight decay 1e-4 times the
    value, inside the learning rate; ``sgd``: no momentum).
    """

    b1, b2, eps, weight_decay = 0.9, 0.999, 1e-8, 1e-4

    def __init__(self, engine: Ensemble, flat: torch.Tensor) -> None:
        self.kind = engine.optimizer
        self.lr = engine.learning_rate
        self.fraction = engine.final_learning_rate_fraction
        self.num_steps = engine.num_steps
        self.count = torch.zeros(len(flat), dtype=flat.dtype)
        self.m = torch.zeros_like(flat)
        self.v = torch.zeros_like(flat)

    @torch.no_grad()
    def step(self, flat: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor) -> None:
        """Update the rows of ``flat`` ``(K, D)`` in place from ``grad`` ``(K, D)``,
        skipping each member whose ``loss`` ``(K,)`` or gradient is not finite."""
        keep = torch.isfinite(loss) & torch.isfinite(grad).all(dim=-1)
        lr = self.lr * self.fraction ** (self.count / self.num_steps)
        if self.kind == "sgd":
            direction = grad
        else:
            count = self.count + 1
            m = (1 - self.b1) * grad + self.b1 * self.m
            v = (1 - self.b2) * grad**2 + self.b2 * self.v
            m_hat = m / (1 - self.b1**count)[:, None]
            v_hat = v / (1 - self.b2**count)[:, None]
            direction = m_hat / (v_hat.sqrt() + self.eps)
            if self.kind == "adamw":
                direction = direction + self.weight_decay * flat
            self.m = torch.where(keep[:, None], m, self.m)
            self.v = torch.where(keep[:, None], v, self.v)
        flat.copy_(torch.where(keep[:, None], flat - lr[:, None] * direction, flat))
        self.count = self.count + keep.to(self.count.dtype)


def _optimise(
    engine: Ensemble,
    flat_model: FlatModel,
    flat: torch.Tensor,
    shift: torch.Tensor | None,
    jitter: dict[str, torch.Tensor] | None,
) -> np.ndarray:
    """Minimise every member's negative log joint, updating ``flat`` ``(K, D)`` in
    place; returns the ``(K, num_steps)`` loss trace (the loss before each step)."""
    opt = _MemberOptimizer(engine, flat)
    losses = np.empty((len(flat), engine.num_steps))
    block = max(1, engine.num_steps // 50)  # progress bar refreshes per block of steps
    with tqdm(total=engine.num_steps, disable=not engine.progress_bar, desc="Ensemble") as bar:
        for step in range(engine.num_steps):
            t = flat_model.evaluate(flat, shift, jitter)
            loss = -(t[:, 0] + t[:, 2])
            (grad,) = torch.autograd.grad(loss.sum(), flat)
            opt.step(flat, grad, loss.detach())
            losses[:, step] = loss.detach().numpy()
            if (step + 1) % block == 0 or step + 1 == engine.num_steps:
                bar.update(step + 1 - bar.n)
                finite = losses[:, step][np.isfinite(losses[:, step])]
                shown = float(np.median(finite)) if finite.size else np.nan
                bar.set_postfix(loss=f"{shown:.4g}")
    return losses


def run_ensemble(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: Ensemble,
    key: int | torch.Generator,
) -> Posterior:
    """Fit ``engine.num_members`` MAP estimates; they are the draws of one chain.

    See `probdyn.Ensemble` for the algorithm and the module docstring for the
    batching. ``traces["loss"]`` is ``(num_members, num_steps)``, the objective
    minimised before each step (the anchored one for anchored members);
    ``sample_stats["lp"]`` the model's own log joint (un-anchored, constrained
    space, no Jacobian) at each member's final values. Steps whose loss or
    gradient is not finite are skipped for that member.

    Raises:
        ValueError: for a model without latent or ``param`` sites, or NaN/inf in
            observed data.
    """
    seed = as_seed(key)
    targs, tkwargs = to_torch_args(args, kwargs)
    k = engine.num_members
    with isolated(seed):
        trace = trace_model(model, targs, tkwargs)
        observed = check_observed(trace)
        flat_model = FlatModel(model, targs, tkwargs, trace, include_params=True)
        check_ensemble_fittable(flat_model.dim > 0, "pyro")
        if engine.anchored:
            _warn_unjittered(trace)
        dtype = trace[flat_model.blocks[0].name]["value"].dtype
        flat = torch.zeros((k, flat_model.dim), dtype=dtype, requires_grad=True)
        begin = time.perf_counter()
        torch.default_generator.manual_seed(sub_seed(seed, 3))
        median = flat_model.unconstrain(prior_medians(model, targs, tkwargs))
        shift, jitter = None, None
        if engine.anchored:
            shift, jitter = _anchors(flat_model, seed, k, median)
        gen = torch.Generator().manual_seed(sub_seed(seed, 4))
        noise = torch.randn((k, flat_model.dim), generator=gen, dtype=dtype)
        with torch.no_grad():
            flat.copy_(median + engine.init_scale * noise)
        flat_model.choose_batching(flat.detach(), shift, jitter)
        reset_failed_solves()
        losses = _optimise(engine, flat_model, flat, shift, jitter)
        with torch.no_grad():
            t = flat_model.evaluate(flat.detach())
            values = flat_model.constrain(flat.detach())[0]
        wall = time.perf_counter() - begin
    lp = (t[:, 0] + t[:, 2]).numpy()
    check_final_loss(losses, *learning_rate_fix(engine))
    warn_non_finite(losses, lp)
    return build_posterior(
        model=model,
        args=args,
        kwargs=kwargs,
        engine=engine,
        seed=seed,
        latent={n: v.unsqueeze(0) for n, v in values.items()},
        params={},
        observed=observed,
        sample_stats={"lp": lp[None]},
        traces={"loss": losses},
        wall_time=wall,
        extra_attrs={"batched": flat_model.batched},
    )
