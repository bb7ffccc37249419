"""The stochastic Lorenz system of Li et al. (2020), the latent-SDE test bed (NumPy only,
so both backends, the tests and the benchmarks draw the same paths)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from probdyn.data._gp_tasks import _as_rng
from probdyn.primitives.sde import time_grid

__all__ = ["stochastic_lorenz"]


def stochastic_lorenz(
    num_series: int,
    times: ArrayLike,
    *,
    a: tuple[float, float, float] = (10.0, 28.0, 8.0 / 3.0),
    b: tuple[float, float, float] = (0.15, 0.15, 0.15),
    dt: float = 1e-3,
    seed: int = 0,
) -> np.ndarray:
    """Paths of the stochastic Lorenz system (Li et al. 2020, torchsde's example).

    ``dx = a0 (y - x) dt + b0 x dW0``, ``dy = (a1 x - y - x z) dt + b1 y dW1``,
    ``dz = (x y - a2 z) dt + b2 z dW2`` (Itô, diagonal multiplicative noise),
    from ``(x, y, z)(0) ~ N(0, I)`` at ``t = 0``, by Euler–Maruyama with steps of
    at most ``dt`` landing on every output time (NumPy).

    Args:
        num_series: the number of independent paths.
        times: increasing output times, ``>= 0``.
        a: the drift parameters ``(sigma, rho, beta)``.
        b: the diffusion coefficients.
        dt: the largest step.
        seed: NumPy seed.

    Returns:
        ``(num_series, len(times), 3)``, unnormalised and noise-free.
    """
    rng = _as_rng(seed, "seed")
    out_t = np.asarray(times, dtype=np.float64)
    grid, index = time_grid(0.0, out_t, dt, 10**7)
    s = rng.standard_normal((num_series, 3))
    coef = np.asarray(b)
    path = [s]
    for h in np.diff(grid):
        x, y, z = s[:, 0], s[:, 1], s[:, 2]
        f = np.stack([a[0] * (y - x), a[1] * x - y - x * z, x * y - a[2] * z], -1)
        s = s + f * h + coef * s * np.sqrt(h) * rng.standard_normal(s.shape)
        path.append(s)
    return np.stack(path, 1)[:, index]
