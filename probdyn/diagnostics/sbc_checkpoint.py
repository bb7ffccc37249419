"""The checkpoint file of `probdyn.sbc`: a JSON file of the finished simulations and the
fingerprint of the run they belong to, rewritten atomically after every simulation."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from probdyn.diagnostics.sbc_simulation import _Job

_CHECKPOINT_FORMAT = "probdyn-sbc/1"


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
    """The records saved at ``path`` (none without a file); raises if they belong to
    another run."""
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
    """Write ``records`` and the run's ``fingerprint`` to ``path``."""
    data = {
        "format": _CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "records": [records[i] for i in sorted(records)],
    }
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)  # atomic: an interrupted write never corrupts the file
