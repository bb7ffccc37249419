"""The base class of engine configs, `AbstractEngine`, and the field checks that the
configs' ``_validate`` hooks share; the configs themselves are in `probdyn.core.engines`.

A check raises a ``ValueError`` that names the config, the field, the value and the fix.
Wherever a field takes an int, a NumPy integer (``np.int64(10)``, a 0-d integer array)
is accepted and stored as a Python int (`as_int`); a bool or a float is not an int.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, ClassVar

import numpy as np

__all__ = ["AbstractEngine", "as_int", "dense_mass_arg"]


def as_int(value: Any) -> int | None:
    """``value`` as a Python int if it is an integer, else None.

    An integer is a Python int, a NumPy integer scalar or a 0-d NumPy integer array;
    a bool (Python or NumPy) is not one, nor is a float with an integral value.

    Example:
        >>> import numpy as np
        >>> as_int(np.int64(10)), as_int(np.array(3)), as_int(True), as_int(2.0)
        (10, 3, None, None)
    """
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return None
    return int(value)


def _plain(value: Any) -> Any:
    """NumPy scalars and 0-d arrays -> the Python bool, int or float they hold;
    anything else unchanged (so a config prints, compares and saves as plain data)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, np.generic) and isinstance(value.item(), (bool, int, float)):
        return value.item()
    return value


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
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            object.__setattr__(self, f.name, _plain(getattr(self, f.name)))
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
    """Raise unless ``value`` is a positive integer (non-negative with ``allow_zero``),
    a NumPy one included (`as_int`; no bool, no float)."""
    number = as_int(value)
    if number is None or not (number >= 0 if allow_zero else number > 0):
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
    """Raise unless ``value`` is a finite positive int or float (a bool is refused):
    an infinite step size or learning rate cannot give a usable run."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and (isinstance(value, int) or math.isfinite(value)) and value > 0):
        raise ValueError(f"{cls}({field}={value!r}): {field} must be a finite positive number.")


_DENSE_MASS_FORMS = (
    "True (one dense mass matrix), False (diagonal) or a list of tuples of latent site "
    "names, each tuple one dense block, e.g. [('a', 'b'), ('c',)]"
)


def _check_dense_mass(cls: str, value: Any) -> bool | tuple[tuple[str, ...], ...]:
    """``dense_mass`` in its stored form: a bool, or a tuple of non-empty tuples of
    distinct site names (the PPLs take a list of tuples, see `dense_mass_arg`).

    Raises:
        TypeError: for any other form, naming the forms accepted.
    """
    if isinstance(value, bool):
        return value
    blocks = value if isinstance(value, (list, tuple)) else None
    ok = blocks is not None and all(
        isinstance(b, tuple) and b and all(isinstance(n, str) for n in b) for b in blocks
    )
    if not ok:
        raise TypeError(f"{cls}(dense_mass={value!r}): give {_DENSE_MASS_FORMS}.")
    names = [n for b in blocks for n in b]  # type: ignore[union-attr]
    if len(set(names)) < len(names):
        raise ValueError(
            f"{cls}(dense_mass={value!r}): a site is named in more than one block; "
            "give each site once."
        )
    return tuple(tuple(b) for b in blocks)  # type: ignore[union-attr]


def dense_mass_arg(engine: Any, latent: list[str]) -> bool | list[tuple[str, ...]]:
    """An MCMC config's ``dense_mass`` as NumPyro and Pyro take it (a bool, or a list
    of tuples of site names), after checking the names against the model's latent sites.

    Raises:
        ValueError: naming a site of ``dense_mass`` that is not a latent site.
    """
    value = engine.dense_mass
    if isinstance(value, bool):
        return value
    unknown = [n for block in value for n in block if n not in latent]
    if unknown:
        raise ValueError(
            f"{type(engine).__name__}(dense_mass={[tuple(b) for b in value]!r}): "
            f"{unknown} {'is not a latent site' if len(unknown) == 1 else 'are not latent sites'}"
            f" of the model; its latent sites are {latent}."
        )
    return [tuple(block) for block in value]
