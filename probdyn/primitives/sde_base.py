"""The backend-neutral half of `NeuralSDE`: its options and stable families (NumPy only).

`NeuralSDEBase` checks and stores `NeuralSDE`'s options, builds the three stable
families (Langevin, linear-noise, geometric) from two array operations each backend
supplies, and holds what the two solves share: the grid from the output times, the
site names, the shape of the increments, whether the increments are sample sites,
and the check of the drift's and diffusion's output shapes. The vocabulary and the
checks themselves are in `probdyn.primitives.sde`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np

from probdyn.primitives.sde import (
    SOLVERS,
    check_family_options,
    check_sde_args,
    check_times,
    key_in_model_error,
    noise_shape,
    state_shape_error,
    time_grid,
)

__all__ = ["NeuralSDEBase"]

_S = TypeVar("_S", bound="NeuralSDEBase")


class NeuralSDEBase:
    """The options of `NeuralSDE` and its stable families, the same on both backends.

    A backend's `NeuralSDE` subclasses this and implements the solve
    (``__call__``) and the two array operations the families need, `_broadcast`
    and `_exp`; ``_sites_outside_model`` says whether latent increments are
    sample sites outside any model too (Pyro: ``pyro.sample`` draws there) or
    are drawn from a key (NumPyro).

    Args:
        drift: ``f(t, z, args)`` with the shape of ``z``.
        diffusion: ``g(t, z, args)``, the shape of ``z`` or ``(*z.shape, m)``.
        solver: a name of `SOLVERS`.
        dt: the largest step (positive).
        noise: a name of `NOISE`.
        brownian: a name of `BROWNIAN`.
        brownian_size: the number ``m`` of Brownian motions (general noise only).
        max_steps: the most grid steps a solve may take.
        name: prefix of the sample and factor sites; unique per model.

    Raises:
        TypeError: drift or diffusion not callable.
        ValueError: see `check_sde_args`.
    """

    _sites_outside_model: ClassVar[bool] = False

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

    # -- the array operations the families need (one per backend) -------------------------
    @staticmethod
    def _broadcast(value: Any, like: Any, *, cast: bool) -> Any:
        """``value`` broadcast to the shape of ``like`` (and cast to its dtype if ``cast``).

        Args:
            value: a number or an array broadcastable to ``like``.
            like: the state.
            cast: give the result ``like``'s dtype.
        """
        raise NotImplementedError

    @staticmethod
    def _exp(y: Any) -> Any:
        """``e**y``, element by element.

        Args:
            y: an array.
        """
        raise NotImplementedError

    # -- the stable families (Oh, Lim & Kim, ICLR 2024) -----------------------------------
    @classmethod
    def langevin(
        cls: type[_S],
        drift: Callable[[Any, Any], Any],
        sigma: Callable[[Any, Any], Any],
        **options: Any,
    ) -> _S:
        """Langevin-type SDE: ``dz = drift(z, args) dt + sigma(t, args) dW``.

        The drift has no explicit time input and the noise is additive (``sigma``
        is broadcast to the state's shape), so ``solver="srk"`` applies.

        Args:
            drift: ``drift(z, args)`` with the shape of ``z``.
            sigma: ``sigma(t, args)``, broadcastable to the shape of ``z``.
            **options: `NeuralSDE`'s keyword options except ``noise`` and
                ``brownian_size`` (the family fixes them).

        Returns:
            The `NeuralSDE` of the backend it is called on (the class examples show
            each family).
        """
        check_family_options("langevin", options)
        broadcast = cls._broadcast

        def f(t: Any, z: Any, args: Any) -> Any:
            return drift(z, args)

        def g(t: Any, z: Any, args: Any) -> Any:
            return broadcast(sigma(t, args), z, cast=True)

        return cls(f, g, noise="additive", **options)

    @classmethod
    def linear_noise(
        cls: type[_S],
        drift: Callable[[Any, Any, Any], Any],
        sigma: Callable[[Any, Any], Any],
        **options: Any,
    ) -> _S:
        """Linear-noise SDE: ``dz = drift(t, z, args) dt + sigma(t, args) * z dW``.

        The noise is proportional to the state (diagonal), so ``solver="milstein"``
        applies.

        Args:
            drift: ``drift(t, z, args)`` with the shape of ``z``.
            sigma: ``sigma(t, args)``, broadcastable to the shape of ``z``.
            **options: `NeuralSDE`'s keyword options except ``noise`` and
                ``brownian_size``.

        Returns:
            The `NeuralSDE` of the backend it is called on.
        """
        check_family_options("linear_noise", options)

        def g(t: Any, z: Any, args: Any) -> Any:
            return sigma(t, args) * z

        return cls(drift, g, noise="diagonal", **options)

    @classmethod
    def geometric(
        cls: type[_S],
        drift: Callable[[Any, Any, Any], Any],
        sigma: Callable[[Any, Any], Any],
        **options: Any,
    ) -> _S:
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

        Returns:
            The `NeuralSDE` of the backend it is called on.
        """
        check_family_options("geometric", options)
        broadcast, exp = cls._broadcast, cls._exp

        def f(t: Any, y: Any, args: Any) -> Any:
            s = broadcast(sigma(t, args), y, cast=False)
            return broadcast(drift(t, exp(y), args), y, cast=False) - 0.5 * s**2

        def g(t: Any, y: Any, args: Any) -> Any:
            return broadcast(sigma(t, args), y, cast=True)

        sde = cls(f, g, noise="additive", **options)
        sde._log_space = True
        return sde

    # -- what both solves share -----------------------------------------------------------
    def _grid(
        self, times: np.ndarray, t0: Any, scalar_time: Callable[[Any], float]
    ) -> tuple[float, np.ndarray, np.ndarray]:
        """The start, the grid and where ``times`` sit in it (`time_grid`).

        Args:
            times: the output times as a float64 array (checked here).
            t0: the caller's ``t0`` (None: ``times[0]``).
            scalar_time: the backend's conversion of a given ``t0`` to a float.
        """
        check_times(times, "times")
        start = float(times[0]) if t0 is None else scalar_time(t0)
        grid, index = time_grid(start, times, self.dt, self.max_steps)
        return start, grid, index

    def _site(self, kind: str) -> str:
        """The name of this SDE's ``"noise"``, ``"levy"`` or ``"failed"`` site."""
        return f"{self.name}.{kind}"

    @property
    def _levy(self) -> bool:
        """Whether the solver needs each step's space-time Lévy area."""
        return SOLVERS[self.solver].levy_area

    def _noise_shape(self, state_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one step's Brownian increment for a state of ``state_shape``."""
        return noise_shape(self.noise, state_shape, self.brownian_size)

    def _increments_are_sites(self, in_model: bool, has_key: bool) -> bool:
        """Whether the increments are the latent sample sites (else: drawn from a key).

        Args:
            in_model: the call runs inside a model (under the PPL's handlers).
            has_key: the caller passed ``key``.

        Raises:
            ValueError: a key for latent increments inside a model.
        """
        latent = self.brownian == "latent"
        if latent and in_model and has_key:
            raise ValueError(key_in_model_error(self.name))
        return latent and not has_key and (in_model or self._sites_outside_model)

    def _check_output(self, what: str, got: tuple[int, ...], state: tuple[int, ...]) -> None:
        """Refuse a drift or diffusion output of the wrong shape (`state_shape_error`).

        Args:
            what: ``"drift"`` or ``"diffusion"``.
            got: the shape it returned.
            state: the state's shape.
        """
        message = state_shape_error(what, got, state, self.noise, self.brownian_size)
        if message is not None:
            raise ValueError(message)
