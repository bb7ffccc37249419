"""Backend-neutral data streaming for Feynman–Kac SMC (``SMC(stream="minibatch")``).

Both backends' open-horizon SMC runners (probdyn/numpyro/engines/fksmc.py and
probdyn/pyro/engines/fksmc.py) cut the model's data into batches by the same rule,
written once here:

* ``N`` is the size of the plate over the leading axis of the observed site(s);
  every observed site must have one row per data point, unscaled and not
  subsampled;
* every array argument of the model (positional or keyword) whose leading
  dimension is ``N`` is a per-data-point array, and each step calls the model
  with those arrays cut to the rows of the batch;
* each epoch visits the data in a fresh random order in ``N // batch_size``
  batches (the remainder, different each epoch, is skipped);
* a factor outside the data plate (e.g. the rejection of a failed ODE solve) is
  weighted by ``batch_size / N`` per step, so it counts once per epoch, as each
  data point does.

The backends describe their traces to these functions as `ObservedSite` records,
so nothing here imports jax or torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "RW_VARIANCE",
    "ObservedSite",
    "Stream",
    "batch_orders",
    "check_batch_size",
    "check_cut",
    "check_global_latents",
    "cut_failed",
    "data_size",
    "find_stream",
    "no_latent_error",
    "probe_rows",
    "site_weights",
]

RW_VARIANCE = 1e-2
"""Variance of the default random-walk jitter per step, ``SMC().jitter ** 2``
(Zhao et al. use 1e-2)."""


@dataclasses.dataclass(frozen=True)
class ObservedSite:
    """What the streaming rule needs to know about one observed or factor site.

    Attributes:
        rows: leading dimension of the observed value (0 for a scalar).
        batch_ndim: number of batch (non-event) dimensions of the value.
        frames: ``(plate name, dim, size)`` of every plate the site sits in.
        scaled: whether the site is scaled (``handlers.scale``, plate subsampling).
        is_factor: whether the site is a ``factor`` (not a data point).
    """

    rows: int
    batch_ndim: int
    frames: tuple[tuple[str, int, int], ...]
    scaled: bool
    is_factor: bool


@dataclasses.dataclass(frozen=True)
class Stream:
    """Where the per-data-point arrays sit among the model's arguments."""

    size: int  # N, the number of data points
    plates: frozenset[str]  # names of the plates over the data axis
    arg_pos: tuple[int, ...]  # positional arguments cut into batches
    kwarg_names: tuple[str, ...]  # keyword arguments cut into batches

    def data(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], asarray: Callable[[Any], Any]
    ) -> tuple[Any, ...]:
        """The per-data-point arrays, positional first, converted by ``asarray``."""
        return tuple(asarray(args[i]) for i in self.arg_pos) + tuple(
            asarray(kwargs[k]) for k in self.kwarg_names
        )

    def batch(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], data: Sequence[Any], idx: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The model's arguments with every per-data-point array cut to rows ``idx``."""
        cut = [d[idx] for d in data]
        new_args = list(args)
        for i, value in zip(self.arg_pos, cut):
            new_args[i] = value
        new_kwargs = dict(kwargs)
        for k, value in zip(self.kwarg_names, cut[len(self.arg_pos) :]):
            new_kwargs[k] = value
        return tuple(new_args), new_kwargs


def data_size(observed: Mapping[str, ObservedSite]) -> tuple[int, frozenset[str]]:
    """``N`` and the plate(s) over the leading axis of the observed (non-factor) sites.

    Raises:
        ValueError: if an observed site is outside a plate over its leading axis,
            is scaled or subsampled, or the sites disagree on ``N``; or if there
            is no observed site.
    """
    sizes: dict[str, int] = {}
    plates = set()
    for name, site in observed.items():
        if site.is_factor:
            continue
        frames = [f for f in site.frames if site.batch_ndim and f[1] == -site.batch_ndim]
        if not frames:
            raise ValueError(
                f"SMC(stream='minibatch'): observed site {name!r} (with {site.rows} rows) is not "
                "inside a plate over its leading axis, so probdyn cannot tell its data points "
                "apart. Observe it inside a plate over the data (numpyro.plate / pyro.plate "
                "('data', len(y))) with one data point per row."
            )
        plate, _, size = frames[0]
        if size != site.rows or site.scaled:
            raise ValueError(
                f"SMC(stream='minibatch'): observed site {name!r} is subsampled or scaled "
                f"(plate {plate!r} of size {size}, value with {site.rows} rows). Remove "
                "subsample_size / scaling: probdyn cuts the data into batches itself (and "
                "scales the gradient for the params by N / batch_size)."
            )
        sizes[name] = site.rows
        plates.add(plate)
    if not sizes:
        raise ValueError("SMC(stream='minibatch'): the model has no observed sites to stream.")
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"SMC(stream='minibatch'): the observed sites have different numbers of data "
            f"points {sizes}; every observed site must have one row per data point."
        )
    return next(iter(sizes.values())), frozenset(plates)


