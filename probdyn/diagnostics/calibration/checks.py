"""Input checks and shared reductions of the calibration functions (NumPy only).

Draws are checked and flattened to ``(sample, *shape)`` (`_as_draws`, `_prepare`), levels,
kinds and axes are validated, and per-element values are reduced to the mean over the
observed elements (`_summarise`), as the conventions of `probdyn.calibration` say.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

_KINDS = ("central", "hdi")
_Axis = int | tuple[int, ...] | None


def _check_sample_dims(sample_dims: int) -> None:
    """Raise unless ``sample_dims`` is 1 or 2 (a bool is refused)."""
    if sample_dims not in (1, 2) or isinstance(sample_dims, bool):
        raise ValueError(
            f"sample_dims={sample_dims!r}: must be 1 (draws are (draw, *shape)) or "
            "2 (draws are (chain, draw, *shape))."
        )


def _as_draws(draws: Any, sample_dims: int, name: str = "draws") -> np.ndarray:
    """``(chain, draw, *shape)`` -> ``(chain * draw, *shape)``, checked."""
    _check_sample_dims(sample_dims)
    arr = np.asarray(draws, dtype=float)
    if arr.ndim < sample_dims:
        raise ValueError(
            f"{name} has shape {arr.shape} but sample_dims={sample_dims} leading sample "
            "dimensions are expected; pass (chain, draw, *shape) or set sample_dims=1."
        )
    flat = arr.reshape((-1, *arr.shape[sample_dims:]))
    if flat.shape[0] == 0:
        raise ValueError(f"{name} has shape {arr.shape}: it holds no draws.")
    if np.isnan(flat).any():
        raise ValueError(
            f"{name} contain {int(np.isnan(flat).sum())} NaN values; drop the failed draws "
            "(or the affected elements) before scoring."
        )
    return flat


def _prepare(
    draws: Any, observed: Any, sample_dims: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattened draws, observations and the mask of observed (non-NaN) elements."""
    flat = _as_draws(draws, sample_dims)
    obs = np.asarray(observed, dtype=float)
    if flat.shape[1:] != obs.shape:
        raise ValueError(
            f"draws have event shape {flat.shape[1:]} but observed has shape {obs.shape}; "
            f"they must match (draws are (chain, draw, *shape) with sample_dims={sample_dims})."
        )
    return flat, obs, ~np.isnan(obs)


def _check_level(level: Any) -> float:
    """One level in (0, 1), as a float."""
    value = float(level)
    if not 0 < value < 1:
        raise ValueError(f"level={level!r}: must be in (0, 1), e.g. 0.9 for a 90 % interval.")
    return value


def _levels(levels: float | Sequence[float]) -> tuple[float, ...]:
    """One level or several, each in (0, 1), as a tuple of floats."""
    values = (levels,) if np.ndim(levels) == 0 else tuple(np.asarray(levels).ravel())
    if not values:
        raise ValueError("levels=(): give at least one level in (0, 1), e.g. (0.5, 0.9).")
    bad = [float(v) for v in values if not 0 < float(v) < 1]
    if bad:
        raise ValueError(f"levels={levels!r}: {bad} outside (0, 1); use e.g. (0.5, 0.9, 0.95).")
    return tuple(float(v) for v in values)


def _check_kind(kind: str) -> str:
    """``kind`` if it is an interval kind (``'central'`` or ``'hdi'``)."""
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r}: must be 'central' (equal tails) or 'hdi' (shortest).")
    return kind


def _keep_axes(axis: _Axis, ndim: int) -> tuple[int, ...]:
    """The axes to keep, checked and made non-negative, in increasing order."""
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis or ())
    if axes and ndim == 0:
        raise ValueError(f"axis={axis!r}: the observations are scalars; drop axis.")
    out = []
    for a in axes:
        if not -ndim <= int(a) < ndim:
            raise ValueError(
                f"axis={axis!r}: axis {a} is out of range for observations with {ndim} "
                f"dimensions; use axes in [-{ndim}, {ndim - 1}]."
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis={axis!r}: repeated axis; give each axis once.")
    return tuple(sorted(out))


def _summarise(values: np.ndarray, valid: np.ndarray, reduce: bool, axis: _Axis) -> Any:
    """Per-element values -> mean over valid elements (all, or all but ``axis``)."""
    if not reduce:
        if axis is not None:
            raise ValueError(
                f"axis={axis!r} with reduce=False: axis selects the dimensions kept by the "
                "mean, so it needs reduce=True (reduce=False returns every element)."
            )
        return np.where(valid, values, np.nan)
    keep = _keep_axes(axis, values.ndim) if axis is not None else ()
    over = tuple(a for a in range(values.ndim) if a not in keep)
    total = np.where(valid, values, 0.0).sum(axis=over)
    count = np.sum(valid, axis=over)
    # No "mean of empty slice" warning: a slice with no observation is NaN.
    mean = np.divide(total, count, out=np.full(np.shape(total), np.nan), where=count > 0)
    return float(mean) if axis is None else mean


def _logmeanexp(values: np.ndarray) -> np.ndarray:
    """``log mean_s exp(values[s])`` over axis 0, stable for very negative values."""
    top = np.max(values, axis=0)
    shift = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):  # all -inf -> log(0) = -inf, intended
        return np.log(np.mean(np.exp(values - shift), axis=0)) + shift


def _rng(key: Any) -> np.random.Generator:
    """A NumPy generator from an int seed, a generator, or None (seed 0)."""
    if key is None:
        return np.random.default_rng(0)
    if isinstance(key, np.random.Generator):
        return key
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return np.random.default_rng(int(key))
    raise TypeError(f"key={key!r}: pass an int seed or a numpy.random.Generator.")
