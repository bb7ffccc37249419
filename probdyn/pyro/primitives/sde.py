"""Neural SDEs for Pyro, stepped by torchsde's solvers on a fixed grid.

``NeuralSDE(f, g, dt=...)(z0, times, args)`` solves the Itô SDE
``dz = f(t, z, args) dt + g(t, z, args) dW`` and returns the state at ``times``,
with the same options, sites and numbers as `probdyn.numpyro.NeuralSDE`.

torchsde's ``sdeint`` steps by ``dt`` from the first time and reads the state at
an output time off a straight line between steps. probdyn instead steps exactly
onto every output time (the grid of ``probdyn.primitives.sde.time_grid``), so it
drives torchsde's solver objects (``Euler``, ``MilsteinIto``, ``SRK``) one grid
step at a time, each with that step's Brownian increment from a small grid
Brownian motion: the increments are the sample site ``f"{name}.noise"``
(``brownian="latent"``) or drawn from a torch generator (``"simulate"``).

A solve that produces a non-finite state never crashes a run: the trajectory is
replaced by zeros, the factor site ``f"{name}.failed"`` sets the model's log
density to -inf, and the failure is counted with `NeuralODE`'s (see
`probdyn.pyro.primitives.ode.failed_solves`), so every engine reports it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.poutine.runtime import am_i_wrapped
from torch import Tensor
from torchsde import BaseBrownian
from torchsde._core.base_sde import ForwardSDE
from torchsde._core.methods import select as _select_method

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
from probdyn.pyro.primitives.ode import _FAILURES, _as_state

__all__ = ["NeuralSDE"]

# probdyn's solver name -> torchsde's method name.
_METHODS = {"euler": "euler", "milstein": "milstein", "srk": "srk"}


class _GridBrownian(BaseBrownian):
    """A Brownian motion known by its increments on a fixed grid.

    Answers torchsde's queries ``bm(t_k, t_{k+1})`` for the grid's steps only
    (the only queries a fixed-grid solve makes): the increment ``W`` and, with
    ``return_U``, torchsde's space-time integral ``U = h (W / 2 + H)``.
    """

    def __init__(self, grid: list[float], dw: Tensor, hh: Tensor | None) -> None:
        self._grid = grid
        self._dw = dw
        self._u = None
        if hh is not None:
            h = torch.as_tensor(np.diff(grid), dtype=dw.dtype, device=dw.device)
            h = h.reshape((-1,) + (1,) * (dw.ndim - 1))
            self._u = h * (0.5 * dw + hh)

    def __call__(self, ta: Any, tb: Any = None, return_U: bool = False, return_A: bool = False):
        if tb is None or return_A:
            raise RuntimeError(
                "probdyn's grid Brownian motion answers step queries bm(ta, tb) only"
            )
        k = bisect.bisect_right(self._grid, 0.5 * (float(ta) + float(tb))) - 1
        if return_U:
            if self._u is None:
                raise RuntimeError("this solve drew no space-time Lévy area")
            return self._dw[k], self._u[k]
        return self._dw[k]

    def __repr__(self) -> str:
        return f"_GridBrownian(steps={len(self._grid) - 1}, shape={tuple(self.shape)})"

    @property
    def dtype(self) -> torch.dtype:
        return self._dw.dtype

    @property
    def device(self) -> torch.device:
        return self._dw.device

    @property
    def shape(self) -> torch.Size:
        return self._dw.shape[1:]

    @property
    def levy_area_approximation(self) -> str:
        return "none" if self._u is None else "space-time"


class _FlatSDE:
    """torchsde's view of the user's SDE: states ``(batch, d)``, ``args`` bound.

    Diagonal and additive noise see the whole state as one row ``(1, N)``;
    general noise sees ``(prod(batch), d)`` rows with a ``(rows, d, m)``
    diffusion. Additive noise under SRK is torchsde's ``"additive"`` type, whose
    scheme (SRA1) only needs the diffusion-increment product.
    """

    sde_type = "ito"

    def __init__(self, sde: NeuralSDE, args: Any, shape: tuple[int, ...], noise_type: str) -> None:
        self._drift, self._diffusion = sde.drift, sde.diffusion
        self._args, self._shape = args, shape
        self.noise_type = noise_type
        self._general = sde.noise == "general"

    def f(self, t: Tensor, y: Tensor) -> Tensor:
        return self._drift(t, y.reshape(self._shape), self._args).reshape(y.shape)

    def g(self, t: Tensor, y: Tensor) -> Tensor:
        g = self._diffusion(t, y.reshape(self._shape), self._args)
        return g.reshape(*y.shape, -1) if self._general else g.reshape(y.shape)

    def g_prod(self, t: Tensor, y: Tensor, v: Tensor) -> Tensor:
        g = self.g(t, y)
        return (g @ v.unsqueeze(-1)).squeeze(-1) if self._general else g * v


def _rows(noise: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``(batch, d)`` layout torchsde sees for a state of ``shape``."""
    if noise == "general":
        return math.prod(shape[:-1]), shape[-1]
    return 1, math.prod(shape)


