"""How many particles or ensemble members one vectorised call takes, and the map that does it.

On a CPU, ``jax.vmap`` over all particles (or members) of a network fitted to thousands
of rows is memory-bound: its temporaries (activations and their gradients, one copy per
particle) are far larger than the caches, so every layer streams them through memory.
Mapping over cache-sized batches instead (``jax.lax.map(..., batch_size=k)``, a loop of
``k``-wide vmaps) keeps each batch's temporaries in cache. On a GPU, or with the
particles sharded across several devices, one ``vmap`` over all of them is right.

Measured with ``python benchmarks/batching.py`` on the UCI networks (one hidden layer
of 50 ReLU units; a 2-core AMD EPYC with 1 MiB of L2 per core and 32 MiB of L3): for
256 particles and 5 gradients each, the fastest batch held 3.5-4.8 MB of temporaries
at 277, 1 439 and 8 611 rows (32, 8 and 1 particles), 2.4-2.9 times faster than one
vmap; for 5 ensemble members on 10 740 rows, one member at a time was 3.3 times
faster. Hence `CPU_BATCH_BYTES`.

A computation with a loop, such as an adaptive ODE solve (a ``while`` loop of solver
steps), is different: its temporaries are small, but every iteration pays a fixed
overhead that a vmap shares among its items, so mapping a few items at a time
multiplies that overhead. Its automatic batch therefore holds at least
`LOOP_MIN_BATCH` items (all of them when there are fewer): an ODE model is never
mapped one particle at a time unless the user asks for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.extend import core as jax_core

__all__ = ["CPU_BATCH_BYTES", "LOOP_MIN_BATCH", "batch_size", "has_loop", "map_batched"]

CPU_BATCH_BYTES = 4 * 2**20
LOOP_MIN_BATCH = 128


def _equations(jaxpr: Any) -> Iterator[Any]:
    """Every equation of a jaxpr, those of its sub-jaxprs (loop bodies, branches) too."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, jax_core.Jaxpr):
                    yield from _equations(sub)


def has_loop(fn: Callable[..., Any], example: tuple[Any, ...]) -> bool:
    """Whether ``fn(*example)`` runs a ``while`` loop (an adaptive ODE solve, say).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> has_loop(jnp.sin, (jnp.zeros(3),))
        False
        >>> has_loop(lambda x: jax.lax.while_loop(lambda v: v < 1.0, lambda v: v + 0.5, x),
        ...          (jnp.zeros(()),))
        True
    """
    jaxpr = jax.make_jaxpr(fn)(*example).jaxpr
    return any(eqn.primitive.name == "while" for eqn in _equations(jaxpr))


def batch_size(
    fn: Callable[..., Any],
    example: tuple[Any, ...],
    count: int,
    fixed: int | None,
    *,
    what: str = "items",
) -> int:
    """How many of ``count`` items one vectorised call takes; 0 means all (one ``vmap``).

    ``fixed`` when given; otherwise, on a CPU with one device, the most items whose
    temporaries fit in `CPU_BATCH_BYTES`, read off XLA's memory analysis of ``fn``
    compiled for one item (``fn(*example)``, typically one item's gradient), and at
    least `LOOP_MIN_BATCH` if ``fn`` runs a loop (`has_loop`); on a GPU, or with
    several devices, all of them.

    Args:
        fn: the per-item computation to size (not run, only compiled).
        example: arguments of ``fn`` for one item.
        count: how many items are mapped over.
        fixed: the user's choice (``particles_per_batch``, ``members_per_batch``), or
            None for the automatic one.
        what: what the items are, for the warning (see below).

    Warns:
        RuntimeWarning: if the user fixed one item at a time for a ``fn`` with a loop
            (it is then several times slower than batches of `LOOP_MIN_BATCH`).

    Example:
        >>> import jax.numpy as jnp
        >>> batch_size(jnp.sin, (jnp.zeros(3),), count=100, fixed=None)
        0
        >>> batch_size(jnp.sin, (jnp.zeros(3),), count=100, fixed=10)
        10
    """
    if fixed is not None:
        if fixed == 1 and count > 1 and has_loop(fn, example):
            warnings.warn(
                f"{what}: one at a time (a batch of 1) for a model with a loop (an ODE "
                f"solve, say) pays the loop's overhead once per item; batches of "
                f"{LOOP_MIN_BATCH} or more are usually several times faster.",
                RuntimeWarning,
                stacklevel=3,
            )
        return 0 if fixed >= count else fixed
    if jax.default_backend() != "cpu" or jax.device_count() > 1:
        return 0
    analysis = jax.jit(fn).lower(*example).compile().memory_analysis()
    temp = getattr(analysis, "temp_size_in_bytes", None)
    if temp is None:  # no memory analysis: one vmap
        return 0
    size = CPU_BATCH_BYTES // max(int(temp), 1)
    if size < LOOP_MIN_BATCH and has_loop(fn, example):
        size = LOOP_MIN_BATCH
    return 0 if size >= count else max(int(size), 1)


def map_batched(
    fn: Callable[..., Any], size: int, in_axes: tuple[int | None, ...]
) -> Callable[..., Any]:
    """``jax.vmap(fn, in_axes)`` when ``size`` is 0, else the same map in batches of ``size``.

    ``in_axes`` is 0 (mapped over the leading axis) or None (shared) per positional
    argument, as for ``jax.vmap``; the batched form is ``jax.lax.map`` with
    ``batch_size=size`` over the mapped arguments (a remainder batch is handled by JAX).

    Example:
        >>> import jax.numpy as jnp
        >>> f = map_batched(lambda x, c: x * c, 2, (0, None))
        >>> f(jnp.arange(5.0), 3.0).tolist()
        [0.0, 3.0, 6.0, 9.0, 12.0]
    """
    if size == 0:
        return jax.vmap(fn, in_axes=in_axes)
    if any(axis not in (0, None) for axis in in_axes):
        raise ValueError(f"map_batched: in_axes must be 0 or None, got {in_axes}.")

    def mapped(*args: Any) -> Any:
        def one(items: tuple[Any, ...]) -> Any:
            it = iter(items)
            return fn(*(next(it) if axis == 0 else a for a, axis in zip(args, in_axes)))

        items = tuple(a for a, axis in zip(args, in_axes) if axis == 0)
        return jax.lax.map(one, items, batch_size=size)

    return mapped
