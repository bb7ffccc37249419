"""The check both backends' optimisers make on their loss trace (NumPy only).

An optimisation whose loss is NaN or infinite at its last step has diverged (too large
a learning rate, most often), and what it fitted is meaningless: the run raises a
``FloatingPointError`` that names the option to change and the step where the loss
became non-finite, instead of returning garbage. Earlier non-finite steps alone are
not an error: NumPyro's ``stable_update`` (and the ensemble's update) skip them, and an
ODE solve that fails now and then gives one. The check reads the loss trace the run
returns anyway, after the run, so it adds nothing to the compiled loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MAP_FIX", "check_final_loss", "learning_rate_fix", "optimisation_failed"]

# ``(what, fix)`` for the MAP estimate that ``init="map"`` starts a run from.
MAP_FIX = (
    "init='map'",
    "start from the prior instead, init='median' or init='sample' (the MAP estimate "
    "runs Adam at learning rate 0.01 from the prior medians)",
)


def learning_rate_fix(engine: Any) -> tuple[str, str]:
    """``(what, fix)`` for the messages below, for a config with a ``learning_rate``."""
    name, rate = type(engine).__name__, engine.learning_rate
    return (
        f"{name}(learning_rate={rate!r})",
        f"lower the learning rate, e.g. {name}(learning_rate={rate / 10:.3g})",
    )


def check_final_loss(losses: Any, what: str, fix: str) -> None:
    """Raise if the optimisation ended at a non-finite loss.

    Args:
        losses: the loss per step, ``(num_steps,)``; or ``(members, num_steps)`` for
            independent optimisations (an ensemble), which fail only if every one of
            them ends non-finite (some alone are the ensemble's warning).
        what: the setting as the user wrote it, e.g. ``"VI(learning_rate=1e+30)"``.
        fix: what to do, e.g. ``"lower the learning rate, e.g. VI(learning_rate=0.001)"``.

    Raises:
        FloatingPointError: naming ``what``, the step (1-based) where the loss became
            non-finite for good (the earliest over members), and ``fix``.

    Example:
        >>> check_final_loss([3.0, 2.0, float("nan")], "VI(learning_rate=10.0)", "lower it")
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FloatingPointError: VI(learning_rate=10.0): the loss became NaN at step 3 of 3 ...
    """
    trace = np.atleast_2d(np.asarray(losses, dtype=float))
    num_steps = trace.shape[-1]
    if num_steps == 0 or np.isfinite(trace[:, -1]).any():
        return
    finite = np.isfinite(trace)
    # per row, the step after its last finite one: where the final non-finite run starts
    starts = np.where(finite.any(axis=1), num_steps - np.argmax(finite[:, ::-1], axis=1), 0)
    step = int(starts.min())
    kind = "NaN" if np.isnan(trace[:, -1]).any() else "infinite"
    when = f"at step {step + 1} of {num_steps}"
    if trace.shape[0] == 1:
        became = f"the loss became {kind} {when} and stayed so to the end"
    else:
        became = f"the losses of all {trace.shape[0]} members became {kind} (the first {when})"
    raise FloatingPointError(
        f"{what}: {became}: the optimisation diverged and its result is meaningless. "
        f"To fix: {fix}; "
        "if that does not help, look in the model for what gives NaN or inf (a scale "
        "that reaches 0, an exp that overflows)."
    )


def optimisation_failed(err: Exception, losses: np.ndarray, step: int, what: str, fix: str) -> None:
    """Raise a ``FloatingPointError`` from ``err``, raised by optimisation step ``step``
    (0-based, after a first step that worked): the optimiser reached parameter values
    the model or guide cannot evaluate (Pyro's validation or a Cholesky factorisation
    fails on them), which is the same divergence as a non-finite loss. ``losses`` is
    the loss trace, of which the steps before ``step`` were filled in."""
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    bad = np.flatnonzero(~np.isfinite(np.asarray(losses[:step], dtype=float)))
    before = f" (the loss was already non-finite at step {bad[0] + 1})" if bad.size else ""
    raise FloatingPointError(
        f"{what}: optimisation step {step + 1} of {len(losses)} failed with "
        f"{type(err).__name__}({first_line!r}) at the parameter values the optimiser "
        f"reached{before}: the optimisation diverged. To fix: {fix}."
    ) from err