class NeuralSDE:
    """Solve the Itô SDE ``dz = drift(t, z, args) dt + diffusion(t, z, args) dW``.

    The Pyro twin of `probdyn.numpyro.NeuralSDE`: the same arguments, defaults,
    sample sites, grid and schemes, so the same increments give the same path
    (to rounding) on both backends. The solver names map onto torchsde:

    | solver     | torchsde method  | noise                       | order |
    |------------|------------------|-----------------------------|-------|
    | `euler`    | `euler`          | diagonal, additive, general | 0.5   |
    | `milstein` | `milstein` (Itô) | diagonal, additive          | 1.0   |
    | `srk`      | `srk` (SRA1)     | additive                    | 1.5   |

    (Strong orders; Euler–Maruyama has order 1.0 for additive noise.)

    The solver steps on a fixed grid: the points ``t0 + k * dt`` merged with the
    output times, so it lands exactly on every output time.

    Two treatments of the Brownian path (``brownian``):

    * ``"latent"``: the increments are the sample site ``f"{name}.noise"``, a
      standard normal of shape ``(num_steps, *noise_shape)``; step ``k`` uses
      ``dW_k = sqrt(h_k) * noise[k]`` (non-centred). SRK also has the site
      ``f"{name}.levy"`` (same shape), the space-time Lévy area
      ``H_k = sqrt(h_k / 12) * levy[k]``. NUTS, HMC and SMC sample them with the
      parameters. Outside any Pyro handler a ``key`` may be given instead, and
      the increments are drawn from it (no site).
    * ``"simulate"``: the same increments are drawn from ``key`` (an int seed or
      a ``torch.Generator``); no sample sites.

    With ``key=None`` the draws come from torch's global RNG, exactly as
    ``pyro.sample`` draws (probdyn's engines seed and isolate it).

    ``noise_shape`` is ``z0.shape`` for diagonal and additive noise, and
    ``(*z0.shape[:-1], brownian_size)`` for general noise. A batch of paths is a
    leading axis of ``z0`` (drift and diffusion broadcast over it).

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
    state at ``t0`` (default ``times[0]``); ``times`` is 1-D and strictly
    increasing (not differentiated); returns ``(len(times), *z0.shape)`` in the
    dtype of ``z0``.

    Raises:
        TypeError: drift or diffusion not callable.
        ValueError: unknown solver/noise/brownian (with the valid names), a solver
            that does not support the noise type, ``dt <= 0``, times not strictly
            increasing, ``t0`` after the first time, a drift or diffusion of the
            wrong shape, a state-dependent diffusion declared additive, no key
            where one is needed.

    Example:
        >>> import torch
        >>> sde = NeuralSDE(lambda t, z, a: -z, lambda t, z, a: 0.1 * z, dt=0.01)
        >>> sde(torch.ones(3), torch.linspace(0.0, 1.0, 5), key=0).shape
        torch.Size([5, 3])
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
            >>> import torch
            >>> sde = NeuralSDE.langevin(lambda z, a: -z, lambda t, a: 0.5, dt=0.1, solver="srk")
            >>> sde(torch.zeros(2), torch.tensor([0.0, 1.0]), key=0).shape
            torch.Size([2, 2])
        """
        check_family_options("langevin", options)

        def f(t: Tensor, z: Tensor, args: Any) -> Tensor:
            return drift(z, args)

        def g(t: Tensor, z: Tensor, args: Any) -> Tensor:
            return _broadcast(sigma(t, args), z)

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
            >>> import torch
            >>> sde = NeuralSDE.linear_noise(lambda t, z, a: -z, lambda t, a: 0.2, dt=0.1)
            >>> sde(torch.ones(2), torch.tensor([0.0, 1.0]), key=0).shape
            torch.Size([2, 2])
        """
        check_family_options("linear_noise", options)

        def g(t: Tensor, z: Tensor, args: Any) -> Tensor:
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
            >>> import torch
            >>> sde = NeuralSDE.geometric(lambda t, z, a: 0.1, lambda t, a: 0.3, dt=0.1)
            >>> bool((sde(torch.ones(2), torch.tensor([0.0, 5.0]), key=0) > 0).all())
            True
        """
        check_family_options("geometric", options)

        def f(t: Tensor, y: Tensor, args: Any) -> Tensor:
            s = _broadcast(sigma(t, args), y)
            return _broadcast(drift(t, torch.exp(y), args), y) - 0.5 * s**2

        def g(t: Tensor, y: Tensor, args: Any) -> Tensor:
            return _broadcast(sigma(t, args), y)

        sde = cls(f, g, noise="additive", **options)
        sde._log_space = True
        return sde

    # -- the solve ------------------------------------------------------------------------
    def __call__(
        self,
        z0: Any,
        times: Any,
        args: Any = None,
        *,
        t0: Any = None,
        key: Any = None,
    ) -> Tensor:
        y0 = _as_state(z0)
        ts = _as_numpy(times)
        check_times(ts, "times")
        start = float(ts[0]) if t0 is None else _scalar_time(t0)
        grid, index = time_grid(start, ts, self.dt, self.max_steps)
        if self._log_space:
            y0 = self._to_log(y0)
        t_grid = torch.as_tensor(grid, dtype=y0.dtype, device=y0.device)
        self._check_fields(t_grid[0], y0, args)
        dw, hh = self._increments(grid, y0, key)
        ys = self._solve(y0, t_grid, dw, hh, args)
        out = ys[torch.as_tensor(index, device=y0.device)]
        if self._log_space:
            out = torch.exp(out)
        failed = not (bool(torch.isfinite(ys).all()) and bool(torch.isfinite(out).all()))
        self._report(failed, y0)
        return torch.zeros_like(out) if failed else out

    def _to_log(self, z0: Tensor) -> Tensor:
        if bool((z0 <= 0).any()):
            raise ValueError(positive_error(float(z0.min())))
        return torch.log(z0)

    def _solve(self, y0: Tensor, grid: Tensor, dw: Tensor, hh: Tensor | None, args: Any) -> Tensor:
        shape = tuple(y0.shape)
        rows, cols = _rows(self.noise, shape)
        additive_srk = self.noise == "additive" and self.solver == "srk"
        noise_type = "general" if self.noise == "general" else "diagonal"
        sde = _FlatSDE(self, args, shape, "additive" if additive_srk else noise_type)
        flat = (len(grid) - 1, rows, -1)
        bm = _GridBrownian(
            grid.tolist(), dw.reshape(flat), None if hh is None else hh.reshape(flat)
        )
        solver = _select_method(method=_METHODS[self.solver], sde_type="ito")(
            sde=ForwardSDE(sde),
            bm=bm,
            dt=self.dt,
            adaptive=False,
            rtol=1e-5,
            atol=1e-4,
            dt_min=1e-5,
            options={},
        )
        y = y0.reshape(rows, cols)
        extra = solver.init_extra_solver_state(grid[0], y)
        states = [y]
        for k in range(len(grid) - 1):
            y, extra = solver.step(grid[k], grid[k + 1], y, extra)
            states.append(y)
        return torch.stack(states).reshape(len(grid), *shape)

    def _check_fields(self, t: Tensor, y0: Tensor, args: Any) -> None:
        with torch.no_grad():
            drift = self.drift(t, y0, args)
        message = state_shape_error(
            "drift", tuple(drift.shape), tuple(y0.shape), self.noise, self.brownian_size
        )
        probe = y0.detach().clone().requires_grad_(self.noise == "additive")
        with torch.enable_grad():
            g = self.diffusion(t, probe, args)
        message = message or state_shape_error(
            "diffusion", tuple(g.shape), tuple(y0.shape), self.noise, self.brownian_size
        )
        if message is not None:
            raise ValueError(message)
        if self.noise == "additive" and g.requires_grad:
            (grad,) = torch.autograd.grad(g.sum(), probe, allow_unused=True)
            if grad is not None and bool((grad != 0).any()):
                raise ValueError(additive_error("diffusion"))

    # -- the Brownian increments ----------------------------------------------------------
    def _increments(self, grid: np.ndarray, y0: Tensor, key: Any) -> tuple[Tensor, Tensor | None]:
        shape = (len(grid) - 1, *noise_shape(self.noise, tuple(y0.shape), self.brownian_size))
        levy = SOLVERS[self.solver].levy_area
        if self.brownian == "latent" and key is None:
            xi = _standard_normal(f"{self.name}.noise", shape, y0)
            eta = _standard_normal(f"{self.name}.levy", shape, y0) if levy else None
        elif self.brownian == "latent" and am_i_wrapped():
            raise ValueError(
                f"NeuralSDE(name={self.name!r}, brownian='latent'): inside a model the "
                "increments are the sample site; do not pass key (or use brownian='simulate')."
            )
        else:
            generator = _generator(key)
            xi = _randn(shape, y0, generator)
            eta = _randn(shape, y0, generator) if levy else None
        h = torch.as_tensor(np.diff(grid), dtype=y0.dtype, device=y0.device)
        h = h.reshape((-1,) + (1,) * (len(shape) - 1))
        dw = torch.sqrt(h) * xi
        hh = None if eta is None else torch.sqrt(h / 12) * eta
        return dw, hh

    def _report(self, failed: bool, like: Tensor) -> None:
        _FAILURES[0] += int(failed)
        if am_i_wrapped():
            log_factor = -torch.inf if failed else 0.0
            pyro.factor(
                self.name + ".failed",
                torch.tensor(log_factor, dtype=like.dtype, device=like.device),
            )


