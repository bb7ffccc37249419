"""Backend-neutral pieces of `NeuralSDE` (NumPy only).

Both backends' `NeuralSDE` inherit their options, their ``repr`` and the stable
families from `probdyn.primitives.sde_base.NeuralSDEBase`, and read their
vocabulary, their argument checks, their time grid and their site shapes from here,
so that the two cannot drift apart: the same options are accepted and refused with
the same messages, and the same times give the same grid, hence the same sample
sites. Each backend keeps the solve (diffrax's or torchsde's steps) and the drawing
of the increments.

Conventions (Itô SDEs, ``dz = f(t, z) dt + g(t, z) dW``):

* ``noise="diagonal"``: ``g(t, z, args)`` has the shape of ``z`` and multiplies
  ``dW`` (same shape) element by element; ``g_i`` should depend on ``z_i`` only
  (diagonal, hence commutative, noise: what Milstein's scheme assumes).
* ``noise="additive"``: as diagonal, and ``g`` must not depend on ``z``.
  Milstein's correction vanishes and stochastic Runge–Kutta schemes of strong
  order 1.5 apply.
* ``noise="general"``: the state is ``(*batch, d)``, ``g`` returns
  ``(*batch, d, m)`` and ``dW`` is ``(*batch, m)``, with ``m = brownian_size``.

The time grid: the uniform points ``t0 + k * dt`` below the last time, merged
with every observation time (so the solver steps exactly onto each of them and
never interpolates). A uniform point closer than ``1e-9 * dt`` to an
observation time is dropped in its favour.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from probdyn.core.engine_base import as_int
from probdyn.primitives.ode import check_time_axis

__all__ = [
    "BROWNIAN",
    "NOISE",
    "SOLVERS",
    "SolverInfo",
    "additive_error",
    "check_family_options",
    "check_sde_args",
    "check_site_shape",
    "check_times",
    "key_in_model_error",
    "noise_shape",
    "positive_error",
    "state_shape_error",
    "time_grid",
]


class SolverInfo(NamedTuple):
    """What a solver name means, on both backends."""

    strong_order: str  # as documented (per noise type)
    noise: tuple[str, ...]  # the noise types it accepts
    levy_area: bool  # needs the space-time Lévy area of each step
    scheme: str  # the scheme, in words


# One vocabulary for both backends. JAX: diffrax's Euler, and diffrax solvers
# written in probdyn/numpyro/primitives/sde.py for diagonal Itô–Milstein (diffrax's
# ItoMilstein materialises the full diffusion Jacobian) and Rößler's SRA1 (as
# torchsde has it); torch: torchsde's Euler, MilsteinIto and SRK (SRA1 for
# additive noise). The same scheme on both, so the same increments give the
# same path.
SOLVERS: dict[str, SolverInfo] = {
    "euler": SolverInfo(
        "0.5 (1.0 for additive noise)",
        ("diagonal", "additive", "general"),
        False,
        "Euler–Maruyama",
    ),
    "milstein": SolverInfo("1.0", ("diagonal", "additive"), False, "Itô–Milstein"),
    "srk": SolverInfo("1.5", ("additive",), True, "stochastic Runge–Kutta SRA1 (Rößler 2010)"),
}
NOISE: tuple[str, ...] = ("diagonal", "additive", "general")
BROWNIAN: tuple[str, ...] = ("latent", "simulate")

# A uniform grid point this close (relative to dt) to an observation time is
# dropped: the step onto the observation time absorbs it.
_MERGE_TOL = 1e-9


def check_sde_args(
    drift: Any,
    diffusion: Any,
    *,
    solver: Any,
    dt: Any,
    noise: Any,
    brownian: Any,
    brownian_size: Any,
    max_steps: Any,
    name: Any,
) -> None:
    """Validate `NeuralSDE`'s options (the same checks on both backends).

    Raises:
        TypeError: drift or diffusion not callable.
        ValueError: an unknown or unsupported option, named with the fix.
    """
    for arg, fn in (("drift", drift), ("diffusion", diffusion)):
        if not callable(fn):
            raise TypeError(f"NeuralSDE({arg}={fn!r}): expected a callable {arg[0]}(t, z, args).")
    if solver not in SOLVERS:
        raise ValueError(f"NeuralSDE(solver={solver!r}): choose one of {sorted(SOLVERS)}.")
    if noise not in NOISE:
        raise ValueError(f"NeuralSDE(noise={noise!r}): choose one of {list(NOISE)}.")
    if brownian not in BROWNIAN:
        raise ValueError(
            f"NeuralSDE(brownian={brownian!r}): choose 'latent' (the increments are sample "
            "sites, for NUTS/HMC/SMC) or 'simulate' (drawn inside the solve from `key`)."
        )
    if isinstance(dt, bool) or not isinstance(dt, (int, float, np.floating, np.integer)):
        raise ValueError(f"NeuralSDE(dt={dt!r}): give the step size as a positive float.")
    if not (math.isfinite(float(dt)) and float(dt) > 0):
        raise ValueError(f"NeuralSDE(dt={dt!r}): the step size must be positive and finite.")
    if (as_int(max_steps) or 0) <= 0:
        raise ValueError(f"NeuralSDE(max_steps={max_steps!r}): must be a positive integer.")
    if not isinstance(name, str) or not name:
        raise ValueError(f"NeuralSDE(name={name!r}): name must be a non-empty string.")
    _check_noise_size(noise, brownian_size)
    if noise not in SOLVERS[solver].noise:
        raise ValueError(_unsupported(solver, noise))


def _check_noise_size(noise: str, brownian_size: Any) -> None:
    if noise == "general":
        if (as_int(brownian_size) or 0) <= 0:
            raise ValueError(
                f"NeuralSDE(noise='general', brownian_size={brownian_size!r}): give the number "
                "m of Brownian motions (a positive int); the diffusion returns (..., d, m)."
            )
    elif brownian_size is not None:
        raise ValueError(
            f"NeuralSDE(noise={noise!r}, brownian_size={brownian_size!r}): with {noise} noise "
            "there is one Brownian motion per state entry; leave brownian_size=None "
            "(or use noise='general')."
        )


def _unsupported(solver: str, noise: str) -> str:
    if solver == "milstein":
        return (
            "NeuralSDE(solver='milstein', noise='general'): Milstein's scheme needs diagonal "
            "(commutative) noise here; use solver='euler' for general noise, or write the "
            "diffusion as diagonal (noise='diagonal')."
        )
    return (
        f"NeuralSDE(solver='srk', noise={noise!r}): the stochastic Runge–Kutta scheme (SRA1) "
        "is for additive noise only, a diffusion that does not depend on the state: declare "
        "noise='additive' (e.g. NeuralSDE.langevin or NeuralSDE.geometric), or use "
        "solver='milstein' (strong order 1.0, diagonal noise) or 'euler'."
    )


def check_family_options(family: str, options: dict[str, Any]) -> None:
    """A stable family fixes the noise type; refuse options that would change it."""
    fixed = sorted(set(options) & {"noise", "brownian_size"})
    if fixed:
        raise ValueError(
            f"NeuralSDE.{family}({fixed[0]}={options[fixed[0]]!r}): the {family} family fixes "
            "the noise type; remove that argument."
        )


def check_times(t: np.ndarray, where: str) -> None:
    """``times`` must be 1-D, non-empty, finite and strictly increasing.

    Args:
        t: the times, as a NumPy array.
        where: how the message names them.

    Raises:
        ValueError: see `probdyn.primitives.ode.check_time_axis`.
    """
    check_time_axis(
        t,
        where,
        "NeuralSDE",
        "The whole state shares one time axis: give a batch of paths a leading axis in z0 instead.",
    )


def time_grid(
    t0: float, times: np.ndarray, dt: float, max_steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """The solver's grid from ``t0`` to ``times[-1]`` and where ``times`` sit in it.

    Args:
        t0: the start (the time of ``z0``), at most ``times[0]``.
        times: strictly increasing output times (float64).
        dt: the largest step.
        max_steps: the most steps allowed.

    Returns:
        ``(grid, index)``: ``grid`` float64, strictly increasing, ``grid[0] = t0``,
        ``grid[index] == times`` exactly; ``len(grid) - 1`` steps.

    Raises:
        ValueError: ``t0`` after the first time, or more than ``max_steps`` steps.
    """
    times = np.asarray(times, dtype=np.float64)
    if t0 > times[0]:
        raise ValueError(
            f"NeuralSDE: t0={t0} is after the first time {times[0]}; z0 is the state at t0, "
            "so t0 <= times[0]."
        )
    end = float(times[-1])
    if (end - t0) / dt > max_steps:  # refuse before building a huge grid
        raise ValueError(_too_many(math.ceil((end - t0) / dt), dt, max_steps, t0, end))
    n = int(np.floor((end - t0) / dt))
    uniform = t0 + dt * np.arange(1, n + 1)
    tol = _MERGE_TOL * dt
    pos = np.clip(np.searchsorted(times, uniform), 1, len(times) - 1) if len(times) > 1 else None
    if pos is None:
        near = np.abs(uniform - times[0])
    else:
        near = np.minimum(np.abs(uniform - times[pos - 1]), np.abs(uniform - times[pos]))
    uniform = uniform[(near > tol) & (uniform < end)]
    grid = np.unique(np.concatenate([[t0], uniform, times]))
    if len(grid) - 1 > max_steps:
        raise ValueError(_too_many(len(grid) - 1, dt, max_steps, t0, end))
    return grid, np.searchsorted(grid, times)


def _too_many(steps: int, dt: float, max_steps: int, t0: float, end: float) -> str:
    return (
        f"NeuralSDE: dt={dt} gives {steps} steps from t0={t0} to {end}, more than "
        f"max_steps={max_steps}. Raise dt or max_steps."
    )


def noise_shape(noise: str, state_shape: tuple[int, ...], brownian_size: int | None) -> tuple:
    """The shape of one step's Brownian increment."""
    if noise == "general":
        if len(state_shape) == 0:
            raise ValueError(
                "NeuralSDE(noise='general'): z0 must have a state axis (shape (..., d)); "
                "got a scalar."
            )
        return (*state_shape[:-1], int(brownian_size or 0))
    return tuple(state_shape)


