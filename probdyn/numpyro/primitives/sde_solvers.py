"""The solver glue of the NumPyro `NeuralSDE`: diffrax steps on a fixed grid.

`solve` is the compiled program of one solve: the Brownian increments (the latent
sites' standard normals, or drawn from a key), a ``lax.scan`` over the grid calling
a diffrax solver's ``step`` with each step's increment (and, for SRK, its space-time
Lévy area), the output times and the failure check. The solvers are diffrax's
``Euler`` and two small diffrax solvers written here, diagonal Itô–Milstein and
Rößler's SRA1, that take exactly the steps torchsde takes, so both backends agree
to rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from probdyn.primitives.sde import SOLVERS

__all__ = ["Plan", "solve"]


def _call_drift(t: Any, y: Any, fields_and_args: tuple[Any, Any, Any]) -> Any:
    """The drift ``f(t, y, args)``, as diffrax's ODETerm calls it."""
    drift, _, args = fields_and_args
    return drift(t, y, args)


def _call_diffusion(t: Any, y: Any, fields_and_args: tuple[Any, Any, Any]) -> Any:
    """The diffusion ``g(t, y, args)``, as the noise term calls it."""
    _, diffusion, args = fields_and_args
    return diffusion(t, y, args)


class _StepNoise(dfx.AbstractTerm):
    """The diffusion term of one step: ``g(t, y) dW`` with this step's increment.

    ``contr`` returns the step's increment ``dw`` (and, when the solver asks for
    it, the space-time Lévy area ``hh``), so that any diffrax SDE solver can take
    the step; ``prod`` is element-wise (diagonal/additive noise) or a
    matrix-vector product over the last axis (general noise).
    """

    dw: Array
    hh: Array | None
    general: bool = eqx.field(static=True)

    def vf(self, t: Any, y: Any, args: Any) -> Any:
        return _call_diffusion(t, y, args)

    def contr(self, t0: Any, t1: Any, use_levy: bool = False, **kwargs: Any) -> Any:
        if use_levy:
            return dfx.SpaceTimeLevyArea(dt=t1 - t0, W=self.dw, H=self.hh)
        return self.dw

    def prod(self, vf: Any, control: Any) -> Any:
        if self.general:
            return jnp.einsum("...dm,...m->...d", vf, control)
        return vf * control


class _DiagonalItoMilstein(dfx.AbstractItoSolver):
    r"""Itô–Milstein for diagonal noise, with one vector-Jacobian product per step.

    ``y1 = y0 + f h + g dW + (J_g^T (g * v))`` with ``v = (dW**2 - h) / 2``: for
    diagonal noise (``g_i`` a function of ``y_i``) the last term is
    ``g_i g_i' (dW_i**2 - h) / 2``, Milstein's correction. This is the formula
    torchsde's ``MilsteinIto`` uses, so both backends take the same step;
    diffrax's ``ItoMilstein`` covers general commutative noise but materialises
    the full Jacobian of the diffusion (quadratic in the state size).
    """

    term_structure: ClassVar = dfx.MultiTerm[tuple[dfx.AbstractTerm, dfx.AbstractTerm]]
    interpolation_cls: ClassVar[Callable[..., dfx.LocalLinearInterpolation]] = (
        dfx.LocalLinearInterpolation
    )

    def order(self, terms: Any) -> int:
        return 1

    def strong_order(self, terms: Any) -> float:
        return 1.0

    def init(self, terms: Any, t0: Any, t1: Any, y0: Any, args: Any) -> None:
        return None

    def step(
        self,
        terms: Any,
        t0: Any,
        t1: Any,
        y0: Any,
        args: Any,
        solver_state: Any,
        made_jump: Any,
    ) -> tuple[Any, None, dict[str, Any], None, Any]:
        drift, diffusion = terms.terms
        h = drift.contr(t0, t1)
        dw = diffusion.contr(t0, t1)
        g0, vjp = jax.vjp(lambda y: diffusion.vf(t0, y, args), y0)
        (correction,) = vjp(g0 * (0.5 * (dw**2 - h)))
        y1 = y0 + drift.vf_prod(t0, y0, args, h) + g0 * dw + correction
        return y1, None, {"y0": y0, "y1": y1}, None, dfx.RESULTS.successful

    def func(self, terms: Any, t0: Any, y0: Any, args: Any) -> Any:
        return terms.vf(t0, y0, args)


