"""The time-grid layout of `LatentSDE` (NumPy only, shared by both backends).

A latent SDE's Euler–Maruyama grid runs through ``t0`` and every time at which some
series of the batch has an observed entry, with extra points so that no step exceeds
``dt`` (`probdyn.primitives.sde.time_grid`). Everything here is bookkeeping on that
grid: checking a batch's times and mask, where each time sits on the grid (`positions`),
which encoder state gives the context of each step (`BatchLayout.context_index`), and
the extra grid past its end for forecasts (`forecast_plan`). Both backends build the
same grid from the same arguments, hence the same sample-site shapes, and refuse the
same input with the same message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from probdyn.core.engine_base import as_int
from probdyn.primitives.sde import time_grid

__all__ = [
    "BatchLayout",
    "ForecastPlan",
    "check_batch_times",
    "check_observed_finite",
    "check_values_shape",
    "forecast_plan",
    "latent_grid",
    "positions",
    "prior_target_times",
    "scalar_time",
    "shape_mask",
    "step_layout",
]


class BatchLayout(NamedTuple):
    """A batch's arrays and its (NumPy, concrete) step grid.

    `step_layout` returns the NumPy arrays; each backend swaps ``times``, ``values``
    and ``mask`` for its own arrays.
    """

    times: Any  # (B, T)
    values: Any  # (B, T, D) or None, NaN allowed where masked
    mask: Any  # (B, T, D) bool
    t0: float
    grid: np.ndarray  # (S + 1,) float64: t0 and every observed time
    obs_pos: tuple[np.ndarray, np.ndarray, np.ndarray]  # each (B, T): times on the grid
    context_index: np.ndarray  # (B, S): first index of series b after grid[k]


class ForecastPlan(NamedTuple):
    """Where the ``target_times`` of a forecast sit, and the grid past the fitted one.

    Attributes:
        extra: ``None`` when every target time is within the grid; otherwise the grid
            from the last grid point through every later target time (steps <= ``dt``),
            along which the prior SDE continues the path.
        positions: `positions` of the targets ``(B, T')`` on the grid extended by
            ``extra``.
    """

    extra: np.ndarray | None
    positions: tuple[np.ndarray, np.ndarray, np.ndarray]


def latent_grid(t0: float, times: np.ndarray, dt: float, max_steps: int) -> np.ndarray:
    """The Euler–Maruyama grid from ``t0`` through ``times`` (steps <= ``dt``).

    Args:
        t0: the start.
        times: sorted unique times, all at or after ``t0``.
        dt: the largest step.
        max_steps: the most steps allowed.

    Returns:
        The float64 grid ``(S + 1,)``.

    Raises:
        ValueError: more than ``max_steps`` steps (the message names `LatentSDE`).
    """
    try:
        grid, _ = time_grid(t0, times, dt, max_steps)
    except ValueError as err:
        raise ValueError(str(err).replace("NeuralSDE", "LatentSDE", 1)) from None
    return grid


def positions(grid: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left grid index, right grid index and weight of each time (clamped to the grid).

    Args:
        grid: ``(N,)`` increasing grid.
        t: times, any shape.

    Returns:
        ``(idx, nxt, w)``, each shaped as ``t``: the state at ``t`` is
        ``(1 - w) path[idx] + w path[nxt]`` (exact at grid points, where ``w`` is 0).
    """
    n = len(grid)
    idx = np.clip(np.searchsorted(grid, t, side="right") - 1, 0, n - 1)
    nxt = np.minimum(idx + 1, n - 1)
    span = grid[nxt] - grid[idx]
    safe = np.where(span > 0, span, 1.0)
    w = np.where(span > 0, np.clip((t - grid[idx]) / safe, 0.0, 1.0), 0.0)
    return idx, nxt, w


def check_batch_times(t: np.ndarray) -> None:
    """Check a batch's ``(B, T)`` times: non-empty, finite, each row strictly increasing.

    Raises:
        ValueError: otherwise (the message says how to fix it).
    """
    if t.ndim != 2 or t.size == 0:
        raise ValueError(
            f"LatentSDE: times must be (series, time), got shape {t.shape}; pad ragged "
            "series with pad_series."
        )
    if not np.all(np.isfinite(t)) or np.any(np.diff(t, axis=1) <= 0):
        raise ValueError(
            "LatentSDE: each row of times must be finite and strictly increasing; sort "
            "the series (pad_series does) and drop duplicate times."
        )


def check_values_shape(got: tuple[int, ...], want: tuple[int, ...]) -> None:
    """Check that ``values`` is ``(series, time, obs_dim)``, as ``times`` and ``obs_dim`` say.

    Raises:
        ValueError: for another shape.
    """
    if got != want:
        raise ValueError(
            f"LatentSDE: values has shape {got}, expected {want} "
            "(series, time, obs_dim) to match times."
        )


def shape_mask(m: np.ndarray, tshape: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """A given boolean mask ``(B, T)``, ``(B, T, 1)`` or ``(B, T, D)`` as ``(B, T, D)``.

    Args:
        m: the mask, as booleans.
        tshape: ``(B, T)``, the shape of the times.
        shape: ``(B, T, D)``, the shape of the values.

    Raises:
        ValueError: for any other shape.
    """
    if m.shape == tshape:
        m = m[..., None]
    if m.ndim != 3 or m.shape[:2] != tshape or m.shape[2] not in (1, shape[2]):
        raise ValueError(f"LatentSDE: mask has shape {m.shape}; give {tshape} or {shape}.")
    return np.broadcast_to(m, shape)


def check_observed_finite(mask: np.ndarray, finite: np.ndarray | None) -> None:
    """Refuse a non-finite value where ``mask`` marks an observation.

    Args:
        mask: ``(B, T, D)`` bool.
        finite: ``(B, T, D)`` bool, which values are finite (None: unknown, traced).

    Raises:
        ValueError: naming the first such entry.
    """
    if finite is None:
        return
    bad = mask & ~finite
    if bad.any():
        b, i, d = (int(k) for k in np.argwhere(bad)[0])
        raise ValueError(
            f"LatentSDE: values[{b}, {i}, {d}] is not finite but mask marks it "
            "observed; set mask False there (or leave mask=None to mask every NaN)."
        )


def scalar_time(value: Any, t0: Any) -> float:
    """``t0`` as a float, from its concrete ``value`` (None where it is traced).

    Raises:
        ValueError: ``value`` is None, not a single number or not finite.
    """
    if value is None or np.size(value) != 1 or not np.isfinite(value).all():
        raise ValueError(f"LatentSDE: t0={t0!r} must be a concrete, finite scalar time.")
    return float(np.asarray(value).reshape(()))


def step_layout(
    t: np.ndarray, mask: np.ndarray, start: float | None, dt: float, max_steps: int
) -> BatchLayout:
    """The step grid of a checked batch and where its times sit on it.

    Args:
        t: ``(B, T)`` float64 times (checked by `check_batch_times`).
        mask: ``(B, T, D)`` bool observation mask.
        start: ``t0`` (None: the earliest observed time).
        dt: the largest Euler–Maruyama step.
        max_steps: the most steps allowed.

    Returns:
        A `BatchLayout` holding ``t`` and ``mask`` (``values`` None).

    Raises:
        ValueError: ``t0`` after the first observed time, or too many steps.
    """
    observed = np.unique(t[mask.any(-1)]) if mask.any() else np.unique(t)
    t0 = float(observed[0]) if start is None else start
    if t0 > observed[0]:
        raise ValueError(
            f"LatentSDE: t0={t0} is after the first observed time {observed[0]}; z0 "
            "is the state at t0, so give t0 <= every observed time."
        )
    grid = latent_grid(t0, observed, dt, max_steps)
    # Context of step k (from grid[k]): the encoder state at the first time of the
    # series after grid[k], i.e. a summary of the observations still to come.
    context_index = np.stack([np.searchsorted(row, grid[:-1], side="right") for row in t])
    return BatchLayout(t, None, mask, t0, grid, positions(grid, t), context_index)


def forecast_plan(
    target: np.ndarray, num_series: int, t0: float, grid: np.ndarray, dt: float, max_steps: int
) -> ForecastPlan:
    """Check a forecast's ``target_times`` and lay them on the (extended) grid.

    Args:
        target: float64 ``(B, T')`` or ``(T',)`` target times.
        num_series: B.
        t0: the start of the latent SDE.
        grid: the batch's step grid.
        dt: the largest Euler–Maruyama step.
        max_steps: the most steps allowed.

    Raises:
        ValueError: a badly shaped or non-finite ``target``, or a time before ``t0``.
    """
    if target.ndim == 1:
        target = np.broadcast_to(target, (num_series, target.shape[0]))
    if target.ndim != 2 or target.shape[0] != num_series or not np.all(np.isfinite(target)):
        raise ValueError(
            f"LatentSDE: target_times has shape {target.shape}; give finite times shaped "
            f"({num_series}, T') or (T',)."
        )
    if target.size and target.min() < t0:
        raise ValueError(
            f"LatentSDE: target_times has {target.min()}, before t0={t0}; the latent "
            "path starts at t0."
        )
    later = np.unique(target[target > grid[-1]])
    if not later.size:
        return ForecastPlan(None, positions(grid, target))
    extra = latent_grid(float(grid[-1]), later, dt, max_steps)
    return ForecastPlan(extra, positions(np.concatenate([grid, extra[1:]]), target))


def prior_target_times(
    num_series: Any, target_times: Any, to_numpy: Callable[[Any], Any] = np.asarray
) -> tuple[np.ndarray, np.ndarray]:
    """Check `LatentSDE.sample_prior`'s arguments; its ``(T',)`` and ``(B, T')`` times.

    Args:
        num_series: B, a positive integer.
        target_times: ``(T',)`` times.
        to_numpy: the backend's array -> NumPy conversion (applied after the
            ``num_series`` check).

    Returns:
        The float64 target times ``(T',)`` and them broadcast to ``(num_series, T')``.

    Raises:
        ValueError: a bad ``num_series``, or ``target_times`` not a non-empty 1-D array.
    """
    if (as_int(num_series) or 0) <= 0:
        raise ValueError(
            f"LatentSDE.sample_prior(num_series={num_series!r}): must be a positive "
            "integer, e.g. num_series=100."
        )
    target = np.asarray(to_numpy(target_times), dtype=np.float64)
    if target.ndim != 1 or target.size == 0:
        raise ValueError(
            f"LatentSDE.sample_prior: target_times has shape {target.shape}; give a "
            "non-empty 1-D array of times."
        )
    return target, np.broadcast_to(target, (num_series, target.size))
