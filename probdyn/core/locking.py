"""Entry points that run a model: the process-wide lock they hold, and the call they
record.

**The lock.** NumPyro's and Pyro's effect handlers live on one stack per process
(``_PYRO_STACK``), not per thread, and Pyro's parameter store and torch's random state
are global too. Two model runs in two threads interleave their handlers: measured, two
`probdyn.fit` calls in two threads fail with "all sites must have unique names"
(NumPyro), "Multiple sample sites named 'a'" or "This Messenger is not on the bottom of
the stack" (Pyro). So every entry point that runs a model (`probdyn.fit`,
`Posterior.predict`, `Posterior.log_likelihood_at` and the forward pass
`probdyn.compare` scores with, the backend services that probe a model for backend
detection and trace it for `probdyn.sbc`) holds `model_lock`: calls from several
threads are safe, and run one at a time. The lock is reentrant, as `fit` probes and
traces the model inside its own call. Processes (``probdyn.sbc(..., workers=n)``)
have their own stacks and run in parallel.

**The call.** `model_call` also records which entry point runs and its arguments,
labelled as the user wrote them, so that a check deep inside a backend
(`probdyn.engines.checks`) names ``fit(y=...)`` rather than a site alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

import numpy as np

__all__ = [
    "argument_labels",
    "current_verb",
    "is_array",
    "label_of",
    "locked",
    "model_arrays",
    "model_call",
    "model_lock",
]

model_lock = threading.RLock()
"""Held around every model run; reentrant (see the module docstring)."""

_F = TypeVar("_F", bound=Callable[..., Any])


def locked(method: _F) -> _F:
    """``method`` run holding `model_lock`: for the primitives' own entry points that
    run a model outside `probdyn.fit` and `Posterior` (``LatentODE.predict``, ...)."""

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        with model_lock:
            return method(*args, **kwargs)

    return cast(_F, run)


@dataclasses.dataclass(frozen=True)
class _Call:
    verb: str
    arguments: tuple[tuple[str, Any], ...]


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("probdyn_call", default=None)


@contextlib.contextmanager
def model_call(
    verb: str, model: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> Iterator[list[tuple[str, Any]]]:
    """Hold `model_lock` and record the call: within the block, checks name ``verb``
    (``"fit"``, ``"predict"``, ...) and the argument a site's value came from.

    Yields:
        The arguments with their labels (`argument_labels`).
    """
    labelled = argument_labels(model, args, kwargs)
    with model_lock:
        token = _CALL.set(_Call(verb, tuple(labelled)))
        try:
            yield labelled
        finally:
            _CALL.reset(token)


def argument_labels(
    model: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> list[tuple[str, Any]]:
    """Every argument with its label: the model's parameter name for a positional
    argument (``args[i]`` past its signature), the keyword for a keyword argument, and
    ``x[0]``, ``data['y']`` for the entries of a tuple, list or dict argument.

    Example:
        >>> def model(x, y=None): ...
        >>> [label for label, _ in argument_labels(model, (1, (2, 3)), {})]
        ['x', 'y', 'y[0]', 'y[1]']
    """
    try:
        params = inspect.signature(model).parameters.values()
        names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):  # a builtin or an object without a signature
        names = []
    labelled = [(names[i] if i < len(names) else f"args[{i}]", a) for i, a in enumerate(args)]
    out: list[tuple[str, Any]] = []
    for label, value in [*labelled, *kwargs.items()]:
        out.append((label, value))
        if isinstance(value, (tuple, list)):
            out += [(f"{label}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, dict):
            out += [(f"{label}[{k!r}]", v) for k, v in value.items()]
    return out


def current_verb(default: str = "fit") -> str:
    """The entry point being run (see `model_call`), or ``default`` outside one."""
    call = _CALL.get()
    return default if call is None else call.verb


def is_array(value: Any) -> bool:
    """Whether ``value`` is an array (NumPy, JAX, torch: it has a shape and a dtype)."""
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, type)


def model_arrays() -> list[tuple[str, Any]]:
    """The array arguments of the current call, with their labels."""
    call = _CALL.get()
    return [(k, a) for k, a in (call.arguments if call else ()) if is_array(a)]


def label_of(value: Any) -> str | None:
    """The label of the array argument of the current call equal to ``value`` (a site's
    value; up to a float32 conversion); by shape alone for a traced value."""
    shape = tuple(np.shape(value))
    same = [(k, a) for k, a in model_arrays() if tuple(a.shape) == shape]
    try:
        v = np.asarray(value, dtype=float)
    except Exception:  # traced inside jax.jit: the only argument of its shape
        return same[0][0] if len(same) == 1 else None
    for label, a in same:
        try:
            if np.allclose(np.asarray(a, dtype=float), v, rtol=1e-6, atol=0.0, equal_nan=True):
                return label
        except Exception:  # an argument that does not convert (e.g. a tensor on a GPU)
            continue
    return None
