"""How `probdyn.compare` maps its training and test data onto the model's parameters by
name, and the short forms of arguments its error messages quote."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any


class _Binder:
    """Maps training and test data onto the model's parameters by name."""

    def __init__(self, model: Callable[..., Any], observed_arg: str) -> None:
        try:
            self.signature = inspect.signature(model)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"compare(model={_short(model)}): cannot read the model's signature ({err}); "
                "pass a plain Python model function."
            ) from err
        params = self.signature.parameters
        if observed_arg not in params:
            raise ValueError(
                f"compare(observed_arg={observed_arg!r}): the model takes no argument of that "
                f"name; its arguments are {list(params)}. Name the one that receives the "
                "observations."
            )
        self.observed_arg = observed_arg
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.positional = [n for n, p in params.items() if p.kind in positional]

    def bind_train(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The training arguments by parameter name, defaults filled in; observations required."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"compare: the training arguments do not fit the model: {err}") from err
        bound.apply_defaults()
        if bound.arguments.get(self.observed_arg) is None:
            raise ValueError(
                f"compare: the training data give no observations in the model argument "
                f"{self.observed_arg!r}; pass them as to probdyn.fit, or set observed_arg to "
                "the argument that takes them."
            )
        return dict(bound.arguments)

    def bind_test(self, train: dict[str, Any], inputs: Any, observations: Any) -> dict[str, Any]:
        """The test arguments by name: ``train`` with ``inputs`` and ``observations`` put in."""
        if isinstance(inputs, Mapping):
            given = dict(inputs)
            unknown = sorted(set(given) - set(self.signature.parameters))
            if unknown:
                raise ValueError(
                    f"compare(test=(inputs, ...)): the model takes no argument(s) {unknown}; "
                    f"its arguments are {list(self.signature.parameters)}."
                )
        elif isinstance(inputs, (tuple, list)):
            slots = [n for n in self.positional if n != self.observed_arg]
            if len(inputs) > len(slots):
                raise ValueError(
                    f"compare(test=(inputs, ...)): {len(inputs)} test inputs, but the model has "
                    f"only {len(slots)} positional arguments besides {self.observed_arg!r}: "
                    f"{slots}."
                )
            given = dict(zip(slots, inputs))
        else:
            raise ValueError(
                f"compare(test=({_short(inputs)}, ...)): the test inputs must be a tuple of the "
                "model's positional arguments (without the observations), e.g. (x_test,), or "
                "a dict by argument name."
            )
        if self.observed_arg in given:
            raise ValueError(
                f"compare(test=(inputs, ...)): the inputs set the observed argument "
                f"{self.observed_arg!r}; pass the observations as the second element of test."
            )
        return {**train, **given, self.observed_arg: observations}

    def call_of(self, arguments: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` that call the model with ``arguments``."""
        bound = inspect.BoundArguments(self.signature, dict(arguments))  # type: ignore[arg-type]
        return tuple(bound.args), dict(bound.kwargs)


def _to_numpy(value: Any) -> Any:
    """A torch tensor as a NumPy array; anything else unchanged."""
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return value


def _short(value: Any) -> str:
    """``repr(value)``, cut to 60 characters for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
