"""Padding ragged time series into one batch (NumPy only, shared by both backends).

`pad_series` turns a list of series of different lengths into the ``(B, T)`` times,
``(B, T, D)`` values and ``(B, T, D)`` mask that `LatentODE` (either backend) takes;
`PaddedSeries.unpad` inverts it. Importing this module loads neither jax nor torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["PaddedSeries", "pad_series"]


class PaddedSeries(NamedTuple):
    """A batch of ragged series padded to a common length.

    Attributes:
        times: ``(B, T)`` float; each row strictly increasing (padding continues past
            the series' last time in small steps, so ODE solvers accept every row).
        values: ``(B, T, D)`` float; NaN at padding and at missing entries.
        mask: ``(B, T, D)`` bool; True where a value was observed.
        lengths: ``(B,)`` int; the number of time points of each series.

    Example:
        >>> import numpy as np
        >>> p = pad_series([np.array([0.0, 1.0]), np.array([0.5])], [np.ones(2), np.ones(1)])
        >>> times, values = p.unpad()
        >>> p.lengths.tolist(), times[1].tolist()
        ([2, 1], [0.5])
    """

    times: np.ndarray
    values: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray

    def unpad(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The original ragged ``(times, values)`` lists (missing entries stay NaN)."""
        n = [int(k) for k in self.lengths]
        return [self.times[b, :k] for b, k in enumerate(n)], [
            self.values[b, :k] for b, k in enumerate(n)
        ]


def pad_series(times: Sequence[ArrayLike], values: Sequence[ArrayLike]) -> PaddedSeries:
    """Pad ragged series (NumPy) into the batch layout `LatentODE` takes.

    Missing values are NaN entries of ``values``; they and the padding are masked.

    Args:
        times: one 1-D strictly increasing array per series.
        values: one ``(len(times[b]), D)`` (or ``(len(times[b]),)``, then D = 1) array
            per series, NaN where an entry is missing.

    Returns:
        A `PaddedSeries` (``.unpad()`` inverts it).

    Raises:
        ValueError: for empty input, mismatched lengths or dimensions, non-finite or
            non-increasing times.

    Example:
        >>> import numpy as np
        >>> p = pad_series([np.array([0.0, 1.0]), np.array([0.5])], [np.ones(2), np.ones(1)])
        >>> p.times.shape, p.values.shape, p.mask[1, :, 0].tolist()
        ((2, 2), (2, 2, 1), [True, False])
    """
    if len(times) == 0 or len(times) != len(values):
        raise ValueError(
            f"pad_series: got {len(times)} time arrays and {len(values)} value arrays; "
            "give one (non-empty) list entry per series in each."
        )
    ts = [np.asarray(t, dtype=float) for t in times]
    vs = [np.asarray(v, dtype=float) for v in values]
    vs = [v[:, None] if v.ndim == 1 else v for v in vs]
    dims = {v.shape[-1] for v in vs}
    for b, (t, v) in enumerate(zip(ts, vs)):
        if t.ndim != 1 or t.size == 0 or v.ndim != 2 or v.shape[0] != t.size:
            raise ValueError(
                f"pad_series: series {b} has times of shape {t.shape} and values of shape "
                f"{v.shape}; give 1-D times and values shaped (len(times), D)."
            )
        if not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
            raise ValueError(
                f"pad_series: times[{b}] must be finite and strictly increasing; sort the "
                "series and drop duplicate or NaN times."
            )
    if len(dims) != 1:
        raise ValueError(f"pad_series: series have different value dimensions {sorted(dims)}.")
    lengths = np.array([t.size for t in ts])
    longest, d = int(lengths.max()), dims.pop()
    span = max(float(max(t[-1] for t in ts) - min(t[0] for t in ts)), 1.0)
    step = 1e-3 * span / longest  # padding times: past the end, strictly increasing
    out_t = np.empty((len(ts), longest))
    out_v = np.full((len(ts), longest, d), np.nan)
    for b, (t, v) in enumerate(zip(ts, vs)):
        out_t[b, : t.size] = t
        out_t[b, t.size :] = t[-1] + step * np.arange(1, longest - t.size + 1)
        out_v[b, : t.size] = v
    return PaddedSeries(out_t, out_v, np.isfinite(out_v), lengths)
