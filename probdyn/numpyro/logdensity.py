"""A NumPyro model as log densities of one flat unconstrained vector, split for tempering.

The vector ``u`` concatenates the latent sites' values in unconstrained space
(the transforms NUTS uses, ``biject_to(site.support)``), raveled in the order of
``jax.flatten_util.ravel_pytree``. Tempered SMC needs the joint density in two
parts:

* ``logprior(u)``: the latent sites' log densities at ``T(u)`` plus
  ``log |det J_T(u)|``;
* ``loglik(u)``: every observed site and every ``factor`` site (scale and mask
  respected), the part that is tempered.

This is the NumPyro counterpart of `probdyn.pyro.engines.ensemble.FlatModel`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.infer.util import (
    _unconstrain_reparam,
    compute_log_probs,
    constrain_fn,
    unconstrain_fn,
)

__all__ = ["FlatModel", "flat_model", "loglik_floor"]


def loglik_floor(dtype: Any) -> float:
    """The value ``loglik`` gives a particle whose log likelihood is not finite,
    ``-finfo(dtype).max / 4`` (see `flat_model`).

    Example:
        >>> import numpy as np
        >>> loglik_floor(np.float32) == float(-np.finfo(np.float32).max / 4)
        True
    """
    return float(-jnp.finfo(dtype).max / 4)


class FlatModel(NamedTuple):
    """A model as functions of one flat unconstrained vector ``u`` of length ``dim``.

    Attributes:
        dim: the length of ``u``.
        prior_draw: a key to a draw of ``u`` from the prior.
        logprior: ``u`` to the latent sites' log density plus ``log |det J|``.
        loglik: ``u`` to the log likelihood; a non-finite value is replaced by a
            huge negative number (see `flat_model`).
        raw_loglik: ``u`` to the log likelihood as the model computes it
            (``-inf`` or NaN where it cannot be computed).
        constrain: ``(N, dim)`` rows to the constrained latent sites,
            ``{site: (N, *shape)}``.
        log_parts: ``u`` to ``(logprior(u), loglik(u))`` from one run of the model,
            so that a program that needs both holds the model (an ODE solve, say) once.
    """

    dim: int
    prior_draw: Callable[[jax.Array], jax.Array]
    logprior: Callable[[jax.Array], jax.Array]
    loglik: Callable[[jax.Array], jax.Array]
    raw_loglik: Callable[[jax.Array], jax.Array]
    constrain: Callable[[jax.Array], dict[str, jax.Array]]
    log_parts: Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def flat_model(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    latent: list[str],
    likelihood_sites: set[str],
) -> FlatModel:
    """The `FlatModel` of ``model(*args, **kwargs)``; pure functions, ready for ``jax.jit``.

    ``loglik`` maps a non-finite log likelihood to ``bad = -finfo.max / 4``
    (`loglik_floor`): the weight ``exp(delta * bad)`` of such a particle is 0 (never
    NaN), yet ``0 * bad`` is 0, so the tempered density at temperature 0 and the ESS
    bisection stay finite, and MCMC moves leave the particle.

    Args:
        model: the NumPyro model.
        args, kwargs: its arguments (closed over).
        latent: the latent sample sites, in trace order.
        likelihood_sites: the observed sample sites, ``factor`` sites included.

    Example:
        >>> import jax, numpyro, numpyro.distributions as dist
        >>> def model(y):
        ...     s = numpyro.sample("s", dist.HalfNormal(1.0))
        ...     numpyro.sample("y", dist.Normal(0.0, s), obs=y)
        >>> fm = flat_model(model, (1.0,), {}, ["s"], {"y"})
        >>> fm.dim, fm.prior_draw(jax.random.PRNGKey(0)).shape
        (1, (1,))
    """

    def prior_values(key: jax.Array) -> dict[str, jax.Array]:
        tr = handlers.trace(handlers.seed(model, key)).get_trace(*args, **kwargs)
        return {name: tr[name]["value"] for name in latent}

    def unconstrained(key: jax.Array) -> dict[str, jax.Array]:
        return unconstrain_fn(model, args, kwargs, prior_values(key))

    template = jax.eval_shape(unconstrained, jax.random.PRNGKey(0))
    _, unravel = ravel_pytree(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), template))
    dim = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(template))

    def prior_draw(key: jax.Array) -> jax.Array:
        return ravel_pytree(unconstrained(key))[0]

    def log_parts(u: jax.Array) -> tuple[jax.Array, jax.Array]:
        substituted = handlers.substitute(
            model, substitute_fn=partial(_unconstrain_reparam, unravel(u))
        )
        log_probs, _ = compute_log_probs(substituted, args, kwargs, {})
        prior = sum((v for k, v in log_probs.items() if k not in likelihood_sites), start=0.0)
        lik = sum((v for k, v in log_probs.items() if k in likelihood_sites), start=0.0)
        return jnp.asarray(prior), jnp.asarray(lik)

    def logprior(u: jax.Array) -> jax.Array:
        return log_parts(u)[0]

    def raw_loglik(u: jax.Array) -> jax.Array:
        return log_parts(u)[1]

    def loglik(u: jax.Array) -> jax.Array:
        ll = raw_loglik(u)
        return jnp.where(jnp.isfinite(ll), ll, loglik_floor(ll.dtype))

    def constrain(particles: jax.Array) -> dict[str, jax.Array]:
        return jax.vmap(lambda u: constrain_fn(model, args, kwargs, unravel(u)))(particles)

    def both(u: jax.Array) -> tuple[jax.Array, jax.Array]:
        prior, ll = log_parts(u)
        return prior, jnp.where(jnp.isfinite(ll), ll, loglik_floor(ll.dtype))

    return FlatModel(dim, prior_draw, logprior, loglik, raw_loglik, constrain, both)
