"""Neural ODEs for NumPyro, built on diffrax.

``NeuralODE(f)(z0, times, args)`` solves ``dz/dt = f(t, z, args)`` and returns the
state at ``times``. The vector field may be a network (e.g. from `BayesianMLP`), a
mechanistic function, or their sum (a universal differential equation).

A solve that fails (too many steps, a non-finite state) never crashes a run: the
trajectory is replaced by zeros, a ``factor`` site sets the model's log density
to -inf (so the sampler rejects that proposal), and the failure is counted (see
`failed_solves`) so that the engine can report it on the Posterior.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from jaxtyping import Array, ArrayLike

from probdyn.primitives.ode import (
    ADAPTIVE,
    FailureCounter,
    NeuralODEBase,
    check_field_shape,
    check_series_count,
    check_t0,
    check_times,
)

__all__ = ["ADJOINTS", "SOLVERS", "NeuralODE", "failed_solves", "reset_failed_solves"]

# One vocabulary for both backends (probdyn.primitives.ode.ADAPTIVE): name ->
# (diffrax solver, adaptive?). The torch backend maps the same names onto
# torchdiffeq's methods.
_DIFFRAX_SOLVERS: dict[str, type] = {
    "tsit5": dfx.Tsit5,
    "dopri5": dfx.Dopri5,
    "dopri8": dfx.Dopri8,
    "bosh3": dfx.Bosh3,
    "kvaerno5": dfx.Kvaerno5,
    "heun": dfx.Heun,
    "midpoint": dfx.Midpoint,
    "euler": dfx.Euler,
}
SOLVERS: dict[str, tuple[type, bool]] = {
    name: (_DIFFRAX_SOLVERS[name], adaptive) for name, adaptive in ADAPTIVE.items()
}
ADJOINTS: dict[str, Callable[[], Any]] = {
    "recursive": dfx.RecursiveCheckpointAdjoint,
    "backsolve": dfx.BacksolveAdjoint,
    "forward": dfx.ForwardMode,
}

# The NumPyro backend's failed solves (NeuralODE's and NeuralSDE's); the Pyro
# backend has its own counter. Solves add to it from a host callback,
# jax.debug.callback(_count_failures, failed).
_FAILURES = FailureCounter()
_count_failures = _FAILURES.add


def failed_solves() -> int:
    """Number of failed solves seen since the last `reset_failed_solves` (this process)."""
    return _FAILURES.count


def reset_failed_solves() -> None:
    """Set the failed-solve counter to zero (engines do this at the start of a run)."""
    _FAILURES.reset()


class _JaxprKey:
    """Hash and compare a jaxpr by its printed form.

    A model builds a fresh vector-field closure every time it runs, so to JAX each
    run is a new function and every eager run (NumPyro's initialisation runs the
    model several times) would recompile the solver. Two traces of the same code
    at the same shapes print identically (constants are hoisted into ``consts``,
    so they are not part of the text), which lets the solver's compiled program
    be reused across model runs and across fits.
    """

    def __init__(self, jaxpr: Any) -> None:
        self.jaxpr = jaxpr
        self.text = str(jaxpr)
        self._hash = hash(self.text)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _JaxprKey) and other.text == self.text


class _ConvertedField(eqx.Module):
    """A vector field as (jaxpr, consts): its closed-over values, sampled weights
    and rates included, become explicit leaves that diffrax differentiates."""

    key: _JaxprKey = eqx.field(static=True)
    in_tree: Any = eqx.field(static=True)
    out_tree: Any = eqx.field(static=True)
    consts: list[Any]

    @classmethod
    def build(cls, fn: Callable[..., Any], t: Any, z: Any, args: Any) -> _ConvertedField:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(t, z, args)
        return cls(
            key=_JaxprKey(closed.jaxpr),
            in_tree=jax.tree.structure((t, z, args)),
            out_tree=jax.tree.structure(out_shape),
            consts=list(closed.consts),
        )

    def __call__(self, t: Any, z: Any, args: Any) -> Any:
        leaves = jax.tree.leaves((t, z, args))
        out = jax.core.eval_jaxpr(self.key.jaxpr, self.consts, *leaves)
        return jax.tree.unflatten(self.out_tree, out)


def _call_converted(t: Any, z: Any, field_and_args: tuple[Any, Any]) -> Any:
    field, args = field_and_args
    return field(t, z, args)


def _concrete(x: Any) -> np.ndarray | None:
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_times(times: Any, where: str) -> None:
    """Check concrete times (`check_times`); traced times are not checked."""
    t = _concrete(times)
    if t is not None:
        check_times(t, where)


class NeuralODE(NeuralODEBase):
    """Solve ``dz/dt = vector_field(t, z, args)`` with diffrax.

    Args:
        vector_field: ``f(t, z, args) -> dz/dt`` with the shape of ``z``.
        solver: ``"tsit5"``, ``"dopri5"``, ``"dopri8"``, ``"bosh3"``,
            ``"kvaerno5"`` (stiff), or the fixed-step ``"heun"``, ``"midpoint"``,
            ``"euler"`` (these need ``dt0``).
        rtol: relative tolerance of the adaptive step-size controller.
        atol: absolute tolerance.
        max_steps: solver steps allowed per solve; more is a failed solve.
        adjoint: how gradients are computed: ``"recursive"`` (backpropagate through
            the solver with checkpointing; exact and the default), ``"backsolve"``
            (continuous adjoint, O(1) memory) or ``"forward"`` (forward mode; only
            for forward-mode autodiff).
        dt0: initial (adaptive) or fixed step size; None lets diffrax choose.
        name: name of the factor site that rejects failed solves; unique per model.

    Calling ``ode(z0, times, args=None, *, t0=None)``:

    * ``times`` 1-D: returns ``(len(times), *z0.shape)``; ``z0`` is the state at
      ``t0`` (default ``times[0]``).
    * ``times`` 2-D ``(batch, T)``: one series per row, ``z0`` shaped
      ``(batch, *state)``; returns ``(batch, T, *state)``.
    * ``times`` a list of 1-D arrays of different lengths (ragged series):
      returns a list of ``(len(times[i]), *state)`` arrays. The series are padded
      and solved in one batched solve; padding never reaches the output.

    Raises:
        ValueError: unknown solver/adjoint, times not strictly increasing or not
            finite, ``z0`` and the vector field's output of different shapes.

    Example:
        >>> import jax.numpy as jnp
        >>> ode = NeuralODE(lambda t, z, k: -k * z)
        >>> ode(jnp.ones(2), jnp.linspace(0.0, 1.0, 5), args=1.0).shape
        (5, 2)
    """

    _solvers = SOLVERS
    _adjoints = ADJOINTS

    # -- one series ---------------------------------------------------------------
    def _solve_one(self, z0: Array, times: Array, t0: Array, args: Any) -> tuple[Array, Array]:
        solver_cls, adaptive = SOLVERS[self.solver]
        controller = (
            dfx.PIDController(rtol=self.rtol, atol=self.atol)
            if adaptive
            else dfx.ConstantStepSize()
        )
        field = _ConvertedField.build(self.vector_field, t0, z0, args)
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_call_converted),
            solver_cls(),
            t0=t0,
            t1=times[-1],
            dt0=self.dt0,
            y0=z0,
            args=(field, args),
            saveat=dfx.SaveAt(ts=times),
            stepsize_controller=controller,
            adjoint=ADJOINTS[self.adjoint](),
            max_steps=self.max_steps,
            throw=False,
        )
        ys = sol.ys
        failed = (sol.result != dfx.RESULTS.successful) | ~jnp.all(jnp.isfinite(ys))
        return jnp.where(failed, jnp.zeros_like(ys), ys), failed

    def _check_shapes(self, z0: Array, t0: Array, args: Any) -> None:
        try:
            out = jax.eval_shape(self.vector_field, t0, z0, args)
        except Exception:  # the field may need a model context; the solve will tell
            return
        check_field_shape(getattr(out, "shape", None), tuple(jnp.shape(z0)))

    def _report(self, failed: Array) -> None:
        any_failed = jnp.any(failed)
        jax.lax.cond(
            any_failed,
            lambda f: jax.debug.callback(_count_failures, f),
            lambda f: None,
            failed,
        )
        if numpyro.primitives._PYRO_STACK:
            numpyro.factor(self.name + ".failed", jnp.where(any_failed, -jnp.inf, 0.0))

    # -- public call ----------------------------------------------------------------
    def __call__(
        self,
        z0: ArrayLike,
        times: ArrayLike | Sequence[ArrayLike],
        args: Any = None,
        *,
        t0: ArrayLike | None = None,
    ) -> Array | list[Array]:
        if isinstance(times, (list, tuple)):
            return self._ragged(jnp.asarray(z0), times, args, t0)
        times = jnp.asarray(times)
        z0 = jnp.asarray(z0)
        if times.ndim == 2:
            for i in range(times.shape[0]) if _concrete(times) is not None else ():
                _check_times(times[i], f"times[{i}]")
            return self._batched(z0, times, args, t0)
        _check_times(times, "times")
        t0_ = times[0] if t0 is None else jnp.asarray(t0, dtype=times.dtype)
        self._check_t0(t0_, times[0])
        self._check_shapes(z0, t0_, args)
        ys, failed = self._solve_one(z0, times, t0_, args)
        self._report(failed)
        return ys

    def _check_t0(self, t0: Any, first: Any) -> None:
        a, b = _concrete(t0), _concrete(first)
        if a is not None and b is not None:
            check_t0(a, b)

    def _batched(self, z0: Array, times: Array, args: Any, t0: Any) -> Array:
        check_series_count(times.shape[0], z0.shape)
        t0s = times[:, 0] if t0 is None else jnp.broadcast_to(jnp.asarray(t0), times.shape[:1])
        self._check_t0(t0s, times[:, 0])
        self._check_shapes(z0[0], t0s[0], args)
        ys, failed = jax.vmap(self._solve_one, in_axes=(0, 0, 0, None))(z0, times, t0s, args)
        self._report(failed)
        return ys

    def _ragged(self, z0: Array, times: Sequence[ArrayLike], args: Any, t0: Any) -> list[Array]:
        series = [jnp.asarray(t) for t in times]
        for i, t in enumerate(series):
            _check_times(t, f"times[{i}]")
        lengths = [int(t.shape[0]) for t in series]
        longest = max(lengths)
        # Pad each series by repeating its last time: the solver saves the same
        # state again, costs no extra steps, and the padding is sliced away.
        padded = jnp.stack(
            [jnp.concatenate([t, jnp.repeat(t[-1:], longest - len(t))]) for t in series]
        )
        ys = self._batched(z0, padded, args, t0)
        return [ys[i, :n] for i, n in enumerate(lengths)]
