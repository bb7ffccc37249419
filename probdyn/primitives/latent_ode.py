"""The backend-neutral half of `LatentODE` (no jax, no torch).

Both backends' `LatentODE` take the same options, refuse the same bad input with the
same messages, size their networks and seed their initial weights the same way, and
solve the same autonomous latent field. That is written here once: `LatentODEBase`
holds the options (each twin subclasses it and builds its own `NeuralODE`s), and the
shape checks of the ``(times, values, mask)`` batch work on plain shape tuples, so each
twin only converts arrays and runs its PPL's sample statements.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from probdyn.core.engine_base import as_int

__all__ = ["LatentODEBase", "autonomous_field", "nonfinite_value_error"]

S = TypeVar("S")  # a backend's NeuralODE

# Initial weights of part k are seeded by seed * _SEED_STRIDE + k (k: 1 field, 2 decoder,
# 3 encoder GRU, 4 encoder head), so that one seed gives the same networks on both backends.
_SEED_STRIDE = 7919


def autonomous_field(t: Any, z: Any, field: Callable[[Any], Any]) -> Any:
    """The latent ODE's field ``dz/dt = f(z)`` (autonomous, as in Chen et al.).

    Args:
        t: the time (unused).
        z: the latent state.
        field: the field network, passed to the solver as ``args``.

    Returns:
        ``field(z)``.
    """
    return field(z)


def nonfinite_value_error(index: Sequence[int]) -> ValueError:
    """The error for an observed (masked-in) value that is NaN or infinite.

    Args:
        index: ``(series, time, dim)`` of the first such value.

    Returns:
        The ``ValueError`` to raise.
    """
    b, t, d = (int(i) for i in index)
    return ValueError(
        f"LatentODE: values[{b}, {t}, {d}] is not finite but mask marks it observed; "
        "set mask False there (or leave mask=None to mask every NaN)."
    )


class LatentODEBase(Generic[S]):
    """The options of a `LatentODE` and the checks that need no backend.

    A subclass gives `_neural_ode` (its backend's solver) and the model, guide and
    predict methods; the constructor's arguments are documented on `LatentODE`.

    Raises:
        ValueError: for a non-positive ``obs_dim``, ``latent_dim``,
            ``encoder_hidden`` or ``obs_scale``, or bad solver options.
    """

    ode: S
    forecast_ode: S

    def __init__(
        self,
        obs_dim: int,
        latent_dim: int = 4,
        *,
        field_sizes: Sequence[int] = (20, 20),
        decoder_sizes: Sequence[int] = (20,),
        encoder_hidden: int = 25,
        obs_scale: float = 0.3,
        solver: str = "tsit5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        max_steps: int = 4096,
        adjoint: str = "recursive",
        dt0: float | None = None,
        name: str = "latent",
        seed: int = 0,
    ) -> None:
        for field, v in (
            ("obs_dim", obs_dim),
            ("latent_dim", latent_dim),
            ("encoder_hidden", encoder_hidden),
        ):
            if (as_int(v) or 0) <= 0:
                raise ValueError(f"LatentODE({field}={v!r}): must be a positive integer.")
        if not isinstance(obs_scale, (int, float)) or not obs_scale > 0:
            raise ValueError(f"LatentODE(obs_scale={obs_scale!r}): must be a positive number.")
        obs_dim, latent_dim, encoder_hidden = int(obs_dim), int(latent_dim), int(encoder_hidden)
        self.obs_dim, self.latent_dim = obs_dim, latent_dim
        self.field_sizes = (latent_dim, *field_sizes, latent_dim)
        self.decoder_sizes = (latent_dim, *decoder_sizes, obs_dim)
        self.encoder_hidden = encoder_hidden
        self.obs_scale = float(obs_scale)
        self.name, self.seed = name, seed
        options: dict[str, Any] = dict(
            solver=solver, rtol=rtol, atol=atol, max_steps=max_steps, adjoint=adjoint, dt0=dt0
        )
        self.ode = self._neural_ode(f"{name}.ode", options)
        # A second solver object: its failure factor needs its own site name.
        self.forecast_ode = self._neural_ode(f"{name}.forecast_ode", options)

    def _neural_ode(self, name: str, options: dict[str, Any]) -> S:
        """The backend's `NeuralODE` of `autonomous_field`, named ``name``.

        Args:
            name: the solver's site-name prefix.
            options: ``solver``, ``rtol``, ``atol``, ``max_steps``, ``adjoint``, ``dt0``.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"LatentODE(obs_dim={self.obs_dim}, latent_dim={self.latent_dim}, "
            f"field={list(self.field_sizes)}, decoder={list(self.decoder_sizes)}, "
            f"encoder_hidden={self.encoder_hidden}, obs_scale={self.obs_scale}, {self.ode!r})"
        )

    def _weight_seed(self, part: int) -> int:
        """The seed of a network's initial weights (1 field, 2 decoder, 3 GRU, 4 head)."""
        return self.seed * _SEED_STRIDE + part

    # -- shape checks of the (times, values, mask) batch ---------------------------------
    def _observation_shape(self, times_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(B, T, obs_dim)`` for ``times`` of shape ``(B, T)``.

        Raises:
            ValueError: if ``times`` is not 2-D.
        """
        if len(times_shape) != 2:
            raise ValueError(
                f"LatentODE: times must be (series, time), got shape {times_shape}; "
                "pad ragged series with pad_series."
            )
        return (*times_shape, self.obs_dim)

    @staticmethod
    def _check_values_shape(values_shape: tuple[int, ...], shape: tuple[int, ...]) -> None:
        """Refuse ``values`` not shaped ``shape`` (``(B, T, obs_dim)``)."""
        if values_shape != shape:
            raise ValueError(
                f"LatentODE: values has shape {values_shape}, expected {shape} "
                "(series, time, obs_dim) to match times."
            )

    @staticmethod
    def _mask_needs_axis(mask_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
        """Whether a mask needs a trailing axis before it broadcasts to ``shape``.

        A ``(B, T)`` mask (one flag per time point) gets one; a ``(B, T, 1)`` or
        ``(B, T, obs_dim)`` mask is broadcast as it is.

        Raises:
            ValueError: for any other shape.
        """
        times_shape = shape[:2]
        if mask_shape == times_shape:
            return True
        fits = len(mask_shape) == 3 and mask_shape[:2] == times_shape
        if not fits or mask_shape[2] not in (1, shape[2]):
            raise ValueError(
                f"LatentODE: mask has shape {mask_shape}; give {times_shape} or {shape}."
            )
        return False
