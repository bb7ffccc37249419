"""One simulation of `probdyn.sbc`: draw a data set from the model's prior
predictive, fit it with the engine, and rank the true values among the posterior
draws. `_Job` carries everything a simulation needs, so that it can run in a worker
process; simulation ``i`` depends only on ``(key, i)``."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from probdyn.core.engines import AbstractEngine
from probdyn.diagnostics.sbc_model import Trace, _Quantity, _trace

if TYPE_CHECKING:
    from probdyn.core.posterior import Posterior

_MAX_PRIOR_REDRAWS = 100


@dataclasses.dataclass(frozen=True)
class _Job:
    """Everything a (possibly remote) simulation needs; pickled for worker processes."""

    model: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    backend: str
    runner: Callable[..., Any]
    engine: AbstractEngine
    data: dict[str, int | str]
    quantities: tuple[_Quantity, ...]
    rank_draws: int | str
    key: int


def _seeds(key: int, index: int) -> list[int]:
    """(simulation, fit, ranking) seeds of simulation ``index``; below 2**31 for JAX."""
    state = np.random.SeedSequence([key, index]).generate_state(3, np.uint32)
    return [int(s) >> 1 for s in state]


def _simulate(job: _Job, seed: int) -> tuple[Trace, int]:
    """A prior predictive draw; draws with a failed ODE solve (a -inf factor) or
    non-finite data are redrawn (they have zero density under the model)."""
    observed = list(job.data)
    for attempt in range(_MAX_PRIOR_REDRAWS):
        sim_seed = seed if attempt == 0 else _seeds(seed, attempt)[0]
        sim = _trace(job.backend, job.model, job.args, job.kwargs, seed=sim_seed, observed=observed)
        truth = _truth(job, sim)
        if sim.valid and all(np.isfinite(v) for v in truth.values()):
            return sim, attempt
    raise RuntimeError(
        f"sbc: {_MAX_PRIOR_REDRAWS} prior predictive draws in a row gave non-finite data or a "
        "failed ODE solve; check the model's priors."
    )


def _truth(job: _Job, sim: Trace) -> dict[str, float]:
    values = {**sim.latent, **sim.deterministic}
    return {
        q.name: sim.log_likelihood if q.site is None else float(np.ravel(values[q.site])[q.index])
        for q in job.quantities
    }


def _with_data(job: _Job, sim: Trace) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args, kwargs = list(job.args), dict(job.kwargs)
    for site, where in job.data.items():
        if isinstance(where, int):
            args[where] = sim.observed[site]
        else:
            kwargs[where] = sim.observed[site]
    return tuple(args), kwargs


def _posterior_draws(job: _Job, post: Posterior) -> dict[str, np.ndarray]:
    """Quantity -> its draws ``(chain, draw)``."""
    out = {}
    for q in job.quantities:
        if q.site is None:
            missing = [s for s in job.data if s not in post.log_likelihood]
            if missing:
                raise ValueError(
                    f"sbc: the {type(job.engine).__name__} posterior has no log likelihood of "
                    f"{missing}; pass log_likelihood=False."
                )
            lead = (post.num_chains, post.num_draws)
            out[q.name] = sum(post.log_likelihood[s].reshape(*lead, -1).sum(-1) for s in job.data)
        elif q.site not in post.samples:
            raise ValueError(
                f"sbc: the {type(job.engine).__name__} posterior has no site {q.site!r}; rank "
                "other sites (sites=)."
            )
        else:
            value = post.samples[q.site]
            out[q.name] = value.reshape(*value.shape[:2], -1)[:, :, q.index]
    return out


def _kept(job: _Job, draws: dict[str, np.ndarray], post: Posterior, rng: Any) -> np.ndarray:
    """Flat indices (chain-major) of the draws the ranks are computed among."""
    total = post.num_chains * post.num_draws
    idx = np.arange(total)
    log_w = post.sample_stats.get("log_weight")
    if log_w is not None and np.ptp(np.ravel(log_w)) > 1e-12:
        # Weighted particles: resample them (systematic) into an unweighted sample.
        w = np.exp(np.ravel(log_w) - np.max(log_w))
        cdf = np.cumsum(w / w.sum())
        idx = np.minimum(
            np.searchsorted(cdf, (rng.uniform() + np.arange(total)) / total), total - 1
        )
    rule = job.rank_draws
    if rule == "all":
        size = total
    elif rule == "ess":
        size = min(total, max(1, int(_min_ess(draws))))
    else:
        size = int(rule)
        if size > total:
            raise ValueError(
                f"sbc(num_rank_draws={size}): the {type(job.engine).__name__} fit has only "
                f"{total} draws; lower num_rank_draws or raise the engine's number of draws."
            )
    return idx[np.linspace(0, total - 1, size).round().astype(int)]


def _min_ess(draws: dict[str, np.ndarray]) -> float:
    """Smallest bulk ESS over the quantities (``inf`` when none can be estimated)."""
    from probdyn.core.arviz import import_arviz

    az = import_arviz()
    values = [
        float(az.ess(x, method="bulk")) for x in draws.values() if x.shape[1] >= 4 and np.ptp(x) > 0
    ]
    finite = [v for v in values if np.isfinite(v)]
    return min(finite) if finite else math.inf


def _run_one(job: _Job, index: int) -> dict[str, Any]:
    """Simulate, fit and rank simulation ``index``; a JSON-friendly record."""
    return _fit_and_rank(job, index, *_simulate(job, _seeds(job.key, index)[0]))


def _fit_and_rank(job: _Job, index: int, sim: Trace, redraws: int) -> dict[str, Any]:
    """Fit the simulated data ``sim`` of simulation ``index`` and rank its truths."""
    seeds = _seeds(job.key, index)
    truth = _truth(job, sim)
    fit_args, fit_kwargs = _with_data(job, sim)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        post = job.runner(job.model, fit_args, fit_kwargs, job.engine, seeds[1])
    wall = time.perf_counter() - start
    draws = _posterior_draws(job, post)
    rng = np.random.default_rng(seeds[2])
    keep = _kept(job, draws, post, rng)
    ranks, fractional = {}, {}
    for name, x in draws.items():
        kept = np.ravel(x)[keep]
        if not np.all(np.isfinite(kept)):
            raise RuntimeError(
                f"sbc: simulation {index} (seeds {seeds}): the fit returned non-finite draws "
                f"of {name!r}."
            )
        below, tied = int(np.sum(kept < truth[name])), int(np.sum(kept == truth[name]))
        ranks[name] = below + int(rng.integers(0, tied + 1))
        fractional[name] = (ranks[name] + float(rng.uniform())) / (len(keep) + 1)
    return {
        "index": index,
        "seeds": seeds,
        "num_rank_draws": len(keep),
        "ranks": ranks,
        "fractional_ranks": fractional,
        "truths": truth,
        "wall_time": wall,
        "num_prior_redraws": redraws,
        "warnings": sorted({f"{w.category.__name__}: {w.message}" for w in caught}),
    }
