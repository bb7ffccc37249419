"""The small ragged batch the LatentSDE tests share (tests/test_latent_sde*.py)."""

from __future__ import annotations

import numpy as np


def ragged() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Three series of 3, 2 and 4 times in [0, 1.2], two values each, one value missing."""
    times = [np.array([0.1, 0.4, 0.9]), np.array([0.0, 0.3]), np.array([0.2, 0.5, 0.65, 1.2])]
    values = [np.arange(6.0).reshape(3, 2) / 6, np.ones((2, 2)), -np.ones((4, 2))]
    values[2][1, 0] = np.nan  # a missing entry inside a series
    return times, values
