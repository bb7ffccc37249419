"""The figures of `SBCResult`: rank histograms and ECDF-difference plots, one panel
per quantity, each with the band a calibrated engine stays in (matplotlib and scipy
imported lazily)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from probdyn.diagnostics.ecdf import _ecdf_counts, _grid_size, ecdf_band
from probdyn.diagnostics.sbc_result import _check_level

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from probdyn.diagnostics.sbc_result import SBCResult


def _plot_ranks(
    result: SBCResult, names: Sequence[str] | None, *, bins: int | None, level: float
) -> Figure:
    """`SBCResult.plot_ranks`: rank histograms of ``result`` with the binomial band.

    Args:
        result: the SBC run.
        names: the quantities to draw (None: all).
        bins: number of equal bins (None: ``max(2, min(20, n // 5))``).
        level: probability of each bin's band under uniformity.

    Returns:
        A ``matplotlib.figure.Figure`` with one panel per quantity.
    """
    from scipy import stats

    _check_level("plot_ranks", "level", level)
    chosen = result._names(names, "plot_ranks")
    n = result.num_simulations
    bins = max(2, min(20, n // 5)) if bins is None else bins
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"plot_ranks(bins={bins!r}): bins must be a positive integer.")
    lo, hi = stats.binom.ppf([(1 - level) / 2, (1 + level) / 2], n, 1 / bins)
    fig, axes = _panels(len(chosen))
    for ax, name in zip(axes, chosen):
        ax.axhspan(lo, hi, color="0.85", label=f"{level:.0%} band")
        ax.axhline(n / bins, color="0.5", lw=1)
        ax.hist(result.fractional_ranks[name], bins=bins, range=(0, 1), color="C0", alpha=0.8)
        ax.set_title(f"{name} (p={result.p_values[name]:.2g})", fontsize=9)
        ax.set_xlabel("fractional rank")
    axes[0].set_ylabel("simulations")
    return fig


def _plot_ecdf(result: SBCResult, names: Sequence[str] | None, *, level: float) -> Figure:
    """`SBCResult.plot_ecdf`: ECDF-difference plots of ``result`` with the simultaneous band.

    Args:
        result: the SBC run.
        names: the quantities to draw (None: all).
        level: simultaneous probability of the band under uniformity.

    Returns:
        A ``matplotlib.figure.Figure`` with one panel per quantity.
    """
    _check_level("plot_ecdf", "level", level)
    chosen = result._names(names, "plot_ecdf")
    n = result.num_simulations
    k = _grid_size(n)
    z = np.arange(k + 1) / k
    lo, hi = ecdf_band(n, k, level)
    fig, axes = _panels(len(chosen))
    for ax, name in zip(axes, chosen):
        counts = _ecdf_counts(result.fractional_ranks[name], k)
        ax.fill_between(z, lo / n - z, hi / n - z, color="0.85", step="mid")
        ax.axhline(0.0, color="0.5", lw=1)
        ax.plot(z, counts / n - z, color="C0", drawstyle="steps-mid")
        ax.set_title(f"{name} (p={result.p_values[name]:.2g})", fontsize=9)
        ax.set_xlabel("fractional rank")
    axes[0].set_ylabel("ECDF difference")
    return fig


def _panels(count: int) -> tuple[Figure, list[Any]]:
    """A figure with ``count`` panels, at most four a row; the unused ones are hidden."""
    from matplotlib.figure import Figure

    cols = min(4, count)
    rows = -(-count // cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows), layout="constrained")
    axes = list(np.ravel(fig.subplots(rows, cols, squeeze=False)))
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]
