"""Running a Pyro model forward for every posterior draw.

The draws are looped over in Python, one model run each (under ``torch.no_grad``):
a model with a neural ODE inside cannot be vectorised over weight draws, and for
the small models probdyn targets a model run costs far less than a gradient step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro.poutine as poutine
import torch

from probdyn.engines.checks import (
    check_known_sites,
    check_observed_shapes,
    check_site_names,
    dist_shape,
)
from probdyn.pyro.bridge import (
    as_seed,
    is_deterministic,
    is_factor,
    is_plate,
    isolated,
    observed_sites,
    to_numpy,
    to_torch_args,
    torch_seed,
    trace_model,
    uncondition,
    with_params,
)

if TYPE_CHECKING:
    from probdyn.core.posterior import Posterior

__all__ = ["forward_draws", "predict"]


def _flat_draws(
    samples: dict[str, Any], latent: set[str], num: int | None = None
) -> tuple[tuple[int, ...], list[dict]]:
    """``(chain, draw)`` and one dict of tensors per draw, in chain-major order
    (``num`` empty draws, default 1, without latent sites: an amortised posterior)."""
    if not latent:
        return (1, num or 1), [{} for _ in range(num or 1)]
    lead = tuple(np.shape(samples[next(iter(latent))])[:2])
    flat = {k: torch.as_tensor(np.asarray(samples[k])).flatten(0, 1) for k in latent}
    return lead, [{k: v[i] for k, v in flat.items()} for i in range(lead[0] * lead[1])]


def _stack(rows: list[dict[str, torch.Tensor]], lead: tuple[int, ...]) -> dict[str, np.ndarray]:
    if not rows:
        return {}
    return {
        name: to_numpy(torch.stack([torch.as_tensor(r[name]) for r in rows])).reshape(
            lead + tuple(np.shape(rows[0][name]))
        )
        for name in rows[0]
    }


def _pointwise_log_prob(site: dict[str, Any]) -> torch.Tensor:
    """Log likelihood of each observation (event dims summed), zero where masked."""
    lp = site["fn"].log_prob(site["value"])
    mask = site.get("mask")
    if mask is not None:
        lp = torch.where(torch.as_tensor(mask), lp, torch.zeros((), dtype=lp.dtype))
    return lp


def forward_draws(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    samples: dict[str, Any],
    params: dict[str, Any],
    seed: Any,
    *,
    latent: set[str],
    num_draws: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Deterministic sites, pointwise log likelihood and posterior predictive per draw.

    ``samples`` are shaped ``(chain, draw, ...)``; only the ``latent`` sites are
    substituted. ``seed`` is an int or a ``torch.Generator``. Returns three dicts
    with the same leading ``(chain, draw)``.
    """
    seed = as_seed(seed)
    args, kwargs = to_torch_args(args, kwargs)
    lead, draws = _flat_draws(samples, latent, num_draws)
    det_rows, ll_rows, pp_rows = [], [], []
    with isolated(seed), torch.no_grad():
        for i, draw in enumerate(draws):
            # Per-draw param values (ensemble members) take precedence over shared ones;
            # substitute only touches param sites, so the latent values are harmless there.
            fixed = with_params(model, {**params, **draw})
            tr = trace_model(poutine.condition(fixed, data=draw), args, kwargs)
            det_rows.append({n: s["value"] for n, s in tr.items() if is_deterministic(s)})
            obs = {n: s for n, s in observed_sites(tr).items() if n not in latent}
            if i == 0:  # the shapes are the same for every draw
                check_observed_shapes({n: (s["value"], dist_shape(s)) for n, s in obs.items()})
            # Replicated data comes from the same run's observation distributions, so
            # the model (and any ODE in it) is solved once per draw, not twice.
            ll_rows.append({n: _pointwise_log_prob(s) for n, s in obs.items()})
            pp_rows.append({n: s["fn"].sample() for n, s in obs.items()})
    return _stack(det_rows, lead), _stack(ll_rows, lead), _stack(pp_rows, lead)


def _check_sites(
    sites: Any, model: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Raise unless ``sites`` names sample sites (deterministic ones included) of the model."""
    check_site_names(sites)
    with isolated(0):
        proto = trace_model(uncondition()(model), args, kwargs)
    available = sorted(n for n, s in proto.items() if s["type"] == "sample" and not is_plate(s))
    check_known_sites(sites, available, available)


def predict(
    post: Posterior,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    key: int | torch.Generator,
    sites: list[str] | None,
    num_draws: int | None = None,
) -> dict[str, np.ndarray]:
    """`Posterior.predict` for Pyro models (see there); ``num_draws`` runs for an
    amortised posterior."""
    assert post.model is not None
    seed = as_seed(key)
    args, kwargs = to_torch_args(args, kwargs)
    latent = set(post.attrs.get("latent_sites", post.samples))
    model = with_params(post.model, post.params)
    if sites is not None:
        _check_sites(sites, model, args, kwargs)
    lead, draws = _flat_draws(post.samples, latent, num_draws)
    rows = []
    # A user's key: all 64 bits reach torch (`torch_seed`; unchanged below 2**32).
    with isolated(torch_seed(seed)), torch.no_grad():
        for draw in draws:
            model_d = with_params(post.model, {**post.params, **draw})  # as in forward_draws
            tr = trace_model(poutine.condition(uncondition()(model_d), data=draw), args, kwargs)
            if sites is not None:
                rows.append({n: tr[n]["value"] for n in sites})
            else:
                rows.append(
                    {
                        n: s["value"]
                        for n, s in tr.items()
                        if s["type"] == "sample"
                        and n not in latent
                        and not is_plate(s)
                        and not is_factor(s)
                    }
                )
    return _stack(rows, lead)
