"""Saving and loading posteriors as netCDF (via ArviZ/xarray). Never pickle.

Every file probdyn writes goes through `atomic_write`: the content is written to a
temporary file beside the target and renamed onto it, so a failed or interrupted
write leaves the previous file as it was, and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from probdyn.core.arviz import dataset, from_inference_data, to_inference_data
from probdyn.core.posterior import Posterior

__all__ = ["atomic_write", "check_output_path", "load", "save", "write_output"]

# The ArviZ groups are written by ArviZ; these two extra groups carry what
# ArviZ's schema has no place for (fitted deterministic parameters and engine
# curves such as the ELBO trace).
_EXTRA = {"params": "probdyn_params", "traces": "probdyn_traces"}
_FORMAT = "probdyn-posterior-1"
# Names HDF5 cannot hold ('/' separates groups, '\0' ends a name, '.' is the group
# itself) are written escaped; this attribute maps each escaped name back.
_NAMES = "probdyn_names"
_GROUP_FIELDS = (
    "samples",
    "sample_stats",
    "posterior_predictive",
    "log_likelihood",
    "observed_data",
    "params",
    "traces",
)


def check_output_path(path: str | os.PathLike[str], where: str) -> str:
    """``path`` as a string, after checking that a file can be written there.

    Args:
        path: the file to write.
        where: how the caller names the argument in errors, e.g.
            ``"Posterior.save(path=...)"``; ``...`` is replaced by ``repr(path)``.

    Raises:
        FileNotFoundError: if the directory of ``path`` does not exist.
        IsADirectoryError: if ``path`` is a directory.
    """
    path = os.fspath(path)
    label = where.replace("...", repr(path))
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"{label}: the directory {directory!r} does not exist. Create it first "
            f"(os.makedirs({directory!r}, exist_ok=True)) or choose another path."
        )
    if os.path.isdir(path):
        raise IsADirectoryError(f"{label}: {path!r} is a directory; give a file name in it.")
    return path


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], Any], *, where: str) -> None:
    """Call ``write(tmp)`` for a new temporary file beside ``path``, then rename it
    onto ``path`` (atomic on POSIX and Windows).

    The temporary name ends with the name of ``path``, so that writers that read the
    format from the extension (``savefig``, ``to_csv`` with compression) see it. If
    ``write`` raises (or the process is interrupted), the temporary file is removed
    and an existing file at ``path`` is left as it was.

    Args:
        path: the file to write.
        write: writes the whole content to the path it is given.
        where: names the argument in errors, as in `check_output_path`.

    Raises:
        FileNotFoundError, IsADirectoryError: see `check_output_path`; and whatever
            ``write`` raises.
    """
    path = check_output_path(path, where)
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex[:12]}-{name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_output(target: Any, write: Callable[[Any], Any], where: str) -> None:
    """``write(target)``: through `atomic_write` when ``target`` is a file name, directly
    when it is an open file or buffer."""
    if isinstance(target, (str, os.PathLike)):
        atomic_write(target, write, where=where)
    else:
        write(target)


def save(post: Posterior, path: str | os.PathLike[str]) -> None:
    """Write ``post`` to ``path`` (netCDF4/HDF5), replacing an existing file atomically.

    Raises:
        FileNotFoundError: if the directory of ``path`` does not exist.
        IsADirectoryError: if ``path`` is a directory.
    """
    escaped, names = _escaped(post)
    idata = to_inference_data(escaped)
    first = idata[idata.groups()[0]]
    first.attrs["probdyn_format"] = _FORMAT
    if names:
        first.attrs[_NAMES] = json.dumps(names)

    def write(tmp: str) -> None:
        idata.to_netcdf(tmp, engine="h5netcdf")
        for field, group in _EXTRA.items():
            values = getattr(escaped, field)
            if values:
                dataset(values).to_netcdf(tmp, mode="a", group=group, engine="h5netcdf")

    atomic_write(path, write, where="Posterior.save(path=...)")


def _escape(name: str) -> str:
    if name == "":
        return "%"  # never produced below: every '%' there starts a '%xx' escape
    out = name.replace("%", "%25").replace("/", "%2F").replace("\0", "%00")
    return "%2E" if out == "." else out


def _escaped(post: Posterior) -> tuple[Posterior, dict[str, str]]:
    """``post`` with every site and param name HDF5 can store, and the map from the
    escaped names back to the originals (empty when no name needed escaping)."""
    names = {_escape(n): n for field in _GROUP_FIELDS for n in getattr(post, field)}
    names = {k: v for k, v in names.items() if k != v}
    if not names:
        return post, {}
    renamed: dict[str, Any] = {
        field: {_escape(n): v for n, v in getattr(post, field).items()} for field in _GROUP_FIELDS
    }
    return dataclasses.replace(post, **renamed), names


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
        names = json.loads(first.attrs.pop(_NAMES, "{}"))
        kwargs = from_inference_data(idata)
        for field, group in _EXTRA.items():
            kwargs[field] = _read_group(xr, path, group)
        for field in _GROUP_FIELDS:
            if field in kwargs:
                kwargs[field] = {names.get(n, n): v for n, v in kwargs[field].items()}
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
