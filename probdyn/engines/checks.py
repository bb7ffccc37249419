"""Checks both backends' runners and ``predict`` make, with their messages written once.

Each backend reads its model's sites with its own PPL (a trace) and hands the names
here; what counts as an error, and what the message says, is the same on both.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "check_ensemble_fittable",
    "check_finite_observed",
    "check_fittable",
    "check_guide_samples",
    "check_has_latent",
    "check_known_sites",
    "check_site_names",
    "check_stream_model",
    "check_vi_model",
]


def check_finite_observed(values: Mapping[str, np.ndarray], how_to_mask: str) -> None:
    """Raise if an observed site's values contain NaN or inf.

    Args:
        values: observed site name -> its values (NumPy), in trace order.
        how_to_mask: the PPL's ways to mask observations, for the message.

    Raises:
        ValueError: naming the first such site, how many values are bad and where
            the first one is.
    """
    for name, value in values.items():
        bad = ~np.isfinite(value)
        if bad.any():
            raise ValueError(
                f"observed site {name!r} contains {int(bad.sum())} NaN/inf value(s) (first at "
                f"index {tuple(int(i) for i in np.argwhere(bad)[0])}). Drop those observations, "
                f"or mask them ({how_to_mask})."
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
