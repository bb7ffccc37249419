"""Conformance checks every (engine, backend) pair must pass."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from probdyn.core.posterior import Posterior

__all__ = ["check_accuracy", "check_arviz", "check_finite", "check_layout", "check_reproducible"]


def check_layout(
    post: Posterior,
    event_shapes: Mapping[str, tuple[int, ...]],
    *,
    num_chains: int | None = None,
    num_draws: int | None = None,
) -> None:
    """Every site is ``(chain, draw, *event)`` with the expected event shape.

    Also checks that sample stats, log likelihood and posterior predictive share
    the ``(chain, draw)`` of the samples.

    Raises:
        AssertionError: on any mismatch.
    """
    lead = (post.num_chains, post.num_draws)
    if num_chains is not None:
        assert post.num_chains == num_chains, (post.num_chains, num_chains)
    if num_draws is not None:
        assert post.num_draws == num_draws, (post.num_draws, num_draws)
    for name, shape in event_shapes.items():
        assert name in post.samples, f"site {name!r} missing from {sorted(post.samples)}"
        assert np.shape(post.samples[name]) == lead + tuple(shape), (
            name,
            np.shape(post.samples[name]),
            lead + tuple(shape),
        )
    for group in (post.sample_stats, post.log_likelihood, post.posterior_predictive):
        for name, value in group.items():
            assert np.shape(value)[:2] == lead, (name, np.shape(value), lead)
    for name, value in post.posterior_predictive.items():
        assert np.shape(value)[2:] == np.shape(post.observed_data[name]), name


def check_finite(post: Posterior) -> None:
    """No NaN or inf in draws, log likelihood or predictive draws."""
    for group in ("samples", "log_likelihood", "posterior_predictive"):
        for name, value in getattr(post, group).items():
            assert np.all(np.isfinite(value)), f"{group}[{name!r}] has non-finite values"


def check_arviz(post: Posterior) -> None:
    """ArviZ conversion has the contract's groups with consistent dims, and
    ``az.summary`` runs on it."""
    from probdyn.core.arviz import import_arviz

    az = import_arviz()
    idata = post.to_arviz()
    groups = set(idata.groups())
    expected = {"posterior", "posterior_predictive", "log_likelihood", "observed_data"}
    if post.sample_stats:
        expected.add("sample_stats")
    assert expected <= groups, (expected, groups)
    for name in post.samples:
        dims = idata.posterior[name].dims
        assert dims[:2] == ("chain", "draw"), (name, dims)
    for name in post.observed_data:
        obs_dims = idata.observed_data[name].dims
        assert idata.posterior_predictive[name].dims[2:] == obs_dims, name
        assert idata.log_likelihood[name].dims[2:] == obs_dims, name
    summary = az.summary(idata, var_names=list(post.attrs.get("latent_sites", post.samples)))
    assert len(summary) > 0


def check_reproducible(fit: Callable[[Any], Posterior]) -> None:
    """``fit(key)`` twice with one key gives identical draws; another key differs."""
    a, b, c = fit(0), fit(0), fit(1)
    for name in a.samples:
        np.testing.assert_array_equal(a.samples[name], b.samples[name])
    assert any(not np.array_equal(a.samples[n], c.samples[n]) for n in a.samples)


def check_accuracy(
    post: Posterior,
    site: str,
    exact_mean: Any,
    exact_sd: Any,
    *,
    num_mcse: float = 4.0,
    check_sd: bool = True,
) -> None:
    """Posterior mean (and sd) of ``site`` agree with the exact values in MC units.

    Mean: ``|mean - exact| <= num_mcse * MCSE`` per element, with ArviZ's MCSE
    (which accounts for autocorrelation; for i.i.d. draws it is ``sd/sqrt(n)``).

    Sd: the Monte-Carlo sd of a sample standard deviation from ``ess``
    effectively independent Gaussian draws is ``sd / sqrt(2 ess)``, so
    ``|sd - exact| <= num_mcse * exact / sqrt(2 ess_bulk)`` per element. For
    ``num_mcse=4`` a correct engine fails a scalar check with probability about
    6e-5.
    """
    from probdyn.core.arviz import import_arviz

    az = import_arviz()
    draws = np.asarray(post.samples[site], dtype=float)
    mean = draws.mean(axis=(0, 1))
    mcse = (
        np.asarray(az.mcse(draws, method="mean"))
        if draws.ndim == 2
        else np.asarray([az.mcse(draws[..., i], method="mean") for i in range(draws.shape[-1])])
    )
    err = np.abs(mean - np.asarray(exact_mean))
    assert np.all(err <= num_mcse * mcse), (
        f"{site}: |mean - exact| = {err} exceeds {num_mcse} x MCSE = {num_mcse * mcse}"
    )
    if not check_sd:
        return
    flat = draws.reshape(draws.shape[0], draws.shape[1], -1)
    ess = np.array([az.ess(flat[..., i], method="bulk") for i in range(flat.shape[-1])])
    sd = draws.std(axis=(0, 1), ddof=1).reshape(-1)
    exact = np.asarray(exact_sd, dtype=float).reshape(-1)
    tol = num_mcse * exact / np.sqrt(2 * ess)
    assert np.all(np.abs(sd - exact) <= tol), (
        f"{site}: sd {sd} vs exact {exact}; tolerance {tol} (ess {ess})"
    )