def _generator(key: Any) -> torch.Generator | None:
    """The generator for ``key``; None (torch's global RNG, as ``pyro.sample``) for None."""
    if key is None or isinstance(key, torch.Generator):
        return key
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return torch.Generator().manual_seed(int(key))
    raise TypeError(
        f"NeuralSDE: key={key!r}; expected an int seed or a torch.Generator "
        "(torch.Generator().manual_seed(0))."
    )


def _broadcast(value: Any, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).expand(like.shape)


def _standard_normal(name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    loc = torch.zeros(shape, dtype=like.dtype, device=like.device)
    value = pyro.sample(name, dist.Normal(loc, torch.ones_like(loc)).to_event(len(shape)))
    check_site_shape(name, tuple(value.shape), shape)
    return value.to(like.dtype)


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    out = torch.randn(shape, generator=generator, dtype=like.dtype, device="cpu")
    return out.to(like.device)


def _as_numpy(times: Any) -> np.ndarray:
    if isinstance(times, Tensor):
        return times.detach().cpu().numpy().astype(np.float64)
    return np.asarray(times, dtype=np.float64)


def _scalar_time(t0: Any) -> float:
    value = _as_numpy(t0)
    if value.size != 1:
        raise ValueError(f"NeuralSDE: t0={t0!r} must be a scalar time.")
    return float(value.reshape(()))
