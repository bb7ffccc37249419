"""Checkpoint and resume of a VI fit: ``probdyn.VI(checkpoint="run.ckpt", checkpoint_every=1000)``.

The backend-neutral half: the fingerprint that says which run a checkpoint belongs to, the
file format, and when to write. Each VI runner (plain and `TaskStream`, on both backends)
hands over its state as a tree of arrays (dicts, lists, tuples, plain numbers and
strings); the file is written atomically (`probdyn.core.io.atomic_write`), so an
interrupted write leaves the previous checkpoint intact.

The file is an uncompressed ``.npz`` archive: one JSON header (format, fingerprint, step,
``num_steps`` of the run that wrote it, the shape of the state tree) and one array per
leaf, read back with ``allow_pickle=False``: never pickle.

A checkpoint belongs to a run when its fingerprint matches: the backend, the model's code
(`probdyn.diagnostics.sbc_checkpoint.code_sha256`, as SBC's checkpoint uses; for a custom
guide its code too), every engine setting but ``num_steps``, ``num_draws``,
``progress_bar`` and the checkpoint settings, the key, and the data arguments (for a
`TaskStream` the code of its ``sample`` function, its fields and count). Anything else
is refused with a ``ValueError`` that names what differs.

Example:
    >>> ckpt = VICheckpoint("run.ckpt", every=100, fingerprint={"backend": "numpyro"})
    >>> [ckpt.due(before, after, 1000) for before, after in [(0, 50), (50, 100), (100, 150)]]
    [False, True, False]
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import types
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from probdyn.core.io import atomic_write, check_output_path
from probdyn.diagnostics.sbc_checkpoint import code_sha256

__all__ = [
    "DeferredInterrupt",
    "VICheckpoint",
    "decode_tree",
    "encode_tree",
    "learning_rate_at",
    "vi_fingerprint",
]

_FORMAT = "probdyn-vi-checkpoint/1"
_WHERE = "VI(checkpoint=...)"
# Settings that may change between a run and its resumption.
_FREE_FIELDS = ("num_steps", "num_draws", "progress_bar", "checkpoint", "checkpoint_every")


def _arguments(*args: Any, **kwargs: Any) -> None:
    """Stands for a fit's data arguments in `vi_fingerprint`'s hash of them."""


def vi_fingerprint(
    *,
    backend: str,
    model: Callable[..., Any],
    engine: Any,
    key: Any,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    """What must match for a checkpoint to continue this fit (JSON values only).

    Args:
        backend: the backend's name.
        model: the model function.
        engine: the `probdyn.VI` config.
        key: a JSON-friendly record of the fit's key (an int, or a list of ints).
        args, kwargs: the fit's data arguments; a `TaskStream` among ``args`` counts by
            the code of its ``sample`` function, its fields and count.

    Example:
        >>> import probdyn
        >>> def model(y=None): ...
        >>> fp = vi_fingerprint(backend="numpyro", model=model, engine=probdyn.VI(),
        ...                     key=0, args=(), kwargs={})
        >>> fp == vi_fingerprint(backend="numpyro", model=model,
        ...                      engine=probdyn.VI(num_steps=10), key=0, args=(), kwargs={})
        True
    """
    settings = {k: v for k, v in engine.to_dict().items() if k not in _FREE_FIELDS}
    if callable(engine.guide):
        settings["guide"] = f"{_name(engine.guide)} (code {code_sha256(engine.guide)[:16]})"
    plain = tuple(_stream_record(a) if hasattr(a, "draw_many") else a for a in args)
    return {
        "backend": backend,
        "model": _name(model),
        "model_code": code_sha256(model),
        # A bound method's object (e.g. a LatentODE's sizes and solver) is no code.
        "model_object": _describe(getattr(model, "__self__", None)),
        "guide_object": _describe(getattr(engine.guide, "__self__", None)),
        "engine": settings,
        "key": key,
        "arguments_sha256": code_sha256(functools.partial(_arguments, *plain, **dict(kwargs))),
    }


def _name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _describe(obj: Any, depth: int = 0) -> Any:
    """A JSON record of an object's settings: plain values as they are, arrays and
    functions by hash, other objects by type and (recursively) attributes."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if depth > 4:
        return type(obj).__qualname__
    if isinstance(obj, (list, tuple)):
        return [_describe(v, depth + 1) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _describe(v, depth + 1) for k, v in obj.items()}
    if hasattr(obj, "__array__") or isinstance(obj, (types.FunctionType, types.MethodType)):
        return code_sha256(functools.partial(_arguments, obj))
    fields = getattr(obj, "__dict__", None)
    if fields is None:
        return type(obj).__qualname__
    return {type(obj).__qualname__: _describe(dict(fields), depth + 1)}


