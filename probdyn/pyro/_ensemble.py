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

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.autoguide.initialization import InitMessenger
from torch.distributions import biject_to, constraints
from tqdm.auto import tqdm

from probdyn._engines import Ensemble
from probdyn._ensemble_warnings import warn_non_finite, warn_not_jittered
from probdyn._posterior import Posterior
from probdyn.pyro._build import build_posterior
from probdyn.pyro._ode import reset_failed_solves
from probdyn.pyro._util import (
    as_seed,
    check_observed,
    is_deterministic,
    is_factor,
    is_plate,
    isolated,
    latent_sites,
    observed_sites,
    sub_seed,
    to_torch_args,
    trace_model,
)

__all__ = ["FlatModel", "prior_medians", "run_ensemble"]

_WRAPPERS = (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)
_GAUSSIAN = (
    torch.distributions.Normal,
    torch.distributions.MultivariateNormal,
    torch.distributions.LowRankMultivariateNormal,
)
_MEDIAN_DRAWS = 2001


# -- A model as a function of one flat unconstrained vector (shared with _smc.py) ------


@dataclasses.dataclass(frozen=True)
class _Block:
    """Where one site lives in the flat vector, and how to constrain it."""

    name: str
    is_param: bool
    transform: Any  # torch Transform: unconstrained -> constrained
    shape: tuple[int, ...]  # constrained
    ushape: tuple[int, ...]  # unconstrained
    start: int
    stop: int


