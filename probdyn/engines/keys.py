"""The rule for an int ``key``, the same on both backends (NumPy only).

An int seed is a non-negative integer below ``2**64`` (a Python int, a NumPy integer or
a 0-d integer array; not a bool): every such seed gives its own stream of random
numbers, and ``Posterior.attrs["seed"]`` records the int as given. What a seed becomes
is the backend's business: on NumPyro a seed below ``2**32`` is
``jax.random.PRNGKey(seed)`` and a larger one the raw key ``[seed >> 32, seed %
2**32]``; on Pyro it seeds torch and `numpy.random.SeedSequence` directly.
"""

from __future__ import annotations

from typing import Any

from probdyn.core.engine_base import as_int

__all__ = ["KEY_BOUND", "int_key"]

KEY_BOUND = 2**64


def int_key(key: Any) -> int | None:
    """``key`` as an int seed if it is an integer, else None (a backend key or
    generator, which the backend checks).

    Args:
        key: what the user passed as ``key``.

    Raises:
        ValueError: for an integer outside ``[0, 2**64)``.

    Example:
        >>> import numpy as np
        >>> int_key(np.uint64(2**63)), int_key("not an int")
        (9223372036854775808, None)
    """
    seed = as_int(key)
    if seed is not None and not 0 <= seed < KEY_BOUND:
        raise ValueError(
            f"key={key!r}: an int key must be in [0, 2**64) "
            f"(0 <= key <= {KEY_BOUND - 1}); e.g. key=0."
        )
    return seed
