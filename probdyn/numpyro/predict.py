"""Running a NumPyro model forward for every posterior draw, in one compiled program."""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from probdyn.engines.checks import (
    check_known_sites,
    check_observed_shapes,
    check_site_names,
    dist_shape,
)
from probdyn.numpyro.bridge import ConcreteValueError, as_key, is_factor, uncondition

if TYPE_CHECKING:
    from probdyn.core.posterior import Posterior

__all__ = ["forward_draws", "predict"]


def _substituted(
    model: Callable[..., Any], draw: dict[str, Any], params: dict[str, Any]
) -> Callable[..., Any]:
    def value_of(msg: dict[str, Any]) -> Any:
        if msg["type"] == "sample" and not msg["is_observed"]:
            return draw.get(msg["name"])
        if msg["type"] == "param":
            # Per-draw param values (ensemble members) take precedence over shared ones.
            return draw[msg["name"]] if msg["name"] in draw else params.get(msg["name"])
        return None

    return handlers.substitute(model, substitute_fn=value_of)


_NEEDS_CONCRETE_DATA = (
    ConcreteValueError,
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)
# Models found to read their arguments' values in Python (weakly held).
_CONCRETE_ONLY: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def _split_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Hashable, list[Any]]:
    """Numeric arrays among the model's arguments (traced, so that a new call with
    other values at the same shapes reuses the compiled program), and a hashable
    description of everything else (compiled in as constants)."""
    leaves, treedef = jax.tree.flatten((args, kwargs))
    dynamic = tuple(
        isinstance(x, (np.ndarray, jax.Array)) and np.dtype(x.dtype).kind in "biufc" for x in leaves
    )
    static = tuple(None if d else x for x, d in zip(leaves, dynamic))
    # The types too: 1, 1.0 and True hash alike but may trace differently.
    types = tuple(type(x) for x in static)
    return (treedef, dynamic, static, types), [x for x, d in zip(leaves, dynamic) if d]


