"""Irregularly sampled 2-D spirals: the latent-ODE protocol of Chen et al. (2018) (NumPy).

Follows the generator of torchdiffeq ``examples/latent_ode.py`` (commit 530b8b6):
every spiral is one of two fixed trajectories on a grid of ``num_total = 1000``
times ``t_k = 6 pi k / 999`` (so the dynamics are time-invariant), a
counter-clockwise Archimedean spiral ``r = b t`` centred at ``(+5, 0)`` and a
clockwise one centred at ``(-5, 0)``, with ``b = 0.3``. Each series is a window of
``window`` consecutive grid points from a random start; its times are the first
``window`` grid times (every series starts at ``t = 0``, as in torchdiffeq). The
model sees ``num_observed`` of the window's points, drawn without replacement
(irregular sampling), with Gaussian noise; the next ``window`` points are the
extrapolation targets of Chen et al.'s Table 2 (0.1642 / 0.1502 / 0.1346 RMSE for
30 / 50 / 100 observed points).

NumPy only, so both backends can consume the same data.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from probdyn.data._gp_tasks import _as_rng

__all__ = ["SpiralData", "spirals"]

ClockwiseRadius = Literal["archimedean", "torchdiffeq"]

_B = 0.3  # the spirals' b (torchdiffeq's ``b = .3``; ``a = 0``)
_CENTRE = 5.0  # x-offset of the two spirals' centres


@dataclasses.dataclass(frozen=True)
class SpiralData:
    """A batch of spiral series: irregular noisy observations and their extrapolation targets.

    Every series has the same number of observations, so the training arrays are
    already rectangular (``mask`` is all True); pass them to ``LatentODE`` as they
    are, or through ``pad_series`` after dropping points.

    Attributes:
        times: ``(N, num_observed)`` observation times, increasing along each row.
        values: ``(N, num_observed, 2)`` noisy observations at ``times``.
        index: ``(N, num_observed)`` sorted indices of the observed points in the window.
        window_times: ``(window,)`` the window's times (shared by every series).
        window_truth: ``(N, window, 2)`` noise-free spiral at ``window_times``
            (interpolation targets).
        extrap_times: ``(window,)`` the next ``window`` grid times.
        extrap_truth: ``(N, window, 2)`` noise-free spiral at ``extrap_times``.
        extrap_values: ``(N, window, 2)`` ``extrap_truth`` plus fresh noise (for
            predictive coverage, which includes the observation noise).
        clockwise: ``(N,)`` bool, the spiral's direction.
        start: ``(N,)`` index of the window's first point on the 1000-point grid.
        noise_sd: observation noise standard deviation.
        clockwise_radius: the clockwise spiral's radius law (see `spirals`).
    """

    times: np.ndarray
    values: np.ndarray
    index: np.ndarray
    window_times: np.ndarray
    window_truth: np.ndarray
    extrap_times: np.ndarray
    extrap_truth: np.ndarray
    extrap_values: np.ndarray
    clockwise: np.ndarray
    start: np.ndarray
    noise_sd: float
    clockwise_radius: str

    @property
    def mask(self) -> np.ndarray:
        """``(N, num_observed, 2)`` bool, all True (every entry is observed)."""
        return np.ones(self.values.shape, dtype=bool)

    @property
    def num_series(self) -> int:
        """N, the number of series."""
        return int(self.times.shape[0])

    @property
    def num_observed(self) -> int:
        """The number of observed points per series."""
        return int(self.times.shape[1])

    @property
    def window(self) -> int:
        """The number of points in the observation window (and in the extrapolation)."""
        return int(self.window_times.shape[0])


def _trajectories(
    num_total: int = 1000,
    *,
    clockwise_radius: ClockwiseRadius = "archimedean",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two full spirals on the time grid: ``(grid, counter_clockwise, clockwise)``.

    ``grid`` is ``(num_total,)`` on ``[0, 6 pi]``; each trajectory is ``(num_total, 2)``.
    """
    grid = np.linspace(0.0, 6 * np.pi, num_total)
    ccw = np.stack([_B * grid * np.cos(grid) + _CENTRE, _B * grid * np.sin(grid)], -1)
    angle = 6 * np.pi - grid  # decreasing angle: clockwise
    if clockwise_radius == "archimedean":
        r = _B * angle  # the mirror image of the counter-clockwise spiral, run backwards
    else:
        angle = angle + 1.0
        r = 50 * _B / angle  # torchdiffeq's code: zs_cw = stop + 1 - t, r = a + b 50 / zs_cw
    cw = np.stack([r * np.cos(angle) - _CENTRE, r * np.sin(angle)], -1)
    return grid, ccw, cw


