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
structure and reused across model runs (`probdyn.numpyro.primitives.sde_solvers`).
The solvers are diffrax's ``Euler`` and two small diffrax solvers written there
(diagonal Itô–Milstein and Rößler's SRA1) that take exactly the steps torchsde
takes, so both backends agree to rounding. The options, the stable families and
the checks are shared with the Pyro twin (`probdyn.primitives.sde_base`).

A solve that produces a non-finite state never crashes a run: the trajectory is
replaced by zeros, the factor site ``f"{name}.failed"`` sets the model's log
density to -inf, and the failure is counted with `NeuralODE`'s (see
`probdyn.numpyro.primitives.ode.failed_solves`), so every engine reports it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, ArrayLike

from probdyn.numpyro.bridge import ConcreteValueError, as_key
from probdyn.numpyro.primitives.ode import _concrete, _ConvertedField, _count_failures
from probdyn.numpyro.primitives.sde_solvers import Plan, solve
from probdyn.primitives.sde import additive_error, check_site_shape, positive_error
from probdyn.primitives.sde_base import NeuralSDEBase

__all__ = ["NeuralSDE"]


class NeuralSDE(NeuralSDEBase):
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

    The stable families (Oh, Lim & Kim, ICLR 2024) are constructors:
    ``NeuralSDE.langevin(drift, sigma)`` (additive noise, ``dz = drift(z, args) dt +
    sigma(t, args) dW``), ``NeuralSDE.linear_noise(drift, sigma)`` (``sigma(t, args) *
    z dW``) and ``NeuralSDE.geometric(drift, sigma)`` (``dz / z = drift dt + sigma
    dW``, solved for ``log z``, so the state stays positive).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> sde = NeuralSDE(lambda t, z, a: -z, lambda t, z, a: 0.1 * z, dt=0.01)
        >>> sde(jnp.ones(3), jnp.linspace(0.0, 1.0, 5), key=jax.random.key(0)).shape
        (5, 3)
        >>> sde = NeuralSDE.langevin(lambda z, a: -z, lambda t, a: 0.5, dt=0.1, solver="srk")
        >>> sde(jnp.zeros(2), jnp.array([0.0, 1.0]), key=jax.random.key(0)).shape
        (2, 2)
        >>> sde = NeuralSDE.linear_noise(lambda t, z, a: -z, lambda t, a: 0.2, dt=0.1)
        >>> sde(jnp.ones(2), jnp.array([0.0, 1.0]), key=jax.random.key(0)).shape
        (2, 2)
        >>> sde = NeuralSDE.geometric(lambda t, z, a: 0.1, lambda t, a: 0.3, dt=0.1)
        >>> bool(jnp.all(sde(jnp.ones(2), jnp.array([0.0, 5.0]), key=jax.random.key(0)) > 0))
        True
    """

    @staticmethod
    def _broadcast(value: Any, like: Any, *, cast: bool) -> Array:
        """``value`` broadcast to ``like``'s shape (and cast to its dtype if ``cast``)."""
        out = jnp.broadcast_to(value, jnp.shape(like))
        return out.astype(like.dtype) if cast else out

    @staticmethod
    def _exp(y: Any) -> Array:
        """``e**y``."""
        return jnp.exp(y)

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
        start, grid, index = self._grid(_concrete_times(times), t0, _concrete_t0)
        if self._log_space:
            self._check_positive(y0)
        # Only shapes and dtypes matter here (the log-space state has z0's).
        t_start = jnp.asarray(start, dtype=y0.dtype)
        drift = self._convert(self.drift, "drift", t_start, y0, args)
        diffusion = self._convert(self.diffusion, "diffusion", t_start, y0, args)
        shape = self._noise_shape(tuple(y0.shape))
        plan = Plan(self.solver, self.noise == "general", self._log_space, shape)
        noise, noise_key = self._noise((len(grid) - 1, *shape), key)
        out, failed = solve(plan, drift, diffusion, y0, grid, index, noise, noise_key, args)
        self._report(failed)
        return out

    def _check_positive(self, z0: Array) -> None:
        value = _concrete(z0)
        if value is not None and np.any(value <= 0):
            raise ValueError(positive_error(np.min(value)))

    def _convert(self, fn: Callable[..., Any], what: str, t: Array, y0: Array, args: Any) -> Any:
        field = _ConvertedField.build(fn, t, y0, args)
        got = jax.eval_shape(field, t, y0, args)
        self._check_output(what, tuple(jnp.shape(got)), tuple(y0.shape))
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
        in_model = bool(numpyro.primitives._PYRO_STACK)
        if self._increments_are_sites(in_model, key is not None):
            xi = _standard_normal(self._site("noise"), shape)
            eta = _standard_normal(self._site("levy"), shape) if self._levy else None
            return (xi, eta), None
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
            numpyro.factor(self._site("failed"), jnp.where(failed, -jnp.inf, 0.0))


def _standard_normal(name: str, shape: tuple[int, ...]) -> Array:
    """The standard-normal sample site ``name`` of ``shape`` (checked: a given value
    may have been drawn for another grid)."""
    value = numpyro.sample(name, dist.Normal(0.0, 1.0).expand(shape).to_event(len(shape)))
    check_site_shape(name, tuple(jnp.shape(value)), shape)
    return value


def _concrete_times(times: Any) -> np.ndarray:
    """The output times as a float64 NumPy array (they must not be traced)."""
    value = _concrete(times)
    if value is None:
        raise ConcreteValueError(
            "NeuralSDE: times must be concrete (a NumPy or JAX array, not a traced value): "
            "the step grid, hence the number of Brownian increments, is built from them. "
            "Pass times as a model argument, not a jit/vmap argument."
        )
    return np.asarray(value, dtype=np.float64)


def _concrete_t0(t0: Any) -> float:
    """A given start time as a float (it must be a concrete scalar)."""
    value = _concrete(t0)
    if value is None or np.size(value) != 1:
        raise ValueError(f"NeuralSDE: t0={t0!r} must be a concrete scalar time.")
    return float(np.asarray(value).reshape(()))