def _join_args(spec: Any, arrays: list[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    treedef, dynamic, static, _types = spec
    values = iter(arrays)
    leaves = [next(values) if d else x for x, d in zip(static, dynamic)]
    args, kwargs = jax.tree.unflatten(treedef, leaves)
    return tuple(args), dict(kwargs)


@functools.lru_cache(maxsize=32)
def _program(body: Callable[..., Any], spec: Hashable) -> Callable[..., Any]:
    """The compiled ``lax.map`` of ``body`` over draws, for one argument structure."""

    def run(keys: jax.Array, flat: Any, params: Any, arrays: list[Any]) -> Any:
        args, kwargs = _join_args(spec, arrays)
        return jax.lax.map(lambda kd: body(kd[0], kd[1], params, args, kwargs), (keys, flat))

    return jax.jit(run)


def _map_draws(
    body: Callable[..., Any],
    key: jax.Array,
    flat: dict[str, Any],
    params: dict[str, Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    num: int | None = None,
) -> Any:
    """``body(key, draw, params, args, kwargs)`` over every draw in one compiled
    program (``num`` runs when there are no draws: an amortised posterior).

    A sequential ``lax.map`` rather than ``vmap``: on CPU, batching adaptive ODE
    solves gains little (every draw waits for the slowest) and compiles several
    times slower. The params enter as arguments, not closure constants: XLA would
    otherwise constant-fold everything that does not depend on the draw (for a neural
    process, its whole encoder: measured at 15 s of compile for 200 tasks).

    ``body`` is a hashable description of the computation (model, sites), so the
    program is compiled once per model and argument shapes and reused by every later
    call (`Posterior.predict` in a loop, ``log_likelihood_at``): measured 0.3 s per
    call for a small BNN before, when each call compiled anew. A model that reads
    its data's values in Python gets them compiled in as constants, as before.
    """
    n = int(np.shape(next(iter(flat.values())))[0]) if flat else (num or 1)
    keys = jax.random.split(key, n)
    spec, arrays = _split_args(args, kwargs)
    model = body.model  # type: ignore[attr-defined]
    try:
        run = None if model in _CONCRETE_ONLY else _program(body, spec)
    except TypeError:  # an unhashable model or argument: compile for this call only
        run = None
    if run is not None:
        try:
            return jax.tree.map(np.asarray, run(keys, flat, params, arrays))
        except _NEEDS_CONCRETE_DATA:
            try:
                _CONCRETE_ONLY.add(model)
            except TypeError:  # not weakly referenceable: it fails over again next call
                pass
    run = jax.jit(
        lambda k, d, p: jax.lax.map(lambda kd: body(kd[0], kd[1], p, args, kwargs), (k, d))
    )
    return jax.tree.map(np.asarray, run(keys, flat, params))


@dataclasses.dataclass(frozen=True)
class _Forward:
    """One draw of `forward_draws`: deterministic sites, pointwise log likelihood
    and replicated data (hashable: it names the compiled program)."""

    model: Callable[..., Any]

    def __call__(
        self,
        k: jax.Array,
        draw: dict[str, Any],
        params: dict[str, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        k1, k2 = jax.random.split(k)
        tr = handlers.trace(handlers.seed(_substituted(self.model, draw, params), k1)).get_trace(
            *args, **kwargs
        )
        det = {n: s["value"] for n, s in tr.items() if s["type"] == "deterministic"}
        loglik, pp = {}, {}
        observed = [
            n
            for n, s in tr.items()
            if s["type"] == "sample" and s["is_observed"] and not is_factor(s)
        ]
        # Shapes are static under jit: checked once, when the program is traced.
        check_observed_shapes({n: (tr[n]["value"], dist_shape(tr[n])) for n in observed})
        # Replicated data comes from the same run's observation distributions, so
        # the model (and any ODE in it) is solved once per draw, not twice.
        for n, kn in zip(observed, jax.random.split(k2, max(len(observed), 1))):
            s = tr[n]
            lp = s["fn"].log_prob(s["value"])
            if s.get("mask") is not None:
                lp = jnp.where(s["mask"], lp, 0.0)
            loglik[n] = lp
            pp[n] = s["fn"].sample(kn)
        return det, loglik, pp


@dataclasses.dataclass(frozen=True)
class _Predict:
    """One draw of `predict`: the requested sites, or every site that is not latent."""

    model: Callable[..., Any]
    latent: frozenset[str]
    sites: tuple[str, ...] | None

    def __call__(
        self,
        k: jax.Array,
        draw: dict[str, Any],
        params: dict[str, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        tr = handlers.trace(
            handlers.seed(_substituted(uncondition(self.model), draw, params), k)
        ).get_trace(*args, **kwargs)
        if self.sites is not None:
            return {n: tr[n]["value"] for n in self.sites}
        return {
            n: s["value"]
            for n, s in tr.items()
            if (s["type"] == "sample" and n not in self.latent and not is_factor(s))
            or s["type"] == "deterministic"
        }


def forward_draws(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    samples: dict[str, np.ndarray],
    params: dict[str, np.ndarray],
    key: Any,
    *,
    latent: set[str],
    num_draws: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Deterministic sites, pointwise log likelihood and posterior predictive per draw.

    ``samples`` are shaped ``(chain, draw, ...)``; only the ``latent`` sites are
    substituted. Without latent sites (an amortised posterior) the model runs
    ``num_draws`` times (default 1). Returns three dicts with the same leading
    ``(chain, draw)``.
    """
    lead = np.shape(samples[next(iter(latent))])[:2] if latent else (1, num_draws or 1)
    flat = {k: jnp.reshape(samples[k], (-1, *np.shape(samples[k])[2:])) for k in latent}
    shared = {k: jnp.asarray(v) for k, v in params.items()}
    det, loglik, pp = _map_draws(
        _Forward(model), as_key(key), flat, shared, args, kwargs, num_draws
    )
    unflat = lambda d: {k: np.asarray(v).reshape(lead + np.shape(v)[1:]) for k, v in d.items()}
    return unflat(det), unflat(loglik), unflat(pp)


def _site_types(
    model: Callable[..., Any], params: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, str]:
    """Site name -> site type, from an abstract trace of the model.

    Under ``jax.eval_shape`` nothing is compiled or solved: an eager trace would
    run the model (and solve its ODEs) op by op, measured at 4-5 s of compile for
    the demo model against none here.
    """
    found: dict[str, str] = {}

    def probe() -> int:
        tr = handlers.trace(handlers.seed(_substituted(uncondition(model), {}, params), 0))
        found.update({n: s["type"] for n, s in tr.get_trace(*args, **kwargs).items()})
        return 0

    jax.eval_shape(probe)
    return found


def predict(
    post: Posterior,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    key: int | jax.Array,
    sites: list[str] | None,
    num_draws: int | None = None,
) -> dict[str, np.ndarray]:
    """`Posterior.predict` for NumPyro models (see there); ``num_draws`` runs for an
    amortised posterior."""
    assert post.model is not None
    model = post.model
    latent = set(post.attrs.get("latent_sites", post.samples))
    lead = (post.num_chains, post.num_draws) if post.samples else (1, num_draws or 1)
    flat = {
        k: jnp.reshape(v, (-1, *np.shape(v)[2:])) for k, v in post.samples.items() if k in latent
    }
    params = {k: jnp.asarray(v) for k, v in post.params.items()}
    if sites is not None:
        check_site_names(sites)
        proto = _site_types(model, params, args, kwargs)
        check_known_sites(sites, proto, sorted(n for n, t in proto.items() if t != "plate"))

    body = _Predict(model, frozenset(latent), None if sites is None else tuple(sites))
    out = _map_draws(body, as_key(key), flat, params, args, kwargs, num_draws)
    return {k: np.asarray(v).reshape(lead + np.shape(v)[1:]) for k, v in out.items()}
