"""``probdyn.sbc``: simulation-based calibration of any engine on any backend.

SBC (Talts et al., 2018) checks an engine on a model by fitting data simulated
from the model itself: draw ``theta ~ p(theta)`` and ``y ~ p(y | theta)``, fit
``p(theta | y)`` with the engine, and record the rank of the true ``theta`` among
the posterior draws. If the engine samples the exact posterior, the true value is
one more draw from it, so its rank is uniform on ``0..L`` (``L`` draws). The
ranks are tested for uniformity with the simultaneous ECDF test of Säilynoja,
Bürkner and Vehtari (2022). See ``docs/sbc.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import pickle
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from probdyn.core.backends import backend_names, engine_variant, get_backend, get_runner
from probdyn.core.engines import SMC, VI, AbstractEngine, Ensemble
from probdyn.core.fit import detect_backend
from probdyn.diagnostics.ecdf import _ecdf_counts, _grid_size, _pattern, ecdf_band, ecdf_test
from probdyn.diagnostics.sbc_model import (
    Trace,
    _data_args,
    _is_int,
    _quantities,
    _Quantity,
    _trace,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from probdyn.core.posterior import Posterior

__all__ = ["SBCResult", "sbc"]

_RANK_DRAW_RULES = ("auto", "all", "ess")
# Engines whose draws are independent (VI, ensemble members, SMC particles after
# the final resampling): every draw is kept. Any other engine is thinned to its
# effective sample size, since autocorrelated draws give non-uniform ranks.
_INDEPENDENT_DRAWS = (VI, Ensemble, SMC)
_MAX_PRIOR_REDRAWS = 100
_CHECKPOINT_FORMAT = "probdyn-sbc/1"


# --------------------------------------------------------------------------- result
@dataclasses.dataclass(eq=False)
class SBCResult:
    """Ranks, test results and plots of a simulation-based calibration run.

    Every ranked quantity is a scalar: one element of a latent (or deterministic)
    site, named ``"site"`` or ``"site[i,j]"``, and, unless turned off,
    ``"log_likelihood"`` (the log likelihood of the simulated data).

    Attributes:
        ranks: quantity -> int array ``(num_simulations,)``: the number of kept
            posterior draws below the true value (ties broken at random), in
            ``0..num_rank_draws``.
        num_rank_draws: int array ``(num_simulations,)``: ``L``, the posterior
            draws kept for ranking in each simulation.
        fractional_ranks: quantity -> ``(rank + U) / (L + 1)`` with ``U ~
            Uniform(0, 1)``: exactly ``Uniform(0, 1)`` for a calibrated engine,
            whatever ``L``. The tests and plots use these.
        truths: quantity -> the simulated true values ``(num_simulations,)``.
        p_values: quantity -> p-value of the simultaneous ECDF uniformity test.
        statistics: quantity -> the test statistic: the smallest pointwise
            binomial tail probability of the ECDF (``gamma``; small is bad).
        attrs: metadata: ``engine``, ``backend``, ``model``, ``key``, ``seeds``
            ``(num_simulations, 3)``, ``fit_wall_time`` per simulation,
            ``wall_time``, ``num_prior_redraws``, ``data_arg``, ``rank_draws`` (the
            thinning rule) and ``fit_warnings``: per simulation, the distinct
            warnings its fit raised (recorded, not re-raised, so that one noisy fit
            cannot end a long run; their count is in the repr).

    Example:
        >>> result = probdyn.sbc(model, engine, 100, args=(y,))  # doctest: +SKIP
        >>> result.summary()  # doctest: +SKIP
        >>> result.plot_ecdf().savefig("sbc.png")  # doctest: +SKIP
    """

    ranks: dict[str, np.ndarray]
    num_rank_draws: np.ndarray
    fractional_ranks: dict[str, np.ndarray] = dataclasses.field(repr=False)
    truths: dict[str, np.ndarray] = dataclasses.field(repr=False)
    p_values: dict[str, float]
    statistics: dict[str, float] = dataclasses.field(repr=False)
    attrs: dict[str, Any] = dataclasses.field(repr=False, default_factory=dict)

    def __repr__(self) -> str:
        p_min = min(self.p_values.values(), default=float("nan"))
        warned = sum(map(bool, self.attrs.get("fit_warnings", [])))
        return (
            f"SBCResult(num_simulations={self.num_simulations}, "
            f"quantities={len(self.ranks)}, min_p_value={p_min:.3g}, flagged={self.flagged()}, "
            f"fits_with_warnings={warned})"
        )

    @property
    def num_simulations(self) -> int:
        """Number of simulations (fits)."""
        return len(self.num_rank_draws)

    def flagged(self, alpha: float = 0.01) -> list[str]:
        """Quantities whose ranks fail the uniformity test at family-wise level ``alpha``.

        Bonferroni over the quantities: a quantity is flagged when its p-value is
        below ``alpha / len(p_values)``, so a calibrated engine flags nothing with
        probability at least ``1 - alpha``.
        """
        _check_level("flagged", "alpha", alpha)
        cut = alpha / max(len(self.p_values), 1)
        return [name for name, p in self.p_values.items() if p < cut]

    def summary(self, alpha: float = 0.01) -> Any:
        """One row per quantity: rank moments, both tests, and the pattern of a failure.

        Columns: ``mean_rank`` and ``sd_rank`` (of the fractional ranks; 0.5 and
        ``1/sqrt(12) = 0.289`` when calibrated), ``gamma`` and ``p_value`` (the
        simultaneous ECDF test), ``chi2`` and ``chi2_p_value`` (Pearson's test on a
        histogram of ``max(2, min(20, n // 5))`` equal bins), and ``pattern`` for
        the quantities `flagged` at ``alpha``: ``"too narrow"`` (ranks pile up at
        both ends), ``"too wide"`` (ranks pile up in the middle), or ``"biased
        low"`` / ``"biased high"`` (the posterior sits below / above the truth),
        whichever of the mean and the variance of the ranks departs more from
        uniform, in standard errors; ``"other (see plot_ecdf)"`` when neither
        departs by 2 standard errors (a local excess of ranks somewhere).

        Returns:
            A ``pandas.DataFrame`` indexed by quantity.
        """
        import pandas as pd
        from scipy import stats

        flagged = set(self.flagged(alpha))
        rows = []
        for name, u in self.fractional_ranks.items():
            n = len(u)
            bins = max(2, min(20, n // 5))
            counts = np.bincount(np.minimum((u * bins).astype(int), bins - 1), minlength=bins)
            chi2 = float(((counts - n / bins) ** 2).sum() / (n / bins))
            rows.append(
                {
                    "quantity": name,
                    "mean_rank": float(u.mean()),
                    "sd_rank": float(u.std()),
                    "gamma": self.statistics[name],
                    "p_value": self.p_values[name],
                    "chi2": chi2,
                    "chi2_p_value": float(stats.chi2.sf(chi2, bins - 1)),
                    "pattern": _pattern(u) if name in flagged else "",
                }
            )
        return pd.DataFrame(rows).set_index("quantity")

    def plot_ranks(
        self, names: Sequence[str] | None = None, *, bins: int | None = None, level: float = 0.99
    ) -> Figure:
        """Rank histograms with the pointwise binomial band of a uniform histogram.

        Each panel bins the fractional ranks into ``bins`` equal bins (default
        ``max(2, min(20, n // 5))``); the grey band holds each bin's count with
        probability ``level`` under uniformity (``Binomial(n, 1 / bins)``).

        Returns:
            A ``matplotlib.figure.Figure`` with one panel per quantity.
        """
        from scipy import stats

        _check_level("plot_ranks", "level", level)
        chosen = self._names(names, "plot_ranks")
        n = self.num_simulations
        bins = max(2, min(20, n // 5)) if bins is None else bins
        if not isinstance(bins, int) or bins < 1:
            raise ValueError(f"plot_ranks(bins={bins!r}): bins must be a positive integer.")
        lo, hi = stats.binom.ppf([(1 - level) / 2, (1 + level) / 2], n, 1 / bins)
        fig, axes = _panels(len(chosen))
        for ax, name in zip(axes, chosen):
            ax.axhspan(lo, hi, color="0.85", label=f"{level:.0%} band")
            ax.axhline(n / bins, color="0.5", lw=1)
            ax.hist(self.fractional_ranks[name], bins=bins, range=(0, 1), color="C0", alpha=0.8)
            ax.set_title(f"{name} (p={self.p_values[name]:.2g})", fontsize=9)
            ax.set_xlabel("fractional rank")
        axes[0].set_ylabel("simulations")
        return fig

    def plot_ecdf(self, names: Sequence[str] | None = None, *, level: float = 0.95) -> Figure:
        """ECDF-difference plots with the simultaneous band of Säilynoja et al. (2022).

        Each panel shows ``ECDF(z) - z`` of the fractional ranks on an even grid
        of ``min(n, 100)`` points. A calibrated engine keeps the whole curve
        inside the band with probability ``level``. A curve above zero on the left
        and below on the right means ranks at both ends (posterior too narrow);
        the opposite, too wide; a curve on one side throughout, a bias.

        Returns:
            A ``matplotlib.figure.Figure`` with one panel per quantity.
        """
        _check_level("plot_ecdf", "level", level)
        chosen = self._names(names, "plot_ecdf")
        n = self.num_simulations
        k = _grid_size(n)
        z = np.arange(k + 1) / k
        lo, hi = ecdf_band(n, k, level)
        fig, axes = _panels(len(chosen))
        for ax, name in zip(axes, chosen):
            counts = _ecdf_counts(self.fractional_ranks[name], k)
            ax.fill_between(z, lo / n - z, hi / n - z, color="0.85", step="mid")
            ax.axhline(0.0, color="0.5", lw=1)
            ax.plot(z, counts / n - z, color="C0", drawstyle="steps-mid")
            ax.set_title(f"{name} (p={self.p_values[name]:.2g})", fontsize=9)
            ax.set_xlabel("fractional rank")
        axes[0].set_ylabel("ECDF difference")
        return fig

    def _names(self, names: Sequence[str] | None, where: str) -> list[str]:
        if names is None:
            return list(self.ranks)
        if isinstance(names, str):
            names = [names]
        unknown = [n for n in names if n not in self.ranks]
        if unknown:
            raise ValueError(
                f"{where}(names={list(names)!r}): no quantities {unknown}; "
                f"available: {list(self.ranks)}."
            )
        return list(names)


# ------------------------------------------------------------------ entry point
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
        checkpoint: a JSON file path. Each finished simulation is written there;
            a rerun with the same path (and the same settings) skips them, and a
            larger ``num_simulations`` extends the run.
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
        ValueError: for bad counts, unknown sites, a model without observed
            sites, observations that cannot be matched to an argument, or a
            checkpoint written by a different run.

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
    if not _is_int(key) or not 0 <= key < 2**63:
        raise TypeError(f"sbc(key={key!r}): key must be a non-negative int seed, e.g. key=0.")
    if not (rank_draws in _RANK_DRAW_RULES or (_is_int(rank_draws) and rank_draws >= 1)):
        raise ValueError(
            f"sbc(num_rank_draws={rank_draws!r}): give a positive int or one of "
            f"{', '.join(repr(r) for r in _RANK_DRAW_RULES)}."
        )


def _check_level(where: str, name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{where}({name}={value!r}): {name} must be in (0, 1).")


def _quiet(engine: AbstractEngine) -> AbstractEngine:
    """The engine with its own progress bar off (one bar for the whole SBC run)."""
    names = {f.name for f in dataclasses.fields(engine)}  # type: ignore[arg-type]
    if "progress_bar" in names:
        return dataclasses.replace(engine, progress_bar=False)  # type: ignore[type-var]
    return engine


def _rank_rule(engine: AbstractEngine, rank_draws: int | str) -> int | str:
    if rank_draws == "auto":
        return "all" if isinstance(engine, _INDEPENDENT_DRAWS) else "ess"
    return int(rank_draws) if _is_int(rank_draws) else rank_draws


# ---------------------------------------------------------------- one simulation
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


# ------------------------------------------------------------- running, resuming
def _run_all(
    job: _Job,
    num_simulations: int,
    checkpoint: str | os.PathLike[str] | None,
    num_workers: int,
    progress_bar: bool,
) -> dict[int, dict[str, Any]]:
    from tqdm.auto import tqdm

    fingerprint = _fingerprint(job)
    records = _load_checkpoint(checkpoint, fingerprint)
    todo = [i for i in range(num_simulations) if i not in records]
    bar = tqdm(
        total=num_simulations,
        initial=num_simulations - len(todo),
        desc="SBC",
        disable=not progress_bar,
    )

    warned = [0]

    def done(record: dict[str, Any]) -> None:
        records[record["index"]] = record
        if checkpoint is not None:
            _save_checkpoint(checkpoint, fingerprint, records)
        warned[0] += bool(record["warnings"])
        if warned[0]:
            bar.set_postfix(fits_with_warnings=warned[0])
        bar.update(1)

    with bar:
        if num_workers == 1 or len(todo) <= 1:
            for i in todo:
                done(_run_one(job, i))
        else:
            _run_parallel(job, todo, num_workers, done)
    return records


def _run_parallel(
    job: _Job, todo: list[int], num_workers: int, done: Callable[[dict[str, Any]], None]
) -> None:
    import concurrent.futures
    import multiprocessing

    try:
        pickle.dumps(job)
    except Exception as err:
        raise TypeError(
            f"sbc(num_workers={num_workers}): the model, engine, runner or arguments cannot be "
            f"sent to worker processes ({err}). Define the model as a top-level function of an "
            "importable module (not a lambda, a closure or a notebook cell), or use num_workers=1."
        ) from err
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=min(num_workers, len(todo)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(_precision(),),
    )

    # Simulations are drawn here, in order, and only the fits go to the workers: the
    # truths and simulated data are then those of a serial run on every backend (a
    # GPU program compiled in another process may differ in the last bit). A few
    # simulations per worker are kept ahead, so that the workers never wait.
    def submit(index: int) -> concurrent.futures.Future[dict[str, Any]]:
        sim, redraws = _simulate(job, _seeds(job.key, index)[0])
        return pool.submit(_fit_and_rank, job, index, sim, redraws)

    queue = iter(todo)
    with pool:
        pending = {submit(i) for i in itertools.islice(queue, 2 * num_workers)}
        while pending:
            finished, pending = concurrent.futures.wait(
                pending, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in finished:
                done(future.result())
                following = next(queue, None)
                if following is not None:
                    pending.add(submit(following))


def _precision() -> dict[str, Any]:
    """The float settings in force here, so that worker processes simulate and fit
    exactly as this one would (read only from backends already imported)."""
    env: dict[str, Any] = {}
    for name in backend_names():
        backend = get_backend(name)
        if backend.loaded():
            env[name] = backend.service("precision")()
    return env


def _init_worker(env: dict[str, Any]) -> None:
    for name, settings in env.items():
        get_backend(name).service("set_precision")(settings)


def _fingerprint(job: _Job) -> dict[str, Any]:
    """What must match for a checkpoint's simulations to belong to this run."""
    import hashlib

    digest = hashlib.sha256()
    for value in (*job.args, *sorted(job.kwargs.items())):
        try:
            digest.update(np.ascontiguousarray(np.asarray(value)).tobytes())
        except Exception:
            digest.update(repr(value).encode())
    engine = {k: v for k, v in job.engine.to_dict().items() if k != "progress_bar"}
    return {
        "model": f"{getattr(job.model, '__module__', '')}.{getattr(job.model, '__qualname__', '')}",
        "engine": engine,
        "backend": job.backend,
        "key": job.key,
        "quantities": [q.name for q in job.quantities],
        "rank_draws": job.rank_draws,
        "data_arg": {k: v for k, v in job.data.items()},
        "arguments_sha256": digest.hexdigest(),
    }


def _load_checkpoint(
    path: str | os.PathLike[str] | None, fingerprint: dict[str, Any]
) -> dict[int, dict[str, Any]]:
    if path is None or not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            saved = json.load(f)
        assert saved["format"] == _CHECKPOINT_FORMAT
        stored = saved["fingerprint"]
        records = {int(r["index"]): r for r in saved["records"]}
    except Exception as err:
        raise ValueError(
            f"sbc(checkpoint={str(path)!r}): the file is not an SBC checkpoint ({err!r}); "
            "delete it or choose another path."
        ) from err
    stored = json.loads(json.dumps(stored))
    current = json.loads(json.dumps(fingerprint))
    differ = [k for k in current if stored.get(k) != current[k]]
    if differ:
        raise ValueError(
            f"sbc(checkpoint={str(path)!r}): the file holds simulations of a different run "
            f"({', '.join(differ)} differ). Delete it, or pass another path to start afresh."
        )
    return records


def _save_checkpoint(
    path: str | os.PathLike[str], fingerprint: dict[str, Any], records: dict[int, dict[str, Any]]
) -> None:
    data = {
        "format": _CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "records": [records[i] for i in sorted(records)],
    }
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)  # atomic: an interrupted write never corrupts the file


def _result(job: _Job, records: list[dict[str, Any]], wall_time: float) -> SBCResult:
    names = [q.name for q in job.quantities]
    fractional = {n: np.array([r["fractional_ranks"][n] for r in records]) for n in names}
    tests = {n: ecdf_test(u) for n, u in fractional.items()}
    warned = [r["warnings"] for r in records]
    return SBCResult(
        ranks={n: np.array([r["ranks"][n] for r in records], dtype=int) for n in names},
        num_rank_draws=np.array([r["num_rank_draws"] for r in records], dtype=int),
        fractional_ranks=fractional,
        truths={n: np.array([r["truths"][n] for r in records]) for n in names},
        p_values={n: t[1] for n, t in tests.items()},
        statistics={n: t[0] for n, t in tests.items()},
        attrs={
            "engine": job.engine.to_dict(),
            "backend": job.backend,
            "model": getattr(job.model, "__name__", repr(job.model)),
            "key": job.key,
            "data_arg": dict(job.data),
            "rank_draws": job.rank_draws,
            "num_simulations": len(records),
            "seeds": np.array([r["seeds"] for r in records], dtype=np.int64),
            "fit_wall_time": np.array([r["wall_time"] for r in records]),
            "wall_time": wall_time,
            "num_prior_redraws": np.array([r["num_prior_redraws"] for r in records], dtype=int),
            "fit_warnings": warned,
            "test": "simultaneous ECDF test (Säilynoja et al. 2022), Monte-Carlo p-value",
        },
    )


def _panels(count: int) -> tuple[Figure, list[Any]]:
    from matplotlib.figure import Figure

    cols = min(4, count)
    rows = -(-count // cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows), layout="constrained")
    axes = list(np.ravel(fig.subplots(rows, cols, squeeze=False)))
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]
