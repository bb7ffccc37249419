"""A Pyro model as log densities of one flat unconstrained vector (`FlatModel`).

The Pyro twin of `probdyn.numpyro.logdensity`: the ensemble, tempered-SMC and
Feynman–Kac SMC runners all see a model through this one class, which gives, per
vector, the log prior, the log-Jacobian and the log likelihood (the tempered part),
evaluated for many vectors at once with ``torch.func.vmap`` where the model allows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from torch.distributions import biject_to, constraints

from probdyn.pyro.bridge import (
    is_deterministic,
    is_plate,
    latent_sites,
)

__all__ = ["FlatModel", "quiet_validation", "site_log_prob"]


@dataclasses.dataclass(frozen=True)
class _Block:
    """Where one site lives in the flat vector, and how to constrain it."""

    name: str
    is_param: bool
    transform: Any  # torch Transform: unconstrained -> constrained
    shape: tuple[int, ...]  # constrained
    ushape: tuple[int, ...]  # unconstrained
    start: int
    stop: int


class FlatModel:
    """A Pyro model as a function of one flat unconstrained vector per draw.

    The vector is the concatenation of the latent sites' unconstrained values
    (and, with ``include_params``, the ``param`` sites'), in trace order.
    `terms` gives, for one vector, ``[log prior, log|det J|, log likelihood]``:
    the prior sums the latent sites' log densities in constrained space, the
    likelihood the observed and ``factor`` sites' (scaled and masked as Pyro does).
    `evaluate` does it for a batch of rows, by ``torch.func.vmap`` when the model
    allows it (`choose_batching` decides), else row by row.

    Args:
        model: the Pyro model.
        args, kwargs: its arguments (tensors).
        trace: one trace of the model (`trace_model`), fixing the sites.
        include_params: also put the ``param`` sites in the vector.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        trace: dict[str, Any],
        *,
        include_params: bool,
    ) -> None:
        self.model, self.args, self.kwargs = model, args, kwargs
        names = latent_sites(trace)
        discrete = [n for n in names if trace[n]["fn"].support.is_discrete]
        if discrete:
            raise ValueError(
                f"fit: latent site(s) {discrete} are discrete; Ensemble and SMC move "
                "continuous values only. Marginalise them out of the model (or use NUTS with "
                "enumeration)."
            )
        if include_params:
            names += [n for n, s in trace.items() if s["type"] == "param"]
        blocks, start = [], 0
        for name in names:
            site = trace[name]
            is_param = site["type"] == "param"
            support = (site["kwargs"] or {}).get("constraint") if is_param else None
            transform = biject_to((support or constraints.real) if is_param else site["fn"].support)
            value = site["value"].detach()
            ushape = tuple(transform.inv(value).shape)
            size = int(np.prod(ushape, dtype=np.int64))
            blocks.append(
                _Block(name, is_param, transform, tuple(value.shape), ushape, start, start + size)
            )
            start += size
        self.blocks: tuple[_Block, ...] = tuple(blocks)
        self.dim = start
        self.latent = [b.name for b in self.blocks if not b.is_param]
        self.batched = False

    def constrain(
        self, flat: torch.Tensor, shift: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Rows ``(..., D)`` -> constrained values ``(..., *shape)`` per site and the
        summed ``log|det J|`` ``(...)`` of the latent sites. With ``shift``, the values
        of ``flat - shift`` instead (and no Jacobian)."""
        lead = tuple(flat.shape[:-1])
        values, logdet = {}, flat.new_zeros(lead)
        for b in self.blocks:
            u = flat[..., b.start : b.stop].reshape(lead + b.ushape)
            if shift is not None:
                u = u - shift[..., b.start : b.stop].reshape(lead + b.ushape)
            z = b.transform(u)
            values[b.name] = z
            if shift is None and not b.is_param:
                ladj = b.transform.log_abs_det_jacobian(u, z)
                logdet = logdet + ladj.reshape((*lead, -1)).sum(-1)
        return values, logdet

    def unconstrain(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Constrained values ``(..., *shape)`` per site -> rows ``(..., D)``."""
        parts = []
        for b in self.blocks:
            v = torch.as_tensor(values[b.name])
            lead = tuple(v.shape[: v.dim() - len(b.shape)])
            parts.append(b.transform.inv(v).reshape((*lead, -1)))
        return torch.cat(parts, dim=-1)

    def terms(
        self,
        flat: torch.Tensor,
        shift: torch.Tensor | None = None,
        jitter: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``[log prior, log|det J|, log likelihood]`` of one row ``(D,)``.

        ``shift`` (``(D,)``, unconstrained) evaluates each latent site's prior
        density at ``z(u - shift)`` instead of ``z(u)``; ``jitter`` adds noise to
        named observations before their likelihood is evaluated (anchored ensembles).
        """
        values, logdet = self.constrain(flat)
        shifted = values if shift is None else self.constrain(flat, shift)[0]
        run = poutine.condition(self.model, data={n: values[n] for n in self.latent})
        params = {b.name: values[b.name] for b in self.blocks if b.is_param}
        if params:
            run = poutine.substitute(run, data=params)
        nodes: dict[str, Any] = dict(poutine.trace(run).get_trace(*self.args, **self.kwargs).nodes)
        prior, lik = flat.new_zeros(()), flat.new_zeros(())
        for name, site in nodes.items():
            if site["type"] != "sample" or is_plate(site) or is_deterministic(site):
                continue
            if name in values:  # a latent site (conditioned, so marked observed)
                prior = prior + site_log_prob(site, shifted[name])
            elif not site["is_observed"]:
                raise ValueError(
                    f"fit: the model drew latent site {name!r}, which its first run did "
                    "not have. Ensemble and SMC need a fixed set of sites."
                )
            else:
                obs = site["value"]
                if jitter is not None and name in jitter:
                    obs = obs + jitter[name]
                lik = lik + site_log_prob(site, obs)
        return torch.stack([prior, logdet, lik])

    def evaluate(
        self,
        flat: torch.Tensor,
        shift: torch.Tensor | None = None,
        jitter: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`terms` of every row of ``flat`` ``(K, D)`` -> ``(K, 3)``; ``shift`` and
        ``jitter`` carry the same leading ``K``."""
        with quiet_validation():
            if self.batched:
                dims = (0, None if shift is None else 0, None if jitter is None else 0)
                fn = torch.func.vmap(self.terms, in_dims=dims, randomness="same")
                return fn(flat, shift, jitter)  # type: ignore[no-any-return]
            return torch.stack(
                [self.terms(*_row(k, flat, shift, jitter)) for k in range(len(flat))]
            )

    def choose_batching(
        self,
        flat: torch.Tensor,
        shift: torch.Tensor | None = None,
        jitter: dict[str, torch.Tensor] | None = None,
    ) -> bool:
        """Try the vmapped evaluation on these rows; keep it if it runs without an
        error or warning and matches the row-by-row values of the first and last
        rows. Sets and returns ``self.batched``."""
        self.batched = False
        with torch.no_grad():
            rows = [0, len(flat) - 1]
            ref = torch.stack([self.terms(*_row(k, flat, shift, jitter)) for k in rows])
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    self.batched = True
                    out = self.evaluate(flat, shift, jitter)
                ok = tuple(out.shape) == (len(flat), 3) and _same(out[rows], ref)
            except Exception:
                ok = False
        self.batched = bool(ok)
        return self.batched


def _row(
    k: int, flat: torch.Tensor, shift: torch.Tensor | None, jitter: dict[str, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None]:
    return (
        flat[k],
        None if shift is None else shift[k],
        None if jitter is None else {n: v[k] for n, v in jitter.items()},
    )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-6, atol=1e-8, equal_nan=True))


def site_log_prob(site: dict[str, Any], value: torch.Tensor) -> torch.Tensor:
    lp = site["fn"].log_prob(value, *site["args"], **site["kwargs"])
    return scale_and_mask(lp, site["scale"], site["mask"]).sum()


@contextlib.contextmanager
def quiet_validation() -> Iterator[None]:
    # Distribution argument checks branch on tensor values, which vmap cannot do;
    # the values evaluated here are constrained by construction and the observed
    # ones were checked when the model was first traced.
    with pyro.validation_enabled(False):
        yield
