"""Saving and loading posteriors as netCDF (via ArviZ/xarray). Never pickle."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from probdyn.core.arviz import dataset, from_inference_data, to_inference_data
from probdyn.core.posterior import Posterior

__all__ = ["load", "save"]

# The ArviZ groups are written by ArviZ; these two extra groups carry what
# ArviZ's schema has no place for (fitted deterministic parameters and engine
# curves such as the ELBO trace).
_EXTRA = {"params": "probdyn_params", "traces": "probdyn_traces"}
_FORMAT = "probdyn-posterior-1"


def save(post: Posterior, path: str | os.PathLike[str]) -> None:
    """Write ``post`` to ``path`` (netCDF4/HDF5). Overwrites an existing file."""
    path = os.fspath(path)
    idata = to_inference_data(post)
    idata[idata.groups()[0]].attrs["probdyn_format"] = _FORMAT
    if os.path.exists(path):
        os.remove(path)
    idata.to_netcdf(path, engine="h5netcdf")
    for field, group in _EXTRA.items():
        values = getattr(post, field)
        if values:
            dataset(values).to_netcdf(path, mode="a", group=group, engine="h5netcdf")


def load(path: str | os.PathLike[str], *, model: Callable[..., Any] | None = None) -> Posterior:
    """Read a posterior written by `Posterior.save`.

    Args:
        path: the file.
        model: optionally, the model function, so that `Posterior.predict` works.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if ``path`` is not a probdyn posterior file (corrupt, truncated,
            or another format).

    Example:
        >>> post = probdyn.load("posterior.nc", model=model)  # doctest: +SKIP
    """
    from probdyn.core.arviz import import_arviz

    az = import_arviz()
    import xarray as xr

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"probdyn.load(path={path!r}): no such file.")
    try:
        idata = az.from_netcdf(path, engine="h5netcdf")
        first = idata[idata.groups()[0]]
        if first.attrs.get("probdyn_format") != _FORMAT:
            raise ValueError("missing probdyn_format attribute")
        first.attrs.pop("probdyn_format")
        kwargs = from_inference_data(idata)
        for field, group in _EXTRA.items():
            kwargs[field] = _read_group(xr, path, group)
    except Exception as err:  # any failure to parse means: not our file
        raise ValueError(
            f"probdyn.load(path={path!r}): not a readable probdyn posterior file ({err}). "
            "Pass a file written by Posterior.save."
        ) from err
    return Posterior(model=model, **kwargs)


def _read_group(xr: Any, path: str, group: str) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        if group not in f:
            return {}
    with xr.open_dataset(path, group=group, engine="h5netcdf") as ds:
        return {n: ds[n].values for n in ds.data_vars}
