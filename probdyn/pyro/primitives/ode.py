"""Neural ODEs for Pyro, built on torchdiffeq.

``NeuralODE(f)(z0, times, args)`` solves ``dz/dt = f(t, z, args)`` and returns the
state at ``times``. The vector field may be a network (e.g. from `BayesianMLP`), a
mechanistic function, or their sum (a universal differential equation).

The options share one vocabulary with `probdyn.numpyro.NeuralODE`; `SOLVERS` maps
each solver name onto torchdiffeq. torchdiffeq has no Tsitouras 5(4) pair, so this
module adds one to torchdiffeq's solver table (under the name ``"probdyn_tsit5"``)
from the coefficients of Tsitouras (2011).

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
from torchdiffeq._impl.odeint import SOLVERS as _TORCHDIFFEQ_SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver, _ButcherTableau

from probdyn.primitives.validate import check_ode_args

__all__ = ["ADJOINTS", "SOLVERS", "NeuralODE", "failed_solves", "reset_failed_solves"]


# -- Tsitouras 5(4), the shared default solver ------------------------------------------
# Ch. Tsitouras, "Runge–Kutta pairs of order 5(4) satisfying only the first column
# simplifying assumption", Comput. Math. Appl. 62 (2011) 770–775. FSAL: the last
# stage is evaluated at the new state, as torchdiffeq's Dormand–Prince assumes.
_TSIT5_B = [
    0.09646076681806523,
    0.01,
    0.4798896504144996,
    1.379008574103742,
    -3.290069515436081,
    2.324710524099774,
    0.0,
]
_TSIT5_B_HAT = [
    0.09468075576583945,
    0.009183565540343254,
    0.4877705284247616,
    1.234297566930479,
    -2.7077123499835256,
    1.866628418170587,
    1 / 66,
]


def _tsit5_dense_weights(theta: float) -> list[float]:
    """Weights b_i(theta) of Tsitouras' continuous extension: y(t0 + theta dt) =
    y0 + dt sum_i b_i(theta) k_i. torchdiffeq fits its quartic interpolant through
    the state at theta = 1/2, so only that point is needed."""
    t = theta
    return [
        -1.0530884977290216
        * t
        * (t - 1.3299890189751412)
        * (t**2 - 1.4364028541716351 * t + 0.7139816917074209),
        0.1017 * t**2 * (t**2 - 2.1966568338249754 * t + 1.2949852507374631),
        2.490627285651252793 * t**2 * (t**2 - 2.38535645472061657 * t + 1.57803468208092486),
        -16.54810288924490272 * (t - 1.21712927295533244) * (t - 0.61620406037800089) * t**2,
        47.37952196281928122 * (t - 1.203071208372362603) * (t - 0.658047292653547382) * t**2,
        -34.87065786149660974 * (t - 1.2) * (t - 0.666666666666666667) * t**2,
        2.5 * (t - 1) * (t - 0.6) * t**2,
    ]


def _f64(values: Sequence[float]) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


class _Tsit5Solver(RKAdaptiveStepsizeODESolver):
    order = 5
    tableau = _ButcherTableau(
        alpha=_f64([0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0]),
        beta=[
            _f64([0.161]),
            _f64([-0.008480655492356989, 0.335480655492357]),
            _f64([2.8971530571054935, -6.359448489975075, 4.3622954328695815]),
            _f64(
                [5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525]
            ),
            _f64(
                [
                    5.86145544294642,
                    -12.92096931784711,
                    8.159367898576159,
                    -0.071584973281401,
                    -0.028269050394068383,
                ]
            ),
            _f64(_TSIT5_B[:-1]),
        ],
        c_sol=_f64(_TSIT5_B),
        c_error=_f64([b - bh for b, bh in zip(_TSIT5_B, _TSIT5_B_HAT)]),
    )
    mid = _f64(_tsit5_dense_weights(0.5))


_TORCHDIFFEQ_SOLVERS.setdefault("probdyn_tsit5", _Tsit5Solver)


# -- one vocabulary, mapped onto torchdiffeq -----------------------------------------------
class _Method(NamedTuple):
    torchdiffeq: str | None  # torchdiffeq's method name; None where it has no such solver
    adaptive: bool
    # torchdiffeq reads the state at an output time off a quartic fitted through each
    # step. For dopri8 and bosh3 that fit is far less accurate than the step (errors
    # of 3e-7 at rtol = atol = 1e-10 on exponential decay), so those solvers step
    # exactly onto every output time instead (torchdiffeq's ``step_t``).
    step_to_times: bool = False
    instead: str = ""  # the nearest alternative, named in the error when it has none


SOLVERS: dict[str, _Method] = {
    "tsit5": _Method("probdyn_tsit5", True),
    "dopri5": _Method("dopri5", True),
    "dopri8": _Method("dopri8", True, step_to_times=True),
    "bosh3": _Method("bosh3", True, step_to_times=True),
    "kvaerno5": _Method(
        None,
        True,
        instead="solver='dopri5' (explicit: on a stiff problem raise max_steps), or "
        "probdyn.numpyro.NeuralODE, whose diffrax backend has the implicit Kvaerno5",
    ),
    "heun": _Method("heun2", False),
    "midpoint": _Method("midpoint", False),
    "euler": _Method("euler", False),
}
ADJOINTS: dict[str, Callable[..., Tensor] | None] = {
    "recursive": odeint,  # backpropagate through the solver's operations
    "backsolve": odeint_adjoint,  # continuous adjoint, solved backwards in time
    "forward": None,  # torchdiffeq's RK step is an autograd.Function with no jvp
}

_FAILURES = [0]


def failed_solves() -> int:
    """Number of failed solves seen since the last `reset_failed_solves` (this process).

    Example:
        >>> reset_failed_solves()
        >>> failed_solves()
        0
    """
    return _FAILURES[0]


def reset_failed_solves() -> None:
    """Set the failed-solve counter to zero (engines do this at the start of a run).

    Example:
        >>> reset_failed_solves()
    """
    _FAILURES[0] = 0


class _StepLimit(RuntimeError):
    pass


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
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(
            f"NeuralODE: {where} must be a non-empty 1-D array, got shape {tuple(t.shape)}."
        )
    v = t.cpu().numpy()
    if not np.all(np.isfinite(v)):
        raise ValueError(f"NeuralODE: {where} contains NaN or inf; remove those time points.")
    steps = np.diff(v)
    if np.any(steps <= 0):
        i = int(np.argmax(steps <= 0))
        kind = "duplicate" if steps[i] == 0 else "unsorted"
        raise ValueError(
            f"NeuralODE: {where} must be strictly increasing, but it has {kind} times "
            f"({v[i]} then {v[i + 1]} at index {i}). Sort them and drop duplicates."
        )


def _union(t0: float, series: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """The solve grid (t0 and every series' times, sorted, unique) and where each
    series' times sit in it."""
    start = torch.full((1,), t0, dtype=torch.float64, device=series[0].device)
    grid = torch.unique(torch.cat([start, *series]))
    return grid, [torch.searchsorted(grid, s) for s in series]


class NeuralODE:
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
    site is always present, 0 when every solve succeeded).

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
            SOLVERS,
            ADJOINTS,
            adaptive=solver in SOLVERS and SOLVERS[solver].adaptive,
            dt0=dt0,
            max_steps=max_steps,
            rtol=rtol,
            atol=atol,
        )
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
        self.vector_field = vector_field
        self.solver = solver
        self.rtol, self.atol = rtol, atol
        self.max_steps = max_steps
        self.adjoint = adjoint
        self.dt0 = dt0
        self.name = name

    def __repr__(self) -> str:
        return (
            f"NeuralODE(solver={self.solver!r}, rtol={self.rtol}, atol={self.atol}, "
            f"max_steps={self.max_steps}, adjoint={self.adjoint!r})"
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
        out_shape = getattr(out, "shape", None)
        if out_shape is not None and tuple(out_shape) != tuple(z0.shape):
            raise ValueError(
                f"NeuralODE: the vector field returns shape {tuple(out_shape)} for a state of "
                f"shape {tuple(z0.shape)} (z0). They must match: check the network's "
                "output size or z0's shape."
            )

    @staticmethod
    def _check_t0(t0: np.ndarray, first: np.ndarray) -> None:
        if np.any(t0 > first):
            shown = t0 if t0.size > 1 else t0.item()
            first_shown = first if first.size > 1 else first.item()
            raise ValueError(
                f"NeuralODE: t0={shown} is after the first observation time {first_shown}."
            )

    def _report(self, failed: int, like: Tensor) -> None:
        _FAILURES[0] += failed
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
        self._check_t0(np.asarray(start), np.asarray(float(grid[0])))
        self._check_shapes(state, start, args)
        (ys,), failed = self._solve_each(state[None], [grid], [start], args)
        self._report(failed, state)
        return ys

    def _many(self, z0: Tensor, series: list[Tensor], args: Any, t0: Any) -> list[Tensor]:
        if z0.shape[:1] != (len(series),):
            raise ValueError(
                f"NeuralODE: times has {len(series)} series (rows) but z0 has leading "
                f"dimension {tuple(z0.shape[:1])}; give one initial state per series."
            )
        firsts = np.array([float(t[0]) for t in series])
        t0s = firsts if t0 is None else _t0_values(t0, len(series))
        self._check_t0(t0s, firsts)
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
