"""Argument checks shared by the backends' primitives (NumPy only).

The NumPyro and Pyro twins must reject the same input with the same message; the
checks live here once so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["check_mlp_args", "check_np_args", "check_ode_args", "layer_index"]


def check_mlp_args(
    name: Any, sizes: Sequence[Any], activation: Any, activations: Mapping[str, Callable[..., Any]]
) -> Callable[..., Any]:
    """Validate `BayesianMLP`'s name, sizes and activation; return the activation function."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"BayesianMLP(name={name!r}): name must be a non-empty string.")
    if len(sizes) < 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ValueError(
            f"BayesianMLP(sizes={list(sizes)!r}): give at least two positive integer widths, "
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


def layer_index(bayesian_layers: Sequence[int] | None, n_layers: int) -> set[int] | None:
    """The stochastic layers as non-negative indices (None: every layer)."""
    if bayesian_layers is None:
        return None
    out = set()
    for i in bayesian_layers:
        if not isinstance(i, int) or not -n_layers <= i < n_layers:
            raise ValueError(
                f"bayesian_layers={list(bayesian_layers)!r}: {i!r} is not a layer index of a "
                f"{n_layers}-layer network (valid: {-n_layers}..{n_layers - 1})."
            )
        out.add(i % n_layers)
    return out


def check_ode_args(
    vector_field: Any,
    solver: Any,
    adjoint: Any,
    solvers: Mapping[str, Any],
    adjoints: Mapping[str, Any],
    *,
    adaptive: bool,
    dt0: Any,
    max_steps: Any,
    rtol: Any,
    atol: Any,
) -> None:
    """Validate the options `NeuralODE` shares between backends.

    ``solvers``/``adjoints`` are the backend's tables (only their keys are read);
    ``adaptive`` says whether ``solver`` picks its own step sizes. Backend-specific
    refusals (a solver one library lacks) are left to the caller, after these.
    """
    if not callable(vector_field):
        raise TypeError(
            f"NeuralODE(vector_field={vector_field!r}): expected a callable f(t, z, args)."
        )
    if solver not in solvers:
        raise ValueError(f"NeuralODE(solver={solver!r}): choose one of {sorted(solvers)}.")
    if adjoint not in adjoints:
        raise ValueError(f"NeuralODE(adjoint={adjoint!r}): choose one of {sorted(adjoints)}.")
    if not adaptive and dt0 is None:
        raise ValueError(f"NeuralODE(solver={solver!r}) is fixed-step: give dt0=...")
    if not (isinstance(max_steps, int) and max_steps > 0):
        raise ValueError(f"NeuralODE(max_steps={max_steps!r}): must be a positive integer.")
    for field, tol in (("rtol", rtol), ("atol", atol)):
        if not tol > 0:
            raise ValueError(f"NeuralODE({field}={tol!r}): must be positive.")


def check_np_args(
    fn: str, sizes: Mapping[str, int], min_sd: float, activation: str, activations: Sequence[str]
) -> None:
    """Check a neural process's options (both backends' constructors call this).

    Raises:
        ValueError: for a size that is not a positive int, ``min_sd`` outside
            (0, 1), or an unknown activation.
    """
    for arg, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{fn}({arg}={value!r}): must be a positive int.")
    if not 0.0 < min_sd < 1.0:
        raise ValueError(f"{fn}(min_sd={min_sd!r}): must lie in (0, 1), e.g. 0.1.")
    if activation not in activations:
        raise ValueError(f"{fn}(activation={activation!r}): choose one of {sorted(activations)}.")