class FlatModel:
    """A Pyro model as a function of one flat unconstrained vector per draw.

    The vector is the concatenation of the latent sites' unconstrained values
    (and, with ``include_params``, the ``param`` sites'), in trace order.
    `terms` gives, for one vector, ``[log prior, log|det J|, log likelihood]``:
    the prior sums the latent sites' log densities in constrained space, the
    likelihood the observed and ``factor`` sites' (scaled and masked as Pyro does).
    `evaluate` does it for a batch of rows, by ``torch.func.vmap`` when the model
    allows it (`choose_batching` decides), else row by row.

    Args:
        model: the Pyro model.
        args, kwargs: its arguments (tensors).
        trace: one trace of the model (`trace_model`), fixing the sites.
        include_params: also put the ``param`` sites in the vector.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        trace: dict[str, Any],
        *,
        include_params: bool,
    ) -> None:
        self.model, self.args, self.kwargs = model, args, kwargs
        names = latent_sites(trace)
        discrete = [n for n in names if trace[n]["fn"].support.is_discrete]
        if discrete:
            raise ValueError(
                f"fit: latent site(s) {discrete} are discrete; Ensemble and SMC move "
                "continuous values only. Marginalise them out of the model (or use NUTS with "
                "enumeration)."
            )
        if include_params:
            names += [n for n, s in trace.items() if s["type"] == "param"]
        blocks, start = [], 0
        for name in names:
            site = trace[name]
            is_param = site["type"] == "param"
            support = (site["kwargs"] or {}).get("constraint") if is_param else None
            transform = biject_to((support or constraints.real) if is_param else site["fn"].support)
            value = site["value"].detach()
            ushape = tuple(transform.inv(value).shape)
            size = int(np.prod(ushape, dtype=np.int64))
            blocks.append(
                _Block(name, is_param, transform, tuple(value.shape), ushape, start, start + size)
            )
            start += size
        self.blocks: tuple[_Block, ...] = tuple(blocks)
        self.dim = start
        self.latent = [b.name for b in self.blocks if not b.is_param]
        self.batched = False

    def constrain(
        self, flat: torch.Tensor, shift: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Rows ``(..., D)`` -> constrained values ``(..., *shape)`` per site and the
        summed ``log|det J|`` ``(...)`` of the latent sites. With ``shift``, the values
        of ``flat - shift`` instead (and no Jacobian)."""
        lead = tuple(flat.shape[:-1])
        values, logdet = {}, flat.new_zeros(lead)
        for b in self.blocks:
            u = flat[..., b.start : b.stop].reshape(lead + b.ushape)
            if shift is not None:
                u = u - shift[..., b.start : b.stop].reshape(lead + b.ushape)
            z = b.transform(u)
            values[b.name] = z
            if shift is None and not b.is_param:
                ladj = b.transform.log_abs_det_jacobian(u, z)
                logdet = logdet + ladj.reshape((*lead, -1)).sum(-1)
        return values, logdet

    def unconstrain(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Constrained values ``(..., *shape)`` per site -> rows ``(..., D)``."""
        parts = []
        for b in self.blocks:
            v = torch.as_tensor(values[b.name])
            lead = tuple(v.shape[: v.dim() - len(b.shape)])
            parts.append(b.transform.inv(v).reshape((*lead, -1)))
        return torch.cat(parts, dim=-1)

    def terms(
        self,
        flat: torch.Tensor,
        shift: torch.Tensor | None = None,
        jitter: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``[log prior, log|det J|, log likelihood]`` of one row ``(D,)``.

        ``shift`` (``(D,)``, unconstrained) evaluates each latent site's prior
        density at ``z(u - shift)`` instead of ``z(u)``; ``jitter`` adds noise to
        named observations before their likelihood is evaluated (anchored ensembles).
        """
        values, logdet = self.constrain(flat)
        shifted = values if shift is None else self.constrain(flat, shift)[0]
        run = poutine.condition(self.model, data={n: values[n] for n in self.latent})
        params = {b.name: values[b.name] for b in self.blocks if b.is_param}
        if params:
            run = poutine.substitute(run, data=params)
        nodes: dict[str, Any] = dict(poutine.trace(run).get_trace(*self.args, **self.kwargs).nodes)
        prior, lik = flat.new_zeros(()), flat.new_zeros(())
        for name, site in nodes.items():
            if site["type"] != "sample" or is_plate(site) or is_deterministic(site):
                continue
            if name in values:  # a latent site (conditioned, so marked observed)
                prior = prior + _site_log_prob(site, shifted[name])
            elif not site["is_observed"]:
                raise ValueError(
                    f"fit: the model drew latent site {name!r}, which its first run did "
                    "not have. Ensemble and SMC need a fixed set of sites."
                )
            else:
                obs = site["value"]
                if jitter is not None and name in jitter:
                    obs = obs + jitter[name]
                lik = lik + _site_log_prob(site, obs)
        return torch.stack([prior, logdet, lik])

    def evaluate(
        self,
        flat: torch.Tensor,
        shift: torch.Tensor | None = None,
        jitter: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`terms` of every row of ``flat`` ``(K, D)`` -> ``(K, 3)``; ``shift`` and
        ``jitter`` carry the same leading ``K``."""
        with _quiet_validation():
            if self.batched:
                dims = (0, None if shift is None else 0, None if jitter is None else 0)
                fn = torch.func.vmap(self.terms, in_dims=dims, randomness="same")
                return fn(flat, shift, jitter)  # type: ignore[no-any-return]
            return torch.stack(
                [self.terms(*_row(k, flat, shift, jitter)) for k in range(len(flat))]
            )

    def choose_batching(
        self,
        flat: torch.Tensor,
        shift: torch.Tensor | None = None,
        jitter: dict[str, torch.Tensor] | None = None,
    ) -> bool:
        """Try the vmapped evaluation on these rows; keep it if it runs without an
        error or warning and matches the row-by-row values of the first and last
        rows. Sets and returns ``self.batched``."""
        self.batched = False
        with torch.no_grad():
            rows = [0, len(flat) - 1]
            ref = torch.stack([self.terms(*_row(k, flat, shift, jitter)) for k in rows])
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    self.batched = True
                    out = self.evaluate(flat, shift, jitter)
                ok = tuple(out.shape) == (len(flat), 3) and _same(out[rows], ref)
            except Exception:
                ok = False
        self.batched = bool(ok)
        return self.batched


def _row(
    k: int, flat: torch.Tensor, shift: torch.Tensor | None, jitter: dict[str, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None]:
    return (
        flat[k],
        None if shift is None else shift[k],
        None if jitter is None else {n: v[k] for n, v in jitter.items()},
    )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-6, atol=1e-8, equal_nan=True))


def _site_log_prob(site: dict[str, Any], value: torch.Tensor) -> torch.Tensor:
    lp = site["fn"].log_prob(value, *site["args"], **site["kwargs"])
    return scale_and_mask(lp, site["scale"], site["mask"]).sum()


@contextlib.contextmanager
def _quiet_validation() -> Iterator[None]:
    # Distribution argument checks branch on tensor values, which vmap cannot do;
    # the values evaluated here are constrained by construction and the observed
    # ones were checked when the model was first traced.
    with pyro.validation_enabled(False):
        yield


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
    key: Any,
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
        if flat_model.dim == 0:
            raise ValueError(
                "fit(engine=Ensemble(...)): the model has no latent sample sites or params; "
                "nothing to fit. Add a pyro.sample site without obs= or a pyro.param site."
            )
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
