"""Neural ODEs for Pyro, built on torchdiffeq.

``NeuralODE(f)(z0, times, args)`` solves ``dz/dt = f(t, z, args)`` and returns the
state at ``times``. The vector field may be a network (e.g. from `BayesianMLP`), a
mechanistic function, or their sum (a universal differential equation).

The options share one vocabulary with `probdyn.numpyro.NeuralODE`; `SOLVERS` maps
each solver name onto torchdiffeq. torchdiffeq has no Tsitouras 5(4) pair, so
`probdyn.pyro.primitives.tsit5` adds one to torchdiffeq's solver table (under the
name ``"probdyn_tsit5"``) from the coefficients of Tsitouras (2011).

A solve that fails (too many steps, a step size that underflows, a non-finite
state, any error the solver raises) never crashes a run: the trajectory is
replaced by zeros, a ``factor`` site sets the model's log density to -inf (so the
sampler rejects that proposal), and the failure is counted (see `failed_solves`)
so that the engine can report it on the Posterior.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import pyro
import torch
from pyro.poutine.runtime import am_i_wrapped
from torch import Tensor
from torchdiffeq import odeint, odeint_adjoint

from probdyn.primitives.ode import (
    ADAPTIVE,
    FailureCounter,
    NeuralODEBase,
    check_field_shape,
    check_series_count,
    check_t0,
    check_times,
)
from probdyn.pyro.primitives import tsit5

__all__ = ["ADJOINTS", "SOLVERS", "NeuralODE", "failed_solves", "reset_failed_solves"]


# -- one vocabulary, mapped onto torchdiffeq -----------------------------------------------
class _Method(NamedTuple):
    """What a solver name means to torchdiffeq."""

    torchdiffeq: str | None  # torchdiffeq's method name; None where it has no such solver
    adaptive: bool  # probdyn.primitives.ode.ADAPTIVE
    # torchdiffeq reads the state at an output time off a quartic fitted through each
    # step. For dopri8 and bosh3 that fit is far less accurate than the step (errors
    # of 3e-7 at rtol = atol = 1e-10 on exponential decay), so those solvers step
    # exactly onto every output time instead (torchdiffeq's ``step_t``).
    step_to_times: bool = False
    instead: str = ""  # the nearest alternative, named in the error when it has none


# solver name -> _Method's fields other than ``adaptive`` (which ADAPTIVE gives).
_TORCHDIFFEQ_METHODS: dict[str, dict[str, Any]] = {
    "tsit5": {"torchdiffeq": tsit5.METHOD},
    "dopri5": {"torchdiffeq": "dopri5"},
    "dopri8": {"torchdiffeq": "dopri8", "step_to_times": True},
    "bosh3": {"torchdiffeq": "bosh3", "step_to_times": True},
    "kvaerno5": {
        "torchdiffeq": None,
        "instead": "solver='dopri5' (explicit: on a stiff problem raise max_steps), or "
        "probdyn.numpyro.NeuralODE, whose diffrax backend has the implicit Kvaerno5",
    },
    "heun": {"torchdiffeq": "heun2"},
    "midpoint": {"torchdiffeq": "midpoint"},
    "euler": {"torchdiffeq": "euler"},
}
SOLVERS: dict[str, _Method] = {
    name: _Method(adaptive=adaptive, **_TORCHDIFFEQ_METHODS[name])
    for name, adaptive in ADAPTIVE.items()
}
ADJOINTS: dict[str, Callable[..., Tensor] | None] = {
    "recursive": odeint,  # backpropagate through the solver's operations
    "backsolve": odeint_adjoint,  # continuous adjoint, solved backwards in time
    "forward": None,  # torchdiffeq's RK step is an autograd.Function with no jvp
}

# The Pyro backend's failed solves (NeuralODE's and NeuralSDE's); the NumPyro
# backend has its own counter.
_FAILURES = FailureCounter()


def failed_solves() -> int:
    """Number of failed solves seen since the last `reset_failed_solves` (this process).

    Example:
        >>> reset_failed_solves()
        >>> failed_solves()
        0
    """
    return _FAILURES.count


def reset_failed_solves() -> None:
    """Set the failed-solve counter to zero (engines do this at the start of a run).

    Example:
        >>> reset_failed_solves()
    """
    _FAILURES.reset()


class _StepLimit(RuntimeError):
    """A solve took more than ``max_steps`` steps."""


class _Field(torch.nn.Module):
    """torchdiffeq's view of the user's field: ``f(t, z)`` with ``args`` bound.

    Counts the solver's steps (accepted and rejected, as diffrax's ``max_steps``
    does) over the whole solve: torchdiffeq's own ``max_num_steps`` resets at
    every output time. With ``batched`` the state has a leading series axis and
    the field, written for one series, is vectorised over it.
    """

    def __init__(self, fn: Callable[..., Tensor], args: Any, max_steps: int, batched: bool):
        super().__init__()
        self.fn = torch.func.vmap(fn, in_dims=(None, 0, None)) if batched else fn
        self.args = args
        self.max_steps = max_steps
        self.steps = 0

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.fn(t, z, self.args)

    def callback_step(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        self.steps += 1
        if self.steps > self.max_steps:
            raise _StepLimit(f"more than max_steps={self.max_steps} steps")


class _GuardedBacksolve(torch.autograd.Function):
    """``odeint_adjoint`` whose backward solve may fail without ending the run.

    The continuous adjoint solves a second ODE backwards when gradients are
    taken, long after `NeuralODE` returned; torchdiffeq raises there (a step size
    that underflows, too many steps), which would abort the sampler. Here the
    backward solve runs inside this function's ``backward``: if it fails, the
    failure is counted (`failed_solves`) and the solve contributes no gradient.
    The sampler stays exact (Hamiltonian Monte Carlo is valid with any force that
    depends on the position alone; a wrong one only costs acceptance).
    """

    @staticmethod
    def forward(ctx: Any, solve: Callable[[Tensor], Tensor], z0: Tensor, *params: Tensor) -> Tensor:
        with torch.enable_grad():
            start = z0.detach().requires_grad_(z0.requires_grad)
            ys = solve(start)
        ctx.graph = (ys, start, params)
        return ys.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        ys, start, params = ctx.graph
        ctx.graph = None
        inputs = (start, *params)
        wanted = [i for i, x in enumerate(inputs) if x.requires_grad]
        grads: list[Tensor | None] = [None] * len(inputs)
        if wanted and ys.requires_grad:
            try:
                found = torch.autograd.grad(
                    ys, [inputs[i] for i in wanted], grad, allow_unused=True
                )
            except Exception:  # the backward solve failed (underflow, step limit)
                _FAILURES.add(1)
                for i in wanted:  # zeros, not None: the parameters were used
                    grads[i] = torch.zeros_like(inputs[i])
            else:
                for i, g in zip(wanted, found, strict=True):
                    grads[i] = g
        return (None, *grads)


def _per_series_norm(x: Tensor) -> Tensor:
    # A batched solve shares its steps; taking the worst series' RMS error makes
    # every series meet rtol/atol on its own, not just on average.
    return x.reshape(x.shape[0], -1).pow(2).mean(1).sqrt().max()


def _grad_leaves(out: Tensor) -> tuple[Tensor, ...]:
    """Leaf tensors requiring grad that ``out`` was computed from.

    The continuous adjoint needs every tensor the vector field closes over (sampled
    weights, rates, ``args``); walking the autograd graph of one evaluation finds
    them whatever the field's structure (the torch analogue of the closure
    conversion the NumPyro twin does with a jaxpr).
    """
    if out.grad_fn is None:
        return (out,) if out.requires_grad else ()
    found: dict[int, Tensor] = {}
    seen: set[Any] = set()
    stack: list[Any] = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # AccumulateGrad nodes hold the leaf
        if isinstance(var, Tensor):
            found[id(var)] = var
        stack.extend(child for child, _ in node.next_functions)
    return tuple(found.values())


def _as_state(z0: Any) -> Tensor:
    z = z0 if isinstance(z0, Tensor) else torch.as_tensor(np.asarray(z0))
    return z if z.is_floating_point() else z.to(torch.get_default_dtype())


def _as_times(times: Any, like: Tensor) -> Tensor:
    # Times are kept in float64 (torchdiffeq steps time in float64 anyway) and are
    # not differentiated: the grid is built from their values.
    if isinstance(times, Tensor):
        return times.detach().to(device=like.device, dtype=torch.float64)
    return torch.as_tensor(np.asarray(times, dtype=np.float64), device=like.device)


def _check_times(t: Tensor, where: str) -> None:
    """`check_times` on a tensor of times."""
    check_times(t.cpu().numpy(), where)


def _union(t0: float, series: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """The solve grid (t0 and every series' times, sorted, unique) and where each
    series' times sit in it."""
    start = torch.full((1,), t0, dtype=torch.float64, device=series[0].device)
    grid = torch.unique(torch.cat([start, *series]))
    return grid, [torch.searchsorted(grid, s) for s in series]


class NeuralODE(NeuralODEBase):
    """Solve ``dz/dt = vector_field(t, z, args)`` with torchdiffeq.

    The solver vocabulary is shared with `probdyn.numpyro.NeuralODE` and mapped
    onto torchdiffeq as follows:

    | solver     | torchdiffeq method | notes                                        |
    |------------|--------------------|----------------------------------------------|
    | `tsit5`    | `probdyn_tsit5`    | Tsitouras 5(4), added by probdyn             |
    | `dopri5`   | `dopri5`           |                                              |
    | `dopri8`   | `dopri8`           | steps onto every output time                 |
    | `bosh3`    | `bosh3`            | steps onto every output time                 |
    | `kvaerno5` | (none)             | ValueError: torchdiffeq has no implicit solver |
    | `heun`     | `heun2`            | fixed step, needs `dt0`                      |
    | `midpoint` | `midpoint`         | fixed step, needs `dt0`                      |
    | `euler`    | `euler`            | fixed step, needs `dt0`                      |

    (torchdiffeq's interpolant between steps is much less accurate than dopri8's
    and bosh3's steps, so those two land a step on every output time; these steps
    count towards ``max_steps``.)

    ``adjoint="recursive"`` backpropagates through ``torchdiffeq.odeint``;
    ``"backsolve"`` uses ``torchdiffeq.odeint_adjoint`` (the tensors the field
    closes over, ``args`` included, are found automatically); ``"forward"`` is
    refused, since torchdiffeq cannot be differentiated in forward mode.
    ``max_steps`` bounds the steps (accepted and rejected) of each solve, and is
    also torchdiffeq's ``max_num_steps`` for the backward solve of the adjoint.

    Args:
        vector_field: ``f(t, z, args) -> dz/dt`` with the shape of ``z``; written for
            one series (batched series are vectorised with ``torch.func.vmap``).
        solver: ``"tsit5"``, ``"dopri5"``, ``"dopri8"``, ``"bosh3"``, or the
            fixed-step ``"heun"``, ``"midpoint"``, ``"euler"`` (these need
            ``dt0``); ``"kvaerno5"`` exists only in the NumPyro backend.
        rtol: relative tolerance of the adaptive step-size controller.
        atol: absolute tolerance.
        max_steps: solver steps allowed per solve; more is a failed solve.
        adjoint: how gradients are computed: ``"recursive"`` (backpropagate through
            the solver; exact and the default) or ``"backsolve"`` (continuous
            adjoint, O(1) memory in the number of steps).
        dt0: initial (adaptive) or fixed step size; None lets torchdiffeq choose.
        name: name of the factor site that rejects failed solves; unique per model.

    Calling ``ode(z0, times, args=None, *, t0=None)`` (numpy arrays or tensors;
    the result is a tensor in the dtype of ``z0``; times are not differentiated):

    * ``times`` 1-D: returns ``(len(times), *z0.shape)``; ``z0`` is the state at
      ``t0`` (default ``times[0]``).
    * ``times`` 2-D ``(batch, T)``: one series per row, ``z0`` shaped
      ``(batch, *state)``; returns ``(batch, T, *state)``.
    * ``times`` a list of 1-D arrays of different lengths (ragged series):
      returns a list of ``(len(times[i]), *state)`` tensors.

    Several series that share ``t0`` (e.g. ``t0=0.0`` given) are solved as one
    batched solve over the sorted union of their times, each series then reading
    its own times from it; the steps are shared, and each series meets
    ``rtol``/``atol`` on its own. Series with different ``t0``, a field that
    ``torch.func.vmap`` cannot vectorise, or a batched solve that fails fall back
    to one solve per series (so a failure is attributed to its series).

    A failed solve returns zeros for its series, counts towards `failed_solves`,
    and, inside a Pyro model, makes the factor site ``f"{name}.failed"`` -inf (the
    site is always present, 0 when every solve succeeded). With
    ``adjoint="backsolve"`` the adjoint ODE is solved when gradients are taken; if
    that backward solve fails, it counts towards `failed_solves` and the solve
    contributes a zero gradient instead of ending the run.

    Raises:
        ValueError: unknown solver/adjoint, a solver or adjoint this backend lacks,
            times not strictly increasing or not finite, ``z0`` and the vector
            field's output of different shapes.

    Example:
        >>> import torch
        >>> ode = NeuralODE(lambda t, z, k: -k * z)
        >>> ode(torch.ones(2), torch.linspace(0.0, 1.0, 5), args=1.0).shape
        torch.Size([5, 2])
    """

    _solvers = SOLVERS
    _adjoints = ADJOINTS

    def _check_backend_options(self, solver: str, adjoint: str) -> None:
        """Refuse the solver and the adjoint torchdiffeq lacks (kvaerno5, forward)."""
        if SOLVERS[solver].torchdiffeq is None:
            raise ValueError(
                f"NeuralODE(solver={solver!r}): the Pyro backend (torchdiffeq) has no "
                f"{solver} solver. Nearest alternative: {SOLVERS[solver].instead}."
            )
        if ADJOINTS[adjoint] is None:
            raise ValueError(
                f"NeuralODE(adjoint={adjoint!r}): the Pyro backend (torchdiffeq) cannot be "
                "differentiated in forward mode. Use adjoint='recursive' (exact, the default) "
                "or 'backsolve' (O(1) memory)."
            )

    # -- one solve --------------------------------------------------------------------
    def _options(self, grid: Tensor, batched: bool) -> dict[str, Any]:
        method = SOLVERS[self.solver]
        if not method.adaptive:
            return {"step_size": self.dt0}
        options: dict[str, Any] = {"max_num_steps": self.max_steps}
        if method.step_to_times:
            options["step_t"] = grid
        if self.dt0 is not None:
            options["first_step"] = self.dt0
        if batched:
            options["norm"] = _per_series_norm
        return options

    def _solve(self, z0: Tensor, grid: Tensor, args: Any, batched: bool) -> Tensor | None:
        """The state at every time of ``grid`` (``grid[0]`` is t0), or None if the
        solve failed."""
        field = _Field(self.vector_field, args, self.max_steps, batched)
        kwargs: dict[str, Any] = {
            "rtol": self.rtol,
            "atol": self.atol,
            "method": SOLVERS[self.solver].torchdiffeq,
            "options": self._options(grid, batched),
        }
        if self.adjoint == "backsolve":
            # z0's own graph reaches the solution through odeint's input, not the field.
            state = (z0[0] if batched else z0).detach()
            probe = self.vector_field(grid[0].to(z0.dtype), state, args)
            kwargs["adjoint_params"] = _grad_leaves(probe) if torch.is_grad_enabled() else ()
        try:
            if self.adjoint == "backsolve" and torch.is_grad_enabled():
                params = kwargs["adjoint_params"]

                def solve(start: Tensor) -> Tensor:
                    return odeint_adjoint(field, start, grid, **kwargs)  # type: ignore[no-any-return]

                ys = _GuardedBacksolve.apply(solve, z0, *params)
            else:
                ys = ADJOINTS[self.adjoint](field, z0, grid, **kwargs)  # type: ignore[misc]
        except Exception:  # step limit, dt underflow, non-finite state, a solver error
            return None
        return ys if bool(torch.isfinite(ys).all()) else None

    def _solve_each(
        self, z0: Tensor, series: Sequence[Tensor], t0s: Sequence[float], args: Any
    ) -> tuple[list[Tensor], int]:
        out, failed = [], 0
        for i, times in enumerate(series):
            grid, (index,) = _union(t0s[i], [times])
            ys = self._solve(z0[i], grid, args, batched=False)
            if ys is None:
                failed += 1
                ys = torch.zeros(len(grid), *z0.shape[1:], dtype=z0.dtype, device=z0.device)
            out.append(ys[index])
        return out, failed

    def _solve_shared(
        self, z0: Tensor, series: Sequence[Tensor], t0: float, args: Any
    ) -> tuple[list[Tensor], int]:
        if self._vectorises(z0, t0, args):
            grid, indices = _union(t0, series)
            ys = self._solve(z0, grid, args, batched=True)
            if ys is not None:
                return [ys[index, i] for i, index in enumerate(indices)], 0
        return self._solve_each(z0, series, [t0] * len(series), args)

    def _vectorises(self, z0: Tensor, t0: float, args: Any) -> bool:
        t = torch.tensor(t0, dtype=z0.dtype, device=z0.device)
        try:
            with torch.no_grad():
                torch.func.vmap(self.vector_field, in_dims=(None, 0, None))(t, z0, args)
        except Exception:  # data-dependent control flow, random ops, ...: solve one by one
            return False
        return True

    # -- checks and reporting ----------------------------------------------------------
    def _check_shapes(self, z0: Tensor, t0: float, args: Any) -> None:
        t = torch.tensor(t0, dtype=z0.dtype, device=z0.device)
        with torch.no_grad():
            out = self.vector_field(t, z0, args)
        check_field_shape(getattr(out, "shape", None), tuple(z0.shape))

    def _report(self, failed: int, like: Tensor) -> None:
        _FAILURES.add(failed)
        if am_i_wrapped():
            log_factor = -torch.inf if failed else 0.0
            pyro.factor(
                self.name + ".failed",
                torch.tensor(log_factor, dtype=like.dtype, device=like.device),
            )

    # -- public call -------------------------------------------------------------------
    def __call__(
        self,
        z0: Any,
        times: Any,
        args: Any = None,
        *,
        t0: Any = None,
    ) -> Tensor | list[Tensor]:
        state = _as_state(z0)
        if isinstance(times, (list, tuple)):
            series = [_as_times(t, state) for t in times]
            for i, t in enumerate(series):
                _check_times(t, f"times[{i}]")
            return self._many(state, series, args, t0)
        grid = _as_times(times, state)
        if grid.ndim == 2:
            rows = list(grid.unbind(0))
            for i, t in enumerate(rows):
                _check_times(t, f"times[{i}]")
            return torch.stack(self._many(state, rows, args, t0))
        _check_times(grid, "times")
        start = float(grid[0]) if t0 is None else _t0_values(t0, 1)[0]
        check_t0(np.asarray(start), np.asarray(float(grid[0])), unwrap_scalars=True)
        self._check_shapes(state, start, args)
        (ys,), failed = self._solve_each(state[None], [grid], [start], args)
        self._report(failed, state)
        return ys

    def _many(self, z0: Tensor, series: list[Tensor], args: Any, t0: Any) -> list[Tensor]:
        check_series_count(len(series), tuple(z0.shape))
        firsts = np.array([float(t[0]) for t in series])
        t0s = firsts if t0 is None else _t0_values(t0, len(series))
        check_t0(t0s, firsts, unwrap_scalars=True)
        self._check_shapes(z0[0], float(t0s[0]), args)
        if np.all(t0s == t0s[0]):
            ys, failed = self._solve_shared(z0, series, float(t0s[0]), args)
        else:
            ys, failed = self._solve_each(z0, series, [float(t) for t in t0s], args)
        self._report(failed, z0)
        return ys


def _t0_values(t0: Any, n: int) -> np.ndarray:
    value = t0.detach().cpu().numpy() if isinstance(t0, Tensor) else np.asarray(t0)
    return np.broadcast_to(value.astype(np.float64), (n,))
