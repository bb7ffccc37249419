"""The solver glue of the Pyro `NeuralSDE`: torchsde's solvers stepped on a fixed grid.

torchsde's ``sdeint`` steps by ``dt`` from the first time and reads the state at an
output time off a straight line between steps. probdyn instead steps exactly onto
every output time (the grid of ``probdyn.primitives.sde.time_grid``), so `solve`
drives torchsde's solver objects (``Euler``, ``MilsteinIto``, ``SRK``) one grid step
at a time, each with that step's Brownian increment from a small grid Brownian
motion (`_GridBrownian`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchsde import BaseBrownian
from torchsde._core.base_sde import ForwardSDE
from torchsde._core.methods import select as _select_method

from probdyn.primitives.sde_base import NeuralSDEBase

__all__ = ["solve"]

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

    def __init__(
        self,
        drift: Callable[..., Tensor],
        diffusion: Callable[..., Tensor],
        args: Any,
        shape: tuple[int, ...],
        noise_type: str,
        general: bool,
    ) -> None:
        self._drift, self._diffusion = drift, diffusion
        self._args, self._shape = args, shape
        self.noise_type = noise_type
        self._general = general

    def f(self, t: Tensor, y: Tensor) -> Tensor:
        """The drift on the flat state."""
        return self._drift(t, y.reshape(self._shape), self._args).reshape(y.shape)

    def g(self, t: Tensor, y: Tensor) -> Tensor:
        """The diffusion on the flat state: ``(rows, N)`` or ``(rows, d, m)``."""
        g = self._diffusion(t, y.reshape(self._shape), self._args)
        return g.reshape(*y.shape, -1) if self._general else g.reshape(y.shape)

    def g_prod(self, t: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """The diffusion times the increment ``v``."""
        g = self.g(t, y)
        return (g @ v.unsqueeze(-1)).squeeze(-1) if self._general else g * v


def _rows(noise: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``(batch, d)`` layout torchsde sees for a state of ``shape``."""
    if noise == "general":
        return math.prod(shape[:-1]), shape[-1]
    return 1, math.prod(shape)


def solve(
    sde: NeuralSDEBase, y0: Tensor, grid: Tensor, dw: Tensor, hh: Tensor | None, args: Any
) -> Tensor:
    """The state at every grid time, ``(len(grid), *y0.shape)``.

    Args:
        sde: the `NeuralSDE` (its drift, diffusion, solver, noise and dt are read).
        y0: the initial state (in log space for the geometric family).
        grid: the grid times (float64 values in ``y0``'s dtype).
        dw: each step's Brownian increment, ``(steps, *noise_shape)``.
        hh: each step's space-time Lévy area (SRK), or None.
        args: passed to drift and diffusion.
    """
    shape = tuple(y0.shape)
    rows, cols = _rows(sde.noise, shape)
    additive_srk = sde.noise == "additive" and sde.solver == "srk"
    noise_type = "general" if sde.noise == "general" else "diagonal"
    flat_sde = _FlatSDE(
        sde.drift,
        sde.diffusion,
        args,
        shape,
        "additive" if additive_srk else noise_type,
        sde.noise == "general",
    )
    flat = (len(grid) - 1, rows, -1)
    bm = _GridBrownian(grid.tolist(), dw.reshape(flat), None if hh is None else hh.reshape(flat))
    solver = _select_method(method=_METHODS[sde.solver], sde_type="ito")(
        sde=ForwardSDE(flat_sde),
        bm=bm,
        dt=sde.dt,
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
