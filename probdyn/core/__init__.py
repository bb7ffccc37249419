"""The core: the one result type and the one verb, backend-neutral.

`Posterior` (what every engine returns), `fit` (the verb), the engine configs, the
registry of backend services, netCDF save/load and the ArviZ conversion. Nothing here
imports jax or torch: a backend is reached only through `probdyn.core.backends`, which
imports it the first time one of its services is asked for.
"""

from probdyn.core.backends import Backend, get_backend, register_backend, register_runner
from probdyn.core.engines import HMC, NUTS, SMC, VI, AbstractEngine, Ensemble
from probdyn.core.fit import detect_backend, fit
from probdyn.core.io import load
from probdyn.core.posterior import Posterior

__all__ = [
    "HMC",
    "NUTS",
    "SMC",
    "VI",
    "AbstractEngine",
    "Backend",
    "Ensemble",
    "Posterior",
    "detect_backend",
    "fit",
    "get_backend",
    "load",
    "register_backend",
    "register_runner",
]
