"""The backend-neutral half of `BayesianMLP` and `lift` (no jax, no torch).

Both backends name an MLP's weights ``layers.{i}.weight`` / ``layers.{i}.bias``, check
the same arguments, read a prior specification (one distribution, a mapping from path
or glob pattern to distribution, or a callable ``(path, shape) -> distribution``) the
same way and fit it to a weight's shape with the same calls (``batch_shape``,
``event_shape``, ``expand``, ``to_event``, which NumPyro and Pyro distributions share).
All of it is written here once (`bayesian_mlp` is the whole recipe of `BayesianMLP`):
each twin passes its pieces in an `MLPBackend` and keeps only its arrays (the template
network) and its sample and param statements (`lift`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import numpy as np

from probdyn.core.engine_base import as_int

__all__ = [
    "MLP_FIELDS",
    "MLPBackend",
    "PriorSpec",
    "bayesian_mlp",
    "check_mlp_args",
    "check_prior",
    "layer_index",
    "mlp_paths",
    "mlp_widths",
    "prior_resolver",
    "resolve_prior",
]

MLP_FIELDS = ("weight", "bias")  # the arrays of one layer, in site order

D = TypeVar("D")
# A prior specification over a backend's distribution type D: one distribution for every
# weight, a mapping from path (or glob pattern) to distribution, or (path, shape) -> D.
PriorSpec: TypeAlias = D | Mapping[str, D] | Callable[[str, tuple[int, ...]], D]


def mlp_paths(n_layers: int) -> list[str]:
    """The parameter paths of an ``n_layers``-layer MLP, in site order.

    Args:
        n_layers: the number of affine layers (``len(sizes) - 1``).

    Returns:
        ``["layers.0.weight", "layers.0.bias", "layers.1.weight", ...]``.
    """
    return [f"layers.{i}.{field}" for i in range(n_layers) for field in MLP_FIELDS]


def check_mlp_args(
    name: Any, sizes: Sequence[Any], activation: Any, activations: Mapping[str, Callable[..., Any]]
) -> Callable[..., Any]:
    """Validate `BayesianMLP`'s name, sizes and activation; return the activation function."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"BayesianMLP(name={name!r}): name must be a non-empty string.")
    if mlp_widths(sizes) is None:
        shown = list(sizes) if isinstance(sizes, (list, tuple, np.ndarray)) else sizes
        raise ValueError(
            f"BayesianMLP(sizes={shown!r}): give at least two positive integer widths, "
            "input first, e.g. [2, 16, 2]."
        )
    if isinstance(activation, str):
        if activation not in activations:
            raise ValueError(
                f"BayesianMLP(activation={activation!r}): choose one of {sorted(activations)} "
                "or pass a callable."
            )
        return activations[activation]
    if callable(activation):
        return activation
    raise ValueError(f"BayesianMLP(activation={activation!r}): not a name or a callable.")


def mlp_widths(sizes: Any) -> list[int] | None:
    """``sizes`` as a list of Python ints if it is a sequence of at least two positive
    integers (NumPy ones and an integer array included, `as_int`), else None."""
    try:
        widths = [as_int(s) for s in sizes]
    except TypeError:  # not iterable (an int, None) or a 0-d array
        return None
    if len(widths) < 2 or not all(w is not None and w > 0 for w in widths):
        return None
    return widths  # type: ignore[return-value]


def layer_index(bayesian_layers: Sequence[int] | None, n_layers: int) -> set[int] | None:
    """The stochastic layers as non-negative indices (None: every layer)."""
    if bayesian_layers is None:
        return None
    out = set()
    for i in bayesian_layers:
        index = as_int(i)
        if index is None or not -n_layers <= index < n_layers:
            raise ValueError(
                f"bayesian_layers={list(bayesian_layers)!r}: {i!r} is not a layer index of a "
                f"{n_layers}-layer network (valid: {-n_layers}..{n_layers - 1})."
            )
        out.add(index % n_layers)
    return out


def check_prior(prior: Any, distribution: type[Any]) -> None:
    """Refuse a prior that is not a distribution, a mapping or a callable.

    Args:
        prior: the ``prior`` argument of `lift` or `BayesianMLP`.
        distribution: the backend's ``Distribution`` base class.

    Raises:
        TypeError: for anything else (a number, a string, a list).
    """
    if isinstance(prior, (distribution, Mapping)) or callable(prior):
        return
    raise TypeError(
        f"prior={prior!r} is not a distribution, a mapping from parameter path to "
        "distribution, or a callable (path, shape) -> distribution. "
        "Give e.g. prior=dist.Normal(0, 1)."
    )


