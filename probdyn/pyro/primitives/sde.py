"""Neural SDEs for Pyro, stepped by torchsde's solvers on a fixed grid.

``NeuralSDE(f, g, dt=...)(z0, times, args)`` solves the Itô SDE
``dz = f(t, z, args) dt + g(t, z, args) dW`` and returns the state at ``times``,
with the same options, sites and numbers as `probdyn.numpyro.NeuralSDE`.

torchsde's ``sdeint`` steps by ``dt`` from the first time and reads the state at
an output time off a straight line between steps. probdyn instead steps exactly
onto every output time (the grid of ``probdyn.primitives.sde.time_grid``), so it
drives torchsde's solver objects (``Euler``, ``MilsteinIto``, ``SRK``) one grid
step at a time (`probdyn.pyro.primitives.sde_solvers`), each with that step's
Brownian increment: the increments are the sample site ``f"{name}.noise"``
(``brownian="latent"``) or drawn from a torch generator (``"simulate"``). The
options, the stable families and the checks are shared with the NumPyro twin
(`probdyn.primitives.sde_base`).

A solve that produces a non-finite state never crashes a run: the trajectory is
replaced by zeros, the factor site ``f"{name}.failed"`` sets the model's log
density to -inf, and the failure is counted with `NeuralODE`'s (see
`probdyn.pyro.primitives.ode.failed_solves`), so every engine reports it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.poutine.runtime import am_i_wrapped
from torch import Tensor

from probdyn.engines.keys import int_key
from probdyn.primitives.sde import additive_error, check_site_shape, positive_error
from probdyn.primitives.sde_base import NeuralSDEBase
from probdyn.pyro.bridge import torch_seed
from probdyn.pyro.primitives.ode import _FAILURES, _as_state
from probdyn.pyro.primitives.sde_solvers import solve

__all__ = ["NeuralSDE"]


class NeuralSDE(NeuralSDEBase):
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

    The stable families (Oh, Lim & Kim, ICLR 2024) are constructors:
    ``NeuralSDE.langevin(drift, sigma)`` (additive noise, ``dz = drift(z, args) dt +
    sigma(t, args) dW``), ``NeuralSDE.linear_noise(drift, sigma)`` (``sigma(t, args) *
    z dW``) and ``NeuralSDE.geometric(drift, sigma)`` (``dz / z = drift dt + sigma
    dW``, solved for ``log z``, so the state stays positive).

    Example:
        >>> import torch
        >>> sde = NeuralSDE(lambda t, z, a: -z, lambda t, z, a: 0.1 * z, dt=0.01)
        >>> sde(torch.ones(3), torch.linspace(0.0, 1.0, 5), key=0).shape
        torch.Size([5, 3])
        >>> sde = NeuralSDE.langevin(lambda z, a: -z, lambda t, a: 0.5, dt=0.1, solver="srk")
        >>> sde(torch.zeros(2), torch.tensor([0.0, 1.0]), key=0).shape
        torch.Size([2, 2])
        >>> sde = NeuralSDE.linear_noise(lambda t, z, a: -z, lambda t, a: 0.2, dt=0.1)
        >>> sde(torch.ones(2), torch.tensor([0.0, 1.0]), key=0).shape
        torch.Size([2, 2])
        >>> sde = NeuralSDE.geometric(lambda t, z, a: 0.1, lambda t, a: 0.3, dt=0.1)
        >>> bool((sde(torch.ones(2), torch.tensor([0.0, 5.0]), key=0) > 0).all())
        True
    """

    # Latent increments are sample sites outside a model too: pyro.sample draws
    # them from torch's global RNG there.
    _sites_outside_model: ClassVar[bool] = True

    @staticmethod
    def _broadcast(value: Any, like: Any, *, cast: bool) -> Tensor:
        """``value`` broadcast to ``like``'s shape, in its dtype (torch needs one,
        so the cast is always made)."""
        return _broadcast(value, like)

    @staticmethod
    def _exp(y: Any) -> Tensor:
        """``e**y``."""
        return torch.exp(y)

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
        _, grid, index = self._grid(_as_numpy(times), t0, _scalar_time)
        if self._log_space:
            y0 = self._to_log(y0)
        t_grid = torch.as_tensor(grid, dtype=y0.dtype, device=y0.device)
        self._check_fields(t_grid[0], y0, args)
        dw, hh = self._increments(grid, y0, key)
        ys = solve(self, y0, t_grid, dw, hh, args)
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

    def _check_fields(self, t: Tensor, y0: Tensor, args: Any) -> None:
        with torch.no_grad():
            drift = self.drift(t, y0, args)
        probe = y0.detach().clone().requires_grad_(self.noise == "additive")
        with torch.enable_grad():
            g = self.diffusion(t, probe, args)
        self._check_output("drift", tuple(drift.shape), tuple(y0.shape))
        self._check_output("diffusion", tuple(g.shape), tuple(y0.shape))
        if self.noise == "additive" and g.requires_grad:
            (grad,) = torch.autograd.grad(g.sum(), probe, allow_unused=True)
            if grad is not None and bool((grad != 0).any()):
                raise ValueError(additive_error("diffusion"))

    # -- the Brownian increments ----------------------------------------------------------
    def _increments(self, grid: np.ndarray, y0: Tensor, key: Any) -> tuple[Tensor, Tensor | None]:
        shape = (len(grid) - 1, *self._noise_shape(tuple(y0.shape)))
        if self._increments_are_sites(am_i_wrapped(), key is not None):
            xi = _standard_normal(self._site("noise"), shape, y0)
            eta = _standard_normal(self._site("levy"), shape, y0) if self._levy else None
        else:
            generator = _generator(key)
            xi = _randn(shape, y0, generator)
            eta = _randn(shape, y0, generator) if self._levy else None
        h = torch.as_tensor(np.diff(grid), dtype=y0.dtype, device=y0.device)
        h = h.reshape((-1,) + (1,) * (len(shape) - 1))
        dw = torch.sqrt(h) * xi
        hh = None if eta is None else torch.sqrt(h / 12) * eta
        return dw, hh

    def _report(self, failed: bool, like: Tensor) -> None:
        _FAILURES.add(failed)
        if am_i_wrapped():
            log_factor = -torch.inf if failed else 0.0
            pyro.factor(
                self._site("failed"),
                torch.tensor(log_factor, dtype=like.dtype, device=like.device),
            )


