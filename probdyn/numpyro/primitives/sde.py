"""Neural SDEs for NumPyro, stepped by diffrax's solvers on a fixed grid.

``NeuralSDE(f, g, dt=...)(z0, times, args)`` solves the Itô SDE
``dz = f(t, z, args) dt + g(t, z, args) dW`` and returns the state at ``times``.
Drift and diffusion may be networks (e.g. from `BayesianMLP`), mechanistic
functions, or both.

The Brownian path is either a set of sample sites (``brownian="latent"``: the
standard-normal increments of the fixed-step grid, non-centred, so NUTS, HMC
and SMC see them) or drawn inside the solve from a key (``brownian="simulate"``).
Either way the solve is a deterministic function of the increments: a
``lax.scan`` over the grid calling a diffrax solver's ``step`` with that step's
increment (and, for SRK, its space-time Lévy area), compiled once per model
structure and reused across model runs. The solvers are diffrax's ``Euler`` and
two small diffrax solvers written here (diagonal Itô–Milstein and Rößler's SRA1)
that take exactly the steps torchsde takes, so both backends agree to rounding.

A solve that produces a non-finite state never crashes a run: the trajectory is
replaced by zeros, the factor site ``f"{name}.failed"`` sets the model's log
density to -inf, and the failure is counted with `NeuralODE`'s (see
`probdyn.numpyro.primitives.ode.failed_solves`), so every engine reports it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, ArrayLike

from probdyn.numpyro.bridge import ConcreteValueError, as_key
from probdyn.numpyro.primitives.ode import _concrete, _ConvertedField, _count_failures
from probdyn.primitives.sde import (
    SOLVERS,
    additive_error,
    check_family_options,
    check_sde_args,
    check_site_shape,
    check_times,
    noise_shape,
    positive_error,
    state_shape_error,
    time_grid,
)

__all__ = ["NeuralSDE"]


# -- the terms and solvers ---------------------------------------------------------------
def _call_drift(t: Any, y: Any, fields_and_args: tuple[Any, Any, Any]) -> Any:
    drift, _, args = fields_and_args
    return drift(t, y, args)


def _call_diffusion(t: Any, y: Any, fields_and_args: tuple[Any, Any, Any]) -> Any:
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


class _Plan(NamedTuple):
    """The static description of one solve (hashable: part of the compile key)."""

    solver: str
    general: bool
    log_space: bool
    noise_shape: tuple[int, ...]


@eqx.filter_jit
def _solve(
    plan: _Plan,
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
    plan: _Plan,
    grid: Array,
    dtype: Any,
    noise: tuple[Array, Array | None] | None,
    key: Array | None,
) -> tuple[Array, Array | None]:
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


# -- the primitive ------------------------------------------------------------------------
class NeuralSDE:
    """Solve the Itô SDE ``dz = drift(t, z, args) dt + diffusion(t, z, args) dW``.

    The solver steps on a fixed grid: the points ``t0 + k * dt`` merged with the
    output times, so it lands exactly on every output time (irregular times need
    no padding and no interpolation).

    Two treatments of the Brownian path (``brownian``):

    * ``"latent"``: the increments are the sample site ``f"{name}.noise"``, a
      standard normal of shape ``(num_steps, *noise_shape)``; step ``k`` uses
      ``dW_k = sqrt(h_k) * noise[k]`` (non-centred). SRK also has the site
      ``f"{name}.levy"`` (same shape), the space-time Lévy area
      ``H_k = sqrt(h_k / 12) * levy[k]``. NUTS, HMC and SMC sample them with the
      parameters; conditioning on them makes the solve deterministic. Outside a
      model, they are drawn from ``key``.
    * ``"simulate"``: the same increments are drawn from ``key`` (inside a model
      with no key: from the model's PRNG, ``numpyro.prng_key()``); no sample
      sites. For variational / latent-SDE training and for forecasting.

    ``noise_shape`` is ``z0.shape`` for diagonal and additive noise, and
    ``(*z0.shape[:-1], brownian_size)`` for general noise. A batch of paths is a
    leading axis of ``z0`` (drift and diffusion broadcast over it).

    Solvers (the same vocabulary and the same schemes as `probdyn.pyro.NeuralSDE`):

    | solver     | scheme                            | noise                       | order |
    |------------|-----------------------------------|-----------------------------|-------|
    | `euler`    | Euler–Maruyama (`diffrax.Euler`)  | diagonal, additive, general | 0.5   |
    | `milstein` | Itô–Milstein for diagonal noise   | diagonal, additive          | 1.0   |
    | `srk`      | Rößler's SRA1 (as torchsde's SRK) | additive                    | 1.5   |

    (Strong orders; Euler–Maruyama has order 1.0 for additive noise.)

    Args:
        drift: ``f(t, z, args)`` with the shape of ``z``.
        diffusion: ``g(t, z, args)``: the shape of ``z`` (``noise="diagonal"`` or
            ``"additive"``, multiplying ``dW`` element-wise; ``g_i`` should depend on
            ``z_i`` only), or ``(*z.shape, brownian_size)`` (``noise="general"``,
            state ``(..., d)``).
        solver: ``"euler"``, ``"milstein"`` or ``"srk"`` (see the table).
        dt: the largest step (positive).
        noise: ``"diagonal"``, ``"additive"`` (the diffusion does not depend on
            ``z``; checked) or ``"general"``.
        brownian: ``"latent"`` (increments are sample sites) or ``"simulate"``.
        brownian_size: the number ``m`` of Brownian motions; only (and required)
            with ``noise="general"``.
        max_steps: the most grid steps a solve may take.
        name: prefix of the sites ``f"{name}.noise"``, ``f"{name}.levy"`` and
            ``f"{name}.failed"``; unique per model.

    Calling ``sde(z0, times, args=None, *, t0=None, key=None)``: ``z0`` is the
    state at ``t0`` (default ``times[0]``); ``times`` is 1-D, strictly
    increasing and concrete (the grid, hence the number of sites, depends on
    it); returns ``(len(times), *z0.shape)``.

    Raises:
        TypeError: drift or diffusion not callable.
        ValueError: unknown solver/noise/brownian (with the valid names), a solver
            that does not support the noise type, ``dt <= 0``, times not strictly
            increasing, ``t0`` after the first time, a drift or diffusion of the
            wrong shape, a state-dependent diffusion declared additive, no key
            where one is needed.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> sde = NeuralSDE(lambda t, z, a: -z, lambda t, z, a: 0.1 * z, dt=0.01)
        >>> sde(jnp.ones(3), jnp.linspace(0.0, 1.0, 5), key=jax.random.key(0)).shape
        (5, 3)
    """

    def __init__(
        self,
        drift: Callable[[Any, Any, Any], Any],
        diffusion: Callable[[Any, Any, Any], Any],
        *,
        solver: str = "euler",
        dt: float,
        noise: str = "diagonal",
        brownian: str = "latent",
        brownian_size: int | None = None,
        max_steps: int = 16384,
        name: str = "sde",
    ) -> None:
        check_sde_args(
            drift,
            diffusion,
            solver=solver,
            dt=dt,
            noise=noise,
            brownian=brownian,
            brownian_size=brownian_size,
            max_steps=max_steps,
            name=name,
        )
        self.drift, self.diffusion = drift, diffusion
        self.solver, self.dt, self.noise = solver, float(dt), noise
        self.brownian, self.brownian_size = brownian, brownian_size
        self.max_steps, self.name = max_steps, name
        self._log_space = False  # geometric family: solved for log z

    def __repr__(self) -> str:
        return (
            f"NeuralSDE(solver={self.solver!r}, dt={self.dt}, noise={self.noise!r}, "
            f"brownian={self.brownian!r}, name={self.name!r})"
        )

    # -- the stable families (Oh, Lim & Kim, ICLR 2024) -------------------------------
    @classmethod
    def langevin(
        cls, drift: Callable[[Any, Any], Any], sigma: Callable[[Any, Any], Any], **options: Any
    ) -> NeuralSDE:
        """Langevin-type SDE: ``dz = drift(z, args) dt + sigma(t, args) dW``.

        The drift has no explicit time input and the noise is additive (``sigma``
        is broadcast to the state's shape), so ``solver="srk"`` applies.

        Args:
            drift: ``drift(z, args)`` with the shape of ``z``.
            sigma: ``sigma(t, args)``, broadcastable to the shape of ``z``.
            **options: `NeuralSDE`'s keyword options except ``noise`` and
                ``brownian_size`` (the family fixes them).

        Example:
            >>> import jax, jax.numpy as jnp
            >>> sde = NeuralSDE.langevin(lambda z, a: -z, lambda t, a: 0.5, dt=0.1, solver="srk")
            >>> sde(jnp.zeros(2), jnp.array([0.0, 1.0]), key=jax.random.key(0)).shape
            (2, 2)
        """
        check_family_options("langevin", options)

        def f(t: Array, z: Array, args: Any) -> Array:
            return drift(z, args)

        def g(t: Array, z: Array, args: Any) -> Array:
            return jnp.broadcast_to(sigma(t, args), jnp.shape(z)).astype(z.dtype)

        return cls(f, g, noise="additive", **options)

    @classmethod
    def linear_noise(
        cls, drift: Callable[[Any, Any, Any], Any], sigma: Callable[[Any, Any], Any], **options: Any
    ) -> NeuralSDE:
        """Linear-noise SDE: ``dz = drift(t, z, args) dt + sigma(t, args) * z dW``.

        The noise is proportional to the state (diagonal), so ``solver="milstein"``
        applies.

        Args:
            drift: ``drift(t, z, args)`` with the shape of ``z``.
            sigma: ``sigma(t, args)``, broadcastable to the shape of ``z``.
            **options: `NeuralSDE`'s keyword options except ``noise`` and
                ``brownian_size``.

        Example:
            >>> import jax, jax.numpy as jnp
            >>> sde = NeuralSDE.linear_noise(lambda t, z, a: -z, lambda t, a: 0.2, dt=0.1)
            >>> sde(jnp.ones(2), jnp.array([0.0, 1.0]), key=jax.random.key(0)).shape
            (2, 2)
        """
        check_family_options("linear_noise", options)

        def g(t: Array, z: Array, args: Any) -> Array:
            return sigma(t, args) * z

        return cls(drift, g, noise="diagonal", **options)

    @classmethod
    def geometric(
        cls, drift: Callable[[Any, Any, Any], Any], sigma: Callable[[Any, Any], Any], **options: Any
    ) -> NeuralSDE:
        """Geometric SDE: ``dz / z = drift(t, z, args) dt + sigma(t, args) dW``.

        Solved for ``y = log z``, where Itô's formula gives the additive-noise SDE
        ``dy = (drift(t, e^y, args) - sigma**2 / 2) dt + sigma dW``; the result is
        ``exp(y)``, so every solver keeps the state positive in discrete time too
        (and ``solver="srk"`` applies). With constant ``drift`` and ``sigma`` the
        solve is exact. ``z0`` must be positive.

        Args:
            drift: the growth rate ``drift(t, z, args)`` with the shape of ``z``.
            sigma: the volatility ``sigma(t, args)``, broadcastable to ``z``.
            **options: `NeuralSDE`'s keyword options except ``noise`` and
                ``brownian_size``.

        Example:
            >>> import jax, jax.numpy as jnp
            >>> sde = NeuralSDE.geometric(lambda t, z, a: 0.1, lambda t, a: 0.3, dt=0.1)
            >>> bool(jnp.all(sde(jnp.ones(2), jnp.array([0.0, 5.0]), key=jax.random.key(0)) > 0))
            True
        """
        check_family_options("geometric", options)

        def f(t: Array, y: Array, args: Any) -> Array:
            s = jnp.broadcast_to(sigma(t, args), jnp.shape(y))
            return jnp.broadcast_to(drift(t, jnp.exp(y), args), jnp.shape(y)) - 0.5 * s**2

        def g(t: Array, y: Array, args: Any) -> Array:
            return jnp.broadcast_to(sigma(t, args), jnp.shape(y)).astype(y.dtype)

        sde = cls(f, g, noise="additive", **options)
        sde._log_space = True
        return sde

    # -- the solve ------------------------------------------------------------------------
    def __call__(
        self,
        z0: ArrayLike,
        times: ArrayLike,
        args: Any = None,
        *,
        t0: ArrayLike | None = None,
        key: Any = None,
    ) -> Array:
        y0 = jnp.asarray(z0)
        if not jnp.issubdtype(y0.dtype, jnp.floating):
            y0 = y0.astype(jnp.result_type(float))
        ts = _concrete_times(times)
        check_times(ts, "times")
        start = float(ts[0]) if t0 is None else _concrete_t0(t0)
        grid, index = time_grid(start, ts, self.dt, self.max_steps)
        if self._log_space:
            self._check_positive(y0)
        # Only shapes and dtypes matter here (the log-space state has z0's).
        t_start = jnp.asarray(start, dtype=y0.dtype)
        drift = self._convert(self.drift, "drift", t_start, y0, args)
        diffusion = self._convert(self.diffusion, "diffusion", t_start, y0, args)
        shape = noise_shape(self.noise, tuple(y0.shape), self.brownian_size)
        plan = _Plan(self.solver, self.noise == "general", self._log_space, shape)
        noise, noise_key = self._noise((len(grid) - 1, *shape), key)
        out, failed = _solve(plan, drift, diffusion, y0, grid, index, noise, noise_key, args)
        self._report(failed)
        return out

    def _check_positive(self, z0: Array) -> None:
        value = _concrete(z0)
        if value is not None and np.any(value <= 0):
            raise ValueError(positive_error(np.min(value)))

    def _convert(self, fn: Callable[..., Any], what: str, t: Array, y0: Array, args: Any) -> Any:
        field = _ConvertedField.build(fn, t, y0, args)
        got = jax.eval_shape(field, t, y0, args)
        message = state_shape_error(
            what, tuple(jnp.shape(got)), tuple(y0.shape), self.noise, self.brownian_size
        )
        if message is not None:
            raise ValueError(message)
        if what == "diffusion" and self.noise == "additive":
            # A diffusion that ignores z has a symbolic-zero tangent, which
            # equinox reports as no leaves (abstractly: nothing is computed).
            tangent = jax.eval_shape(
                lambda y: eqx.filter_jvp(lambda x: field(t, x, args), (y,), (jnp.ones_like(y),))[1],
                y0,
            )
            if jax.tree.leaves(tangent):
                raise ValueError(additive_error("diffusion"))
        return field

    # -- the Brownian increments ----------------------------------------------------------
    def _noise(
        self, shape: tuple[int, ...], key: Any
    ) -> tuple[tuple[Array, Array | None] | None, Array | None]:
        """The standard-normal sites (latent, in a model) or the key to draw them from."""
        levy = SOLVERS[self.solver].levy_area
        in_model = bool(numpyro.primitives._PYRO_STACK)
        if self.brownian == "latent" and in_model and key is None:
            xi = _standard_normal(f"{self.name}.noise", shape)
            eta = _standard_normal(f"{self.name}.levy", shape) if levy else None
            return (xi, eta), None
        if self.brownian == "latent" and in_model:
            raise ValueError(
                f"NeuralSDE(name={self.name!r}, brownian='latent'): inside a model the "
                "increments are the sample site; do not pass key (or use brownian='simulate')."
            )
        return None, self._key(key, in_model)

    def _key(self, key: Any, in_model: bool) -> Array:
        if key is not None:
            return as_key(key)
        found = numpyro.prng_key() if in_model else None
        if found is None:
            where = (
                "brownian='latent' outside a model"
                if self.brownian == "latent"
                else ("brownian='simulate'")
            )
            raise ValueError(
                f"NeuralSDE(name={self.name!r}): {where} draws the Brownian increments from a "
                "key: call sde(z0, times, args, key=jax.random.key(0)) (or run it inside a "
                "seeded model)."
            )
        return found

    def _report(self, failed: Array) -> None:
        jax.lax.cond(
            failed,
            lambda f: jax.debug.callback(_count_failures, f),
            lambda f: None,
            failed,
        )
        if numpyro.primitives._PYRO_STACK:
            numpyro.factor(self.name + ".failed", jnp.where(failed, -jnp.inf, 0.0))


def _standard_normal(name: str, shape: tuple[int, ...]) -> Array:
    value = numpyro.sample(name, dist.Normal(0.0, 1.0).expand(shape).to_event(len(shape)))
    check_site_shape(name, tuple(jnp.shape(value)), shape)
    return value


def _concrete_times(times: Any) -> np.ndarray:
    value = _concrete(times)
    if value is None:
        raise ConcreteValueError(
            "NeuralSDE: times must be concrete (a NumPy or JAX array, not a traced value): "
            "the step grid, hence the number of Brownian increments, is built from them. "
            "Pass times as a model argument, not a jit/vmap argument."
        )
    return np.asarray(value, dtype=np.float64)


def _concrete_t0(t0: Any) -> float:
    value = _concrete(t0)
    if value is None or np.size(value) != 1:
        raise ValueError(f"NeuralSDE: t0={t0!r} must be a concrete scalar time.")
    return float(np.asarray(value).reshape(()))
