"""The base class of engine configs, `AbstractEngine`, and the field checks that the
configs' ``_validate`` hooks share; the configs themselves are in `probdyn.core.engines`.

A check raises a ``ValueError`` that names the config, the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, ClassVar


class AbstractEngine:
    """Base class of every engine config.

    Subclasses are frozen dataclasses. Do not override anything but the abstract
    hook ``_validate``. Unknown keyword arguments raise a ``TypeError`` that
    suggests the nearest valid field name.
    """

    name: ClassVar[str] = "engine"

    def __new__(cls, *args: Any, **kwargs: Any) -> AbstractEngine:
        fields = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        for key in kwargs:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise TypeError(
                    f"{cls.__name__} got an unknown option {key!r}.{hint} "
                    f"Valid options: {', '.join(fields)}."
                )
        return super().__new__(cls)

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-friendly dict (``{"engine": name, **fields}``).

        A ``Posterior`` given as ``init`` is recorded by its description, not its data.
        """
        out: dict[str, Any] = {"engine": type(self).__name__}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if not isinstance(value, (int, float, str, bool, type(None))):
                value = repr(value)
            out[f.name] = value
        return out


def _check_positive_int(cls: str, field: str, value: Any, *, allow_zero: bool = False) -> None:
    """Raise unless ``value`` is a positive int (non-negative with ``allow_zero``; no bool)."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{cls}({field}={value!r}): {field} must be {bound} integer.")


def _check_choice(cls: str, field: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(
            f"{cls}({field}={value!r}): unknown {field}; choose one of "
            f"{', '.join(repr(c) for c in choices)}."
        )


def _check_probability(cls: str, field: str, value: Any) -> None:
    """Raise unless ``value`` is a number in (0, 1)."""
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{cls}({field}={value!r}): {field} must be a number in (0, 1).")


def _check_positive_number(cls: str, field: str, value: Any) -> None:
    """Raise unless ``value`` is a positive int or float (a bool is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{cls}({field}={value!r}): {field} must be a positive number.")
