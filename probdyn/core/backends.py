"""The registry of backend services: the one seam between the core and a backend.

The core (`fit`, `Posterior`, SBC, compare) never imports a backend. Everything it
needs from one it asks of the backend's entry here:

* **runners**, looked up by ``(engine config type, backend, variant)``: the function
  ``runner(model, args, kwargs, engine, key) -> Posterior`` that runs an engine. The
  *variant* names a different algorithm behind the same config: ``"minibatch"`` for
  ``SMC(stream="minibatch")`` (Feynman–Kac SMC), ``"stream"`` for `VI` trained on a
  `probdyn.data.TaskStream`; it is ``""`` otherwise (see `engine_variant`).
* **services**, the functions of one module per backend (``Backend.services``):

  ========================= ===========================================================
  ``probe(model, a, kw)``    whether a run of the model under this PPL records a
                             sample site (backend detection)
  ``forward_draws(...)``     deterministic sites, pointwise log likelihood and
                             replicated data for every draw (`Posterior` methods)
  ``predict(...)``           the model run forward for every draw (`Posterior.predict`)
  ``trace_once(...)``        one run of a model, sites sorted by role (`probdyn.sbc`)
  ``check_inputs(labelled)`` raise TypeError for another backend's array among a
                             model's labelled arguments (optional: skipped if absent)
  ``param_names(model, a,    the model's ``param`` sites, so that an ensemble start
  kw)``                      of a model with them is refused before the ensemble is
                             fitted (optional: the runner refuses it otherwise)
  ``precision()``            the float settings in force (to copy into workers)
  ``set_precision(env)``     apply them in a worker process
  ========================= ===========================================================

Runners and services are named as ``"module:function"`` / module strings, so that
registering imports nothing: a backend loads the first time one of its services is
used. A third backend registers itself with `register_backend` and its runners with
`register_runner`, and is then checked with `probdyn.testing`.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Callable
from typing import Any

from probdyn.core.engines import HMC, MCLMC, NUTS, SMC, VI, AbstractEngine, Ensemble

__all__ = [
    "Backend",
    "backend_names",
    "engine_variant",
    "get_backend",
    "get_runner",
    "register_backend",
    "register_runner",
]


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend as the core sees it.

    Args:
        name: the name users pass as ``backend=`` (``"numpyro"``, ``"pyro"``).
        packages: module prefixes whose use marks a model as this backend's (e.g.
            ``("numpyro", "probdyn.numpyro")``); the first one is the PPL itself,
            and a backend counts as loaded once it is in ``sys.modules``.
        services: the module holding the service functions (see this module's
            docstring), imported on first use.
        install: the install hint shown when the PPL is missing.
    """

    name: str
    packages: tuple[str, ...]
    services: str
    install: str = ""

    def owns(self, module: str) -> bool:
        """Whether ``module`` belongs to this backend (the PPL or probdyn's twin)."""
        return any(module == p or module.startswith(p + ".") for p in self.packages)

    def loaded(self) -> bool:
        """Whether the PPL is already imported (probing never imports a backend)."""
        return self.packages[0] in sys.modules

    def service(self, name: str) -> Callable[..., Any]:
        """The service function ``name`` (imports the backend on first use)."""
        try:
            module = importlib.import_module(self.services)
        except ModuleNotFoundError as err:
            hint = f" Install it with: {self.install}" if self.install else ""
            raise ModuleNotFoundError(
                f"The {self.name!r} backend needs {err.name!r}, which is not installed.{hint}",
                name=err.name,
            ) from err
        fn = getattr(module, name, None)
        if fn is None:
            raise NotImplementedError(f"The {self.name!r} backend has no {name!r} service.")
        return fn


_BACKENDS: dict[str, Backend] = {}
_RUNNERS: dict[tuple[type[AbstractEngine], str, str], str | Callable[..., Any]] = {}


def register_backend(backend: Backend) -> None:
    """Make a backend known to `probdyn.fit`, `Posterior` and the diagnostics.

    Args:
        backend: its `Backend` entry (name, packages, services module).

    Example:
        >>> import probdyn
        >>> from probdyn.core import Backend, get_backend
        >>> probdyn.core.register_backend(get_backend("numpyro"))  # already registered
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend(backend={backend!r}): expected a probdyn.core.Backend.")
    _BACKENDS[backend.name] = backend


def backend_names() -> tuple[str, ...]:
    """The names of the registered backends, in registration order."""
    return tuple(_BACKENDS)


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``; ValueError naming the choices otherwise."""
    try:
        return _BACKENDS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"backend={name!r}: choose one of {', '.join(map(repr, _BACKENDS))}."
        ) from None


