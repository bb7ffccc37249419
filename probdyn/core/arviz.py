"""The one module that talks to ArviZ's data structure.

Everything that turns a `Posterior` into ArviZ data, or back, lives here, and goes
through ``arviz.from_dict``. A move to ArviZ 1.x (DataTree) is a change to this
file only.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from probdyn.core.posterior import Posterior

__all__ = ["from_inference_data", "to_inference_data"]

_GROUPS = ("posterior", "sample_stats", "posterior_predictive", "log_likelihood", "observed_data")


_NO_DRAWS = ("observed_data", "constant_data")

_ARVIZ_ATTRS = (
    "created_at",
    "arviz_version",
    "inference_library",
    "inference_library_version",
    "creation_library",
    "creation_library_version",
    "creation_library_language",
)


def _dims(name: str, event_ndim: int) -> list[str]:
    return [f"{name}_dim_{i}" for i in range(event_ndim)]


def _event_dims(groups: dict[str, dict[str, np.ndarray]]) -> dict[str, list[str]]:
    # One dim name per axis of a site, shared by every group in which the site
    # appears: az.loo and az.plot_ppc need observed_data and posterior_predictive
    # to agree.
    dims: dict[str, list[str]] = {}
    for group, data in groups.items():
        lead = 0 if group in _NO_DRAWS else 2
        for name, value in data.items():
            dims.setdefault(name, _dims(name, np.ndim(value) - lead))
    return dims


def import_arviz():  # type: ignore[no-untyped-def]
    """Import ArviZ without its import-time FutureWarning about the 1.x refactor
    (the one-module rule above is how probdyn prepares for that refactor)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")
        import arviz

    return arviz


def to_inference_data(post: Posterior):  # type: ignore[no-untyped-def]
    """Convert a `Posterior` to ``arviz.InferenceData``.

    Metadata (engine, backend, seed, versions, timings) becomes JSON-encoded
    attributes of every group. An amortised posterior has no draws: its fitted params
    become the ``constant_data`` group, so the result is never empty.
    """
    az = import_arviz()

    groups = {
        "posterior": post.samples,
        "sample_stats": post.sample_stats,
        "posterior_predictive": post.posterior_predictive,
        "log_likelihood": post.log_likelihood,
        "observed_data": post.observed_data,
    }
    if not post.samples:
        groups["constant_data"] = post.params
    groups = {k: {n: np.asarray(v) for n, v in g.items()} for k, g in groups.items() if g}
    attrs = {k: json.dumps(v) for k, v in post.attrs.items()}
    idata = az.from_dict(**groups, dims=_event_dims(groups))
    for group in idata.groups():
        idata[group].attrs.update(attrs)
    return idata


def diagnostics_data(post: Posterior):  # type: ignore[no-untyped-def]
    """The posterior draws as ``arviz.InferenceData`` for convergence diagnostics.

    ArviZ's rank-normalised R-hat compares chains and refuses a single one: on a
    one-chain posterior (VI, ensembles, SMC and one-chain NUTS all give one)
    ``az.summary`` logs "Shape validation failed: ... minimum_shape: (chains=2,
    draws=4)" once per variable and reports ``r_hat`` NaN. The check it needs is
    within the chain, so a single chain of at least 8 draws is given to ArviZ as its
    first and second halves (an odd last draw dropped). ArviZ splits every chain
    in two again, so R-hat compares the chain's four quarters: a within-chain
    check of stationarity, as split R-hat is for one chain in Stan; the ESS is
    estimated from the same quarters. Several chains are passed as they are.

    Example:
        >>> import numpy as np
        >>> from probdyn.core.posterior import Posterior
        >>> post = Posterior(samples={"a": np.zeros((1, 9))})
        >>> diagnostics_data(post).posterior["a"].shape
        (2, 4)
    """
    az = import_arviz()
    samples = {n: np.asarray(v) for n, v in post.samples.items()}
    chains, draws = next(iter(samples.values())).shape[:2]
    if chains == 1 and draws >= 8:
        half = draws // 2
        samples = {n: v[:, : 2 * half].reshape((2, half, *v.shape[2:])) for n, v in samples.items()}
    return az.from_dict(posterior=samples, dims=_event_dims({"posterior": samples}))


def from_inference_data(idata: Any) -> dict[str, Any]:
    """Read the groups and metadata back from ``arviz.InferenceData``.

    Returns the keyword arguments of `Posterior` (without ``params``/``traces``,
    which the file layer stores beside the ArviZ groups).
    """
    out: dict[str, Any] = {}
    field = {"posterior": "samples"}
    for group in _GROUPS:
        if group in idata.groups():
            ds = idata[group]
            out[field.get(group, group)] = {n: ds[n].values for n in ds.data_vars}
    out.setdefault("samples", {})  # an amortised posterior has no draws
    attrs = dict(idata[idata.groups()[0]].attrs)
    out["attrs"] = {
        k: json.loads(v) for k, v in attrs.items() if k not in _ARVIZ_ATTRS and isinstance(v, str)
    }
    return out


def dataset(values: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    """A plain ``xarray.Dataset`` of arrays with per-site dim names (no chain/draw)."""
    import xarray as xr

    return xr.Dataset({k: (_dims(k, np.ndim(v)), np.asarray(v)) for k, v in values.items()})
