"""Backend-neutral pieces of `NeuralODE` (NumPy only).

Both backends' `NeuralODE` inherit their options, their argument checks and their
``repr`` from `NeuralODEBase`, check their times, start times and shapes here, and
count their failed solves with a `FailureCounter`, so that the two twins accept and
refuse the same input with the same message. Each backend keeps its solver table
(diffrax's or torchdiffeq's classes for the shared names), the solve and its
reporting.

The vocabulary: `ADAPTIVE` names every solver and says whether it picks its own
step sizes (the others are fixed-step and need ``dt0``); `ADJOINT_NAMES` names the
ways gradients are computed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from probdyn.core.engine_base import as_int

__all__ = [
    "ADAPTIVE",
    "ADJOINT_NAMES",
    "FailureCounter",
    "NeuralODEBase",
    "check_field_shape",
    "check_ode_args",
    "check_series_count",
    "check_t0",
    "check_time_axis",
    "check_times",
]

# One vocabulary for both backends: solver name -> adaptive (picks its own steps)?
ADAPTIVE: dict[str, bool] = {
    "tsit5": True,
    "dopri5": True,
    "dopri8": True,
    "bosh3": True,
    "kvaerno5": True,
    "heun": False,
    "midpoint": False,
    "euler": False,
}
ADJOINT_NAMES: tuple[str, ...] = ("recursive", "backsolve", "forward")


class FailureCounter:
    """A process-wide count of failed solves, one per backend.

    Each backend's `NeuralODE` and `NeuralSDE` add to their backend's counter;
    its engines reset it at the start of a run and read it at the end (through
    the backend's ``failed_solves`` and ``reset_failed_solves``). Two counters,
    so that a process using both backends reports each run's own failures.

    Example:
        >>> failures = FailureCounter()
        >>> failures.add(2)
        >>> failures.count
        2
        >>> failures.reset()
        >>> failures.count
        0
    """

    def __init__(self) -> None:
        self.count = 0

    def add(self, failed: Any) -> None:
        """Count ``failed`` more failures (a bool, an int or an array of flags).

        Args:
            failed: a number of failures, or flags whose sum is one.
        """
        self.count += int(np.sum(np.asarray(failed)))

    def reset(self) -> None:
        """Set the count to zero."""
        self.count = 0


def check_ode_args(
    vector_field: Any,
    solver: Any,
    adjoint: Any,
    solvers: Mapping[str, Any],
    adjoints: Mapping[str, Any],
    *,
    adaptive: bool,
    dt0: Any,
    max_steps: Any,
    rtol: Any,
    atol: Any,
) -> None:
    """Validate the options `NeuralODE` shares between backends.

    ``solvers``/``adjoints`` are the backend's tables (only their keys are read);
    ``adaptive`` says whether ``solver`` picks its own step sizes. Backend-specific
    refusals (a solver one library lacks) are left to the caller, after these.

    Raises:
        TypeError: the vector field is not callable.
        ValueError: an unknown solver or adjoint, a fixed-step solver without
            ``dt0``, ``max_steps`` not a positive int, ``rtol`` or ``atol`` not
            positive.
    """
    if not callable(vector_field):
        raise TypeError(
            f"NeuralODE(vector_field={vector_field!r}): expected a callable f(t, z, args)."
        )
    if solver not in solvers:
        raise ValueError(f"NeuralODE(solver={solver!r}): choose one of {sorted(solvers)}.")
    if adjoint not in adjoints:
        raise ValueError(f"NeuralODE(adjoint={adjoint!r}): choose one of {sorted(adjoints)}.")
    if not adaptive and dt0 is None:
        raise ValueError(f"NeuralODE(solver={solver!r}) is fixed-step: give dt0=...")
    if (as_int(max_steps) or 0) <= 0:
        raise ValueError(f"NeuralODE(max_steps={max_steps!r}): must be a positive integer.")
    for field, tol in (("rtol", rtol), ("atol", atol)):
        if not tol > 0:
            raise ValueError(f"NeuralODE({field}={tol!r}): must be positive.")


class NeuralODEBase:
    """The options of `NeuralODE`, checked and stored the same way on both backends.

    A backend's `NeuralODE` subclasses this, names its solver and adjoint tables
    in ``_solvers`` and ``_adjoints`` (keyed by the names of `ADAPTIVE` and
    `ADJOINT_NAMES`), adds the refusals of what its library lacks in
    `_check_backend_options`, and implements ``__call__``.

    Args:
        vector_field: ``f(t, z, args) -> dz/dt`` with the shape of ``z``.
        solver: a name of `ADAPTIVE`.
        rtol: relative tolerance of the adaptive step-size controller.
        atol: absolute tolerance.
        max_steps: solver steps allowed per solve; more is a failed solve.
        adjoint: a name of `ADJOINT_NAMES`.
        dt0: initial (adaptive) or fixed step size; None lets the library choose.
        name: name of the factor site that rejects failed solves; unique per model.

    Raises:
        TypeError: the vector field is not callable.
        ValueError: see `check_ode_args` and the backend's `_check_backend_options`.
    """

    _solvers: ClassVar[Mapping[str, Any]] = ADAPTIVE
    _adjoints: ClassVar[Mapping[str, Any]] = dict.fromkeys(ADJOINT_NAMES)

    def __init__(
        self,
        vector_field: Callable[[Any, Any, Any], Any],
        *,
        solver: str = "tsit5",
        rtol: float = 1e-6,
        atol: float = 1e-6,
        max_steps: int = 4096,
        adjoint: str = "recursive",
        dt0: float | None = None,
        name: str = "ode",
    ) -> None:
        check_ode_args(
            vector_field,
            solver,
            adjoint,
            self._solvers,
            self._adjoints,
            adaptive=ADAPTIVE.get(solver, False),
            dt0=dt0,
            max_steps=max_steps,
            rtol=rtol,
            atol=atol,
        )
        self._check_backend_options(solver, adjoint)
        self.vector_field = vector_field
        self.solver = solver
        self.rtol, self.atol = rtol, atol
        self.max_steps = max_steps
        self.adjoint = adjoint
        self.dt0 = dt0
        self.name = name

    def _check_backend_options(self, solver: str, adjoint: str) -> None:
        """Refuse a valid name the backend's library cannot honour (none by default).

        Args:
            solver: a name of `ADAPTIVE`.
            adjoint: a name of `ADJOINT_NAMES`.
        """

    def __repr__(self) -> str:
        return (
            f"NeuralODE(solver={self.solver!r}, rtol={self.rtol}, atol={self.atol}, "
            f"max_steps={self.max_steps}, adjoint={self.adjoint!r})"
        )


def check_time_axis(t: np.ndarray, where: str, owner: str, shape_hint: str = "") -> None:
    """Times must be 1-D, non-empty, finite and strictly increasing.

    Args:
        t: the times, as a NumPy array.
        where: how the message names them (``"times"``, ``"times[2]"``).
        owner: the primitive named in the message (``"NeuralODE"``).
        shape_hint: a sentence appended to the message on a wrong shape.

    Raises:
        ValueError: naming the first offending time and the fix.
    """
    if t.ndim != 1 or t.size == 0:
        hint = f" {shape_hint}" if shape_hint else ""
        raise ValueError(
            f"{owner}: {where} must be a non-empty 1-D array, got shape {t.shape}.{hint}"
        )
    if not np.all(np.isfinite(t)):
        raise ValueError(f"{owner}: {where} contains NaN or inf; remove those time points.")
    steps = np.diff(t)
    if np.any(steps <= 0):
        i = int(np.argmax(steps <= 0))
        kind = "duplicate" if steps[i] == 0 else "unsorted"
        raise ValueError(
            f"{owner}: {where} must be strictly increasing, but it has {kind} times "
            f"({t[i]} then {t[i + 1]} at index {i}). Sort them and drop duplicates."
        )


def check_times(t: np.ndarray, where: str) -> None:
    """`NeuralODE`'s times: 1-D, non-empty, finite and strictly increasing.

    Args:
        t: the times, as a NumPy array.
        where: how the message names them.

    Raises:
        ValueError: see `check_time_axis`.
    """
    check_time_axis(t, where, "NeuralODE")


def check_t0(t0: np.ndarray, first: np.ndarray, *, unwrap_scalars: bool = False) -> None:
    """Refuse a start time after its series' first time.

    Args:
        t0: the start time(s).
        first: each series' first time (the same shape).
        unwrap_scalars: show a one-element ``t0`` and ``first`` as Python numbers
            (``.item()``) rather than as arrays in the message.

    Raises:
        ValueError: some ``t0`` is after its first time.
    """
    if np.any(t0 > first):
        if unwrap_scalars:
            t0 = t0 if t0.size > 1 else t0.item()
            first = first if first.size > 1 else first.item()
        raise ValueError(f"NeuralODE: t0={t0} is after the first observation time {first}.")


def check_field_shape(out_shape: tuple[int, ...] | None, state_shape: tuple[int, ...]) -> None:
    """The vector field must return the state's shape.

    Args:
        out_shape: the shape the field returned (None: not an array, not checked).
        state_shape: the shape of ``z0``.

    Raises:
        ValueError: the shapes differ.
    """
    if out_shape is not None and tuple(out_shape) != tuple(state_shape):
        raise ValueError(
            f"NeuralODE: the vector field returns shape {tuple(out_shape)} for a state of "
            f"shape {tuple(state_shape)} (z0). They must match: check the network's "
            "output size or z0's shape."
        )


def check_series_count(num_series: int, z0_shape: tuple[int, ...]) -> None:
    """Several series need one initial state each, along ``z0``'s leading axis.

    Args:
        num_series: the number of series (rows of 2-D times, or ragged series).
        z0_shape: the shape of ``z0``.

    Raises:
        ValueError: ``z0``'s leading dimension is not ``num_series``.
    """
    if tuple(z0_shape[:1]) != (num_series,):
        raise ValueError(
            f"NeuralODE: times has {num_series} series (rows) but z0 has leading "
            f"dimension {tuple(z0_shape[:1])}; give one initial state per series."
        )
