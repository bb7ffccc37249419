"""Checks both backends' runners and ``predict`` make, with their messages written once.

Each backend reads its model's sites with its own PPL (a trace) and hands the names,
values and shapes here; what counts as an error, and what the message says, is the
same on both. A message names the entry point (``fit``, ``predict``, ...) and the
argument as the user wrote it, from the call `probdyn.core.locking.model_call` records.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from probdyn.core.locking import current_verb, is_array, label_of, model_arrays

__all__ = [
    "InputError",
    "InputTypeError",
    "check_array_types",
    "check_ensemble_fittable",
    "check_finite_observed",
    "check_fittable",
    "check_guide_samples",
    "check_has_latent",
    "check_known_sites",
    "check_observed_shapes",
    "check_observed_sites",
    "check_site_names",
    "check_stream_model",
    "check_vi_model",
    "dist_shape",
    "distribution_class_error",
    "explained",
]


class InputError(ValueError):
    """Bad data found by one of these checks; the message names the site or argument
    and the fix (so `explained` passes it on unchanged)."""


class InputTypeError(TypeError):
    """A wrong kind of input (a distribution class for a distribution), named."""


def _head(verb: str, label: str | None) -> str:
    return f"{verb}({label}=...)" if label else verb


# -- observed data --------------------------------------------------------------------------
def check_observed_shapes(sites: Mapping[str, tuple[Any, Sequence[int] | None]]) -> None:
    """Raise if an observation would be broadcast against its distribution.

    A value is scored term by term against a distribution of shape ``batch_shape +
    event_shape``; if that shape is larger than the value's (a ``(10, 1)`` column of
    observations against a ``(10,)`` mean), the PPL broadcasts the value and counts
    every observation many times (100 likelihood terms instead of 10), silently.

    Args:
        sites: observed site name -> (its value, concrete or traced, and its
            distribution's ``batch_shape + event_shape``, None if unknown).

    Raises:
        InputError: naming the site, the argument (where known), both shapes and the
            shape to pass.

    Example:
        >>> check_observed_shapes({"y": (np.ones(10), (10,)), "z": (np.ones(10), ())})
        >>> check_observed_shapes({"y": (np.ones((10, 1)), (10,))})  # doctest: +SKIP
        InputError: fit: observed site 'y' has shape (10, 1) but ... broadcast to (10, 10) ...
    """
    for name, (value, shape) in sites.items():
        if shape is None:
            continue
        value_shape, dist_shape = tuple(np.shape(value)), tuple(shape)
        try:
            full: tuple[int, ...] | None = tuple(np.broadcast_shapes(value_shape, dist_shape))
        except ValueError:
            full = None
        if full == value_shape:
            continue
        label = label_of(value)
        culprits = [k for k, a in model_arrays() if tuple(a.shape) == dist_shape and k != label]
        what = (
            f"the observation would be broadcast to {full} ({math.prod(full)} likelihood terms "
            f"instead of {math.prod(value_shape)})"
            if full is not None
            else "they do not broadcast"
        )
        raise InputError(
            f"{_head(current_verb(), label)}: observed site {name!r} has shape {value_shape} but "
            f"the model's distribution for it has shape {dist_shape}; {what}. Pass "
            f"{label or 'the observations'} with shape {dist_shape}, or fix the inputs that "
            "give the distribution its shape"
            + (f" ({', '.join(culprits)} of shape {dist_shape})." if culprits else ".")
        )


def check_observed_sites(
    sites: Mapping[str, Mapping[str, Any]], values: Mapping[str, np.ndarray], how_to_mask: str
) -> None:
    """`check_observed_shapes` and `check_finite_observed` on a trace's observed sites.

    Args:
        sites: observed site name -> its site (a NumPyro or Pyro trace entry: ``value``,
            ``fn``, ``mask``).
        values: the sites' values as NumPy arrays.
        how_to_mask: see `check_finite_observed`.
    """
    check_observed_shapes({n: (s["value"], dist_shape(s)) for n, s in sites.items()})
    check_finite_observed(values, how_to_mask, {n: _masked(s) for n, s in sites.items()})


def dist_shape(site: Mapping[str, Any]) -> tuple[int, ...] | None:
    """``batch_shape + event_shape`` of a site's distribution; None without one."""
    fn: Any = site.get("fn")
    if not hasattr(fn, "batch_shape") or not hasattr(fn, "event_shape"):
        return None
    return tuple(fn.batch_shape) + tuple(fn.event_shape)


def _masked(site: Mapping[str, Any]) -> bool:
    """Whether a mask handler or a masked distribution (``obs_mask=``) masks the site."""
    fn = site.get("fn")
    while fn is not None and not hasattr(fn, "_mask"):
        fn = getattr(fn, "base_dist", None)
    return site.get("mask") is not None or fn is not None


def check_finite_observed(
    values: Mapping[str, np.ndarray],
    how_to_mask: str,
    masked: Mapping[str, bool] | None = None,
) -> None:
    """Raise if an observed site's values contain NaN or inf.

    A masked-out observation is still the site's value (its log density is computed,
    then zeroed; its gradient can be NaN), so it must be a finite number too: the
    message says to fill such entries with any finite value and keep the mask.

    Args:
        values: observed site name -> its values (NumPy), in trace order.
        how_to_mask: the PPL's way to mask observations, for the message, with
            ``{mask}`` and ``{y}`` where the mask's and the data's names go.
        masked: observed site name -> whether the site is masked (``mask`` handler,
            ``obs_mask=``).

    Raises:
        InputError: naming the first such site (and argument, where known), how many
            values are bad and where the first one is.
    """
    for name, value in values.items():
        bad = ~np.isfinite(value)
        if not bad.any():
            continue
        label = label_of(value)
        y = label or "y"
        where = (
            f"{_head(current_verb(), label)}: observed site {name!r} contains "
            f"{int(bad.sum())} NaN/inf value(s) (first at index "
            f"{tuple(int(i) for i in np.argwhere(bad)[0])})"
        )
        fill = f"{y} = np.where(mask, {y}, 0.0)"
        if (masked or {}).get(name):
            raise InputError(
                f"{where}, and the site is masked: a mask leaves the values in place, so masked "
                f"observations must still be finite numbers. Keep the mask and fill the masked "
                f"entries with any finite value: {fill}."
            )
        raise InputError(
            f"{where}. Drop those observations, or mask them and fill them with any finite "
            f"value: mask = np.isfinite({y}); {fill}; and in the model "
            f"{how_to_mask.format(mask='mask', y=y)}."
        )


def check_has_latent(latent: Sequence[str]) -> None:
    """Raise unless the model has latent sample sites (samplers: NUTS, HMC, SMC).

    Raises:
        ValueError: if ``latent`` is empty.

    Example:
        >>> check_has_latent(["mu"])
        >>> check_has_latent([])
        Traceback (most recent call last):
        ...
        ValueError: fit: the model has no latent sample sites; nothing to infer.
    """
    if not latent:
        raise ValueError("fit: the model has no latent sample sites; nothing to infer.")


def check_fittable(latent: Sequence[str], params: Collection[str]) -> None:
    """Raise unless the model has latent sample sites or ``param`` sites (VI).

    Raises:
        ValueError: if both are empty.
    """
    if not latent and not params:
        raise ValueError("fit: the model has no latent sample sites or params; nothing to fit.")


def check_vi_model(engine: Any, latent: Sequence[str], params: Collection[str], size: int) -> None:
    """Raise unless `VI` has something to fit, and its flow guide enough dimensions.

    Args:
        engine: the `VI` config.
        latent: the model's latent sample sites.
        params: the model's ``param`` sites.
        size: the number of latent elements (unconstrained dimensions).

    Raises:
        ValueError: for a model without latent or ``param`` sites, or
            ``guide="flow"`` on fewer than 2 latent dimensions.
    """
    check_fittable(latent, params)
    if engine.guide == "flow" and size < 2:
        raise ValueError(
            f"VI(guide='flow') needs at least 2 latent dimensions, but the model has {size}; "
            "use guide='normal' (exact for a one-dimensional Gaussian posterior)."
        )


def check_stream_model(
    engine: Any, fields: Sequence[str], latent: Sequence[str], observed: Sequence[str]
) -> None:
    """Raise unless a model trained across a `probdyn.data.TaskStream` can be: it needs an
    observed site, and latent sites (local to each task) need an amortised guide function.

    Args:
        engine: the `VI` config.
        fields: the stream's field names (for the message).
        latent: the model's latent sample sites on one batch.
        observed: its observed sample sites.

    Raises:
        ValueError: naming what is missing.
    """
    if not observed:
        raise ValueError(
            f"fit: with a TaskStream the model needs an observed site (got none for the "
            f"fields {fields}); pass the targets' field as obs=."
        )
    if latent and not callable(engine.guide):
        raise ValueError(
            f"VI(guide={engine.guide!r}) with a TaskStream: the latent site(s) {latent} are "
            "local to each task, so they need an amortised guide function, e.g. "
            "VI(guide=latent_np_guide)."
        )


def check_ensemble_fittable(fittable: bool, ppl: str) -> None:
    """Raise unless `Ensemble` members have something to optimise.

    Args:
        fittable: whether the model has latent sample sites or ``param`` sites.
        ppl: ``"numpyro"`` or ``"pyro"``, for the message's advice.

    Raises:
        ValueError: if ``fittable`` is false.
    """
    if not fittable:
        raise ValueError(
            "fit(engine=Ensemble(...)): the model has no latent sample sites or params; "
            f"nothing to fit. Add a {ppl}.sample site without obs= or a {ppl}.param site."
        )


def check_guide_samples(
    guide: Any,
    latent: Sequence[str],
    site_types: Mapping[str, str],
    *,
    who: str = "a custom guide",
) -> list[str]:
    """The guide's own ``param`` sites; raise if it misses a latent site of the model.

    Args:
        guide: the user's guide function (named in the message).
        latent: the model's latent sample sites.
        site_types: site name -> site type (``"sample"``, ``"param"``, ...) of one
            run of the guide.
        who: how the message names a guide (``"a custom guide"`` for `VI`'s
            ``guide=``, ``"a guide"`` for an amortised one on a task stream).

    Raises:
        ValueError: naming the latent sites the guide does not sample.
    """
    missing = [n for n in latent if site_types.get(n) != "sample"]
    if missing:
        raise ValueError(
            f"VI(guide={guide!r}): the guide does not sample the model's latent site(s) "
            f"{missing}; {who} must sample every latent site of the model."
        )
    return [n for n, t in site_types.items() if t == "param"]


def check_site_names(sites: Any) -> None:
    """``predict(sites=...)`` must be a list of site names.

    Raises:
        TypeError: for a single string or a list with a non-string in it.
    """
    if isinstance(sites, str) or not all(isinstance(s, str) for s in sites):
        raise TypeError(f"predict(sites={sites!r}): give a list of site names.")


def check_known_sites(
    sites: Sequence[str], known: Collection[str], available: Sequence[str]
) -> None:
    """Raise if ``predict(sites=...)`` names a site the model does not have.

    Args:
        sites: the requested site names.
        known: every name the model's trace records (a request for one of them passes).
        available: the names the message offers instead (sorted).

    Raises:
        ValueError: naming the unknown sites and the available ones.
    """
    unknown = [s for s in sites if s not in known]
    if unknown:
        raise ValueError(
            f"predict(sites={sites!r}): the model has no site(s) {unknown}; available: {available}."
        )


# -- the model's inputs ---------------------------------------------------------------------
def check_array_types(
    labelled: Sequence[tuple[str, Any]], foreign: Mapping[str, str], ppl: str, convert: str
) -> None:
    """Raise if an argument is an array of another backend's library (a torch tensor
    given to a NumPyro model, a JAX array to a Pyro model).

    Args:
        labelled: the arguments with their labels (`argument_labels`).
        foreign: top-level module of an array type this backend cannot take -> its
            name for the message (``{"torch": "torch.Tensor"}``).
        ppl: the backend's name for the message (``"NumPyro"``).
        convert: how to convert, with ``{x}`` where the argument goes.

    Raises:
        TypeError: naming the first such argument and the conversion.
    """
    for label, value in labelled:
        kind = foreign.get(type(value).__module__.split(".")[0])
        if kind is not None and is_array(value):
            raise TypeError(
                f"{_head(current_verb(), label)}: a {kind} given to a {ppl} model; convert it "
                f"with {convert.format(x=label)}."
            )


def distribution_class_error(err: BaseException, primitives: str) -> InputTypeError | None:
    """A TypeError naming the site, if ``err`` came from a ``sample`` statement that was
    given a distribution class (``sample("w", dist.Normal)``) instead of an instance.

    Args:
        err: the error a model run raised.
        primitives: the module whose ``sample`` function it passed through
            (``"numpyro.primitives"``).

    Returns:
        The clearer error to raise from ``err``, or None if ``err`` is something else.
    """
    found: dict[str, Any] | None = None
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "sample" and frame.f_globals.get("__name__") == primitives:
            found = dict(frame.f_locals)
        tb = tb.tb_next
    fn = (found or {}).get("fn")
    if not isinstance(fn, type):
        return None
    name = (found or {}).get("name")
    return InputTypeError(
        f"{current_verb()}: sample site {name!r} was given the class {fn.__qualname__}, not a "
        f"distribution: give an instance with its parameters, dist.{fn.__qualname__}(...) "
        "(e.g. dist.Normal(0.0, 1.0))."
    )


@contextlib.contextmanager
def explained(
    labelled: Sequence[tuple[str, Any]], fitted: Sequence[tuple[str, Any]] = ()
) -> Iterator[None]:
    """Re-raise a model run's failure as a ValueError naming the arguments that explain
    it: inputs with NaN or inf, or inputs shaped unlike those the model was fitted with
    (``fitted``) past their first, data dimension. Other failures pass unchanged.

    Args:
        labelled: the call's arguments (`argument_labels`).
        fitted: the arguments the model was fitted with, for `Posterior.predict`.
    """
    try:
        yield
    except (InputError, InputTypeError):
        raise
    except Exception as err:
        nan = _non_finite(labelled)
        causes = nan or _shape_mismatches(labelled, fitted)
        if not causes:
            raise
        fix = (
            "Give the model finite inputs: drop or fill those entries (a model that handles "
            "missing inputs itself must keep them out of its distributions)"
            if nan
            else "Give new inputs the shape the model was fitted with past the first (data) "
            "dimension"
        )
        raise ValueError(
            f"{_head(current_verb(), causes[0][0])}: {'; '.join(c for _, c in causes)}, and "
            f"the model failed on it ({type(err).__name__}: {err}). {fix}."
        ) from err


def _non_finite(labelled: Sequence[tuple[str, Any]]) -> list[tuple[str, str]]:
    """(label, description) of each float array argument holding NaN or inf."""
    out = []
    for label, value in labelled:
        try:
            a = np.asarray(value) if is_array(value) else np.zeros(0)
            bad = ~np.isfinite(a) if a.dtype.kind in "fc" else np.zeros(0, bool)
        except Exception:  # a traced or device array that will not convert
            continue
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            out.append((label, f"{label} has {int(bad.sum())} NaN/inf value(s) (first at {first})"))
    return out


def _shape_mismatches(
    labelled: Sequence[tuple[str, Any]], fitted: Sequence[tuple[str, Any]]
) -> list[tuple[str, str]]:
    """(label, description) of each argument shaped unlike at fit past its first dim."""
    before = {lab: tuple(a.shape) for lab, a in fitted if is_array(a)}
    out = []
    for label, value in labelled:
        if is_array(value) and label in before:
            now, then = tuple(value.shape), before[label]
            if len(now) != len(then) or now[1:] != then[1:]:
                out.append(
                    (label, f"{label} has shape {now}, but the model was fitted with {then}")
                )
    return out
