"""The checkpoint file of `probdyn.sbc`: a JSON file of the finished simulations and the
fingerprint of the run they belong to, rewritten atomically after every simulation.

The fingerprint holds a hash of the model's code (`code_sha256`), so that a model
edited under the same name does not resume a run of its old version."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import types
from typing import TYPE_CHECKING, Any

import numpy as np

from probdyn.core.io import atomic_write, check_output_path

if TYPE_CHECKING:
    from probdyn.diagnostics.sbc_simulation import _Job

_CHECKPOINT_FORMAT = "probdyn-sbc/1"
_MAX_DEPTH = 10  # containers nested deeper than this count by their place only


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
        "model_code": code_sha256(job.model),
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
    if path is None:
        return {}
    check_output_path(path, "sbc(checkpoint=...)")  # before the first fit, not after it
    if not os.path.exists(path):
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
    if differ == ["model_code"]:
        raise ValueError(
            f"sbc(checkpoint={str(path)!r}): the checkpoint was written by a different model: "
            f"the code of {current['model']} (or of a function it calls) is not the code that "
            "wrote it, so its simulations would mix truths from two models. To start fresh, "
            "delete the file or pass another checkpoint path."
        )
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

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f)

    # Atomic: an interrupted or failed write leaves the previous checkpoint intact.
    atomic_write(path, write, where="sbc(checkpoint=...)")


def code_sha256(fn: Any) -> str:
    """A hash of what ``fn`` computes: its bytecode, constants and names, and, in turn,
    those of the functions of user code it references (through globals, closures or
    default arguments) and the plain values (numbers, strings, arrays) it reads there.

    Library functions (those of other top-level packages) count by name only, so an
    upgrade of NumPyro does not change the hash; nor do comments, formatting or line
    numbers, which the bytecode does not hold. The bytecode is that of the running
    Python, so another Python version gives another hash.
    """
    digest = hashlib.sha256()
    _hash_callable(fn, digest, set(), _package(fn))
    return digest.hexdigest()


def _package(fn: Any) -> str:
    return (getattr(fn, "__module__", None) or "").split(".")[0]


def _hash_callable(fn: Any, digest: Any, seen: set[int], package: str) -> None:
    if isinstance(fn, functools.partial):
        _hash_callable(fn.func, digest, seen, package)
        _hash_value((fn.args, sorted(fn.keywords.items())), digest, seen, package)
        return
    fn = getattr(fn, "__func__", fn)  # a bound method: its function
    if not isinstance(fn, types.FunctionType):
        # A callable object: the __call__ its class defines or inherits.
        call = next((vars(k)["__call__"] for k in type(fn).__mro__ if "__call__" in vars(k)), None)
        digest.update(f"<{type(fn).__module__}.{type(fn).__qualname__}>".encode())
        if isinstance(call, types.FunctionType):
            _hash_callable(call, digest, seen, package)
        return
    if id(fn) in seen:
        digest.update(b"<seen>")
        return
    seen.add(id(fn))
    digest.update(f"{fn.__module__}.{fn.__qualname__}".encode())
    _hash_code(fn.__code__, digest)
    for value in (fn.__defaults__ or (), *(fn.__kwdefaults__ or {}).values()):
        _hash_value(value, digest, seen, package)
    for cell in fn.__closure__ or ():
        try:
            _hash_value(cell.cell_contents, digest, seen, package)
        except ValueError:  # an empty cell
            digest.update(b"<empty>")
    for name in _global_names(fn.__code__):
        if name in fn.__globals__:
            digest.update(name.encode())
            _hash_value(fn.__globals__[name], digest, seen, package)


def _global_names(code: types.CodeType) -> list[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # nested functions, lambdas, comprehensions
            names.update(_global_names(const))
    return sorted(names)


def _hash_code(code: types.CodeType, digest: Any) -> None:
    digest.update(code.co_code)
    digest.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _hash_code(const, digest)
        elif isinstance(const, frozenset):  # its repr's order varies between processes
            digest.update(repr(sorted(map(repr, const))).encode())
        else:
            digest.update(repr(const).encode())


def _hash_value(value: Any, digest: Any, seen: set[int], package: str, depth: int = 0) -> None:
    """Plain values by content, functions and objects of user code by their code,
    anything else (modules, library functions and classes) by name."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        digest.update(repr(value).encode())
    elif isinstance(value, (tuple, list, dict)) and depth > _MAX_DEPTH:
        digest.update(b"<nested>")  # a container that holds itself, or nearly so
    elif isinstance(value, (tuple, list)):
        digest.update(f"<{type(value).__name__} {len(value)}>".encode())
        for item in value:
            _hash_value(item, digest, seen, package, depth + 1)
    elif isinstance(value, dict):
        digest.update(f"<dict {len(value)}>".encode())
        for key in sorted(value, key=repr):
            _hash_value(key, digest, seen, package, depth + 1)
            _hash_value(value[key], digest, seen, package, depth + 1)
    elif not isinstance(value, type) and hasattr(value, "__array__"):  # NumPy, JAX, torch
        _hash_array(value, digest)
    elif isinstance(value, types.ModuleType):
        digest.update(f"<module {value.__name__}>".encode())
    elif callable(value) and _is_user_code(value, package):
        _hash_callable(value, digest, seen, package)
    else:
        name = getattr(value, "__qualname__", None) or type(value).__qualname__
        module = getattr(value, "__module__", None) or type(value).__module__
        digest.update(f"<{module}.{name}>".encode())


def _hash_array(value: Any, digest: Any) -> None:
    try:
        array = np.asarray(value)
    except Exception:  # e.g. a torch tensor that requires grad
        digest.update(f"<{type(value).__module__}.{type(value).__qualname__}>".encode())
        return
    digest.update(f"{array.dtype}{array.shape}".encode())
    if array.dtype != object:
        digest.update(np.ascontiguousarray(array).tobytes())


def _is_user_code(value: Any, package: str) -> bool:
    """True for callables (not classes) of the model's own top-level package or of
    ``__main__``: the code a user edits, as opposed to the libraries it calls."""
    if isinstance(value, type):
        return False
    target = value.func if isinstance(value, functools.partial) else value
    return _package(getattr(target, "__func__", target)) in (package, "__main__", "")