def _stream_record(stream: Any) -> dict[str, Any]:
    return {
        "sample": code_sha256(stream.sample),
        "fields": list(stream.fields),
        "count": stream.count,
    }


def encode_tree(tree: Any) -> tuple[Any, list[np.ndarray]]:
    """A tree of dicts, lists, tuples, plain values and arrays -> (a JSON-friendly
    skeleton, its arrays in order). Dict keys keep their type (an optimiser's state
    dict has int keys); anything with ``__array__`` (NumPy, JAX, a detached torch
    tensor) is an array leaf.

    Example:
        >>> skeleton, arrays = encode_tree({0: (1.5, np.zeros(2))})
        >>> decode_tree(skeleton, arrays)
        {0: (1.5, array([0., 0.]))}
    """
    arrays: list[np.ndarray] = []

    def enc(x: Any) -> Any:
        if x is None or isinstance(x, (bool, int, float, str)):
            return {"v": x}
        if isinstance(x, dict):
            return {"d": [[enc(k), enc(v)] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return {"l" if isinstance(x, list) else "t": [enc(v) for v in x]}
        if hasattr(x, "__array__"):
            arrays.append(np.asarray(x))
            return {"a": len(arrays) - 1}
        raise TypeError(f"{_WHERE}: cannot store a {type(x).__name__} in a checkpoint.")

    return enc(tree), arrays


def decode_tree(
    skeleton: Any, arrays: list[np.ndarray], array: Callable[[np.ndarray], Any] = lambda a: a
) -> Any:
    """The inverse of `encode_tree`; ``array`` converts each array leaf (e.g. to a tensor)."""

    def dec(node: dict[str, Any]) -> Any:
        ((kind, value),) = node.items()
        if kind == "v":
            return value
        if kind == "a":
            return array(arrays[value])
        if kind == "d":
            return {dec(k): dec(v) for k, v in value}
        items = [dec(v) for v in value]
        return items if kind == "l" else tuple(items)

    return dec(skeleton)


class VICheckpoint:
    """The checkpoint file of one VI fit.

    Args:
        path: the file (written atomically, read without pickle).
        every: write after the compiled block (or step) that reaches each multiple of
            ``every`` steps; also at the end of the run and when it is interrupted
            (``KeyboardInterrupt``).
        fingerprint: `vi_fingerprint` of the fit.
    """

    def __init__(self, path: str | os.PathLike[str], every: int, fingerprint: dict[str, Any]):
        self.path = os.fspath(path)
        self.every = every
        self.fingerprint = json.loads(json.dumps(fingerprint))

    def due(self, before: int, after: int, num_steps: int) -> bool:
        """Whether to write after the steps ``before`` to ``after`` (a multiple of
        ``every`` was reached, or the run ended)."""
        return after // self.every > before // self.every or after >= num_steps

    def load(self, num_steps: int) -> dict[str, Any] | None:
        """The saved ``{"step", "num_steps", "losses", "state": (skeleton, arrays),
        "extra"}``, or None without a file.

        Raises:
            ValueError: if the file is not a VI checkpoint, belongs to another run (the
                message names what differs), or is past ``num_steps``.
        """
        check_output_path(self.path, _WHERE)  # before the fit, not after it
        if not os.path.exists(self.path):
            return None
        try:
            with np.load(self.path, allow_pickle=False) as f:
                header = json.loads(str(f["header"]))
                assert header["format"] == _FORMAT, f"format {header.get('format')!r}"
                arrays = [f[f"a{i}"] for i in range(header["num_arrays"])]
                losses = f["losses"]
        except Exception as err:
            raise ValueError(
                f"VI(checkpoint={self.path!r}): the file is not a readable VI checkpoint "
                f"({_unreadable_reason(err)}); delete it or choose another path."
            ) from err
        self._check(header["fingerprint"])
        step = int(header["step"])
        if step > num_steps:
            raise ValueError(
                f"VI(checkpoint={self.path!r}): the checkpoint is at step {step}, past "
                f"num_steps={num_steps}. Give num_steps >= {step} to continue it, or another "
                "path to start afresh."
            )
        return {
            "step": step,
            "num_steps": int(header["num_steps"]),
            "losses": losses,
            "state": (header["state"], arrays),
            "extra": header["extra"],
        }

    def _check(self, stored: dict[str, Any]) -> None:
        current = self.fingerprint
        differ = [k for k in current if stored.get(k) != current[k]]
        if not differ:
            return
        start = f"VI(checkpoint={self.path!r}): the checkpoint belongs to another fit"
        fix = "Delete the file or pass another checkpoint path to start afresh."
        if "engine" in differ:
            old, new = stored.get("engine", {}), current["engine"]
            fields = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fields)
            raise ValueError(
                f"{start}: engine settings differ ({changes}); only num_steps, "
                f"num_draws, progress_bar and the checkpoint settings may change on resuming. {fix}"
            )
        if differ == ["model_code"]:
            raise ValueError(
                f"{start}: the code of {current['model']} (or of a function it calls) is not "
                f"the code that wrote it. {fix}"
            )
        labels = {
            "arguments_sha256": "data arguments",
            "model_code": "model code",
            "model_object": "settings of the model's object",
            "guide_object": "settings of the guide's object",
        }
        names = ", ".join(labels.get(k, k) for k in differ)
        raise ValueError(f"{start} ({names} differ). {fix}")

    def save(
        self, step: int, num_steps: int, losses: np.ndarray, state: Any, extra: Any = None
    ) -> None:
        """Write the fit's ``state`` (a tree for `encode_tree`) after ``step`` steps of
        a run of ``num_steps``, with the loss trace so far and JSON-friendly ``extra``."""
        skeleton, arrays = encode_tree(state)
        header = {
            "format": _FORMAT,
            "fingerprint": self.fingerprint,
            "step": int(step),
            "num_steps": int(num_steps),
            "num_arrays": len(arrays),
            "state": skeleton,
            "extra": extra,
        }
        content: dict[str, Any] = {"header": np.array(json.dumps(header)), "losses": losses}
        content.update({f"a{i}": a for i, a in enumerate(arrays)})

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **content)

        atomic_write(self.path, write, where=_WHERE)


