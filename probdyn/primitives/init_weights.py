"""Initial network weights, drawn with NumPy: one seed gives the same network on both
backends.

NumPy, not jax.random or torch, and cached: models run these on every trace, and eager
jax.random calls compile small programs each time (measured: +2-3 s of compile per fit
of a [1, 50, 1] BNN). The cache holds NumPy arrays, never backend arrays: a
``jnp.asarray`` made while a jit/scan is tracing can be a tracer, and a cached tracer
would leak into every later trace. The arrays are read-only: both backends share this
cache, and a backend that trained a view of one in place (``torch.as_tensor`` shares
memory) would change every later model's starting point. Copy them into a parameter.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["init_diffusion", "init_gru", "init_layers"]


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.flags.writeable = False
    return arrays


@functools.lru_cache(maxsize=64)
def init_layers(sizes: tuple[int, ...], seed: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """``(weight (in, out), bias (out,))`` per layer: weights ``N(0, 1/in)``, biases 0.

    Deterministic layers start at this Glorot-style scale; Bayesian ones are overwritten
    by their sample sites, so their initial values do not matter.
    """
    rng = np.random.default_rng(seed)
    return tuple(
        _frozen(rng.standard_normal((n_in, n_out)) / np.sqrt(n_in), np.zeros(n_out))  # type: ignore[misc]
        for n_in, n_out in zip(sizes[:-1], sizes[1:])
    )


@functools.lru_cache(maxsize=16)
def init_gru(n_in: int, hidden: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A GRU's stacked gate weights ``(n_in + hidden, 3 hidden)``, ``N(0, 1/(n_in +
    hidden))``, and zero biases."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_in + hidden, 3 * hidden)) / np.sqrt(n_in + hidden)
    return _frozen(w, np.zeros(3 * hidden))  # type: ignore[return-value]


@functools.lru_cache(maxsize=16)
def init_diffusion(latent: int, hidden: int, seed: int) -> tuple[np.ndarray, ...]:
    """A latent SDE's per-dimension diffusion nets ``(w1, b1, w2, b2)``: one hidden layer
    of ``hidden`` units for each of the ``latent`` coordinates."""
    rng = np.random.default_rng(seed)
    return _frozen(
        rng.standard_normal((latent, hidden)),
        np.zeros((latent, hidden)),
        rng.standard_normal((latent, hidden)) / np.sqrt(hidden),
        np.zeros(latent),
    )
