"""Predator–prey data: a seeded synthetic Lotka–Volterra set and the Hudson's Bay table."""

from __future__ import annotations

import dataclasses

import numpy as np

from probdyn.data._gp_tasks import _as_rng

__all__ = [
    "HARE_LYNX",
    "PredatorPreyData",
    "hare_lynx",
    "lotka_volterra",
    "synthetic_predator_prey",
]

# Hudson's Bay Company pelts (thousands), 1900-1920: year, hare, lynx. A public
# historical table (as used in Carpenter's Stan case study on Lotka-Volterra
# models), typed in here.
HARE_LYNX = np.array(
    [
        [1900, 30.0, 4.0],
        [1901, 47.2, 6.1],
        [1902, 70.2, 9.8],
        [1903, 77.4, 35.2],
        [1904, 36.3, 59.4],
        [1905, 20.6, 41.7],
        [1906, 18.1, 19.0],
        [1907, 21.4, 13.0],
        [1908, 22.0, 8.3],
        [1909, 25.4, 9.1],
        [1910, 27.1, 7.4],
        [1911, 40.3, 8.0],
        [1912, 57.0, 12.3],
        [1913, 76.6, 19.5],
        [1914, 52.3, 45.7],
        [1915, 19.5, 51.1],
        [1916, 11.2, 29.7],
        [1917, 7.6, 15.8],
        [1918, 14.6, 9.7],
        [1919, 16.2, 10.1],
        [1920, 24.7, 8.6],
    ]
)


@dataclasses.dataclass(frozen=True)
class PredatorPreyData:
    """A train/test split of a predator–prey series (columns: prey, predator).

    Attributes:
        t_train, y_train: observation times and positive observations ``(n, 2)``.
        t_test, y_test: the held-out extrapolation window.
        t_grid: a fine grid over both windows, for plotting.
        z_grid: the noise-free truth on ``t_grid`` (None for real data).
        z_test: the noise-free truth at ``t_test`` (None for real data).
        scale: observations were divided by this (real data), to keep states near 1.
        name: a label.
    """

    t_train: np.ndarray
    y_train: np.ndarray
    t_test: np.ndarray
    y_test: np.ndarray
    t_grid: np.ndarray
    z_grid: np.ndarray | None
    z_test: np.ndarray | None
    scale: float
    name: str


def lotka_volterra(
    times: np.ndarray,
    z0: tuple[float, float] = (1.0, 0.5),
    alpha: float = 1.0,
    beta: float = 0.8,
    gamma: float = 1.0,
    delta: float = 0.5,
    substeps: int = 200,
) -> np.ndarray:
    """Solve the Lotka–Volterra equations with fixed-step RK4 (NumPy only).

    ``dx/dt = alpha x - beta x y``, ``dy/dt = delta x y - gamma y``.

    Args:
        times: increasing output times; the solve starts at ``times[0]``.
        z0: (prey, predator) at ``times[0]``.
        alpha: prey growth rate.
        beta: rate at which predation removes prey.
        gamma: predator death rate.
        delta: predator growth per unit of prey.
        substeps: RK4 steps per unit time.

    Returns:
        ``(len(times), 2)`` array.

    Example:
        >>> lotka_volterra(np.array([0.0, 1.0])).shape
        (2, 2)
    """

    def f(z: np.ndarray) -> np.ndarray:
        x, y = z
        return np.array([alpha * x - beta * x * y, delta * x * y - gamma * y])

    out = [np.asarray(z0, dtype=float)]
    z = out[0]
    for t_a, t_b in zip(times[:-1], times[1:]):
        n = max(1, int(np.ceil((t_b - t_a) * substeps)))
        h = (t_b - t_a) / n
        for _ in range(n):
            k1 = f(z)
            k2 = f(z + h / 2 * k1)
            k3 = f(z + h / 2 * k2)
            k4 = f(z + h * k3)
            z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(z)
    return np.stack(out)


def synthetic_predator_prey(
    *,
    seed: int = 0,
    num_train: int = 16,
    num_test: int = 8,
    t_train: float = 8.0,
    t_end: float = 12.0,
    noise: float = 0.1,
) -> PredatorPreyData:
    """Sparse, noisy, irregularly sampled Lotka–Volterra data with a held-out window.

    The truth is `lotka_volterra` with its defaults (alpha=1, beta=0.8, gamma=1,
    delta=0.5, z0=(1, 0.5)); one cycle lasts about 7 time units. Observation
    times are uniform at random on ``[0, t_train]`` (train) and
    ``(t_train, t_end]`` (test); observations are log-normal around the truth
    with log-scale sd ``noise``.

    Example:
        >>> data = synthetic_predator_prey(seed=0)
        >>> data.y_train.shape, data.y_test.shape
        ((16, 2), (8, 2))
    """
    rng = _as_rng(seed, "seed")
    t_tr = np.sort(np.concatenate([[0.0], rng.uniform(0.0, t_train, num_train - 1)]))
    t_te = np.sort(rng.uniform(t_train, t_end, num_test))
    t_grid = np.linspace(0.0, t_end, 201)
    all_t = np.unique(np.concatenate([t_tr, t_te, t_grid]))
    z_all = lotka_volterra(all_t)
    at = lambda ts: z_all[np.searchsorted(all_t, ts)]
    noisy = lambda z: z * np.exp(noise * rng.standard_normal(z.shape))
    return PredatorPreyData(
        t_train=t_tr,
        y_train=noisy(at(t_tr)),
        t_test=t_te,
        y_test=noisy(at(t_te)),
        t_grid=t_grid,
        z_grid=at(t_grid),
        z_test=at(t_te),
        scale=1.0,
        name="synthetic Lotka-Volterra",
    )


def hare_lynx(*, num_test: int = 5, scale: float = 20.0) -> PredatorPreyData:
    """The 1900–1920 hare–lynx table; the last ``num_test`` years are held out.

    Time is years since 1900; counts are divided by ``scale``.

    Example:
        >>> hare_lynx().t_train[:3]
        array([0., 1., 2.])
    """
    t = HARE_LYNX[:, 0] - 1900.0
    y = HARE_LYNX[:, 1:] / scale
    n = len(t) - num_test
    return PredatorPreyData(
        t_train=t[:n],
        y_train=y[:n],
        t_test=t[n:],
        y_test=y[n:],
        t_grid=np.linspace(0.0, t[-1], 201),
        z_grid=None,
        z_test=None,
        scale=scale,
        name="Hudson's Bay hare-lynx 1900-1920",
    )