class _AdditiveSRA1(dfx.AbstractItoSolver):
    r"""Rößler's SRA1 for additive noise: strong order 1.5, two drift evaluations.

    With ``u = W / 2 + H`` (``H`` the space-time Lévy area, so ``h u`` is
    ``∫ (W_s - W_{t0}) ds``)::

        z1 = y0 + 3/4 h f(t0, y0) + 3/2 g(t1) u
        y1 = y0 + h (f(t0, y0) + 2 f(t0 + 3/4 h, z1)) / 3 + g(t1) (W - u) + g(t0) u

    (A. Rößler, SIAM J. Numer. Anal. 48 (2010) 922–952, the tableau with
    ``c1 = (1, 0)``, as torchsde's SRK uses for additive noise.) diffrax's
    ``SRA1`` evaluates the diffusion at ``t0`` in the stage, which differs from
    this one (by a higher-order term) when the diffusion depends on time; this
    form keeps the two backends' steps identical.
    """

    term_structure: ClassVar = dfx.MultiTerm[tuple[dfx.AbstractTerm, dfx.AbstractTerm]]
    interpolation_cls: ClassVar[Callable[..., dfx.LocalLinearInterpolation]] = (
        dfx.LocalLinearInterpolation
    )

    def order(self, terms: Any) -> int:
        return 2

    def strong_order(self, terms: Any) -> float:
        return 1.5

    def init(self, terms: Any, t0: Any, t1: Any, y0: Any, args: Any) -> None:
        return None

    def step(
        self,
        terms: Any,
        t0: Any,
        t1: Any,
        y0: Any,
        args: Any,
        solver_state: Any,
        made_jump: Any,
    ) -> tuple[Any, None, dict[str, Any], None, Any]:
        drift, diffusion = terms.terms
        h = drift.contr(t0, t1)
        levy = diffusion.contr(t0, t1, use_levy=True)
        u = 0.5 * levy.W + levy.H
        g0, g1 = diffusion.vf(t0, y0, args), diffusion.vf(t1, y0, args)
        k0 = drift.vf_prod(t0, y0, args, h)
        z1 = y0 + 0.75 * k0 + 1.5 * diffusion.prod(g1, u)
        k1 = drift.vf_prod(t0 + 0.75 * h, z1, args, h)
        noise = diffusion.prod(g1, levy.W - u) + diffusion.prod(g0, u)
        y1 = y0 + (k0 + 2 * k1) / 3 + noise
        return y1, None, {"y0": y0, "y1": y1}, None, dfx.RESULTS.successful

    def func(self, terms: Any, t0: Any, y0: Any, args: Any) -> Any:
        return terms.vf(t0, y0, args)


_SOLVER_CLASSES: dict[str, Callable[[], Any]] = {
    "euler": dfx.Euler,
    "milstein": _DiagonalItoMilstein,
    "srk": _AdditiveSRA1,
}


class Plan(NamedTuple):
    """The static description of one solve (hashable: part of the compile key)."""

    solver: str
    general: bool
    log_space: bool
    noise_shape: tuple[int, ...]


@eqx.filter_jit
def solve(
    plan: Plan,
    drift: Any,
    diffusion: Any,
    z0: Array,
    grid: ArrayLike,
    index: ArrayLike,
    noise: tuple[Array, Array | None] | None,
    key: Array | None,
    args: Any,
) -> tuple[Array, Array]:
    """The state at ``grid[index]`` and whether the solve failed.

    One compiled program per model structure does everything after the sample
    sites: the Brownian increments (from ``noise``, standard normals, or drawn
    from ``key``), the scan over the grid, the output times, and the failure
    check (eager model runs, as in NumPyro's initialisation, then cost one
    cached call instead of a compile per operation).
    """
    y0 = jnp.log(z0) if plan.log_space else z0
    grid = jnp.asarray(grid, dtype=y0.dtype)
    steps = grid.shape[0] - 1
    if steps == 0:
        ys = y0[None]
    else:
        dw, hh = _increments(plan, grid, y0.dtype, noise, key)
        ys = _scan(
            _SOLVER_CLASSES[plan.solver](), plan.general, (drift, diffusion, args), y0, grid, dw, hh
        )
    out = ys[index]
    if plan.log_space:
        out = jnp.exp(out)
    failed = ~jnp.all(jnp.isfinite(ys)) | ~jnp.all(jnp.isfinite(out))
    return jnp.where(failed, jnp.zeros_like(out), out), failed


def _increments(
    plan: Plan,
    grid: Array,
    dtype: Any,
    noise: tuple[Array, Array | None] | None,
    key: Array | None,
) -> tuple[Array, Array | None]:
    """Each step's Brownian increment ``dW`` and (SRK) Lévy area ``H``.

    ``dW_k = sqrt(h_k) xi_k`` and ``H_k = sqrt(h_k / 12) eta_k``, with the standard
    normals ``(xi, eta)`` given (``noise``: the latent sites) or drawn from ``key``.
    """
    shape = (grid.shape[0] - 1, *plan.noise_shape)
    levy = SOLVERS[plan.solver].levy_area
    if noise is None:
        assert key is not None
        k_w, k_h = jax.random.split(key)
        xi = jax.random.normal(k_w, shape, dtype)
        eta = jax.random.normal(k_h, shape, dtype) if levy else None
    else:
        xi, eta = noise
    h = jnp.diff(grid).reshape((-1,) + (1,) * len(plan.noise_shape))
    dw = jnp.sqrt(h) * xi.astype(dtype)
    hh = None if eta is None else jnp.sqrt(h / 12) * eta.astype(dtype)
    return dw, hh


def _scan(
    solver: Any,
    general: bool,
    fields_and_args: tuple[Any, Any, Any],
    y0: Array,
    grid: Array,
    dw: Array,
    hh: Array | None,
) -> Array:
    """The state at every grid time, ``(len(grid), *y0.shape)``."""

    def terms(w: Array, h: Array | None) -> dfx.MultiTerm:
        return dfx.MultiTerm(dfx.ODETerm(_call_drift), _StepNoise(w, h, general))

    def body(y: Array, step: tuple[Array, Array, Array, Array | None]) -> tuple[Array, Array]:
        t0, t1, w, h = step
        y1, _, _, _, _ = solver.step(terms(w, h), t0, t1, y, fields_and_args, None, False)
        return y1, y1

    _, ys = jax.lax.scan(body, y0, (grid[:-1], grid[1:], dw, hh))
    return jnp.concatenate([y0[None], ys])