def spirals(
    num_series: int = 1000,
    *,
    num_observed: int = 100,
    window: int = 100,
    noise_sd: float = 0.3,
    num_total: int = 1000,
    clockwise_radius: ClockwiseRadius = "archimedean",
    key: int | np.random.Generator = 0,
) -> SpiralData:
    """Chen et al.'s (2018) irregularly sampled spirals with extrapolation targets.

    Each series picks a direction (clockwise or counter-clockwise, probability 1/2
    each) and a start index uniformly in ``[window, num_total - 2 window]`` (the
    torchdiffeq rule of not starting near either end, narrowed so that the
    extrapolation window also lies on the grid). Its observation window is the
    ``window`` grid points from the start, at times ``grid[:window]``; the model
    sees ``num_observed`` of them, chosen without replacement and sorted, plus
    Gaussian noise with sd ``noise_sd``. The next ``window`` points, at times
    ``grid[window:2 window]``, are the extrapolation targets.

    Scoring: Chen et al.'s extrapolation RMSE (0.13-0.16) is below the noise sd
    0.3, which is impossible against noisy targets, so it is taken against the
    noise-free spiral: use ``extrap_truth``. ``extrap_values`` (fresh noise) is for
    checking a posterior predictive that includes the observation noise.

    The paper and torchdiffeq's docstring call both spirals Archimedean
    (``r = a + b theta``), but torchdiffeq's code draws the clockwise one with
    ``r = 50 b / (6 pi + 1 - t)``. ``clockwise_radius="archimedean"`` (default)
    uses ``r = b (6 pi - t)``, the mirror image of the counter-clockwise spiral;
    ``"torchdiffeq"`` reproduces the code.

    Args:
        num_series: N, the number of series (Chen et al.: 1000).
        num_observed: points observed per series, 1..window (Chen et al.: 30, 50, 100).
        window: points in the observation window and in the extrapolation window.
        noise_sd: observation noise standard deviation (Chen et al.: 0.3); >= 0.
        num_total: points on the full ``[0, 6 pi]`` grid (torchdiffeq: 1000); at
            least ``3 * window``.
        clockwise_radius: ``"archimedean"`` or ``"torchdiffeq"`` (see above).
        key: an int seed or a ``numpy.random.Generator``.

    Returns:
        A `SpiralData`.

    Raises:
        ValueError: for a non-positive count, ``num_observed`` outside
            ``1..window``, ``num_total < 3 * window``, a negative or non-finite
            ``noise_sd`` or an unknown ``clockwise_radius``.

    Example:
        >>> from probdyn.data import spirals
        >>> d = spirals(8, num_observed=30, key=0)
        >>> d.times.shape, d.values.shape, d.extrap_truth.shape
        ((8, 30), (8, 30, 2), (8, 100, 2))
        >>> bool(d.extrap_times[0] > d.window_times[-1])
        True
    """
    for name, v in (("num_series", num_series), ("window", window), ("num_total", num_total)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"spirals({name}={v!r}): must be a positive integer.")
    if (
        isinstance(num_observed, bool)
        or not isinstance(num_observed, (int, np.integer))
        or not 1 <= num_observed <= window
    ):
        raise ValueError(
            f"spirals(num_observed={num_observed!r}): must be an integer in 1..window "
            f"(window={window}); Chen et al. use 30, 50 or 100."
        )
    if num_total < 3 * window:
        raise ValueError(
            f"spirals(num_total={num_total}): must be at least 3 * window = {3 * window} "
            "(a margin, the observation window and the extrapolation window)."
        )
    if not isinstance(noise_sd, (int, float)) or not np.isfinite(noise_sd) or noise_sd < 0:
        raise ValueError(f"spirals(noise_sd={noise_sd!r}): must be a finite number >= 0.")
    if clockwise_radius not in ("archimedean", "torchdiffeq"):
        raise ValueError(
            f"spirals(clockwise_radius={clockwise_radius!r}): use 'archimedean' or 'torchdiffeq'."
        )
    rng = _as_rng(key)
    grid, ccw, cw = _trajectories(num_total, clockwise_radius=clockwise_radius)
    start = rng.integers(window, num_total - 2 * window + 1, size=num_series)
    clockwise = rng.random(num_series) < 0.5
    span = start[:, None] + np.arange(2 * window)
    truth = np.where(clockwise[:, None, None], cw[span], ccw[span])
    index = np.sort(
        np.stack([rng.choice(window, num_observed, replace=False) for _ in range(num_series)]),
        axis=1,
    )
    rows = np.arange(num_series)[:, None]
    values = truth[rows, index] + noise_sd * rng.standard_normal((num_series, num_observed, 2))
    extrap_truth = truth[:, window:]
    extrap_values = extrap_truth + noise_sd * rng.standard_normal(extrap_truth.shape)
    return SpiralData(
        times=grid[index],
        values=values,
        index=index,
        window_times=grid[:window],
        window_truth=truth[:, :window],
        extrap_times=grid[window : 2 * window],
        extrap_truth=extrap_truth,
        extrap_values=extrap_values,
        clockwise=clockwise,
        start=start,
        noise_sd=float(noise_sd),
        clockwise_radius=clockwise_radius,
    )
