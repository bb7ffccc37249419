"""Test configuration: float64 for accuracy on both backends, fixed seeds."""

from __future__ import annotations

import numpyro

numpyro.enable_x64()
