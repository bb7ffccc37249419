"""The backend-neutral end of every runner: metadata, warnings, the `Posterior`.

Each backend's ``postprocess.build_posterior`` takes what a runner produced (the
fields of `RunFields`, written once here), and hands it to `assemble_run` with the
two things that need the PPL: converting its arrays to NumPy and the forward pass
(deterministic sites, pointwise log likelihood, posterior predictive). The
attributes and the failed-solve report are written once for both backends, in
`assemble_posterior`.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import numpy as np

from probdyn.core.engines import AbstractEngine
from probdyn.core.posterior import Posterior

__all__ = [
    "RunFields",
    "assemble_amortized",
    "assemble_posterior",
    "assemble_run",
    "package_versions",
]


class _RunInputs(TypedDict):
    model: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    engine: AbstractEngine
    latent: dict[str, Any]
    params: dict[str, Any]
    observed: dict[str, np.ndarray]
    wall_time: float


class RunFields(_RunInputs, total=False):
    """What a runner hands to its backend's ``build_posterior`` (as keywords).

    Attributes:
        model, args, kwargs: the model and the data it was fitted to.
        engine: the engine config.
        latent: draws per latent site, ``(chain, draw, *event)`` (the backend's
            arrays or tensors).
        params: fitted ``param`` values shared by every draw.
        observed: the observed values (NumPy).
        wall_time: seconds the run took.
        sample_stats: per-draw statistics, ``(chain, draw)`` (optional).
        traces: per-step curves of the run (optional).
        compile_time: seconds spent compiling (optional; 0 where nothing compiles).
        extra_attrs: the engine's own entries of ``attrs`` (optional).
    """

    sample_stats: dict[str, Any]
    traces: dict[str, Any]
    compile_time: float
    extra_attrs: dict[str, Any]


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
    stacklevel: int = 4,
) -> Posterior:
    """Record the run's metadata, report failed solves, and build the `Posterior`.

    ``num_failed_solves`` counts the solves that failed *during the run* (read
    before the post-processing forward pass, whose solves are not proposals).
    ``stacklevel`` makes the failed-solve warning point at the code that called
    the runner (4 for a runner that calls this through one helper).
    """
    if num_failed_solves:
        warnings.warn(
            f"{num_failed_solves} ODE/SDE solve(s) failed during the run (max_steps reached or a "
            "non-finite state: those proposals were rejected; or a failed backward adjoint "
            "solve: that gradient was set to zero). See "
            "posterior.attrs['num_failed_solves'].",
            RuntimeWarning,
            stacklevel=stacklevel,
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


def assemble_run(
    run: RunFields,
    *,
    backend: str,
    seed: Any,
    versions: dict[str, str],
    num_failed_solves: int,
    to_numpy: Callable[[Any], np.ndarray],
    forward: Callable[
        [dict[str, np.ndarray], dict[str, np.ndarray]],
        tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]],
    ],
) -> Posterior:
    """The `Posterior` of a run: its arrays as NumPy, the forward pass, the metadata.

    Args:
        run: what the runner produced (see `RunFields`).
        backend: the backend's name, recorded in ``attrs``.
        seed: a JSON-friendly record of the run's key.
        versions: the package versions that produced it.
        num_failed_solves: the solves that failed during the run, read before the
            forward pass (whose solves are not proposals).
        to_numpy: the backend's array or tensor -> NumPy.
        forward: ``(latent, params) -> (deterministic, log likelihood, posterior
            predictive)`` per draw, all NumPy, the backend's forward pass.
    """
    latent = {k: to_numpy(v) for k, v in run["latent"].items()}
    params = {k: to_numpy(v) for k, v in run["params"].items()}
    det, loglik, pp = forward(latent, params)
    return assemble_posterior(
        backend=backend,
        model=run["model"],
        args=run["args"],
        kwargs=run["kwargs"],
        engine=run["engine"],
        seed=seed,
        versions=versions,
        latent=latent,
        deterministic=det,
        log_likelihood=loglik,
        posterior_predictive=pp,
        observed=run["observed"],
        params=params,
        sample_stats={k: to_numpy(v) for k, v in run.get("sample_stats", {}).items()},
        traces={k: to_numpy(v) for k, v in run.get("traces", {}).items()},
        num_failed_solves=num_failed_solves,
        wall_time=run["wall_time"],
        compile_time=run.get("compile_time", 0.0),
        extra_attrs=run.get("extra_attrs"),
        stacklevel=5,  # here, build_posterior, the runner, then its caller
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
