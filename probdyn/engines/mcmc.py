"""The backend-neutral half of the NUTS and HMC runners (NumPy only).

Where chains start (``init=``: a prior draw, the prior median, a MAP estimate or the
draws of an earlier `Posterior`; the VI runners' autoguides follow the same
`init_strategy`), what to say when no start is valid because the model's ODE or SDE
solves all fail there (`init_failure_error`), and NUTS's tree depth read off the
number of leapfrog steps. Each backend turns these into its own kernel's inputs
(unconstrained values, tensors).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    from probdyn.core.posterior import Posterior

__all__ = [
    "failed_solve_names",
    "init_failure_error",
    "init_strategy",
    "per_draw_param_error",
    "posterior_starts",
    "tree_depth",
]

# NeuralODE and NeuralSDE name the factor site that rejects their failed solves
# f"{name}{FAILED_SUFFIX}" (-inf when a solve failed, 0 otherwise).
FAILED_SUFFIX = ".failed"

S = TypeVar("S")


def init_strategy(
    init: Any, sample: S, median: S, start: dict[str, Any] | None = None, value: Any = None
) -> S:
    """The PPL's init strategy for ``init=`` (of NUTS, HMC or VI's autoguides).

    A given ``start`` (a MAP estimate, say) wins: ``value(values=start)``;
    otherwise ``"sample"`` starts at a prior draw and anything else (``"median"``,
    and ``"map"`` or a `Posterior`, whose starts the runner sets itself) at the
    prior median.

    Args:
        init: the engine's ``init`` option.
        sample: the PPL's ``init_to_sample``.
        median: the PPL's ``init_to_median``.
        start: constrained values to start at, or None.
        value: the PPL's ``init_to_value`` (needed with a ``start``).

    Example:
        >>> init_strategy("sample", "S", "M")
        'S'
        >>> init_strategy("sample", "S", "M", {"mu": 0.0}, dict)
        {'values': {'mu': 0.0}}
    """
    if start is not None:
        return value(values=start)  # type: ignore[no-any-return]
    return sample if init == "sample" else median


def posterior_starts(
    init: Posterior, latent: Sequence[str], num_chains: int, param_sites: Sequence[str] = ()
) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """One start per chain from the posterior's draws, spread evenly over them, and
    the posterior's params (which the chains keep fixed).

    Args:
        init: the earlier fit of the same model.
        latent: the model's latent sites.
        num_chains: how many starts.
        param_sites: the model's ``param`` sites.

    Raises:
        ValueError: if the posterior has no draws of a latent site of the model, or
            holds a value per draw of one of its ``param`` sites (`per_draw_param_error`).
    """
    per_draw = [s for s in param_sites if s in init.samples]
    if per_draw:
        raise ValueError(per_draw_param_error(per_draw))
    missing = [s for s in latent if s not in init.samples]
    if missing:
        raise ValueError(
            f"NUTS(init=Posterior): the initial posterior has no draws of site(s) {missing}; "
            "it must come from a fit of the same model."
        )
    flat = init.draws(flatten=True)
    idx = np.linspace(0, len(flat[latent[0]]) - 1, num_chains).round().astype(int)
    return [{s: flat[s][i] for s in latent} for i in idx], dict(init.params)


def per_draw_param_error(sites: Sequence[str], given: str = "init=Posterior") -> str:
    """Why a sampler cannot start from an `Ensemble` fit of a model with ``param``
    sites: each member fitted its own value of them, and a sampler holds one fixed.

    Example:
        >>> per_draw_param_error(["scale"], "init='ensemble'").split(":")[0]
        "init='ensemble'"
    """
    return (
        f"{given}: the model has param site(s) {list(sites)}, and an Ensemble fit gives "
        "each member its own value of them (one per draw) while a sampler holds one set "
        "fixed, so the chains would not sample the model the members were fitted to. "
        "Start from a fit that keeps them fixed (VI, or init='map'), or make those sites "
        "latent (sample statements with a prior)."
    )


def tree_depth(n_steps: np.ndarray) -> np.ndarray:
    """NUTS's tree depth per draw, ``floor(log2(n_steps)) + 1`` (at least 1).

    Example:
        >>> tree_depth(np.array([1, 3, 7, 8]))
        array([1, 2, 3, 4])
    """
    return np.floor(np.log2(np.maximum(n_steps, 1))).astype(np.int64) + 1  # type: ignore[no-any-return]


def failed_solve_names(log_factors: Mapping[str, Any]) -> list[str]:
    """The ODE/SDE primitives whose failed-solve factor is -inf.

    Args:
        log_factors: a model trace's factor sites, name -> log factor (any
            array-like; -inf anywhere in it means a failed solve).

    Returns:
        The primitives' names (the ``name=`` given to `NeuralODE`/`NeuralSDE`),
        in trace order.

    Example:
        >>> failed_solve_names({"pk.failed": -np.inf, "sde.failed": 0.0, "prior": -np.inf})
        ['pk']
    """
    return [
        site[: -len(FAILED_SUFFIX)]
        for site, value in log_factors.items()
        if site.endswith(FAILED_SUFFIX) and bool(np.any(np.asarray(value) == -np.inf))
    ]


def init_failure_error(engine: str, failed: Sequence[str]) -> RuntimeError:
    """The error for a sampler that found no valid start because solves failed there.

    Args:
        engine: the engine's class name (``"NUTS"``, ``"HMC"``).
        failed: the names of the ODE/SDE primitives whose solves all failed at the
            initial point (`failed_solve_names`).

    Returns:
        A RuntimeError naming each primitive and its factor site and saying what to
        try (the caller raises it from the PPL's own error).

    Example:
        >>> message = str(init_failure_error("NUTS", ["pk"]))
        >>> "every solve of the ODE/SDE 'pk' (factor site 'pk.failed') failed" in message
        True
    """
    names = ", ".join(repr(n) for n in failed)
    sites = ", ".join(repr(n + FAILED_SUFFIX) for n in failed)
    plural = "s" if len(failed) > 1 else ""
    return RuntimeError(
        f"{engine} could not find valid initial parameters: every solve of the ODE/SDE "
        f"{names} (factor site{plural} {sites}) failed at the initial point(s) tried.\n"
        "A solve fails when it reaches max_steps or its state becomes NaN or inf. Try: a "
        "stiff solver (NeuralODE(solver='kvaerno5'), NumPyro backend) or a larger "
        "max_steps (or looser rtol/atol); priors that keep the rates where the equations "
        f"can be integrated; or another start ({engine}(init='sample'), init='map', or "
        "init=<a Posterior of the same model>)."
    )