def _unreadable_reason(err: Exception) -> str:
    """Why a checkpoint file could not be read, in words: NumPy's own message for a
    file that is not an ``.npz`` archive suggests ``allow_pickle=True``, which would
    be the wrong fix here."""
    if "pickle" in str(err) or type(err).__name__ == "BadZipFile":
        return "it is not a NumPy .npz archive"
    return repr(err)


def learning_rate_at(engine: Any, step: int) -> float:
    """The learning rate of step ``step`` under the run's schedule,
    ``learning_rate * final_learning_rate_fraction ** (step / num_steps)``.

    Example:
        >>> import probdyn
        >>> learning_rate_at(probdyn.VI(learning_rate=0.1, num_steps=100), 100)
        0.010000000000000002
    """
    frac = engine.final_learning_rate_fraction
    return float(engine.learning_rate * frac ** (step / engine.num_steps))


class DeferredInterrupt:
    """A context in which Ctrl-C (SIGINT) sets ``requested`` instead of raising, so that a
    step-by-step training loop finishes its step, writes its checkpoint and raises
    ``KeyboardInterrupt`` itself: a state caught in the middle of an optimiser step
    (some parameters updated, others not) is never saved. A second Ctrl-C raises at
    once. Outside the main thread, or with ``active=False``, it does nothing.

    Example:
        >>> with DeferredInterrupt() as stop:
        ...     stop.requested
        False
    """

    def __init__(self, active: bool = True) -> None:
        self.active = active and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> DeferredInterrupt:
        if self.active:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __exit__(self, *exc: Any) -> None:
        if self.active and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._previous)
