"""Where the chains of a NumPyro sampler start (NUTS, HMC, MCLMC).

``init="median"`` and ``"sample"`` are the kernel's own init strategies; ``"map"``
starts every chain at a MAP estimate (jittered), and a `Posterior` (a VI fit, or the
deep ensemble that ``init="ensemble"`` fits first, see `probdyn.fit`) starts one
chain at each of its draws, spread evenly over them. The starts are returned in the
unconstrained space the kernels work in, stacked along a leading chain axis when
there are several chains.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from numpyro import handlers
from numpyro.infer.util import constrain_fn, unconstrain_fn

from probdyn.core.posterior import Posterior
from probdyn.engines.mcmc import posterior_starts
from probdyn.numpyro.engines.map import map_estimate

__all__ = ["chain_starts"]


def chain_starts(
    init: Any,
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    latent: Sequence[str],
    param_sites: Sequence[str],
    num_chains: int,
    key: jax.Array,
) -> tuple[Callable[..., Any], Any, dict[str, Any]]:
    """The model to run, the chains' unconstrained starts and the params held fixed.

    Args:
        init: the engine's ``init`` (a strategy name or a `Posterior`).
        model, args, kwargs: the model and its arguments.
        latent: the model's latent sample sites.
        param_sites: the model's ``param`` sites.
        num_chains: number of chains.
        key: PRNG key for the MAP fit and its jitter.

    Returns:
        ``(model, init_params, fixed)``: for ``"median"``/``"sample"`` the model
        itself, None (the kernel's init strategy applies) and ``{}``; otherwise the
        model with ``fixed`` params substituted and the unconstrained starts, one
        per chain along a leading axis (no axis for one chain).

    Raises:
        ValueError: a `Posterior` start lacks a latent site, or holds per-draw values
            of a ``param`` site (an `Ensemble` fit of a model with ``param`` sites:
            each member fitted its own, and a sampler holds one set fixed).
    """
    if isinstance(init, str) and init != "map":
        return model, None, {}
    if isinstance(init, str):
        values, fixed = _from_map(model, args, kwargs, latent, num_chains, key)
    else:
        values, fixed = _from_posterior(init, latent, param_sites, num_chains)
    run_model = handlers.substitute(model, data=fixed) if fixed else model
    per_chain = [unconstrain_fn(run_model, args, kwargs, v) for v in values]
    if len(per_chain) == 1:
        return run_model, per_chain[0], fixed
    return run_model, jax.tree.map(lambda *xs: jnp.stack(xs), *per_chain), fixed


def _from_posterior(
    init: Posterior, latent: Sequence[str], param_sites: Sequence[str], num_chains: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One start per chain from the posterior's draws, spread over them."""
    values, params = posterior_starts(init, list(latent), num_chains, param_sites)
    starts = [{s: jnp.asarray(v) for s, v in row.items()} for row in values]
    return starts, {k: jnp.asarray(v) for k, v in params.items()}


def _from_map(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    latent: Sequence[str],
    num_chains: int,
    key: jax.Array,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every chain starts at the MAP estimate, jittered by 1e-2 in unconstrained
    space so that chains are distinct (and R-hat means something)."""
    values, params = map_estimate(model, args, kwargs, key)
    model = handlers.substitute(model, data=params) if params else model
    centre = unconstrain_fn(model, args, kwargs, {s: values[s] for s in latent})
    out = []
    for k in jax.random.split(key, num_chains):
        leaves, tree = jax.tree.flatten(centre)
        ks = jax.random.split(k, len(leaves))
        jittered = [x + 1e-2 * jax.random.normal(kk, jnp.shape(x)) for x, kk in zip(leaves, ks)]
        out.append(constrain_fn(model, args, kwargs, jax.tree.unflatten(tree, jittered)))
    return out, params
