"""The backend-neutral half of `LatentSDE` (NumPy only).

`LatentSDEBase` is what both backends' `LatentSDE` inherit: the constructor's checks
and attributes, the ``repr``, the seeds of the initial weights, and the data checks
and step-grid layout of a batch (`latent_grid`), written once so that the NumPyro and
Pyro twins accept and refuse the same arguments with the same messages and build the
same grid, hence the same sample sites. A backend supplies small hooks that turn its
arrays into NumPy ones and back (`LatentSDEBase._as_numpy`, `_time_value`,
`_values_array`, `_finite_values`, `_layout`); the networks, the Euler–Maruyama steps
and the model and guide are the backend's.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from probdyn.core.engine_base import as_int
from probdyn.primitives.latent_grid import (
    BatchLayout,
    ForecastPlan,
    check_batch_times,
    check_observed_finite,
    check_values_shape,
    forecast_plan,
    scalar_time,
    shape_mask,
    step_layout,
)

__all__ = ["G_FLOOR", "HALF_LOG_2PI", "LatentSDEBase", "check_latent_sde_args"]

G_FLOOR = 1e-3  # the diffusion is in (G_FLOOR, 1): u = (f_q - f_p) / g stays finite
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def check_latent_sde_args(
    sizes: dict[str, Any],
    widths: dict[str, Any],
    scales: dict[str, Any],
    z0_prior: Any,
    name: Any,
    seed: Any,
) -> None:
    """Check `LatentSDE`'s constructor arguments.

    Args:
        sizes: argument name -> value, each a positive integer.
        widths: argument name -> value, each a sequence of positive integers.
        scales: argument name -> value, each a positive finite number.
        z0_prior: ``"standard"`` or ``"learned"``.
        name: the site-name prefix, a non-empty string.
        seed: an integer.

    Raises:
        ValueError: naming the first bad argument and the fix.
    """
    for field, v in sizes.items():
        if (as_int(v) or 0) <= 0:
            raise ValueError(
                f"LatentSDE({field}={v!r}): must be a positive integer; give e.g. {field}=4."
            )
    for field, hidden in widths.items():
        if isinstance(hidden, (str, int, np.integer)) or not all(
            (as_int(s) or 0) > 0 for s in hidden
        ):
            raise ValueError(
                f"LatentSDE({field}={hidden!r}): must be a sequence of positive integers "
                f"(hidden widths), e.g. {field}=(32, 32) or ()."
            )
    for field, x in scales.items():
        if (
            isinstance(x, bool)
            or not isinstance(x, (int, float))
            or not (math.isfinite(x) and x > 0)
        ):
            raise ValueError(
                f"LatentSDE({field}={x!r}): must be a positive finite number, e.g. {field}=0.1."
            )
    if z0_prior not in ("standard", "learned"):
        raise ValueError(
            f"LatentSDE(z0_prior={z0_prior!r}): give 'standard' (N(0, I)) or 'learned' "
            "(a diagonal Gaussian with learned location and scale)."
        )
    if not isinstance(name, str) or not name:
        raise ValueError(f"LatentSDE(name={name!r}): give a non-empty site-name prefix.")
    if as_int(seed) is None:
        raise ValueError(f"LatentSDE(seed={seed!r}): must be an integer, e.g. seed=0.")


class LatentSDEBase(ABC):
    """The options of a latent SDE and the NumPy layout of a batch (no backend).

    The backends' ``LatentSDE`` document the arguments; this class checks and stores
    them (``prior_sizes``, ``posterior_sizes`` and ``decoder_sizes`` are the full layer
    widths of the two drifts and the decoder) and lays a batch out on its step grid
    (`_plan`, `_forecast_plan`), reading the backend's arrays through its hooks.

    Raises:
        ValueError: a non-positive size, ``obs_scale`` or ``dt``, or an empty name
            (the message names the argument and the fix).
    """

    # The error for a traced argument whose values decide shapes (NumPyro's subclass).
    _NOT_CONCRETE: type[ValueError] = ValueError

    def __init__(
        self,
        obs_dim: int,
        latent_dim: int = 4,
        *,
        dt: float,
        drift_sizes: Sequence[int] = (32, 32),
        diffusion_hidden: int = 16,
        decoder_sizes: Sequence[int] = (),
        encoder_hidden: int = 32,
        context_dim: int = 16,
        obs_scale: float = 0.1,
        z0_prior: str = "standard",
        max_steps: int = 4096,
        name: str = "latent_sde",
        seed: int = 0,
    ) -> None:
        check_latent_sde_args(
            {
                "obs_dim": obs_dim,
                "latent_dim": latent_dim,
                "diffusion_hidden": diffusion_hidden,
                "encoder_hidden": encoder_hidden,
                "context_dim": context_dim,
                "max_steps": max_steps,
            },
            {"drift_sizes": drift_sizes, "decoder_sizes": decoder_sizes},
            {"obs_scale": obs_scale, "dt": dt},
            z0_prior,
            name,
            seed,
        )
        # the checked integers (NumPy ones included) are stored as Python ints
        obs_dim, latent_dim, context_dim = int(obs_dim), int(latent_dim), int(context_dim)
        drift_sizes, decoder_sizes = tuple(map(int, drift_sizes)), tuple(map(int, decoder_sizes))
        self.obs_dim, self.latent_dim, self.dt = obs_dim, latent_dim, float(dt)
        self.prior_sizes = (latent_dim, *drift_sizes, latent_dim)
        self.posterior_sizes = (latent_dim + context_dim, *drift_sizes, latent_dim)
        self.decoder_sizes = (latent_dim, *decoder_sizes, obs_dim)
        self.diffusion_hidden, self.encoder_hidden = int(diffusion_hidden), int(encoder_hidden)
        self.context_dim, self.obs_scale = context_dim, float(obs_scale)
        self.z0_prior, self.max_steps, self.name = z0_prior, int(max_steps), name
        self.seed = int(seed)

    def __repr__(self) -> str:
        return (
            f"LatentSDE(obs_dim={self.obs_dim}, latent_dim={self.latent_dim}, dt={self.dt}, "
            f"drift={list(self.prior_sizes)}, diffusion_hidden={self.diffusion_hidden}, "
            f"decoder={list(self.decoder_sizes)}, encoder_hidden={self.encoder_hidden}, "
            f"context_dim={self.context_dim}, obs_scale={self.obs_scale}, "
            f"z0_prior={self.z0_prior!r}, name={self.name!r})"
        )

    def _part_seed(self, part: int) -> int:
        """The seed of the initial weights of network ``part`` (1 prior drift, 2
        diffusion, 3 decoder, 4 GRU, 5 and 6 its heads, 7 posterior drift)."""
        return self.seed * 7919 + part

    # -- the backend's hooks ------------------------------------------------------------------
    @abstractmethod
    def _as_numpy(self, x: Any) -> np.ndarray | None:
        """``x`` as a NumPy array, or None where it is traced (not concrete)."""

    @abstractmethod
    def _time_value(self, t0: Any) -> Any:
        """The concrete value of a given ``t0`` for `scalar_time` (None: traced)."""

    @abstractmethod
    def _values_array(self, values: Any) -> Any:
        """``values`` as the backend's array (with a ``shape``)."""

    @abstractmethod
    def _finite_values(self, values: Any, array: Any) -> np.ndarray | None:
        """Which entries of ``values`` (``array``: `_values_array` of them) are finite;
        None where they are traced."""

    @abstractmethod
    def _layout(self, times: Any, values: Any, mask: Any, t0: Any) -> BatchLayout:
        """`_plan` with ``times``, ``values`` and ``mask`` as the backend's arrays."""

    def _concrete(self, x: Any, message: str) -> np.ndarray:
        """``x`` as a NumPy array; `_NOT_CONCRETE` with ``message`` if it is traced."""
        value = self._as_numpy(x)
        if value is None:
            raise self._NOT_CONCRETE(message)
        return value

    # -- a batch on its step grid --------------------------------------------------------------
    def _plan(self, times: Any, values: Any, mask: Any, t0: Any) -> BatchLayout:
        """Check a batch and lay it out on its step grid.

        Returns:
            A `BatchLayout` with NumPy ``times`` ``(B, T)`` (float64) and ``mask``
            ``(B, T, D)``, and ``values`` as the backend's array (or None).
        """
        t = np.array(
            self._concrete(
                times,
                "LatentSDE: times must be concrete (a NumPy array, not a traced value): the "
                "step grid, hence the shape of the path_noise site, is built from them.",
            ),
            dtype=np.float64,
        )  # a writable copy, as torch wants
        check_batch_times(t)
        shape = (*t.shape, self.obs_dim)
        array = None if values is None else self._values_array(values)
        if array is not None:
            check_values_shape(tuple(array.shape), shape)
        finite = None if array is None else self._finite_values(values, array)
        if mask is None:
            if array is None:
                m = np.ones(shape, bool)
            elif finite is None:
                raise ValueError(
                    "LatentSDE: values are traced, so the default mask (their finite "
                    "entries) is unknown; pass mask as a concrete boolean array."
                )
            else:
                m = finite
        else:
            given = self._concrete(
                mask,
                "LatentSDE: mask must be concrete (a NumPy array): the step grid goes "
                "through every observed time.",
            )
            m = shape_mask(np.asarray(given).astype(bool), t.shape, shape)
        check_observed_finite(m, finite)
        start = None if t0 is None else scalar_time(self._time_value(t0), t0)
        return step_layout(t, m, start, self.dt, self.max_steps)._replace(values=array)

    def _forecast_plan(self, target_times: Any, lay: BatchLayout) -> ForecastPlan:
        """Check ``target_times`` and lay them on ``lay``'s grid (extended past its end)."""
        given = self._concrete(
            target_times, "LatentSDE: target_times must be concrete (a NumPy array)."
        )
        target = np.asarray(given, dtype=np.float64)
        num_series = int(lay.times.shape[0])
        return forecast_plan(target, num_series, lay.t0, lay.grid, self.dt, self.max_steps)

    def _guide_layout(self, times: Any, values: Any, mask: Any, t0: Any) -> BatchLayout:
        """`_layout` of the guide's batch, which must have ``values`` to encode."""
        lay = self._layout(times, values, mask, t0)
        if lay.values is None:
            raise ValueError("LatentSDE.guide: values are required to encode the series.")
        return lay

    def _prediction_sites(self) -> dict[str, str]:
        """`predict`'s output keys -> the model's sites they come from."""
        return {
            "mean": f"{self.name}.forecast",
            "latent": f"{self.name}.forecast_latent",
            "z0": f"{self.name}.z0",
        }
