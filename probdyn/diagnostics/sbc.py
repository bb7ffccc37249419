"""``probdyn.sbc``: simulation-based calibration of any engine on any backend.

SBC (Talts et al., 2018) checks an engine on a model by fitting data simulated
from the model itself: draw ``theta ~ p(theta)`` and ``y ~ p(y | theta)``, fit
``p(theta | y)`` with the engine, and record the rank of the true ``theta`` among
the posterior draws. If the engine samples the exact posterior, the true value is
one more draw from it, so its rank is uniform on ``0..L`` (``L`` draws). The
ranks are tested for uniformity with the simultaneous ECDF test of Säilynoja,
Bürkner and Vehtari (2022). See ``docs/sbc.md``.

This module holds the entry point and its argument checks; one simulation is in
`sbc_simulation`, running them (serially or on a process pool) in `sbc_run`, the
checkpoint file in `sbc_checkpoint`, the result type in `sbc_result` and its plots in
`sbc_plot`, all under `probdyn.diagnostics`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from probdyn.core.backends import backend_names, engine_variant, get_runner
from probdyn.core.engines import SMC, VI, AbstractEngine, Ensemble
from probdyn.core.fit import detect_backend
from probdyn.diagnostics.sbc_model import _data_args, _is_int, _quantities, _trace
from probdyn.diagnostics.sbc_result import SBCResult, _result
from probdyn.diagnostics.sbc_run import _run_all
from probdyn.diagnostics.sbc_simulation import _Job
from probdyn.engines.keys import int_key

__all__ = ["SBCResult", "sbc"]

_RANK_DRAW_RULES = ("auto", "all", "ess")
# Engines whose draws are independent (VI, ensemble members, SMC particles after
# the final resampling): every draw is kept. Any other engine is thinned to its
# effective sample size, since autocorrelated draws give non-uniform ranks.
_INDEPENDENT_DRAWS = (VI, Ensemble, SMC)


def sbc(
    model: Callable[..., Any],
    engine: AbstractEngine,
    num_simulations: int,
    *,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    data_arg: int | str | Mapping[str, int | str] | None = None,
    sites: Sequence[str] | None = None,
    log_likelihood: bool = True,
    num_rank_draws: int | str = "auto",
    key: int = 0,
    backend: str | None = None,
    progress_bar: bool = True,
    checkpoint: str | os.PathLike[str] | None = None,
    num_workers: int = 1,
) -> SBCResult:
    """Simulation-based calibration of ``engine`` on ``model`` (Talts et al., 2018).

    For each simulation ``i``: draw the latent sites and the observations from the
    model's prior predictive, fit the simulated observations with ``engine``, and
    rank the true value of every ranked quantity among the posterior draws.

    The data contract: ``args``/``kwargs`` are the arguments of a `probdyn.fit`
    call, observations included (real data, or any placeholder of the right
    shape: only their shape is used). Each observed site must take its value
    straight from one argument (``obs=y``); the simulated observations are passed
    back in that argument. ``data_arg`` names it; by default it is found by
    matching the observed values against the arguments.

    Args:
        model: a NumPyro or Pyro model function. With ``num_workers > 1`` it must be
            importable (a top-level function of a module), since it is pickled.
        engine: the engine config to check (`NUTS`, `VI`, ...).
        num_simulations: number of simulated data sets (fits); 100-1000 in
            practice, see ``docs/sbc.md`` for the power of the test.
        args: the model's positional arguments.
        kwargs: the model's keyword arguments.
        data_arg: where the observations go: a positional index, a keyword name
            (with one observed site), or ``{observed site: index or name}``.
        sites: latent or deterministic sites to rank, every scalar element of
            each; default every latent sample site. For a BNN, rank sites that
            its symmetries leave unchanged (noise scale, output bias, a
            deterministic prediction), see ``docs/sbc.md``.
        log_likelihood: also rank the log likelihood of the simulated data
            (summed over observed sites), a test quantity sensitive to the joint
            calibration of all parameters (Modrák et al., 2023).
        num_rank_draws: ``L``, the posterior draws each rank is computed among.
            An int: exactly ``L`` evenly spaced draws. ``"all"``: every draw.
            ``"ess"``: ``floor(min bulk ESS)`` evenly spaced draws, so that they
            are nearly independent (Talts et al.). ``"auto"``: ``"all"`` for `VI`,
            `Ensemble` and `SMC` (independent draws), ``"ess"`` otherwise.
        key: an int seed. Simulation ``i`` uses seeds derived from ``(key, i)``
            only, so results do not depend on ``num_workers`` or on resuming.
        backend: ``"numpyro"`` or ``"pyro"``; detected from the model when omitted.
        progress_bar: show a progress bar over the simulations (the engine's own
            bar is turned off).
        checkpoint: a JSON file path. Each finished simulation is written there
            (atomically); a rerun with the same path (and the same settings and
            model code) skips them, and a larger ``num_simulations`` extends the run.
        num_workers: fits run in this many processes (``spawn`` context: JAX is
            not fork-safe). Each process imports the backend and compiles its own
            programs, so this pays off when a fit takes more than a few seconds.
            The simulations are drawn in the calling process, so the truths and
            simulated data are those of ``num_workers=1`` on every backend.

    Returns:
        An `SBCResult`.

    Raises:
        TypeError: for an engine that is not an engine config, a non-int key, or a
            model that cannot be pickled when ``num_workers > 1``.
        ValueError: for an int key outside ``[0, 2**64)``, bad counts, unknown
            sites, a model without observed sites, observations that cannot be
            matched to an argument, or a checkpoint written by a different run
            (other settings, or a model whose code has changed since).
        FileNotFoundError: for a ``checkpoint`` in a directory that does not exist.

    Example:
        >>> import numpy as np, probdyn
        >>> from probdyn.testing import normal_model
        >>> vi = probdyn.VI(num_steps=300, num_draws=100)
        >>> result = probdyn.sbc(normal_model, vi, 3, args=(np.zeros(10),),
        ...                      progress_bar=False)  # doctest: +SKIP
        >>> result.ranks["mu"].shape  # doctest: +SKIP
        (3,)
    """
    _check_inputs(engine, num_simulations, key, num_workers, num_rank_draws, model)
    args, kwargs = tuple(args), dict(kwargs or {})
    if backend is None:
        backend = detect_backend(model, args, kwargs)
    elif backend not in backend_names():
        raise ValueError(f"sbc(backend={backend!r}): choose one of {', '.join(backend_names())}.")
    runner = get_runner(engine, backend, engine_variant(engine, args))
    engine = _quiet(engine)
    probe = _trace(backend, model, args, kwargs, seed=0, observed=None)
    if not probe.observed:
        raise ValueError(
            "sbc: the model has no observed sites with these arguments. Pass the observations "
            "(real data, or a placeholder array of the right shape) in the argument the model "
            "uses as obs=, as for probdyn.fit."
        )
    job = _Job(
        model=model,
        args=args,
        kwargs=kwargs,
        backend=backend,
        runner=runner,
        engine=engine,
        data=_data_args(model, args, kwargs, probe.observed, data_arg),
        quantities=_quantities(probe, sites, log_likelihood),
        rank_draws=_rank_rule(engine, num_rank_draws),
        key=int(key),
    )
    start = time.perf_counter()
    records = _run_all(job, num_simulations, checkpoint, num_workers, progress_bar)
    return _result(job, [records[i] for i in range(num_simulations)], time.perf_counter() - start)


def _check_inputs(
    engine: Any, num_simulations: Any, key: Any, num_workers: Any, rank_draws: Any, model: Any
) -> None:
    """Raise for an argument of `sbc` of the wrong type or out of range."""
    if not isinstance(engine, AbstractEngine):
        raise TypeError(
            f"sbc(engine={engine!r}): expected an engine config such as probdyn.NUTS(...) or "
            "probdyn.VI(...)."
        )
    if not callable(model):
        raise TypeError(f"sbc(model={model!r}): the model must be a callable model function.")
    for name, value in (("num_simulations", num_simulations), ("num_workers", num_workers)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"sbc({name}={value!r}): {name} must be a positive integer.")
    try:
        seed = int_key(key)
    except ValueError as err:
        raise ValueError(f"sbc: {err}") from None
    if seed is None:
        raise TypeError(f"sbc(key={key!r}): key must be a non-negative int seed, e.g. key=0.")
    if not (rank_draws in _RANK_DRAW_RULES or (_is_int(rank_draws) and rank_draws >= 1)):
        raise ValueError(
            f"sbc(num_rank_draws={rank_draws!r}): give a positive int or one of "
            f"{', '.join(repr(r) for r in _RANK_DRAW_RULES)}."
        )


def _quiet(engine: AbstractEngine) -> AbstractEngine:
    """The engine with its own progress bar off (one bar for the whole SBC run)."""
    names = {f.name for f in dataclasses.fields(engine)}  # type: ignore[arg-type]
    if "progress_bar" in names:
        return dataclasses.replace(engine, progress_bar=False)  # type: ignore[type-var]
    return engine


def _rank_rule(engine: AbstractEngine, rank_draws: int | str) -> int | str:
    """The thinning rule of ``num_rank_draws``, with ``"auto"`` resolved for ``engine``."""
    if rank_draws == "auto":
        return "all" if isinstance(engine, _INDEPENDENT_DRAWS) else "ess"
    return int(rank_draws) if _is_int(rank_draws) else rank_draws