def check_batch_size(batch_size: int | None, n: int | None = None) -> int:
    """``batch_size``, checked to be given and (with ``n``) at most ``n``."""
    if batch_size is None:
        raise ValueError(
            "SMC(batch_size=None): the Feynman-Kac (minibatch) runner needs batch_size; give "
            "SMC(stream='minibatch', batch_size=...)."
        )
    if n is not None and batch_size > n:
        raise ValueError(
            f"SMC(batch_size={batch_size}): larger than the {n} data points of the observed "
            f"site(s); give batch_size <= {n}."
        )
    return batch_size


def find_stream(
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    n: int,
    plates: frozenset[str],
    leading: Callable[[Any], int | None],
) -> Stream:
    """The arguments with ``n`` rows (``leading(value)`` is an array's first dimension,
    None for non-arrays).

    Raises:
        ValueError: if no argument has ``n`` rows.
    """
    stream = Stream(
        size=n,
        plates=plates,
        arg_pos=tuple(i for i, a in enumerate(args) if leading(a) == n),
        kwarg_names=tuple(k for k, a in kwargs.items() if leading(a) == n),
    )
    if not stream.arg_pos and not stream.kwarg_names:
        raise ValueError(
            f"SMC(stream='minibatch'): no argument of the model is an array with {n} rows (the "
            "size of the observed sites' plate). Pass the observations (and inputs) to the "
            "model as arguments, one row per data point, so that probdyn can cut them into "
            "batches."
        )
    return stream


def probe_rows(n: int, batch_size: int) -> int:
    """How many rows to cut the data to when checking that cutting works."""
    return min(batch_size, n - 1) if n > 1 else 1


def check_cut(stream: Stream, small: int, observed: Mapping[str, ObservedSite]) -> None:
    """Check a trace of the model run on arguments cut to ``small`` rows.

    Raises:
        ValueError: if an observed site kept its rows or a data plate kept size ``N``.
    """
    n = stream.size
    for name, site in observed.items():
        if site.is_factor:
            continue
        if site.rows != small:
            raise ValueError(
                f"SMC(stream='minibatch'): observed site {name!r} keeps {site.rows} rows when "
                f"the model's {n}-row array arguments are cut to {small}. Pass its observations "
                "as an argument (obs=y, with y an argument of the model)."
            )
        fixed = [p for p, _, size in site.frames if p in stream.plates and size != small]
        if fixed:
            raise ValueError(
                f"SMC(stream='minibatch'): plate {fixed[0]!r} keeps size {n} when the model's "
                f"{n}-row array arguments are cut to {small} rows. Size the data plate from "
                "the arguments (plate('data', len(x))) rather than a fixed number."
            )


def cut_failed(n: int, small: int, err: Exception) -> ValueError:
    """The error for a model that fails on arguments cut to ``small`` rows."""
    return ValueError(
        f"SMC(stream='minibatch'): the model failed when its {n}-row array arguments were "
        f"cut to {small} rows ({type(err).__name__}: {err}). Size the data plate from the "
        "arguments (plate('data', len(x))) rather than a fixed number."
    )


def check_global_latents(
    latent_frames: Mapping[str, Sequence[str]], plates: frozenset[str]
) -> None:
    """Refuse latent sites inside the data plate (``latent_frames``: site -> plate names).

    Raises:
        ValueError: if a latent site has one value per data point.
    """
    local = [n for n, frames in latent_frames.items() if any(f in plates for f in frames)]
    if local:
        raise ValueError(
            f"SMC(stream='minibatch'): latent site(s) {local} sit inside the data plate (one "
            "value per data point); the particles track global unknowns only. Move them out of "
            "the plate, or use stream='tempered'."
        )


def no_latent_error() -> ValueError:
    """The error for a model without latent sites."""
    return ValueError(
        "SMC(stream='minibatch'): the model has no latent sample sites, so there is no "
        "posterior for the particles to track. Give the stochastic weights a prior "
        "(BayesianMLP(..., bayesian_layers=[...])), or fit param-only models by "
        "optimisation (probdyn.VI or probdyn.Ensemble)."
    )


def site_weights(
    observed: Mapping[str, ObservedSite], stream: Stream, batch_size: int
) -> dict[str, float]:
    """Observed and factor sites that make the batch potential, with their weights.

    A factor outside the data plate is counted at every step; weighting it by
    ``batch_size / N`` counts it once per epoch, as each data point is.
    """
    out = {}
    for name, site in observed.items():
        in_plate = any(f[0] in stream.plates for f in site.frames)
        out[name] = 1.0 if (in_plate or not site.is_factor) else batch_size / stream.size
    return out


def batch_orders(seed: Sequence[int] | int, n: int, epochs: int, batch_size: int) -> np.ndarray:
    """Each epoch's batches, ``(epochs, n // batch_size, batch_size)`` data rows: a
    fresh random order of the data per epoch, from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    steps = n // batch_size
    perms = np.stack([rng.permutation(n)[: steps * batch_size] for _ in range(epochs)])
    return perms.reshape(epochs, steps, batch_size)
