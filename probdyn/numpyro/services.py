"""The NumPyro backend's services to the core (see `probdyn.core.backends`).

The core never imports this backend; it asks the registry, which imports this module
the first time one of these functions is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from probdyn.core.locking import model_lock
from probdyn.diagnostics.sbc_model import Trace
from probdyn.engines.checks import check_array_types
from probdyn.numpyro.bridge import is_factor, trace_model, uncondition
from probdyn.numpyro.predict import forward_draws, predict

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
    """Whether one run of ``model`` under NumPyro records a sample site."""
    with model_lock:
        tr = handlers.trace(handlers.seed(model, 0)).get_trace(*args, **kwargs)
    return any(site.get("type") == "sample" for site in tr.values())


def param_names(
    model: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[str]:
    """The model's ``param`` sites, from an abstract run (nothing is computed)."""
    found: list[str] = []

    def run() -> None:
        tr = trace_model(model, args, kwargs)  # seeded; names a distribution-class misuse
        found.extend(name for name, site in tr.items() if site["type"] == "param")

    with model_lock:
        try:
            jax.eval_shape(run)
        except (jax.errors.JAXTypeError, jax.errors.JAXIndexError):
            found.clear()
            run()
    return found


def check_inputs(labelled: Sequence[tuple[str, Any]]) -> None:
    """Raise TypeError for a torch tensor among a NumPyro model's (labelled) arguments."""
    check_array_types(
        labelled,
        {"torch": "torch.Tensor"},
        "NumPyro",
        "np.asarray({x}) (or {x}.detach().cpu().numpy())",
    )


def trace_once(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    seed: int,
    observed: Sequence[str] | None,
) -> Trace:
    """One run of the model for `probdyn.sbc`, its sites sorted by role."""
    fn = model if observed is None else uncondition(model)
    with model_lock:
        tr = handlers.trace(handlers.seed(fn, jax.random.PRNGKey(seed))).get_trace(*args, **kwargs)
    out = Trace({}, {}, {}, 0.0, True)
    for name, site in tr.items():
        if site["type"] == "deterministic":
            out.deterministic[name] = np.asarray(site["value"])
        elif site["type"] != "sample":
            continue
        elif is_factor(site):
            out.valid &= bool(np.all(np.isfinite(site["fn"].log_prob(site["value"]))))
        elif name in (observed or ()) or (observed is None and site["is_observed"]):
            lp = site["fn"].log_prob(site["value"])
            if site.get("mask") is not None:
                lp = jnp.where(site["mask"], lp, 0.0)
            out.observed[name] = np.asarray(site["value"])
            out.log_likelihood += float(jnp.sum(lp))
        else:
            out.latent[name] = np.asarray(site["value"])
    out.valid &= all(np.all(np.isfinite(v)) for v in out.observed.values())
    return out


def precision() -> dict[str, Any]:
    """The float settings in force, for worker processes to copy."""
    return {"jax_enable_x64": bool(jax.config.read("jax_enable_x64"))}


def set_precision(env: dict[str, Any]) -> None:
    """Apply `precision`'s settings in this process."""
    if "jax_enable_x64" in env:
        jax.config.update("jax_enable_x64", env["jax_enable_x64"])