def state_shape_error(
    what: str, got: tuple[int, ...], state: tuple[int, ...], noise: str, m: int | None
) -> str | None:
    """The error message if the drift's or diffusion's output has the wrong shape."""
    if what == "drift":
        want, hint = state, "the drift returns dz/dt with the shape of z"
    elif noise == "general":
        want = (*state, int(m or 0))
        hint = f"with noise='general' the diffusion returns (..., d, m) = {want}"
    else:
        want, hint = state, f"with noise={noise!r} the diffusion returns the shape of z"
    if tuple(got) == tuple(want):
        return None
    return (
        f"NeuralSDE: the {what} returns shape {tuple(got)} for a state of shape {tuple(state)} "
        f"(z0): {hint}. Check the network's output size or z0's shape."
    )


def additive_error(what: str) -> str:
    """The message when a diffusion declared additive depends on the state."""
    return (
        f"NeuralSDE(noise='additive'): the {what} depends on the state z, so the noise is not "
        "additive. Use noise='diagonal' (with solver='euler' or 'milstein'), or make the "
        "diffusion a function of t and args only."
    )


def check_site_shape(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    """A latent increment site given a value (conditioning, a posterior draw) of the
    wrong shape: the grid it was drawn for differs from this call's grid."""
    if tuple(got) != tuple(want):
        raise ValueError(
            f"NeuralSDE: the site {name!r} has shape {tuple(got)}, but this call's grid needs "
            f"{tuple(want)} (num_steps, *noise_shape). The value was drawn for other times, "
            "dt, t0 or state shape: with brownian='latent' the increments belong to one time "
            "grid; to predict at new times, continue from the last state with a second "
            "NeuralSDE of another name (or use brownian='simulate')."
        )


def positive_error(value: Any) -> str:
    """The message when a geometric SDE starts at a non-positive state."""
    return (
        f"NeuralSDE.geometric: z0 must be positive (the state of a geometric SDE stays "
        f"positive), got min(z0) = {value}. Shift or rescale the state."
    )


def key_in_model_error(name: str) -> str:
    """The message when a key is given for latent increments inside a model."""
    return (
        f"NeuralSDE(name={name!r}, brownian='latent'): inside a model the "
        "increments are the sample site; do not pass key (or use brownian='simulate')."
    )