def resolve_prior(
    prior: Any, path: str, shape: tuple[int, ...], distribution: type[Any], library: str
) -> Any:
    """The prior of one weight: chosen from ``prior`` and shaped as the weight, one event.

    A distribution with an event shape must cover the whole weight (its batch dimensions
    become event dimensions); a scalar one is expanded to the weight's shape.

    Args:
        prior: a distribution, a mapping from path (exact or glob pattern) to
            distribution (the first match wins), or a callable ``(path, shape) ->
            distribution``.
        path: the weight's path, e.g. ``"layers.0.weight"``.
        shape: the weight's shape.
        distribution: the backend's ``Distribution`` base class.
        library: the backend's name (``"numpyro"`` or ``"pyro"``), for messages.

    Returns:
        A distribution whose event shape is ``shape``.

    Raises:
        ValueError: if no key of a mapping matches ``path``, or the distribution's
            shape is not the weight's.
        TypeError: if the chosen value is not a ``distribution``.
    """
    d: Any
    if isinstance(prior, distribution):
        d = prior
    elif isinstance(prior, Mapping):
        matches = [v for k, v in prior.items() if k == path or fnmatch.fnmatchcase(path, k)]
        if not matches:
            raise ValueError(
                f"prior: no entry of the prior mapping matches parameter {path!r}; add it "
                f"(keys may be glob patterns such as '*.bias'). Keys given: {list(prior)}."
            )
        d = matches[0]
    else:
        d = prior(path, shape)
    if not isinstance(d, distribution):
        raise TypeError(
            f"prior: for parameter {path!r} got {d!r}, which is not a "
            f"{library}.distributions.Distribution. Give e.g. dist.Normal(0, 1)."
        )
    batch_shape, event_shape = tuple(d.batch_shape), tuple(d.event_shape)
    if event_shape:
        if batch_shape + event_shape != shape:
            raise ValueError(
                f"prior: the distribution for {path!r} has shape "
                f"{batch_shape + event_shape}, but the parameter is {shape}."
            )
        return d.to_event(len(batch_shape))
    return d.expand(shape).to_event(len(shape))


def prior_resolver(
    prior: Any, distribution: type[Any], library: str
) -> Callable[[str, tuple[int, ...]], Any]:
    """Check ``prior`` now; return ``(path, shape) -> distribution`` (`resolve_prior`).

    Args:
        prior: the ``prior`` argument of `lift`.
        distribution: the backend's ``Distribution`` base class.
        library: the backend's name (``"numpyro"`` or ``"pyro"``), for messages.

    Returns:
        The prior of one weight given its path and shape.

    Raises:
        TypeError: if ``prior`` is not a distribution, mapping or callable.
    """
    check_prior(prior, distribution)

    def of(path: str, shape: tuple[int, ...]) -> Any:
        return resolve_prior(prior, path, shape, distribution, library)

    return of


@dataclass(frozen=True)
class MLPBackend:
    """What `bayesian_mlp` needs from a backend.

    Attributes:
        distribution: the backend's ``Distribution`` base class.
        normal: the backend's ``Normal`` class; ``normal(0.0, 1.0)`` is the default prior.
        activations: the named activation functions.
        init_mlp: ``(sizes, activation, seed) -> MLP``, the template network.
        lift: the backend's `lift`, which turns the template's weights into sites.
    """

    distribution: type[Any]
    normal: Callable[[float, float], Any]
    activations: Mapping[str, Callable[..., Any]]
    init_mlp: Callable[[Sequence[int], Callable[..., Any], int], Any]
    lift: Callable[..., Any]


def bayesian_mlp(
    backend: MLPBackend,
    name: Any,
    sizes: Sequence[Any],
    activation: Any,
    prior: Any,
    bayesian_layers: Sequence[int] | None,
) -> Any:
    """`BayesianMLP` on ``backend``: check the arguments, build the template, lift it.

    The checks run in the same order on both backends (name, sizes and activation; the
    prior; ``bayesian_layers``); the template's initial weights are seeded by
    ``len(name)``, and only the layers in ``bayesian_layers`` become sample sites.

    Args:
        backend: the backend's pieces (an `MLPBackend`).
        name, sizes, activation, prior, bayesian_layers: as given to `BayesianMLP`.

    Returns:
        The backend's MLP holding this run's weights.

    Raises:
        TypeError: if ``prior`` is not a distribution, mapping or callable.
        ValueError: for bad ``name``, ``sizes``, ``activation`` or ``bayesian_layers``.
    """
    act = check_mlp_args(name, sizes, activation, backend.activations)
    sizes = mlp_widths(sizes)  # type: ignore[assignment]  # checked: Python ints
    prior = backend.normal(0.0, 1.0) if prior is None else prior
    check_prior(prior, backend.distribution)
    chosen = layer_index(bayesian_layers, len(sizes) - 1)
    template = backend.init_mlp(sizes, act, len(name))

    def is_bayesian(path: str) -> bool:
        return chosen is None or int(path.split(".")[1]) in chosen

    return backend.lift(name, template, prior, bayesian=is_bayesian)
