"""The figure of `Comparison.plot`: every engine's predictive bands at the test
inputs, side by side, over the held-out (and optionally the training) observations."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from probdyn import calibration
from probdyn.core.io import write_output
from probdyn.diagnostics.compare_args import _Binder, _to_numpy

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from probdyn.diagnostics.compare import Comparison


def _plot_bands(
    result: Comparison,
    inputs: Any,
    *,
    x: Any,
    site: str | None,
    levels: Sequence[float],
    key: Any,
    output_names: Sequence[str] | None,
    show_train: bool,
    x_label: str | None = None,
    x_split: float | None = None,
    path: str | os.PathLike[str] | None,
) -> Figure:
    import matplotlib.pyplot as plt

    site = site or result.site
    if inputs is None:
        if site != result.site:
            raise ValueError(
                f"Comparison.plot(site={site!r}): only {result.site!r} was predicted at the "
                "test inputs; pass inputs=... to predict another site."
            )
        arguments, preds = result.test_arguments, dict(result.predictions)
    else:
        arguments, preds = _predict_at(result, inputs, site, key)
    x_name, x_values, default_x_label = _x_axis(result, arguments, preds, x)
    x_label = x_label or default_x_label
    names = list(result.posteriors)
    # Bands of the observed site are of new observations (predictive); of any other
    # site (a latent trajectory), of that quantity (credible).
    kind = "predictive" if _is_observed(result, site) else "credible"
    n_out = _num_outputs(result.observations, preds)
    labels = list(output_names) if output_names is not None else []
    fig, axes = plt.subplots(
        n_out, len(names), squeeze=False, sharex=True, sharey="row",
        figsize=(max(3.2 * len(names) + 1.0, 7.0), 2.4 * n_out + 0.8),
    )  # fmt: skip
    points = _observed_points(result, x_name, x_values if inputs is None else None, show_train)
    for j, name in enumerate(names):
        pred = preds.get(name)
        for i in range(n_out):
            ax = axes[i, j]
            if isinstance(pred, np.ndarray):
                _draw_bands(ax, x_values, pred, i, n_out, levels, kind)
            else:
                message = result.table.loc[name, "error"] if name in result.table.index else ""
                ax.text(0.5, 0.5, _wrap(f"no predictions: {message or pred}"), ha="center",
                        va="center", fontsize=7, transform=ax.transAxes)  # fmt: skip
            for label, (px, py), style in points:
                ax.plot(px, py[:, i], style, ms=4, label=label)
            if x_split is not None:
                ax.axvline(x_split, color="grey", lw=0.8, ls=":", label="end of training data")
            if i == 0:
                ax.set_title(name)
            if j == 0:
                default = f"{site}[{i}]" if n_out > 1 else site
                ax.set_ylabel(labels[i] if i < len(labels) else default)
            if i == n_out - 1:
                ax.set_xlabel(x_label)
    for i in range(n_out):
        _clip_to_data(axes[i, 0], [p[1][:, i] for _, p, _ in points])
    handles, labels_ = axes[0, 0].get_legend_handles_labels()
    # Below the panels: inside one, the legend hides that panel's bands.
    # About 1.45 inches an entry; one row of entries takes about 0.17 inches.
    ncol = max(1, min(len(labels_), int(fig.get_figwidth() // 1.45)))
    rows = -(-len(labels_) // ncol)
    fig.legend(handles, labels_, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    what = f"{kind} intervals of {site!r}" + (" (new observations)" if kind == "predictive" else "")
    fig.suptitle(f"Median and central {what}, by engine", fontsize=10)
    fig.tight_layout(rect=(0, (0.08 + 0.17 * rows) / fig.get_figheight(), 1, 1))
    if path is not None:
        try:
            write_output(
                path, lambda target: fig.savefig(target, dpi=120), "Comparison.plot(path=...)"
            )
        except BaseException:
            plt.close(fig)
            raise
    return fig


def _clip_to_data(ax: Any, values: Sequence[np.ndarray], margin: float = 0.5) -> None:
    """Narrow the (shared) y range of ``ax`` to the observations ``values`` plus
    ``margin`` times their range on each side, where the bands reach further."""
    finite = [v[np.isfinite(v)] for v in values]
    data = np.concatenate(finite) if finite else np.empty(0)
    if data.size < 2 or np.ptp(data) == 0:
        return
    pad = margin * float(np.ptp(data))
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, float(data.min()) - pad), min(high, float(data.max()) + pad))


def _is_observed(result: Comparison, site: str) -> bool:
    """Whether ``site`` is observed in the model (its draws are new observations)."""
    posts = [p for p in result.posteriors.values() if p is not None]
    if posts and any(p.observed_data for p in posts):
        return any(site in p.observed_data for p in posts)
    return site == result.observed_arg


def _predict_at(
    result: Comparison, inputs: Any, site: str, key: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    if result.model is None:
        raise RuntimeError("Comparison.plot(inputs=...): this comparison has no model attached.")
    binder = _Binder(result.model, result.observed_arg)
    arguments = binder.bind_test(result.train_arguments, inputs, None)
    args, kwargs = binder.call_of(arguments)
    preds: dict[str, Any] = {}
    for name, post in result.posteriors.items():
        if post is None:
            continue
        try:
            preds[name] = post.predict(*args, key=key, sites=[site], **kwargs)[site]
        except Exception as err:  # one engine's failure leaves the other panels
            preds[name] = f"{type(err).__name__}: {err}"
    return arguments, preds


def _num_points(preds: Mapping[str, Any]) -> int | None:
    for pred in preds.values():
        if isinstance(pred, np.ndarray) and pred.ndim >= 3:
            return int(pred.shape[2])
    return None


def _num_outputs(observations: np.ndarray, preds: Mapping[str, Any]) -> int:
    for pred in preds.values():
        if isinstance(pred, np.ndarray) and pred.ndim >= 3:
            return int(np.prod(pred.shape[3:], dtype=int))
    return int(np.prod(observations.shape[1:], dtype=int))


def _per_point(value: Any, n: int | None) -> np.ndarray | None:
    """``value`` as one number per point, or None if it is not."""
    if n is None or value is None:
        return None
    try:
        arr = np.asarray(_to_numpy(value), dtype=float)
    except (TypeError, ValueError):
        return None
    if arr.shape == (n,) or arr.shape == (n, 1):
        return arr.reshape(n)
    return None


def _x_axis(
    result: Comparison, arguments: Mapping[str, Any], preds: Mapping[str, Any], x: Any
) -> tuple[str | None, np.ndarray, str]:
    n = _num_points(preds)
    if n is None:
        n = int(result.observations.shape[0]) if result.observations.ndim else 1
    names = [k for k in arguments if k != result.observed_arg]
    found = next((k for k in names if _per_point(arguments[k], n) is not None), None)
    if x is not None:
        values = _per_point(x, n)
        if values is None:
            raise ValueError(
                f"Comparison.plot(x=...): x has shape {np.shape(x)}, but there are {n} points "
                "to plot; give one value per point."
            )
        return found, values, found or "x"
    if found is not None:
        return found, _per_point(arguments[found], n), found  # type: ignore[return-value]
    # No input is one number per point (several features): rank the points by
    # their observed value, which shows calibration as well as any axis would.
    obs = result.observations.reshape(result.observations.shape[0], -1)
    if obs.shape[0] == n:
        rank = np.empty(n)
        rank[np.argsort(obs[:, 0], kind="stable")] = np.arange(n)
        return None, rank, "held-out point (sorted by observed value)"
    return None, np.arange(n, dtype=float), "point"


def _observed_points(
    result: Comparison, x_name: str | None, test_x: np.ndarray | None, show_train: bool
) -> list[tuple[str, tuple[np.ndarray, np.ndarray], str]]:
    out = []
    obs = result.observations
    flat = obs.reshape(obs.shape[0], -1) if obs.ndim else obs.reshape(1, 1)
    tx = test_x if test_x is not None else None
    if tx is None and x_name is not None:
        tx = _per_point(result.test_arguments.get(x_name), flat.shape[0])
    if tx is not None:
        out.append(("held-out observations", (tx, flat), "rx"))
    train_y = result.train_arguments.get(result.observed_arg)
    if show_train and x_name is not None and train_y is not None:
        ty = np.asarray(_to_numpy(train_y), dtype=float)
        ty = ty.reshape(ty.shape[0], -1) if ty.ndim else ty.reshape(1, 1)
        trx = _per_point(result.train_arguments.get(x_name), ty.shape[0])
        if trx is not None and ty.shape[1] == flat.shape[1]:
            out.insert(0, ("training observations", (trx, ty), "ko"))
    return out


def _draw_bands(
    ax: Any,
    x: np.ndarray,
    pred: np.ndarray,
    i: int,
    n_out: int,
    levels: Sequence[float],
    kind: str = "predictive",
) -> None:
    draws = np.asarray(pred, dtype=float).reshape(-1, pred.shape[2], n_out)[..., i]
    order = np.argsort(x, kind="stable")
    for k, level in enumerate(sorted(levels, reverse=True)):
        lo, hi = calibration.interval(draws, level, sample_dims=1)
        alpha = 0.15 + 0.2 * k
        ax.fill_between(x[order], lo[order], hi[order], color="C0", alpha=alpha,
                        lw=0, label=f"{100 * level:g}% {kind} interval")  # fmt: skip
    ax.plot(x[order], np.median(draws, axis=0)[order], color="C0", lw=1, label="median")


def _wrap(text: str, width: int = 40) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:8])
