"""Runner registry: ``(engine config type, backend) -> runner``.

Runners are registered as ``"module:function"`` strings so that registering one
imports nothing; the backend is imported when a run first needs it. A runner has
the signature ``runner(model, args, kwargs, engine, key) -> Posterior``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from probdyn._engines import HMC, NUTS, SMC, VI, AbstractEngine, Ensemble

__all__ = ["get_runner", "register_runner"]

BACKENDS = ("numpyro", "pyro")

_RUNNERS: dict[tuple[type[AbstractEngine], str], str | Callable[..., Any]] = {
    (NUTS, "numpyro"): "probdyn.numpyro._mcmc:run_mcmc",
    (HMC, "numpyro"): "probdyn.numpyro._mcmc:run_mcmc",
    (VI, "numpyro"): "probdyn.numpyro._vi:run_vi",
    (NUTS, "pyro"): "probdyn.pyro._mcmc:run_mcmc",
    (HMC, "pyro"): "probdyn.pyro._mcmc:run_mcmc",
    (VI, "pyro"): "probdyn.pyro._vi:run_vi",
    (Ensemble, "numpyro"): "probdyn.numpyro._ensemble:run_ensemble",
    (Ensemble, "pyro"): "probdyn.pyro._ensemble:run_ensemble",
    (SMC, "numpyro"): "probdyn.numpyro._smc:run_smc",
    (SMC, "pyro"): "probdyn.pyro._smc:run_smc",
}


def register_runner(
    engine: type[AbstractEngine], backend: str, runner: str | Callable[..., Any]
) -> None:
    """Register the function that runs ``engine`` configs on ``backend``.

    Args:
        engine: the config class (a subclass of ``AbstractEngine``).
        backend: ``"numpyro"`` or ``"pyro"``.
        runner: a callable ``runner(model, args, kwargs, engine, key) -> Posterior``,
            or a ``"module:function"`` string imported on first use.

    Example:
        >>> import probdyn
        >>> probdyn.register_runner(probdyn.NUTS, "numpyro", "probdyn.numpyro._mcmc:run_mcmc")
    """
    if not (isinstance(engine, type) and issubclass(engine, AbstractEngine)):
        raise TypeError(f"register_runner(engine={engine!r}): expected an engine config class.")
    if backend not in BACKENDS:
        raise ValueError(f"register_runner(backend={backend!r}): choose one of {BACKENDS}.")
    _RUNNERS[(engine, backend)] = runner


def get_runner(engine: AbstractEngine, backend: str) -> Callable[..., Any]:
    """The runner for ``engine`` on ``backend``; NotImplementedError if there is none."""
    target = _RUNNERS.get((type(engine), backend))
    if target is None:
        have = sorted(b for (e, b) in _RUNNERS if e is type(engine))
        raise NotImplementedError(
            f"No {type(engine).__name__} runner for the {backend!r} backend yet "
            f"(available for: {', '.join(have) or 'none'})."
        )
    if isinstance(target, str):
        module, _, name = target.partition(":")
        target = getattr(importlib.import_module(module), name)
    return target
