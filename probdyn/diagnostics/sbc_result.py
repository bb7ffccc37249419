"""`SBCResult`, what `probdyn.sbc` returns: the ranks of every quantity, their
uniformity tests and summary, and the records of the simulations it is built from
(`_result`). Its plots are drawn by `probdyn.diagnostics.sbc_plot`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from probdyn.diagnostics.ecdf import _pattern, ecdf_test

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from probdyn.diagnostics.sbc_simulation import _Job


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
        from probdyn.diagnostics.sbc_plot import _plot_ranks

        return _plot_ranks(self, names, bins=bins, level=level)

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
        from probdyn.diagnostics.sbc_plot import _plot_ecdf

        return _plot_ecdf(self, names, level=level)

    def _names(self, names: Sequence[str] | None, where: str) -> list[str]:
        """The quantities ``names`` selects (all for None), checked; ``where`` names the caller."""
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


def _check_level(where: str, name: str, value: Any) -> None:
    """Raise unless ``value`` (the argument ``name`` of ``where``) is a number in (0, 1)."""
    if not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{where}({name}={value!r}): {name} must be in (0, 1).")


def _result(job: _Job, records: list[dict[str, Any]], wall_time: float) -> SBCResult:
    """The `SBCResult` of the records of a run, in simulation order, and its wall time."""
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
