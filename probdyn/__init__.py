"""probdyn: probabilistic programming for dynamics.

Neural ODEs and Bayesian neural networks as NumPyro (and, later, Pyro) model
primitives; NUTS, HMC and variational inference behind one `fit` call that always
returns a `Posterior`.

``import probdyn`` imports neither jax nor torch: a backend loads on first use
(``probdyn.numpyro``, ``probdyn.pyro``, or the first `fit`).
"""

from __future__ import annotations

import importlib
from typing import Any

from probdyn.core.backends import register_runner
from probdyn.core.engines import HMC, MCLMC, NUTS, SMC, VI, AbstractEngine, Ensemble
from probdyn.core.fit import fit
from probdyn.core.io import load
from probdyn.core.posterior import Posterior
from probdyn.diagnostics.compare import Comparison, compare
from probdyn.diagnostics.sbc import SBCResult, sbc

__version__ = "0.1.0"

__all__ = [
    "HMC",
    "MCLMC",
    "NUTS",
    "SMC",
    "VI",
    "AbstractEngine",
    "Comparison",
    "Ensemble",
    "Posterior",
    "SBCResult",
    "__version__",
    "compare",
    "fit",
    "load",
    "register_runner",
    "sbc",
]

_SUBMODULES = ("numpyro", "pyro", "calibration", "testing", "data")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"probdyn.{name}")
    raise AttributeError(f"module 'probdyn' has no attribute {name!r}")
