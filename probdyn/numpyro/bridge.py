"""Helpers shared by the NumPyro runners: keys, tracing, checks, versions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions.distribution import Unit
from numpyro.primitives import Messenger

from probdyn.core.assemble import package_versions
from probdyn.engines.checks import check_observed_sites, distribution_class_error
from probdyn.engines.keys import int_key

__all__ = ["as_key", "check_observed", "seed_record", "site_trace", "trace_model", "versions"]


class ConcreteValueError(ValueError):
    """A model argument must be a concrete array, and was traced (inside ``jax.jit``):
    its values decide shapes, e.g. an SDE's step grid from its observation times.
    probdyn's compiled forward pass catches it and compiles the data in instead."""


def as_key(key: Any) -> jax.Array:
    """An int seed or a JAX key -> a JAX PRNG key (raw uint32 layout).

    A seed below ``2**32`` gives ``jax.random.PRNGKey(seed)``, as it always has; a
    larger one (up to ``2**64``, see `probdyn.engines.keys`) the raw key ``[hi, lo]``
    of its two 32-bit halves, which is what ``PRNGKey`` gives with 64-bit JAX (without
    it, ``PRNGKey`` keeps the low half only, so ``2**32`` would repeat seed 0).

    Raises:
        ValueError: for an int seed outside ``[0, 2**64)``.
        TypeError: for anything else than an int seed or a JAX key.
    """
    seed = int_key(key)
    if seed is not None:
        if seed < 2**32:
            return jax.random.PRNGKey(seed)
        return jnp.asarray([seed >> 32, seed & 0xFFFFFFFF], dtype=jnp.uint32)
    if isinstance(key, jax.Array):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            return jax.random.key_data(key)
        if key.shape == (2,) and key.dtype == jnp.uint32:
            return key
    raise TypeError(f"key={key!r}: expected an int seed or a JAX PRNG key (jax.random.key(0)).")


def seed_record(key: Any) -> Any:
    """A JSON-friendly record of the key, for the posterior's metadata."""
    seed = int_key(key)
    if seed is not None:
        return seed
    return [int(v) for v in np.asarray(as_key(key)).ravel()]


def trace_model(
    model: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], key: Any = 0
) -> dict[str, Any]:
    """Run the model once under a seed and return its trace.

    Raises:
        TypeError: naming the site, for a distribution class given to ``sample``.
    """
    try:
        return handlers.trace(handlers.seed(model, as_key(key))).get_trace(*args, **kwargs)
    except TypeError as err:
        better = distribution_class_error(err, "numpyro.primitives")
        if better is None:
            raise
        raise better from err


def site_trace(
    model: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], key: Any = 0
) -> dict[str, Any]:
    """The model's sites as a trace, from an abstract run when that suffices.

    Runs the model once under `jax.eval_shape`: nothing is computed or compiled, so
    this costs the tracing only, where an eager run (`trace_model`) compiles and runs
    every operation one by one (about 2 s for a small BNN on a CPU with cold caches,
    and the sampler traces the model again anyway). The sites' names, types, shapes
    and distributions' shapes are then right, their values abstract. Falls back to
    `trace_model` whenever a caller needs a concrete value: an observed value
    computed inside the model (not the array passed in), a ``param`` site's initial
    value, or a model that needs concrete values to run (Python control flow on a
    sample, NumPy on a traced value).

    Use it for names, roles and shapes only: the distributions of the returned sites
    may hold abstract values, which must not reach a JAX computation.
    """
    captured: dict[str, Any] = {}

    def run() -> None:
        captured.update(trace_model(model, args, kwargs, key))

    try:
        jax.eval_shape(run)
    except (jax.errors.JAXTypeError, jax.errors.JAXIndexError):
        return trace_model(model, args, kwargs, key)
    for site in captured.values():
        abstract = site["type"] == "param" or (
            site["type"] == "sample" and site["is_observed"] and _is_tracer(site["value"])
        )
        if abstract:
            return trace_model(model, args, kwargs, key)
    return captured


def _is_tracer(value: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(value))


def is_factor(site: dict[str, Any]) -> bool:
    return isinstance(site.get("fn"), Unit)


def observed_sites(trace: dict[str, Any]) -> dict[str, Any]:
    return {
        name: site
        for name, site in trace.items()
        if site["type"] == "sample" and site["is_observed"] and not is_factor(site)
    }


def check_observed(trace: dict[str, Any]) -> dict[str, np.ndarray]:
    """Return the observed values; raise if any would be broadcast against their
    distribution, or contain NaN or inf (`probdyn.engines.checks`)."""
    sites = observed_sites(trace)
    out = {name: np.asarray(site["value"]) for name, site in sites.items()}
    check_observed_sites(
        sites,
        out,
        "wrap the sample statement in `with numpyro.handlers.mask(mask={mask}):` or pass "
        "numpyro.sample(..., obs={y}, obs_mask={mask})",
    )
    return out


class uncondition(Messenger):
    """Turn observed sample sites into latent ones, so that they are re-sampled."""

    def process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "sample" and msg["is_observed"] and not is_factor(msg):
            msg["value"] = None
            msg["is_observed"] = False


def versions() -> dict[str, str]:
    """Versions of probdyn and of the packages that produced a posterior."""
    return package_versions(("jax", "numpyro", "diffrax", "equinox", "optax", "arviz"))
