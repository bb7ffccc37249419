"""The figures of calibration: the reliability diagram and the PIT histogram, each with
the band a calibrated predictive stays in (matplotlib and scipy imported lazily)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from probdyn.diagnostics.calibration.checks import _levels
from probdyn.diagnostics.calibration.intervals import coverage

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _new_axes(ax: Axes | None) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(4.5, 4))[1]


def _check_band(band: float) -> float:
    if not 0 < float(band) < 1:
        raise ValueError(f"band={band!r}: must be in (0, 1), e.g. 0.95.")
    return float(band)


def plot_reliability(
    draws: Any,
    observed: Any,
    levels: float | Sequence[float] | None = None,
    *,
    kind: str = "central",
    sample_dims: int = 2,
    band: float = 0.95,
    ax: Axes | None = None,
) -> Axes:
    """Reliability diagram: empirical coverage against nominal level.

    A calibrated predictive lies on the diagonal. The shaded band is where the
    coverage of a calibrated predictive falls with probability ``band`` at each level
    (pointwise): the central ``band`` range of ``Binomial(n, level) / n`` for the ``n``
    observed elements, assuming independent observations (dependent ones, e.g. along
    a trajectory, scatter more). Points below the band: intervals too narrow
    (overconfident); above: too wide.

    Args:
        draws: predictive draws ``(chain, draw, *shape)``.
        observed: held-out observations of ``shape``; NaN marks a missing one.
        levels: nominal levels (default 0.05, 0.10, ..., 0.95).
        kind: ``"central"`` or ``"hdi"`` intervals.
        sample_dims: 2 for ``(chain, draw, ...)``, 1 for ``(draw, ...)``.
        band: probability of the binomial band.
        ax: matplotlib Axes to draw into (default: a new figure).

    Returns:
        The matplotlib Axes.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> ax = plot_reliability(rng.normal(size=(1, 1000, 300)), rng.normal(size=300))
        >>> ax.get_xlabel()
        'nominal level'
    """
    from scipy import stats

    band = _check_band(band)
    default = tuple(round(k / 20, 2) for k in range(1, 20))  # 0.05, 0.10, ..., 0.95
    grid = _levels(default if levels is None else levels)
    cov = coverage(draws, observed, grid, kind=kind, sample_dims=sample_dims)
    n = int(np.sum(~np.isnan(np.asarray(observed, dtype=float))))
    nominal = np.array(grid)
    order = np.argsort(nominal)
    nominal = nominal[order]
    empirical = np.array([cov[level] for level in grid])[order]
    tail = (1 - band) / 2
    lo = stats.binom.ppf(tail, n, nominal) / n
    hi = stats.binom.ppf(1 - tail, n, nominal) / n
    ax = _new_axes(ax)
    ax.fill_between(nominal, lo, hi, color="0.85", label=f"{band:.0%} band if calibrated (n={n})")
    ax.plot([0, 1], [0, 1], color="0.4", lw=1, ls="--")
    ax.plot(nominal, empirical, "o-", color="C0", label=f"{kind} intervals")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="nominal level", ylabel="empirical coverage")
    ax.set_title("Reliability")
    ax.legend(loc="upper left", fontsize="small")
    return ax


def plot_pit(
    pit_values: Any, bins: int = 20, *, band: float = 0.95, ax: Axes | None = None
) -> Axes:
    """Histogram of PIT values with a simultaneous band for uniform counts.

    Under calibration each bin count is ``Binomial(N, 1 / bins)`` for ``N`` PIT
    values. The band is simultaneous over the bins by a Bonferroni correction: each
    bin's limits are its ``(1 - band) / (2 * bins)`` and ``1 - (1 - band) / (2 * bins)``
    binomial quantiles, so all bins of a calibrated predictive lie inside with
    probability at least ``band`` (for independent values). U shape: too narrow
    predictions; hump: too wide; slope: biased. NaN values are dropped.

    Args:
        pit_values: PIT values from `pit`, any shape.
        bins: number of equal-width bins on [0, 1].
        band: simultaneous probability of the band.
        ax: matplotlib Axes to draw into (default: a new figure).

    Returns:
        The matplotlib Axes.

    Raises:
        ValueError: for no values, values outside [0, 1], ``bins < 1`` or a band
            outside (0, 1).

    Example:
        >>> ax = plot_pit(np.random.default_rng(0).uniform(size=500), bins=10)
        >>> len(ax.patches) >= 10
        True
    """
    from scipy import stats

    band = _check_band(band)
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins={bins!r}: must be a positive integer, e.g. 20.")
    values = np.asarray(pit_values, dtype=float).ravel()
    values = values[~np.isnan(values)]
    if values.size == 0 or values.min() < 0 or values.max() > 1:
        raise ValueError("pit_values must hold at least one value, all in [0, 1] (see pit()).")
    n = values.size
    counts, edges = np.histogram(values, bins=int(bins), range=(0.0, 1.0))
    tail = (1 - band) / (2 * bins)
    lo, hi = stats.binom.ppf([tail, 1 - tail], n, 1 / bins)
    ax = _new_axes(ax)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="C0", alpha=0.7)
    # The band over the bars (not behind them), and head room for the legend, so
    # that neither hides a bar.
    ax.axhspan(lo, hi, color="0.5", alpha=0.25, zorder=3,
               label=f"{band:.0%} simultaneous band if calibrated")  # fmt: skip
    ax.axhline(n / bins, color="0.3", lw=1, ls="--", zorder=3, label="uniform (calibrated)")
    top = max(float(counts.max()), float(hi))
    ax.set(xlim=(0, 1), ylim=(0, 1.4 * top), xlabel="PIT value", ylabel="count")
    ax.set_title(f"PIT histogram (N={n})")
    ax.legend(loc="upper center", fontsize="x-small")
    return ax
