"""Open-horizon Feynman–Kac SMC for Pyro models (``SMC(stream="minibatch")``).

The algorithm of Zhao, Mair, Schön and Sjölund (AISTATS 2024), as on the NumPyro
backend (probdyn/numpyro/engines/fksmc.py, whose docstring explains it): one particle
cloud over the latent sites, started from the prior; at every mini-batch the
particles are jittered (Gaussian random walk, sd ``engine.jitter``, in
unconstrained space), reweighted by the batch likelihood, the ``param`` sites
take one Adam step along the particle-weighted Fisher-identity gradient
``(N / B) sum_i w_i grad_psi log p(batch | phi_i, psi)``, and the cloud is
resampled (stratified, `probdyn.engines.smc_math.stratified_resample`).

The data are cut into batches by the rule in `probdyn.engines.fk_stream`, shared with
the NumPyro runner. The particles are rows of one ``(num_particles, D)`` tensor
(`probdyn.pyro.engines.ensemble.FlatModel`), evaluated at once by ``torch.func.vmap``
where the model allows it, else row by row (``attrs["batched"]``). Adam is
``torch.optim.Adam`` (the same update as optax's ``adam``, with PyTorch's default
epsilon 1e-8, as optax's).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro.poutine as poutine
import torch
from tqdm.auto import tqdm

from probdyn.core.engines import SMC
from probdyn.core.posterior import Posterior
from probdyn.engines import fk_stream as streaming
from probdyn.engines import smc_math as _smc_math
from probdyn.engines.fk_stream import RW_VARIANCE
from probdyn.engines.losses import check_final_loss, learning_rate_fix
from probdyn.pyro.bridge import (
    as_seed,
    check_observed,
    is_deterministic,
    is_factor,
    is_plate,
    isolated,
    latent_sites,
    sub_seed,
    to_torch_args,
    trace_model,
)
from probdyn.pyro.engines.smc import _prior_draws
from probdyn.pyro.logdensity import FlatModel, quiet_validation, site_log_prob
from probdyn.pyro.postprocess import build_posterior
from probdyn.pyro.primitives.ode import reset_failed_solves

__all__ = ["RW_VARIANCE", "run_fksmc"]


def _observed(trace: dict[str, Any]) -> dict[str, streaming.ObservedSite]:
    """The observed and factor sites of a trace, described for `probdyn.engines.fk_stream`."""
    out = {}
    for name, site in trace.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        if is_plate(site) or is_deterministic(site):
            continue
        shape = tuple(site["value"].shape)
        event = tuple(site["fn"].event_shape)
        scale = site.get("scale", 1.0)
        out[name] = streaming.ObservedSite(
            rows=int(shape[0]) if shape else 0,
            batch_ndim=len(shape) - len(event),
            frames=tuple((f.name, f.dim, f.size) for f in site["cond_indep_stack"]),
            scaled=not (isinstance(scale, (int, float)) and scale == 1.0),
            is_factor=is_factor(site),
        )
    return out


def _leading(value: Any) -> int | None:
    return int(value.shape[0]) if isinstance(value, torch.Tensor) and value.dim() else None


def _stream(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    observed: dict[str, streaming.ObservedSite],
    batch_size: int,
) -> streaming.Stream:
    """Find the data axis; check that cutting the arguments cuts the observations."""
    n, plates = streaming.data_size(observed)
    streaming.check_batch_size(batch_size, n)
    stream = streaming.find_stream(args, kwargs, n, plates, _leading)
    small = streaming.probe_rows(n, batch_size)
    data = stream.data(args, kwargs, torch.as_tensor)
    b_args, b_kwargs = stream.batch(args, kwargs, data, torch.arange(small))
    try:
        found = _observed(trace_model(model, b_args, b_kwargs))
    except Exception as err:
        raise streaming.cut_failed(n, small, err) from err
    streaming.check_cut(stream, small, found)
    return stream


class _BatchLikelihood(FlatModel):
    """The weighted batch log likelihood of rows ``[latent, params]``, at the batch
    arguments last set with `at`. `terms` gives ``[0, 0, log likelihood]``, so the
    batching probe and `evaluate` of `FlatModel` apply unchanged."""

    def __init__(
        self,
        model: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        trace: dict[str, Any],
        weights: dict[str, float],
    ) -> None:
        super().__init__(model, args, kwargs, trace, include_params=True)
        self.weights = weights

    def at(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _BatchLikelihood:
        self.args, self.kwargs = args, kwargs
        return self

    def terms(
        self,
        flat: torch.Tensor,
        shift: torch.Tensor | None = None,
        jitter: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        values, _ = self.constrain(flat)
        run = poutine.condition(self.model, data={n: values[n] for n in self.latent})
        params = {b.name: values[b.name] for b in self.blocks if b.is_param}
        if params:
            run = poutine.substitute(run, data=params)
        nodes: dict[str, Any] = dict(poutine.trace(run).get_trace(*self.args, **self.kwargs).nodes)
        lik = flat.new_zeros(())
        for name, weight in self.weights.items():
            lik = lik + weight * site_log_prob(nodes[name], nodes[name]["value"])
        zero = flat.new_zeros(())
        return torch.stack([zero, zero, lik])


def run_fksmc(
    model: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], engine: SMC, key: Any
) -> Posterior:
    """Open-horizon Feynman–Kac SMC on a Pyro model (see the module docstring).

    Same contract as the NumPyro runner (`probdyn.numpyro.engines.fksmc.run_fksmc`):
    draws ``(1, num_particles, *event)``, the learned ``param`` values in
    ``params``, uniform ``sample_stats["log_weight"]`` and per-step ``traces``
    ``"log_marginal_increment"``, ``"ess"``, ``"loss"`` and ``"batch_index"``.

    Raises:
        ValueError: for the same bad streaming set-ups as on NumPyro (see
            `probdyn.engines.fk_stream`), or NaN/inf in observed data.

    Example:
        >>> import numpy as np, pyro, pyro.distributions as dist, probdyn
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> engine = probdyn.SMC(num_particles=100, stream="minibatch", batch_size=5,
        ...                      progress_bar=False)
        >>> run_fksmc(model, (np.ones(20),), {}, engine, 0).samples["mu"].shape
        (1, 100)
    """
    batch_size = streaming.check_batch_size(engine.batch_size)
    seed = as_seed(key)
    targs, tkwargs = to_torch_args(args, kwargs)
    with isolated(seed):
        trace = trace_model(model, targs, tkwargs)
        observed = check_observed(trace)
        sites = _observed(trace)
        latent = latent_sites(trace)
        if not latent:
            raise streaming.no_latent_error()
        stream = _stream(model, targs, tkwargs, sites, batch_size)
        streaming.check_global_latents(
            {n: [f.name for f in trace[n]["cond_indep_stack"]] for n in latent}, stream.plates
        )
        weights = streaming.site_weights(sites, stream, batch_size)
        lik = _BatchLikelihood(model, targs, tkwargs, trace, weights)
        prior = FlatModel(model, targs, tkwargs, trace, include_params=False)
        n, p, steps = stream.size, engine.num_particles, stream.size // batch_size
        data = stream.data(targs, tkwargs, torch.as_tensor)
        orders = streaming.batch_orders(sub_seed(seed, 1), n, engine.num_epochs, batch_size)
        reset_failed_solves()
        start = time.perf_counter()

        first = stream.batch(targs, tkwargs, data, torch.as_tensor(orders[0, 0]))
        prior.args, prior.kwargs = first
        z = _prior_draws(prior, p, sub_seed(seed, 0))
        # The params start at their traced (initial) values, unconstrained.
        initial = lik.unconstrain({b.name: trace[b.name]["value"].detach() for b in lik.blocks})
        psi = initial[prior.dim :].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([psi], lr=engine.learning_rate) if psi.numel() else None
        gen = torch.Generator().manual_seed(sub_seed(seed, 2))
        rng = np.random.default_rng(sub_seed(seed, 3))
        lik.at(*first).choose_batching(torch.cat([z, psi.detach().expand(p, -1)], -1))

        log_inc, ess, losses = [], [], []
        bar = tqdm(
            total=engine.num_epochs * steps, disable=not engine.progress_bar, desc="SMC (minibatch)"
        )
        with bar, quiet_validation():
            for epoch in range(engine.num_epochs):
                for step in range(steps):
                    idx = torch.as_tensor(orders[epoch, step])
                    z = z + engine.jitter * torch.randn(z.shape, generator=gen, dtype=z.dtype)
                    rows = torch.cat([z, psi.expand(p, -1)], -1)
                    ll = lik.at(*stream.batch(targs, tkwargs, data, idx)).evaluate(rows)[:, 2]
                    ll = torch.where(torch.isnan(ll), -math.inf, ll)
                    top = torch.logsumexp(ll.detach(), 0)
                    ok = bool(torch.isfinite(top))
                    log_w = ll.detach() - top if ok else torch.full_like(ll, -math.log(p))
                    w = torch.exp(log_w)
                    # -(N/B) sum_i w_i ll_i, with 0 * -inf read as 0 (a dead particle).
                    loss = -(n / batch_size) * (w * torch.where(w > 0, ll, 0.0)).sum()
                    if optimizer is not None and ok:
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
                    ancestors = _smc_math.stratified_resample(log_w.numpy(), rng)
                    z = z[torch.as_tensor(ancestors)]
                    log_inc.append(float(top) - math.log(p))
                    ess.append(_smc_math.ess(log_w.numpy()))
                    losses.append(float(loss.detach()))
                    bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
        wall = time.perf_counter() - start
        if optimizer is not None:  # params learned by Adam: did they diverge?
            check_final_loss(np.asarray(losses), *learning_rate_fix(engine))
        values = prior.constrain(z)[0]
        final = lik.constrain(torch.cat([z[0], psi.detach()]))[0]
        fitted = {b.name: final[b.name] for b in lik.blocks if b.is_param}
    return build_posterior(
        model=model,
        args=args,
        kwargs=kwargs,
        engine=engine,
        seed=seed,
        latent={name: v.detach().unsqueeze(0) for name, v in values.items()},
        params=fitted,
        observed=observed,
        sample_stats={"log_weight": np.full((1, p), -math.log(p))},
        traces={
            "log_marginal_increment": np.asarray(log_inc),
            "ess": np.asarray(ess),
            "loss": np.asarray(losses),
            "batch_index": orders.reshape(-1, batch_size),
        },
        wall_time=wall,
        extra_attrs={"batched": lik.batched},
    )
