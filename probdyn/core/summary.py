"""``Posterior.summary``: ArviZ's summary, with large sites folded into one row."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from probdyn.core.posterior import Posterior

_MIN_COLS = ("ess_bulk", "ess_tail")
_MAX_COLS = ("r_hat", "mcse_mean", "mcse_sd")


def summarize(post: Posterior, *, max_elements: int | None = 10, **kwargs: Any):  # type: ignore[no-untyped-def]
    from probdyn.core.arviz import import_arviz

    az = import_arviz()
    import pandas as pd

    if not post.samples:
        raise ValueError(
            "summary: this posterior is amortised (trained on a TaskStream) and has no draws "
            "to summarise; see posterior.traces['loss'], or predict on a task with "
            "posterior.predict(x_target, context=(x_c, y_c))."
        )
    idata = post.to_arviz()
    small = [n for n, v in post.samples.items() if _size(v) <= (max_elements or np.inf)]
    large = [n for n in post.samples if n not in small]
    frames = []
    if small:
        frames.append(az.summary(idata, var_names=small, **kwargs))
    for name in large:
        table = az.summary(idata, var_names=[name], **kwargs)
        row = {}
        for col in table.columns:
            if col in _MIN_COLS:
                row[col] = table[col].min()
            elif col in _MAX_COLS:
                row[col] = table[col].max()
            else:
                row[col] = table[col].mean()
        frames.append(pd.DataFrame([row], index=[f"{name}[{_size(post.samples[name])}]"]))
    return pd.concat(frames) if frames else pd.DataFrame()


def _size(value: np.ndarray) -> int:
    return int(np.prod(np.shape(value)[2:], dtype=int))
