"""``probdyn.fit``: one verb, one result type."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from probdyn.core.backends import backend_names, engine_variant, get_backend, get_runner
from probdyn.core.engines import VI, AbstractEngine, ensemble_init
from probdyn.core.locking import model_call
from probdyn.core.posterior import Posterior, check_inputs
from probdyn.data._tasks import TaskStream, stream_rng
from probdyn.engines.checks import explained
from probdyn.engines.mcmc import per_draw_param_error

__all__ = ["detect_backend", "fit"]


def fit(
    model: Callable[..., Any],
    *args: Any,
    engine: AbstractEngine,
    key: Any = 0,
    backend: str | None = None,
    **kwargs: Any,
) -> Posterior:
    """Fit a posterior of ``model`` with ``engine``.

    Thread safety: NumPyro's and Pyro's effect handlers live on one stack per process,
    so `fit`, `Posterior.predict` and `Posterior.log_likelihood_at` hold one
    process-wide lock (`probdyn.core.locking.model_lock`). Calls from several threads
    are safe and run one at a time, each giving the same draws as alone; for fits in
    parallel, use processes.

    Args:
        model: a plain NumPyro (or, with the Pyro backend, Pyro) model function.
        *args: the model's positional arguments; observed data is passed the usual
            way, as an argument used as ``obs=`` inside the model. Or a single
            `probdyn.data.TaskStream` (with the `VI` engine): the model is trained
            across a stream of task batches, which it receives as keyword arguments,
            and the posterior is amortised (see `Posterior.predict`'s ``context``).
        engine: an engine config: `NUTS`, `HMC`, `VI`, `Ensemble` or `SMC`.
        key: an int seed or a backend random key. The same key reproduces the same
            draws bit for bit.
        backend: ``"numpyro"`` or ``"pyro"``; detected from the model when omitted.
        **kwargs: the model's keyword arguments.

    Returns:
        A `Posterior`.

    Raises:
        TypeError: if ``engine`` is not an engine config; an argument is another
            backend's array (a torch tensor given to a NumPyro model, a JAX array to
            a Pyro model); a ``sample`` statement is given a distribution class
            instead of an instance.
        ValueError: if the backend cannot be told from the model, or the model uses
            both NumPyro and Pyro; observed data contains NaN or inf, or would be
            broadcast against its distribution (a ``(10, 1)`` column against a
            ``(10,)`` mean); the model fails on an input holding NaN or inf. Each
            message names the argument (``fit(y=...)``) or site.

    Example:
        >>> import numpy as np, numpyro, numpyro.distributions as dist, probdyn
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
        ...     numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> post = probdyn.fit(model, np.ones(5), engine=probdyn.VI(num_steps=200,
        ...                    progress_bar=False), key=0)
        >>> post.samples["mu"].shape
        (1, 1000)
    """
    if not isinstance(engine, AbstractEngine):
        raise TypeError(
            f"fit(engine={engine!r}): expected an engine config such as probdyn.NUTS(...), "
            "probdyn.HMC(...) or probdyn.VI(...)."
        )
    if not callable(model):
        raise TypeError(f"fit(model={model!r}): the model must be a callable model function.")
    _check_stream(args, engine)
    with model_call("fit", model, args, kwargs) as labelled:
        if backend is None:
            probe_args, probe_kwargs = args, kwargs
            if args and isinstance(args[0], TaskStream):
                probe_args, probe_kwargs = (), {**args[0].draw(stream_rng(0)), **kwargs}
            backend = detect_backend(model, probe_args, probe_kwargs)
        elif backend not in backend_names():
            raise ValueError(
                f"fit(backend={backend!r}): choose one of {', '.join(backend_names())}."
            )
        else:
            _check_one_ppl(model, backend)
        check_inputs(backend, labelled)
        runner = get_runner(engine, backend, engine_variant(engine, args))
        with explained(labelled):
            if ensemble_init(engine) is None or getattr(runner, "unavailable", False):
                return runner(model, args, kwargs, engine, key)
            return _ensemble_started(runner, model, args, kwargs, engine, key, backend)


def _ensemble_started(
    runner: Callable[..., Posterior],
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: AbstractEngine,
    key: Any,
    backend: str,
) -> Posterior:
    """Run a sampler whose ``init`` is ``"ensemble"`` or an `Ensemble` config: fit the
    ensemble (same backend, same key), start the chains at its members (the runner's
    ``init=Posterior`` path: ``num_chains`` members spread evenly over them), and
    record the config as given and the ensemble's wall time."""
    ensemble = ensemble_init(engine)
    assert ensemble is not None
    _refuse_param_sites(model, args, kwargs, engine, backend)
    members = get_runner(ensemble, backend, "")(model, args, kwargs, ensemble, key)
    started = dataclasses.replace(engine, init=members)  # type: ignore[type-var]
    post = runner(model, args, kwargs, started, key)
    post.attrs["engine"] = engine.to_dict()
    post.attrs["init_wall_time"] = float(members.attrs.get("wall_time", float("nan")))
    return post


