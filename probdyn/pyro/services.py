"""The Pyro backend's services to the core (see `probdyn.core.backends`).

The core never imports this backend; it asks the registry, which imports this module
the first time one of these functions is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from probdyn.core.locking import model_lock
from probdyn.diagnostics.sbc_model import Trace
from probdyn.engines.checks import check_array_types
from probdyn.pyro.bridge import (
    is_deterministic,
    is_factor,
    is_plate,
    isolated,
    to_numpy,
    to_torch_args,
    trace_model,
    uncondition,
)
from probdyn.pyro.predict import _pointwise_log_prob, forward_draws, predict

__all__ = [
    "check_inputs",
    "forward_draws",
    "param_names",
    "precision",
    "predict",
    "probe",
    "set_precision",
    "trace_once",
]


def probe(model: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether one run of ``model`` under Pyro records a sample site.

    The probe must not touch the global torch RNG or the user's param store, and
    gets NumPy data as tensors, as the Pyro runners give it."""
    targs, tkwargs = to_torch_args(args, kwargs)
    with model_lock, isolated(0):
        tr = trace_model(model, targs, tkwargs)
    return any(site.get("type") == "sample" for site in tr.values())


def check_inputs(labelled: Sequence[tuple[str, Any]]) -> None:
    """Raise TypeError for a JAX array among a Pyro model's (labelled) arguments."""
    check_array_types(
        labelled,
        {"jax": "JAX array", "jaxlib": "JAX array"},
        "Pyro",
        "np.asarray({x}) (probdyn gives NumPy arrays to a Pyro model as tensors)",
    )


def param_names(
    model: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[str]:
    """The model's ``param`` sites, from one run in a private parameter store."""
    targs, tkwargs = to_torch_args(args, kwargs)
    with model_lock, isolated(0):
        tr = trace_model(model, targs, tkwargs)
    return [name for name, site in tr.items() if site["type"] == "param"]


def trace_once(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    seed: int,
    observed: Sequence[str] | None,
) -> Trace:
    """One run of the model for `probdyn.sbc`, its sites sorted by role."""
    targs, tkwargs = to_torch_args(args, kwargs)
    fn = model if observed is None else uncondition()(model)
    with model_lock, isolated(seed):
        tr = trace_model(fn, targs, tkwargs)
    out = Trace({}, {}, {}, 0.0, True)
    for name, site in tr.items():
        if site["type"] != "sample" or is_plate(site):
            continue
        if is_deterministic(site):
            out.deterministic[name] = to_numpy(site["value"])
        elif is_factor(site):
            out.valid &= bool(np.all(np.isfinite(to_numpy(site["fn"].log_prob(site["value"])))))
        elif name in (observed or ()) or (observed is None and site["is_observed"]):
            out.observed[name] = to_numpy(site["value"])
            out.log_likelihood += float(to_numpy(_pointwise_log_prob(site)).sum())
        else:
            out.latent[name] = to_numpy(site["value"])
    out.valid &= all(np.all(np.isfinite(v)) for v in out.observed.values())
    return out


def precision() -> dict[str, Any]:
    """The float settings in force, for worker processes to copy."""
    return {
        "torch_dtype": str(torch.get_default_dtype()).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
    }


def set_precision(env: dict[str, Any]) -> None:
    """Apply `precision`'s settings in this process."""
    if "torch_dtype" in env:
        torch.set_default_dtype(getattr(torch, env["torch_dtype"]))
        torch.set_num_threads(env["torch_threads"])
