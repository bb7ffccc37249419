"""Calibration of predictive draws: the public path of `probdyn.diagnostics.calibration`.

Everything here is defined in `probdyn.diagnostics.calibration` and re-exported under
this shorter name, which is the one the documentation and examples use.
"""

from probdyn.diagnostics.calibration import *  # noqa: F403
from probdyn.diagnostics.calibration import __all__  # noqa: F401
