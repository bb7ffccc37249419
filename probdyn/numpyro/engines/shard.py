"""Sharding an engine's parallel axis (members, particles, chains) across devices.

The rule (DESIGN.md, "Scale"): one device first, with the parallel axis
vectorised (``vmap``); past one device, the same axis is split across all
devices through JAX's own sharding, and the compiled program follows the data
("computation follows sharding": ``jit`` partitions a program whose inputs are
sharded). No ``pmap``, no scheduler of our own.

Arrays are split along their leading axis over a one-dimensional `Mesh` of all
devices when that axis divides evenly; otherwise they stay where they are (one
device). Try it on CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
set before JAX is imported.
"""

from __future__ import annotations

from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["num_devices_of", "shard_leading"]

T = TypeVar("T")

_AXIS = "parallel"


def shard_leading(tree: T) -> T:
    """Split every array of ``tree`` along its leading axis across all devices.

    With ``n = jax.device_count() > 1``, each array leaf whose leading axis has a
    length divisible by ``n`` is placed with a `NamedSharding` over a 1-D mesh of
    all ``n`` devices, partitioned on axis 0 (``PartitionSpec("parallel")``), so
    each device holds ``length / n`` consecutive entries. A leaf whose leading
    axis does not divide by ``n`` (or a scalar, or a non-array leaf) is returned
    unchanged: it stays on one device, and a jitted program that takes it runs
    there. With one device the whole tree is returned unchanged.

    Args:
        tree: a pytree of arrays whose leading axis is the parallel axis
            (ensemble members, particles, chains).

    Returns:
        The same pytree, with the divisible leaves sharded.

    Example:
        >>> import jax.numpy as jnp
        >>> x = shard_leading({"u": jnp.zeros((8, 3))})
        >>> x["u"].shape
        (8, 3)
    """
    n = jax.device_count()
    if n == 1:
        return tree
    mesh = Mesh(np.asarray(jax.devices()), (_AXIS,))
    sharding = NamedSharding(mesh, PartitionSpec(_AXIS))

    def place(leaf: Any) -> Any:
        shape = np.shape(leaf) if isinstance(leaf, (jax.Array, np.ndarray)) else ()
        if not shape or shape[0] % n:
            return leaf
        return jax.device_put(leaf, sharding)

    return jax.tree.map(place, tree)


def num_devices_of(x: Any) -> int:
    """How many devices hold distinct pieces of array ``x`` (1 if replicated or local).

    Example:
        >>> import jax.numpy as jnp
        >>> num_devices_of(jnp.zeros(4))
        1
    """
    sharding = getattr(x, "sharding", None)
    if sharding is None or sharding.is_fully_replicated:
        return 1
    return len(sharding.device_set)
