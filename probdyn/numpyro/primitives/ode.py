"""Neural ODEs for NumPyro, built on diffrax.

``NeuralODE(f)(z0, times, args)`` solves ``dz/dt = f(t, z, args)`` and returns the
state at ``times``. The vector field may be a network (e.g. from `BayesianMLP`), a
mechanistic function, or their sum (a universal differential equation).

A solve that fails (too many steps, a non-finite state) never crashes a run: the
trajectory is replaced by zeros, a ``factor`` site sets the model's log density
to -inf (so the sampler rejects that proposal), and the failure is counted (see
`failed_solves`) so that the engine can report it on the Posterior. With the
implicit ``"kvaerno5"`` the field goes through `_GuardedODETerm`, so that NaN or inf
never reaches lineax's linear solves (which raise rather than report a failure).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
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
# Solvers with a Newton iteration (a linear solve per step), whose field is
# solved through `_GuardedODETerm`.
_IMPLICIT = frozenset({"kvaerno5"})
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


def _vf_prod(t: Any, z: Any, field_and_args: tuple[Any, Any], control: Any) -> Any:
    out = _call_converted(t, z, field_and_args)
    return jnp.broadcast_to(out, jnp.shape(z)).astype(jnp.result_type(z)) * control


@jax.custom_jvp
def _guarded_vf_prod(t: Any, z: Any, field_and_args: tuple[Any, Any], control: Any) -> Any:
    """`_vf_prod`, ``f(t, z, args) * control``, whose derivatives are finite wherever it is.

    An implicit solver linearises its step: its Newton iteration solves with
    ``I - h * df/dz``, and its gradient (the implicit function theorem, in
    optimistix) solves with the same matrix at the root. lineax raises, rather
    than returns a failure code, when that matrix or the right-hand side is
    non-finite -- a Newton iterate that diverged in a step the controller then
    rejects, a NaN step size once a solve has failed, or a field whose
    derivative is infinite -- and the error aborts the whole sampler. Here
    non-finite entries of ``d(f h)/dz``, and every derivative where ``f h``
    itself is non-finite, are zero. The solution is unchanged (only the Newton
    matrix is: a worse one converges more slowly or fails, which rejects the
    step), and a failed step or solve is still reported as one. Zero tangents
    stay symbolic, so that ``0 * inf`` in a derivative nobody asked for (with
    respect to a rate, say, while the solver wants ``df/dz``) is never formed.
    """
    return _vf_prod(t, z, field_and_args, control)


def _is_zero(x: Any) -> bool:
    return isinstance(x, jax.custom_derivatives.SymbolicZero)


@partial(_guarded_vf_prod.defjvp, symbolic_zeros=True)
def _guarded_jvp(primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[Any, Any]:
    t, z, field_and_args, control = primals

    def in_state(z_: Any) -> tuple[Any, Any]:
        out = _vf_prod(t, z_, field_and_args, control)
        return out, out

    jac, out = jax.jacfwd(in_state, has_aux=True)(z)  # out.shape + z.shape
    finite = jnp.isfinite(out)
    jac = jnp.where(jnp.isfinite(jac), jac, 0.0)
    t_out = jnp.zeros_like(out)
    if not _is_zero(tangents[1]):
        t_out = t_out + jnp.tensordot(jac, tangents[1], axes=jnp.ndim(z))
    # The time, the field's own inputs (weights, rates, args) and the step: only
    # the leaves with a tangent.
    leaves, tree = jax.tree.flatten((t, field_and_args, control))
    dots = jax.tree.leaves((tangents[0], tangents[2], tangents[3]), is_leaf=_is_zero)
    live = [i for i, d in enumerate(dots) if not _is_zero(d)]
    if live:

        def of_live(*xs: Any) -> Any:
            filled = list(leaves)
            for i, x in zip(live, xs, strict=True):
                filled[i] = x
            t_, fa_, c_ = jax.tree.unflatten(tree, filled)
            return _vf_prod(t_, z, fa_, c_)

        _, rest = jax.jvp(of_live, [leaves[i] for i in live], [dots[i] for i in live])
        t_out = t_out + rest
    # Masked once more: where ``f h`` is non-finite (a NaN step, a diverged
    # iterate) the tangents coming in are too, and 0 * NaN is NaN.
    return out, jnp.where(finite, t_out, 0.0)


@jax.custom_vjp
def _finite_cotangent(ys: Array) -> Array:
    """The identity, whose cotangent has its NaN and inf entries set to zero.

    A likelihood that is non-finite at a solution (the log of a negative
    concentration) sends a NaN cotangent back into the solve, and an implicit
    solver's gradient would hand it to lineax, which raises. The log density is
    non-finite there anyway, so the sampler rejects that point whatever its
    gradient; a finite one keeps the run alive.
    """
    return ys


def _finite_cotangent_fwd(ys: Array) -> tuple[Array, None]:
    return ys, None


def _finite_cotangent_bwd(_: None, ct: Array) -> tuple[Array]:
    return (jnp.where(jnp.isfinite(ct), ct, 0.0),)


_finite_cotangent.defvjp(_finite_cotangent_fwd, _finite_cotangent_bwd)


class _GuardedODETerm(dfx.AbstractTerm):  # type: ignore[misc]
    """diffrax's `ODETerm` for the converted field, through `_guarded_vf_prod`."""

    def vf(self, t: Any, y: Any, args: Any) -> Any:
        return _guarded_vf_prod(t, y, args, jnp.ones((), jnp.result_type(y)))

    def contr(self, t0: Any, t1: Any, **kwargs: Any) -> Any:
        # Once a step has failed badly the controller's next step size can be
        # NaN (an infinite error over an infinite state). Transposing ``h * k``
        # then gives ``NaN * 0`` even where the cotangent is zero, so such a step
        # is taken as zero: it stays rejected, and the solve is reported failed.
        dt = t1 - t0
        return jnp.where(jnp.isfinite(dt), dt, jnp.zeros_like(dt))

    def prod(self, vf: Any, control: Any) -> Any:
        return vf * control

    def vf_prod(self, t: Any, y: Any, args: Any, control: Any) -> Any:
        return _guarded_vf_prod(t, y, args, control)


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
            ``"kvaerno5"`` (implicit, for stiff problems), or the fixed-step
            ``"heun"``, ``"midpoint"``, ``"euler"`` (these need ``dt0``). With
            ``"kvaerno5"``, non-finite derivatives of the field are taken as zero
            in its Newton matrix and its gradient (see `_GuardedODETerm`), so a
            proposal where they are NaN or inf is rejected rather than ending the
            run; solutions and finite gradients are unchanged.
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
        term = _GuardedODETerm() if self.solver in _IMPLICIT else dfx.ODETerm(_call_converted)
        sol = dfx.diffeqsolve(
            term,
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
        ys = _finite_cotangent(sol.ys) if self.solver in _IMPLICIT else sol.ys
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