def _generator(key: Any) -> torch.Generator | None:
    """The generator for ``key``; None (torch's global RNG, as ``pyro.sample``) for None."""
    if key is None or isinstance(key, torch.Generator):
        return key
    seed = int_key(key)  # ValueError outside [0, 2**64)
    if seed is not None:
        return torch.Generator().manual_seed(torch_seed(seed))
    raise TypeError(
        f"NeuralSDE: key={key!r}; expected an int seed or a torch.Generator "
        "(torch.Generator().manual_seed(0))."
    )


def _broadcast(value: Any, like: Tensor) -> Tensor:
    """``value`` as a tensor in ``like``'s dtype and device, expanded to its shape."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).expand(like.shape)


def _standard_normal(name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """The standard-normal sample site ``name`` of ``shape`` in ``like``'s dtype."""
    loc = torch.zeros(shape, dtype=like.dtype, device=like.device)
    value = pyro.sample(name, dist.Normal(loc, torch.ones_like(loc)).to_event(len(shape)))
    check_site_shape(name, tuple(value.shape), shape)
    return value.to(like.dtype)


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normals drawn on the CPU from ``generator`` (the same numbers on any
    device), moved to ``like``'s device."""
    out = torch.randn(shape, generator=generator, dtype=like.dtype, device="cpu")
    return out.to(like.device)


def _as_numpy(times: Any) -> np.ndarray:
    """Times (a tensor, an array or a list) as a float64 NumPy array."""
    if isinstance(times, Tensor):
        return times.detach().cpu().numpy().astype(np.float64)
    return np.asarray(times, dtype=np.float64)


def _scalar_time(t0: Any) -> float:
    """A given start time as a float (it must be a scalar)."""
    value = _as_numpy(t0)
    if value.size != 1:
        raise ValueError(f"NeuralSDE: t0={t0!r} must be a scalar time.")
    return float(value.reshape(()))