def register_runner(
    engine: type[AbstractEngine],
    backend: str,
    runner: str | Callable[..., Any],
    *,
    variant: str = "",
) -> None:
    """Register the function that runs ``engine`` configs on ``backend``.

    Args:
        engine: the config class (a subclass of ``AbstractEngine``).
        backend: the name of a registered backend (``"numpyro"``, ``"pyro"``, or one
            added with `register_backend`).
        runner: a callable ``runner(model, args, kwargs, engine, key) -> Posterior``,
            or a ``"module:function"`` string imported on first use.
        variant: the algorithm variant it runs (see `engine_variant`); ``""`` for
            the config's plain meaning.

    Example:
        >>> import probdyn
        >>> probdyn.register_runner(probdyn.NUTS, "numpyro",
        ...                         "probdyn.numpyro.engines.mcmc:run_mcmc")
    """
    if not (isinstance(engine, type) and issubclass(engine, AbstractEngine)):
        raise TypeError(f"register_runner(engine={engine!r}): expected an engine config class.")
    if backend not in _BACKENDS:
        raise ValueError(
            f"register_runner(backend={backend!r}): choose one of {backend_names()} "
            "(or add one with probdyn.core.register_backend)."
        )
    _RUNNERS[(engine, backend, variant)] = runner


def engine_variant(engine: AbstractEngine, args: tuple[Any, ...]) -> str:
    """Which algorithm behind ``engine`` the arguments call for.

    ``"minibatch"`` for ``SMC(stream="minibatch")`` (Feynman–Kac SMC), ``"stream"``
    for `VI` whose data is a `probdyn.data.TaskStream` (an amortised posterior), and
    ``""`` otherwise.
    """
    from probdyn.data._tasks import TaskStream

    if isinstance(engine, SMC) and engine.stream == "minibatch":
        return "minibatch"
    if isinstance(engine, VI) and args and isinstance(args[0], TaskStream):
        return "stream"
    return ""


def get_runner(engine: AbstractEngine, backend: str, variant: str = "") -> Callable[..., Any]:
    """The runner for ``engine`` on ``backend``; NotImplementedError if there is none."""
    target = _RUNNERS.get((type(engine), backend, variant))
    if target is None:
        have = sorted({b for (e, b, v) in _RUNNERS if e is type(engine) and v == variant})
        what = type(engine).__name__ + (f" ({variant})" if variant else "")
        raise NotImplementedError(
            f"No {what} runner for the {backend!r} backend yet "
            f"(available for: {', '.join(have) or 'none'})."
        )
    if isinstance(target, str):
        module, _, name = target.partition(":")
        target = getattr(importlib.import_module(module), name)
    return target


# -- the two built-in backends -------------------------------------------------------
register_backend(
    Backend(
        name="numpyro",
        packages=("numpyro", "probdyn.numpyro"),
        services="probdyn.numpyro.services",
        install='pip install "probdyn[numpyro]"',
    )
)
register_backend(
    Backend(
        name="pyro",
        packages=("pyro", "probdyn.pyro"),
        services="probdyn.pyro.services",
        install='pip install "probdyn[pyro]"',
    )
)
for _b in ("numpyro", "pyro"):
    _engines = f"probdyn.{_b}.engines"
    register_runner(NUTS, _b, f"{_engines}.mcmc:run_mcmc")
    register_runner(HMC, _b, f"{_engines}.mcmc:run_mcmc")
    register_runner(VI, _b, f"{_engines}.vi:run_vi")
    register_runner(VI, _b, f"{_engines}.vi_stream:run_vi_stream", variant="stream")
    register_runner(Ensemble, _b, f"{_engines}.ensemble:run_ensemble")
    register_runner(SMC, _b, f"{_engines}.smc:run_smc")
    register_runner(SMC, _b, f"{_engines}.fksmc:run_fksmc", variant="minibatch")
    register_runner(MCLMC, _b, f"{_engines}.mclmc:run_mclmc")
del _b, _engines
