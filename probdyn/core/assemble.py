"""The backend-neutral end of every runner: metadata, warnings, the `Posterior`.

Each backend's ``_build.py`` computes what needs the PPL (deterministic sites,
pointwise log likelihood, posterior predictive, as NumPy arrays) and hands the rest
to `assemble_posterior`, so the attributes and the failed-solve report are written
once for both backends.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from probdyn.core.engines import AbstractEngine
from probdyn.core.posterior import Posterior

__all__ = ["assemble_amortized", "assemble_posterior", "package_versions"]


def package_versions(distributions: Sequence[str]) -> dict[str, str]:
    """probdyn's version and those of the installed ``distributions``, for ``attrs["versions"]``.

    probdyn's own comes from ``probdyn.__version__``, so a source checkout on the
    path (not installed) records it too; a distribution that is not installed is
    left out.

    Example:
        >>> import probdyn
        >>> package_versions(["numpy"])["probdyn"] == probdyn.__version__
        True
    """
    import probdyn

    out = {"probdyn": probdyn.__version__}
    for name in distributions:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def assemble_posterior(
    *,
    backend: str,
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: AbstractEngine,
    seed: Any,
    versions: dict[str, str],
    latent: dict[str, np.ndarray],
    deterministic: dict[str, np.ndarray],
    log_likelihood: dict[str, np.ndarray],
    posterior_predictive: dict[str, np.ndarray],
    observed: dict[str, np.ndarray],
    params: dict[str, np.ndarray],
    sample_stats: dict[str, np.ndarray],
    traces: dict[str, np.ndarray],
    num_failed_solves: int,
    wall_time: float,
    compile_time: float,
    extra_attrs: dict[str, Any] | None = None,
) -> Posterior:
    """Record the run's metadata, report failed solves, and build the `Posterior`.

    ``num_failed_solves`` counts the solves that failed *during the run* (read
    before the post-processing forward pass, whose solves are not proposals).
    """
    if num_failed_solves:
        warnings.warn(
            f"{num_failed_solves} ODE/SDE solve(s) failed during the run (max_steps reached or a "
            "non-finite state); those proposals were rejected. See "
            "posterior.attrs['num_failed_solves'].",
            RuntimeWarning,
            stacklevel=4,
        )
    attrs = {
        "engine": engine.to_dict(),
        "backend": backend,
        "seed": seed,
        "versions": versions,
        "wall_time": float(wall_time),
        "compile_time": float(compile_time),
        "num_failed_solves": int(num_failed_solves),
        "latent_sites": sorted(latent),
        "model": getattr(model, "__name__", repr(model)),
        **(extra_attrs or {}),
    }
    return Posterior(
        samples={**latent, **deterministic},
        sample_stats=sample_stats,
        posterior_predictive=posterior_predictive,
        log_likelihood=log_likelihood,
        observed_data=observed,
        params=params,
        traces=traces,
        attrs=attrs,
        model=model,
        model_args=args,
        model_kwargs=kwargs,
    )


def assemble_amortized(
    *,
    backend: str,
    model: Callable[..., Any],
    kwargs: dict[str, Any],
    engine: AbstractEngine,
    seed: Any,
    versions: dict[str, str],
    params: dict[str, np.ndarray],
    losses: np.ndarray,
    stream: Any,
    num_failed_solves: int,
    wall_time: float,
    compile_time: float,
) -> Posterior:
    """The `Posterior` of a model trained across a `probdyn.data.TaskStream`: fitted
    params, the loss trace, no draws; the stream and the model options in attrs."""
    return assemble_posterior(
        backend=backend,
        model=model,
        args=(),
        kwargs=kwargs,
        engine=engine,
        seed=seed,
        versions=versions,
        latent={},
        deterministic={},
        log_likelihood={},
        posterior_predictive={},
        observed={},
        params=params,
        sample_stats={},
        traces={"loss": np.asarray(losses)},
        num_failed_solves=num_failed_solves,
        wall_time=wall_time,
        compile_time=compile_time,
        extra_attrs={"stream": stream.describe(kwargs), "amortized": True},
    )
