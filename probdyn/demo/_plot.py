"""The demo's figure: predictive bands of both species against the data."""

from __future__ import annotations

import numpy as np

from probdyn.calibration import interval
from probdyn.core.io import atomic_write
from probdyn.data import PredatorPreyData

__all__ = ["plot_predictive"]

#: Years between labelled ticks on a calendar time axis.
YEAR_STEP = 5

SMOKE_NOTE = "--quick: smoke-test sizes, not converged; for checking the install only"


def plot_predictive(
    data: PredatorPreyData,
    pred: dict[str, np.ndarray],
    path: str,
    title: str = "",
    *,
    year0: float | None = None,
    note: str = "",
) -> None:
    """Posterior predictive bands of both species against the data and the truth.

    Args:
        data: the demo's data (times, observations, truth if known).
        pred: draws of ``"z"`` (states) and ``"y"`` (observations) on ``data.t_grid``.
        path: the PNG to write.
        title: the figure's title.
        year0: the calendar year of time 0 (time axis in years), or None (``time``).
        note: a line printed across the top of the figure (e.g. `SMOKE_NOTE`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = data.scale if year0 is not None else 1.0
    x_of = (lambda t: np.asarray(t) + year0) if year0 is not None else np.asarray
    fig, axes = plt.subplots(2, 1, figsize=(8, 6.4), sharex=True)
    for j, (ax, label) in enumerate(zip(axes, ("prey", "predator"))):
        z, y = pred["z"][..., j] * unit, pred["y"][..., j] * unit
        lo90, hi90 = interval(y, 0.9)
        zlo, zhi = interval(z, 0.9)
        grid = x_of(data.t_grid)
        ax.fill_between(grid, lo90, hi90, color="C0", alpha=0.15,
                        label="90% predictive interval (new observations)")  # fmt: skip
        ax.fill_between(grid, zlo, zhi, color="C0", alpha=0.35,
                        label="90% credible interval (true state)")  # fmt: skip
        ax.plot(grid, np.median(z.reshape(-1, z.shape[-1]), axis=0), color="C0",
                label="posterior median (state)")  # fmt: skip
        if data.z_grid is not None:
            ax.plot(grid, data.z_grid[:, j] * unit, "k--", lw=1, label="true state")
        ax.plot(x_of(data.t_train), data.y_train[:, j] * unit, "ko", ms=4,
                label="observed (training)")  # fmt: skip
        ax.plot(x_of(data.t_test), data.y_test[:, j] * unit, "rx", ms=6, label="held out")
        split = (float(data.t_train[-1]) + float(data.t_test[0])) / 2
        ax.axvline(x_of(split), color="grey", lw=0.8, ls=":", label="end of training data")
        ax.set_ylabel(_species_label(label, year0 is not None))
    axes[0].set_title(title)
    axes[1].set_xlabel("year" if year0 is not None else "time (arbitrary units)")
    if year0 is not None:
        from matplotlib.ticker import MultipleLocator, StrMethodFormatter

        # Whole years every 5 (1900, 1905, ...): a tick before the first year would
        # read as data that is not there.
        axes[1].xaxis.set_major_locator(MultipleLocator(YEAR_STEP))
        axes[1].xaxis.set_minor_locator(MultipleLocator(1))
        axes[1].xaxis.set_major_formatter(StrMethodFormatter("{x:.0f}"))
    handles, labels = axes[0].get_legend_handles_labels()
    # Below the axes: inside, the legend hid the first peak's band.
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    if note:
        fig.text(0.5, 0.985, note, ha="center", va="top", fontsize=8, color="C3")
    fig.tight_layout(rect=(0, 0.08, 1, 0.97 if note else 1))
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120), where="plot_predictive(path=...)")
    finally:
        plt.close(fig)


def _species_label(label: str, real: bool) -> str:
    if not real:
        return f"{label} (arbitrary units)"
    return {"prey": "hare pelts (thousands)", "predator": "lynx pelts (thousands)"}[label]
