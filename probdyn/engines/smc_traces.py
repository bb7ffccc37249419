"""What both tempered SMC runners record per stage, and the attrs they report (NumPy only).

The traces are indexed by the temperature the particles were moved at, ``beta_0 =
0, ..., beta_K = 1``: `StageTraces` starts them at ``beta_0`` (full ESS, zero log
evidence), each stage adds its moves' acceptance rate, step size and number (the
prior draws at ``beta_0`` are not moved: 0 moves, acceptance rate NaN), and each
reweighting the next temperature, its ESS and the running log evidence.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["BAR_FORMAT", "StageTraces", "tempered_attrs"]

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| temperature {n:.3g}/1 [{elapsed}{postfix}]"
"""The progress bar's format: it counts temperature from 0 to 1, not stages."""


class StageTraces:
    """The per-stage curves of one tempered SMC run (``temperature``, ``ess``,
    ``log_evidence``, ``acceptance_rate``, ``step_size``, ``num_moves``).

    Example:
        >>> t = StageTraces(100)
        >>> t.moved(float("nan"), 0.5, 0); t.reweighted(1.0, 60.0, -1.25); t.moved(0.7, 0.5, 3)
        >>> t.temperature, t.log_evidence
        (1.0, -1.25)
        >>> {k: v.shape for k, v in t.arrays().items()}["acceptance_rate"]
        (2,)
    """

    def __init__(self, num_particles: int) -> None:
        self.curves: dict[str, list[float]] = {
            "temperature": [0.0],
            "ess": [float(num_particles)],
            "log_evidence": [0.0],
            "acceptance_rate": [],
            "step_size": [],
            "num_moves": [],
        }

    @property
    def temperature(self) -> float:
        """The temperature the particles are at now."""
        return self.curves["temperature"][-1]

    @property
    def log_evidence(self) -> float:
        """The running estimate of ``log p(y)``."""
        return self.curves["log_evidence"][-1]

    def moved(self, acceptance_rate: float, step_size: float, num_moves: int) -> None:
        """Record a stage's moves at the current temperature (``num_moves`` of them;
        acceptance rate NaN if none)."""
        self.curves["acceptance_rate"].append(acceptance_rate)
        self.curves["step_size"].append(step_size)
        self.curves["num_moves"].append(num_moves)

    def reweighted(self, temperature: float, ess: float, log_increment: float) -> None:
        """Record a reweighting to ``temperature``: the weights' ESS and the evidence
        increment ``log mean exp((beta' - beta) * loglik)``."""
        self.curves["temperature"].append(temperature)
        self.curves["ess"].append(ess)
        self.curves["log_evidence"].append(self.log_evidence + log_increment)

    def add_evidence(self, log_increment: float) -> None:
        """Add a stage's increment without a new temperature (the last stage, at 1)."""
        self.curves["log_evidence"][-1] += log_increment

    def arrays(self) -> dict[str, np.ndarray]:
        """The curves as arrays, for ``Posterior.traces``."""
        return {k: np.asarray(v) for k, v in self.curves.items()}


def tempered_attrs(traces: dict[str, np.ndarray], **backend: Any) -> dict[str, Any]:
    """``Posterior.attrs`` of a tempered SMC run: ``log_evidence`` (the last of its
    trace), ``num_stages``, ``num_moves`` (all stages' moves) and the backend's own
    entries."""
    return {
        "log_evidence": float(traces["log_evidence"][-1]),
        "num_stages": len(traces["temperature"]) - 1,
        "num_moves": int(np.sum(traces["num_moves"])),
        **backend,
    }
