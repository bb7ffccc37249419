"""Calibration of predictive draws against held-out observations (NumPy only).

Every function takes predictive draws in the posterior layout, ``(chain, draw,
*shape)`` (set ``sample_dims=1`` for ``(draw, *shape)``), and observations of
``shape``, e.g. ``post.predict(x_test, sites=["y"])["y"]`` and ``y_test``.

Conventions shared by all functions:

- ``reduce=True`` (default) averages over all observation elements and returns a
  float; ``reduce=False`` returns one value per element (an array of ``shape``).
- ``axis`` (an int or a tuple of axes of ``observed``) keeps those axes and
  averages over the others, e.g. ``axis=-1`` gives one value per output dimension
  and ``axis=0`` one per time point of a ``(time, dim)`` trajectory.
- Missing observations are NaN in ``observed``: they are left out of every mean
  (and are NaN in per-element results). Draws must not contain NaN.
- Lower is better for `crps`, `nlpd` and `rmse`; `coverage` should equal the
  nominal level and `pit` values should be uniform on [0, 1].

The guide ``docs/calibration.md`` explains how to read each metric and plot.

The functions are defined by concern in `intervals` (`interval`, `coverage`,
`interval_width`), `pit_values` (`pit`, `pit_test`), `scores` (`rmse`, `crps`, `nlpd`), `table`
(`calibration_table`) and `plots` (`plot_reliability`, `plot_pit`), over the shared input
checks of `checks`; import them from here (or from `probdyn.calibration`).
"""

from __future__ import annotations

# isort: off
# One name a line, in the order the API page (docs/api/calibration.md) renders them.
from probdyn.diagnostics.calibration.intervals import interval
from probdyn.diagnostics.calibration.intervals import coverage
from probdyn.diagnostics.calibration.intervals import interval_width
from probdyn.diagnostics.calibration.pit_values import pit
from probdyn.diagnostics.calibration.pit_values import pit_test
from probdyn.diagnostics.calibration.scores import rmse
from probdyn.diagnostics.calibration.scores import crps
from probdyn.diagnostics.calibration.scores import nlpd
from probdyn.diagnostics.calibration.table import calibration_table
from probdyn.diagnostics.calibration.plots import plot_reliability
from probdyn.diagnostics.calibration.plots import plot_pit
# isort: on

__all__ = [
    "calibration_table",
    "coverage",
    "crps",
    "interval",
    "interval_width",
    "nlpd",
    "pit",
    "pit_test",
    "plot_pit",
    "plot_reliability",
    "rmse",
]
