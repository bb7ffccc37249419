"""What `probdyn.sbc` needs from a model: one run of it with its sites sorted by role
(`_trace`, on either backend), which arguments carry the observed data
(`_data_args`), and the scalar quantities that get ranked (`_quantities`)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from probdyn.core.backends import get_backend

LOG_LIKELIHOOD = "log_likelihood"


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass
class Trace:
    """One run of the model: site values by role, and what SBC needs from them."""

    observed: dict[str, np.ndarray]
    latent: dict[str, np.ndarray]
    deterministic: dict[str, np.ndarray]
    log_likelihood: float  # of the observed sites, summed (masked entries 0)
    valid: bool  # finite observations and factors (a failed ODE solve is -inf)


def _trace(
    backend: str,
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    seed: int,
    observed: Sequence[str] | None,
) -> Trace:
    """Run the model once (the backend's ``trace_once`` service). ``observed=None``:
    as given (a probe that finds the observed sites); otherwise those sites are
    unconditioned and simulated."""
    return get_backend(backend).service("trace_once")(model, args, kwargs, seed, observed)


def _data_args(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    observed: dict[str, np.ndarray],
    data_arg: int | str | Mapping[str, int | str] | None,
) -> dict[str, int | str]:
    """Observed site -> the argument (position or keyword) its data comes from."""
    sites = list(observed)
    if data_arg is None:
        mapping: dict[str, int | str] = {}
        for site, value in observed.items():
            hits: list[int | str] = [i for i, a in enumerate(args) if _same(a, value)]
            hits += [k for k, a in kwargs.items() if _same(a, value)]
            if len(hits) != 1:
                found = "no argument" if not hits else f"several arguments ({hits})"
                raise ValueError(
                    f"sbc(data_arg=None): the values of observed site {site!r} match {found}. "
                    f"Pass data_arg= naming the argument that carries them (its position in "
                    f"args or its keyword), e.g. data_arg={{{site!r}: 'y'}}."
                )
            mapping[site] = hits[0]
        return mapping
    if isinstance(data_arg, Mapping):
        if sorted(data_arg) != sorted(sites):
            raise ValueError(
                f"sbc(data_arg={dict(data_arg)!r}): give one entry per observed site; the model's "
                f"observed sites are {sites}."
            )
        given = dict(data_arg)
    elif len(sites) != 1:
        raise ValueError(
            f"sbc(data_arg={data_arg!r}): the model has {len(sites)} observed sites {sites}; "
            f"give a mapping {{site: argument}} for each."
        )
    else:
        given = {sites[0]: data_arg}
    mapping = {site: _resolve_arg(model, args, kwargs, where) for site, where in given.items()}
    for site, where in mapping.items():
        value = args[where] if isinstance(where, int) else kwargs[where]
        if not _same(value, observed[site]):
            raise ValueError(
                f"sbc(data_arg={data_arg!r}): observed site {site!r} does not take its value "
                f"from argument {where!r}. SBC passes simulated data back through that argument, "
                "so the model must use it directly as obs= (no transformation)."
            )
    return mapping


def _resolve_arg(
    model: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], where: Any
) -> int | str:
    if _is_int(where):
        if not 0 <= where < len(args):
            raise ValueError(
                f"sbc(data_arg={where!r}): no positional argument {where}; args has "
                f"{len(args)} item(s)."
            )
        return int(where)
    if not isinstance(where, str):
        raise TypeError(f"sbc(data_arg={where!r}): give an int position or a keyword name.")
    if where in kwargs:
        return where
    try:
        names = list(inspect.signature(model).parameters)
    except (TypeError, ValueError):
        names = []
    if where in names and names.index(where) < len(args):
        return names.index(where)
    raise ValueError(
        f"sbc(data_arg={where!r}): the call passes no argument named {where!r}; pass the "
        "observations in args or kwargs, as for probdyn.fit."
    )


def _same(arg: Any, value: np.ndarray) -> bool:
    """Whether an argument holds the observed values (dtype conversion allowed)."""
    if arg is None or isinstance(arg, (str, bytes)):
        return False
    try:
        a = np.asarray(arg)
    except Exception:
        return False
    if a.shape != value.shape or a.dtype == object or a.size == 0:
        return False
    return bool(np.allclose(a, value, rtol=1e-5, atol=1e-8, equal_nan=True))


@dataclasses.dataclass(frozen=True)
class _Quantity:
    name: str
    site: str | None  # None: the log likelihood
    index: int  # flat element index within the site


def _quantities(
    probe: Trace, sites: Sequence[str] | None, log_likelihood: bool
) -> tuple[_Quantity, ...]:
    available = {**probe.latent, **probe.deterministic}
    if sites is None:
        chosen = list(probe.latent)
    elif isinstance(sites, str) or not all(isinstance(s, str) for s in sites):
        raise TypeError(f"sbc(sites={sites!r}): give a list of site names.")
    else:
        chosen = list(sites)
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise ValueError(
            f"sbc(sites={list(chosen)!r}): no latent or deterministic site(s) {unknown}; "
            f"available: {sorted(available)}."
        )
    if log_likelihood and LOG_LIKELIHOOD in chosen:
        raise ValueError(
            f"sbc: a site is named {LOG_LIKELIHOOD!r}, as the log-likelihood quantity is; "
            "pass log_likelihood=False or leave that site out of sites=."
        )
    out = []
    for site in chosen:
        shape = np.shape(available[site])
        for j, idx in enumerate(np.ndindex(*shape)):
            label = site if not shape else f"{site}[{','.join(map(str, idx))}]"
            out.append(_Quantity(label, site, j))
    if log_likelihood:
        out.append(_Quantity(LOG_LIKELIHOOD, None, 0))
    if not out:
        raise ValueError("sbc: nothing to rank; the model has no latent sites (pass sites=).")
    return tuple(out)