def _refuse_param_sites(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: AbstractEngine,
    backend: str,
) -> None:
    """Refuse an ensemble start of a model with ``param`` sites before fitting the
    ensemble (the runner would refuse its per-draw params only afterwards). A
    backend without the ``param_names`` service leaves the check to its runner."""
    try:
        names = get_backend(backend).service("param_names")(model, args, kwargs)
    except NotImplementedError:
        return
    if names:
        given = getattr(engine, "init", None)
        label = f"init={given!r}" if isinstance(given, str) else "init=Ensemble(...)"
        raise ValueError(per_draw_param_error(names, f"{type(engine).__name__}({label})"))


def _check_stream(args: tuple[Any, ...], engine: AbstractEngine) -> None:
    """A `TaskStream` is the only data argument, and only the VI engine trains on one."""
    if not any(isinstance(a, TaskStream) for a in args):
        return
    if len(args) != 1:
        raise TypeError(
            f"fit: a TaskStream must be the only positional argument (got {len(args)}); pass "
            "network options as keyword arguments, e.g. fit(model, stream, engine=VI(), hidden=64)."
        )
    if not isinstance(engine, VI):
        raise TypeError(
            f"fit(engine={type(engine).__name__}(...)): a TaskStream (training across tasks) "
            "is fitted with probdyn.VI; the other engines need one fixed dataset."
        )


def _referenced_modules(fn: Callable[..., Any]) -> set[str]:
    """Top-level packages named by the function's code, globals and closure."""
    import dis
    import types

    found: set[str] = set()
    seen: set[int] = set()

    def visit_code(code: types.CodeType, globs: dict[str, Any]) -> None:
        # Modules imported inside the function body (``import pyro`` in the model).
        instructions = list(dis.get_instructions(code))
        found.update(i.argval for i in instructions if i.opname == "IMPORT_NAME")
        # Only names read as globals: ``co_names`` also holds attribute names and the
        # names of ``from m import name`` inside the body, which are not the module's
        # globals of the same name.
        for name in {i.argval for i in instructions if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}:
            obj = globs.get(name)
            if obj is not None:
                visit_obj(obj, globs)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                visit_code(const, globs)

    def visit_obj(obj: Any, globs: dict[str, Any]) -> None:
        if isinstance(obj, types.ModuleType):
            found.add(obj.__name__)
            return
        mod = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", None)
        if isinstance(mod, str):
            found.add(mod)
        if isinstance(obj, types.FunctionType) and id(obj) not in seen:
            seen.add(id(obj))
            visit_code(obj.__code__, obj.__globals__)
            for cell in obj.__closure__ or ():
                try:
                    visit_obj(cell.cell_contents, obj.__globals__)
                except ValueError:  # empty cell
                    pass

    visit_obj(fn, getattr(fn, "__globals__", {}))
    return found


def _backend_of(module: str) -> str | None:
    for name in backend_names():
        if get_backend(name).owns(module):
            return name
    return None


def _static_backends(model: Callable[..., Any]) -> dict[str, list[str]]:
    """Backend -> the modules of it that the model's code refers to."""
    found: dict[str, list[str]] = {}
    for module in sorted(_referenced_modules(model)):
        if b := _backend_of(module):
            found.setdefault(b, []).append(module)
    return found


def _both(model: Callable[..., Any], how: str) -> ValueError:
    return ValueError(
        f"fit(model={getattr(model, '__name__', model)!r}): the model uses both NumPyro and "
        f"Pyro ({how}). A model is fitted by one PPL, and the other's sample statements would "
        "be silently left out: write the model with one PPL's primitives."
    )


def _check_one_ppl(model: Callable[..., Any], backend: str) -> None:
    """With ``backend=`` given: raise if the model's code refers to another PPL."""
    found = _static_backends(model)
    if not set(found) - {backend}:
        return
    how = "; ".join(f"{b}: {', '.join(m)}" for b, m in found.items())
    if backend in found:
        raise _both(model, f"its code refers to {how}")
    raise ValueError(
        f"fit(backend={backend!r}): the model's code refers to {how}, not to {backend}; "
        "pass the backend it is written for, or leave backend= out to detect it."
    )


def detect_backend(
    model: Callable[..., Any], args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
) -> str:
    """Tell which PPL a model function is written in.

    First from the modules its code refers to (directly or through the functions
    it calls); if that names neither PPL, by tracing the model once under each PPL
    that is already imported. Never a guess: ambiguity raises.

    Raises:
        ValueError: if the model's code refers to both PPLs, tracing finds sample
            sites under both, or neither can be found.
    """
    found = _static_backends(model)
    if len(found) > 1:
        how = "; ".join(f"{b}: {', '.join(m)}" for b, m in found.items())
        raise _both(model, f"its code refers to {how}")
    if len(found) == 1:
        return next(iter(found))
    traced = [b for b in backend_names() if _traces_sites(b, model, args, kwargs or {})]
    if len(traced) == 1:
        return traced[0]
    if len(traced) > 1:
        raise _both(model, f"a run records sample sites under {' and '.join(traced)}")
    raise ValueError(
        f"fit(model={getattr(model, '__name__', model)!r}): cannot tell the backend; the model "
        "seems to use neither NumPyro nor Pyro. Pass backend='numpyro' or backend='pyro'."
    )


def _traces_sites(
    backend: str, model: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> bool:
    entry = get_backend(backend)
    if not entry.loaded():  # never import a backend just to probe
        return False
    try:
        return bool(entry.service("probe")(model, args, kwargs))
    except Exception:
        return False
