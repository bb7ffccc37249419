"""MCLMC on the Pyro backend: not available; the sampler is BlackJAX's, on JAX.

Microcanonical Langevin Monte Carlo and its step-size / ``L`` tuner come from
BlackJAX (`probdyn.numpyro.engines.mclmc`), which runs on JAX only. The runner is
registered all the same, so that ``probdyn.fit(..., engine=MCLMC(), backend="pyro")``
says which backend to use instead of only that none exists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from probdyn.core.engines import MCLMC
from probdyn.core.posterior import Posterior

__all__ = ["run_mclmc"]


def run_mclmc(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: MCLMC,
    key: Any,
) -> Posterior:
    """Raise: MCLMC needs JAX.

    Raises:
        NotImplementedError: always, naming the NumPyro backend and the Pyro engines
            that come closest (NUTS, HMC).
    """
    raise NotImplementedError(
        "MCLMC runs on the NumPyro backend only (BlackJAX's sampler, on JAX): write the "
        "model with numpyro (the probdyn.numpyro primitives mirror probdyn.pyro's) and fit "
        "it with backend='numpyro', or use NUTS or HMC on the Pyro backend."
    )


# Read by `probdyn.fit`: an engine this backend cannot run raises before any
# ensemble start is fitted for it.
run_mclmc.unavailable = True  # type: ignore[attr-defined]
