"""Warnings both backends' ensemble runners give, written once (NumPy only)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

__all__ = ["warn_non_finite", "warn_not_jittered"]


def warn_not_jittered(names: Sequence[str]) -> None:
    """Anchored members: say which observed sites or factors were not jittered."""
    if names:
        warnings.warn(
            f"Ensemble(anchored=True): observed site(s) or factor(s) {list(names)} are not "
            "Gaussian (Normal likelihood), so their observations are not jittered; the "
            "anchored ensemble is then an approximation to the posterior, not exact draws.",
            UserWarning,
            stacklevel=5,
        )


def warn_non_finite(losses: np.ndarray, final: np.ndarray) -> None:
    """Count members that ended, or stepped, at a non-finite loss (they are kept)."""
    bad_final = int((~np.isfinite(final)).sum())
    bad_steps = int((~np.isfinite(losses)).any(axis=1).sum())
    if bad_final or bad_steps:
        warnings.warn(
            f"Ensemble: {bad_final} of {len(final)} member(s) end with a non-finite loss and "
            f"{bad_steps} had a non-finite loss at some step (those steps were skipped). "
            "They are kept; see posterior.traces['loss'] and sample_stats['lp'], and try a "
            "smaller learning_rate or init_scale.",
            RuntimeWarning,
            stacklevel=5,
        )
