"""Streams of task batches: the data of a model trained across many small datasets.

A neural process is not fitted to one dataset but to a distribution of them: every
optimisation step sees a fresh batch of tasks. `TaskStream` is that data source for
`probdyn.fit` with the `probdyn.VI` engine, on either backend::

    post = probdyn.fit(conditional_np_model, gp_task_stream(16), engine=probdyn.VI(...))

NumPy only: the stream yields NumPy arrays and each backend converts them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from probdyn.data._gp_tasks import Kernel, gp_tasks

__all__ = ["TASK_FIELDS", "TaskStream", "context_call", "gp_task_stream", "stream_rng"]

#: The keyword arguments of probdyn's neural-process models, in `GPTaskBatch` layout.
TASK_FIELDS = ("x_context", "y_context", "mask_context", "x_target", "y_target", "mask_target")


@dataclasses.dataclass(frozen=True)
class TaskStream:
    """A source of fresh, equally shaped batches of tasks, for training across datasets.

    Pass one as the only positional data argument of `probdyn.fit` with the `probdyn.VI`
    engine: every optimisation step then draws a new batch and calls the model with the
    batch's ``fields`` as keyword arguments (plus the keyword arguments given to ``fit``).
    The fitted `Posterior` is *amortised*: it holds the fitted params and no draws, and
    `Posterior.predict` runs the model on new tasks (``context=``) instead.

    Attributes:
        sample: ``sample(rng) -> batch`` for a ``numpy.random.Generator``; the batch is a
            mapping or an object with the ``fields`` as attributes (e.g. `GPTaskBatch`).
            Every batch must have the same shapes (pad and mask ragged tasks), so the
            training step compiles once.
        fields: the names of the model's keyword arguments read from each batch.
        count: the field whose True entries count the points the training loss is
            averaged over (the loss trace is then in nats per point); None averages over
            the tasks of the batch (the leading axis).
        description: a short label kept in ``posterior.attrs["stream"]``.

    Example:
        >>> from probdyn.data import gp_tasks
        >>> stream = TaskStream(lambda rng: gp_tasks(4, key=rng), description="4 RBF tasks")
        >>> batch = stream.draw(stream_rng(0))
        >>> sorted(batch) == sorted(TASK_FIELDS), batch["x_target"].shape
        (True, (4, 50, 1))
    """

    sample: Callable[[np.random.Generator], Any]
    fields: tuple[str, ...] = TASK_FIELDS
    count: str | None = "mask_target"
    description: str = ""

    def __post_init__(self) -> None:
        if not callable(self.sample):
            raise TypeError(
                f"TaskStream(sample={self.sample!r}): give a function rng -> batch, e.g. "
                "lambda rng: gp_tasks(16, key=rng)."
            )
        fields = self.fields
        if isinstance(fields, str) or not fields or not all(isinstance(f, str) for f in fields):
            raise TypeError(
                f"TaskStream(fields={fields!r}): give a non-empty tuple of keyword-argument "
                "names, e.g. probdyn.data.TASK_FIELDS."
            )
        object.__setattr__(self, "fields", tuple(fields))
        if self.count is not None and self.count not in self.fields:
            raise ValueError(
                f"TaskStream(count={self.count!r}): must be one of fields {self.fields} or None."
            )

    def draw(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One batch as ``{field: array}``.

        Raises:
            ValueError: if the batch lacks a field or a field has no leading task axis.
        """
        batch = self.sample(rng)
        out = {}
        for field in self.fields:
            get = batch.get if isinstance(batch, Mapping) else lambda f: getattr(batch, f, None)
            value = get(field)
            if value is None:
                raise ValueError(
                    f"TaskStream: the batch from {self.sample!r} has no field {field!r}; "
                    f"every batch needs {self.fields}."
                )
            out[field] = np.asarray(value)
            if out[field].ndim < 1:
                raise ValueError(
                    f"TaskStream: field {field!r} is a scalar; every field needs a leading "
                    "task axis."
                )
        return out

    def draw_many(self, rng: np.random.Generator, num: int) -> dict[str, np.ndarray]:
        """``num`` batches stacked on a new leading axis: ``{field: (num, *batch_shape)}``.

        Raises:
            ValueError: if the batches' shapes differ.
        """
        batches = [self.draw(rng) for _ in range(num)]
        first = batches[0]
        for b in batches[1:]:
            for f in self.fields:
                if b[f].shape != first[f].shape:
                    raise ValueError(
                        f"TaskStream: field {f!r} changed shape from {first[f].shape} to "
                        f"{b[f].shape} between batches; pad every batch to the same shape "
                        "(and mask the padding)."
                    )
        return {f: np.stack([b[f] for b in batches]) for f in self.fields}

    def points(self, batch: Mapping[str, Any]) -> Any:
        """The number the loss of ``batch`` is divided by (see ``count``); array-friendly,
        so a backend can call it on its own arrays inside a compiled step."""
        if self.count is None:
            return batch[self.fields[0]].shape[0]
        m = batch[self.count]
        return (m > 0).sum() if hasattr(m, "sum") else np.sum(np.asarray(m) > 0)

    def describe(self, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A JSON-friendly record for ``posterior.attrs["stream"]``, with the model's
        keyword ``options`` (network sizes) where they are JSON values, so that a loaded
        posterior rebuilds the same network."""
        record: dict[str, Any] = {
            "description": self.description or repr(self.sample),
            "fields": list(self.fields),
            "count": self.count,
        }
        try:
            record["options"] = json.loads(json.dumps(dict(options or {})))
        except TypeError:
            record["options"] = {}
        return record


def stream_rng(seed: Any) -> np.random.Generator:
    """The task stream's generator for a fit's seed: the same int gives the same stream on
    both backends.

    Args:
        seed: a non-negative int, or a sequence of non-negative ints (a backend key's data).

    Example:
        >>> a, b = stream_rng(3), stream_rng(3)
        >>> bool(a.random() == b.random())
        True
    """
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return np.random.default_rng(int(seed))
    return np.random.default_rng([int(v) for v in np.ravel(np.asarray(seed))])


def gp_task_stream(
    batch_size: int = 16,
    *,
    kernel: Kernel = "rbf",
    **options: Any,
) -> TaskStream:
    """A `TaskStream` of `gp_tasks` batches: the standard neural-process training data.

    Args:
        batch_size: tasks per batch (16 in juho-lee/bnp).
        kernel: ``"rbf"``, ``"matern52"`` or ``"periodic"``.
        **options: other `gp_tasks` arguments (``max_context``, ``max_points``, ...).

    Returns:
        A `TaskStream` over `probdyn.data.TASK_FIELDS`, the loss counted per real target
        point.

    Raises:
        ValueError: for options `gp_tasks` refuses (checked on a first batch).

    Example:
        >>> stream = gp_task_stream(8, kernel="matern52")
        >>> stream.draw(stream_rng(0))["y_context"].shape
        (8, 46, 1)
    """
    gp_tasks(batch_size, key=0, kernel=kernel, **options)  # refuse bad options now
    opts = "".join(f", {k}={v!r}" for k, v in options.items())
    return TaskStream(
        lambda rng: gp_tasks(batch_size, key=rng, kernel=kernel, **options),
        description=f"gp_tasks({batch_size}, kernel={kernel!r}{opts})",
    )


def _as_points(name: str, value: Any) -> np.ndarray:
    """``(n,)`` -> ``(1, n, 1)``, ``(n, d)`` -> ``(1, n, d)``, ``(b, n, d)`` unchanged."""
    a = np.asarray(value, dtype=float)
    if a.ndim == 1:
        return a[None, :, None]
    if a.ndim == 2:
        return a[None]
    if a.ndim == 3:
        return a
    raise ValueError(
        f"{name} has shape {a.shape}; give (n,) or (n, dim) for one task, (batch, n, dim) for "
        "a batch of tasks."
    )


def context_call(
    args: tuple[Any, ...], context: Any, fields: Any
) -> tuple[dict[str, np.ndarray], Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]]:
    """The model's task keyword arguments for ``predict(x_target, context=(x_c, y_c))``
    (or ``log_likelihood_at(x_target, y_target, context=...)``), and the function that
    gives the outputs the caller's shape.

    One task (1-D or 2-D arrays) becomes a batch of one, which is removed again from
    every output ``(chain, draw, 1, ...)``; with 1-D ``y_context`` the trailing output
    dimension of per-target sites is removed too, so ``"y"`` is ``(chain, draw, n_t)``.

    Raises:
        ValueError: a posterior not trained on task fields, a malformed context, or
            inconsistent sizes.

    Example:
        >>> kw, squeeze = context_call((np.zeros(7),), (np.ones(3), np.ones(3)), TASK_FIELDS)
        >>> kw["x_context"].shape, kw["mask_context"].shape, kw["x_target"].shape
        ((1, 3, 1), (1, 3), (1, 7, 1))
        >>> squeeze({"y": np.zeros((1, 5, 1, 7, 1))})["y"].shape
        (1, 5, 7)
    """
    need = set(TASK_FIELDS[:4])
    if not need <= set(fields):
        raise ValueError(
            f"predict(context=...): the model was trained on the fields {list(fields)}, not "
            f"the task fields {TASK_FIELDS}; call predict with the model's own keyword "
            "arguments instead."
        )
    if not isinstance(context, (tuple, list)) or len(context) != 2:
        raise ValueError(
            f"context={context!r}: give a pair (x_context, y_context) of the new task's "
            "observed points."
        )
    if len(args) not in (1, 2):
        raise ValueError(
            f"with context=, pass the target inputs (and, for log_likelihood_at, the target "
            f"observations) as positional arguments; got {len(args)} of them."
        )
    x_c, y_c = _as_points("x_context", context[0]), _as_points("y_context", context[1])
    x_t = _as_points("x_target", args[0])
    single = np.ndim(args[0]) <= 2
    if x_c.shape[:2] != y_c.shape[:2] or x_c.shape[0] != x_t.shape[0]:
        raise ValueError(
            f"context x {np.shape(context[0])} and y {np.shape(context[1])} and x_target "
            f"{np.shape(args[0])} disagree in their batch or point counts."
        )
    out = {
        "x_context": x_c,
        "y_context": y_c,
        "mask_context": np.ones(x_c.shape[:2], bool),
        "x_target": x_t,
    }
    if len(args) == 2:
        y_t = _as_points("y_target", args[1])
        if y_t.shape[:2] != x_t.shape[:2]:
            raise ValueError(
                f"y_target {np.shape(args[1])} and x_target {np.shape(args[0])} differ in "
                "their batch or point counts."
            )
        out |= {"y_target": y_t, "mask_target": np.ones(x_t.shape[:2], bool)}
    y_vector = np.ndim(context[1]) == 1
    n_t = x_t.shape[1]

    def squeeze(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = {}
        for name, v in values.items():
            if single and v.ndim >= 3 and v.shape[2] == 1:
                v = v[:, :, 0]
            if y_vector and v.ndim == 5 - single and v.shape[-2:] == (n_t, 1):
                v = v[..., 0]
            res[name] = v
        return res

    return out, squeeze
