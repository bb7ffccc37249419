"""The networks and Euler–Maruyama steps of the Pyro `LatentSDE`.

The twins of `probdyn.numpyro.primitives.latent_sde_networks` (the same equations and
numbers): the diagonal diffusion, the backwards GRU encoder, and the prior and posterior
Euler–Maruyama schemes, as Python loops over the grid (fine for the small grids of this
model; no compilation). `LatentSDE` builds the networks as param sites and calls these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from probdyn.primitives.latent_sde import G_FLOOR, HALF_LOG_2PI
from probdyn.pyro.primitives.bnn import MLP

__all__ = [
    "ContextEncoder",
    "DiagonalDiffusion",
    "decode",
    "gather",
    "posterior_path",
    "prior_path",
    "softplus",
]


def softplus(x: Tensor) -> Tensor:
    """``log(1 + e^x)`` exactly, as ``jax.nn.softplus`` (torch's ``F.softplus`` returns
    ``x`` above 20)."""
    return torch.logaddexp(x, x.new_zeros(()))


# -- networks -----------------------------------------------------------------------------
@dataclass(frozen=True)
class DiagonalDiffusion:
    """``g_i(z) = floor + (1 - floor) sigmoid(MLP_i(z_i))``: one scalar net per dimension."""

    w1: Tensor  # (L, H)
    b1: Tensor  # (L, H)
    w2: Tensor  # (L, H)
    b2: Tensor  # (L,)

    def __call__(self, z: Tensor) -> Tensor:
        hidden = softplus(z[..., None] * self.w1 + self.b1)
        out = torch.sum(hidden * self.w2, dim=-1) + self.b2
        return G_FLOOR + (1.0 - G_FLOOR) * torch.sigmoid(out)


@dataclass(frozen=True)
class ContextEncoder:
    """A GRU run backwards in time over a batch; heads for ``q(z0)`` and a per-time context.

    The equations of the NumPyro twin's ``ContextEncoder`` (one series there, the
    batch here): input ``(values * mask, mask, t - t0)``; time points with no observed
    entry leave the hidden state unchanged; the state at index ``j`` summarises the
    observations at indices ``>= j``; row ``T`` is the initial zero state.
    """

    w: Tensor  # (n_in + H, 3 H)
    b: Tensor  # (3 H,)
    z0_head: MLP
    context_head: MLP

    def __call__(
        self, times: Tensor, values: Tensor, mask: Tensor, t0: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        hidden = self.b.shape[0] // 3
        observed = torch.any(mask, dim=-1)  # (B, T)
        m = mask.to(values.dtype)
        zero = values.new_zeros(())
        x = torch.cat([torch.where(mask, values, zero), m, (times - t0)[..., None]], dim=-1)
        w_zr, b_zr = self.w[:, : 2 * hidden], self.b[: 2 * hidden]
        w_c, b_c = self.w[:, 2 * hidden :], self.b[2 * hidden :]
        h0 = values.new_zeros((times.shape[0], hidden))
        h = h0
        states: list[Tensor] = []
        for j in range(times.shape[1] - 1, -1, -1):
            xt = x[:, j]
            gates = torch.cat([xt, h], dim=-1) @ w_zr + b_zr
            z, r = torch.sigmoid(gates[:, :hidden]), torch.sigmoid(gates[:, hidden:])
            cand = torch.tanh(torch.cat([xt, r * h], dim=-1) @ w_c + b_c)
            h = torch.where(observed[:, j, None], (1 - z) * h + z * cand, h)
            states.append(h)
        hs = torch.stack(states[::-1], dim=1)  # (B, T, H)
        out = self.z0_head(hs[:, 0])
        half = out.shape[-1] // 2
        context = self.context_head(torch.cat([hs, h0[:, None]], dim=1))
        return out[:, :half], softplus(out[:, half:]) + 1e-4, context


# -- Euler–Maruyama -------------------------------------------------------------------------
def prior_path(
    drift: MLP, diffusion: DiagonalDiffusion, z0: Tensor, h: Tensor, noise: Tensor
) -> Tensor:
    """The prior Euler scheme driven by ``noise`` ``(..., B, S, L)``; path ``(..., B, S+1, L)``."""
    root = torch.sqrt(h)
    z, zs = z0, [z0]
    for k in range(h.shape[0]):
        z = z + drift(z) * h[k] + diffusion(z) * root[k] * noise[..., k, :]
        zs.append(z)
    return torch.stack(zs, dim=-2)


def posterior_path(
    prior_drift: MLP,
    posterior_drift: MLP,
    diffusion: DiagonalDiffusion,
    z0: Tensor,
    h: Tensor,
    eps: Tensor,
    context: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The posterior Euler scheme driven by ``eps`` ``(..., B, S, L)``, context ``(B, S, C)``.

    Returns the path ``(..., B, S + 1, L)``; the equivalent prior noise
    ``e = eps + u sqrt(h)`` ``(..., B, S, L)``; the guide's log density of ``e`` less
    the martingale term, ``(..., B)``; and the path KL ``1/2 sum_k |u_k|^2 h_k``,
    ``(..., B)``.
    """
    root = torch.sqrt(h)
    z, zs, es, us = z0, [z0], [], []
    for k in range(h.shape[0]):
        c = context[:, k].expand(*z.shape[:-1], context.shape[-1])
        fp = prior_drift(z)
        fq = posterior_drift(torch.cat([z, c], dim=-1))
        g = diffusion(z)
        u = (fq - fp) / g
        e = eps[..., k, :]
        z = z + fq * h[k] + g * root[k] * e
        zs.append(z)
        es.append(e + u * root[k])
        us.append(u)
    path = torch.stack(zs, dim=-2)
    u_all = torch.stack(us, dim=-2)
    # log q(e) = log N(eps; 0, I) (unit-triangular change of variables), minus the
    # zero-mean martingale sum_k u_k . eps_k sqrt(h_k) (see the NumPyro module docstring).
    terms = -0.5 * eps**2 - HALF_LOG_2PI - u_all * eps * root[:, None]
    log_q = torch.sum(terms, dim=(-2, -1))
    kl = 0.5 * torch.sum(u_all**2 * h[:, None], dim=(-2, -1))
    return path, torch.stack(es, dim=-2), log_q, kl


def gather(path: Tensor, index: np.ndarray) -> Tensor:
    """``path[..., b, index[b, t], :]`` for ``path`` ``(..., B, N, L)``, ``index`` ``(B, T)``."""
    idx = torch.as_tensor(index, dtype=torch.long, device=path.device)
    shape = (*path.shape[:-2], idx.shape[-1], path.shape[-1])
    return torch.gather(path, -2, idx[..., None].expand(shape))


def decode(decoder: MLP, path: Tensor, idx: np.ndarray, nxt: np.ndarray, w: np.ndarray) -> Tensor:
    """The latent state and decoded mean, concatenated, at fractional grid positions.

    Linear interpolation between grid points, exact at them (weight 0 or 1).
    """
    lo, hi = gather(path, idx), gather(path, nxt)
    weight = torch.as_tensor(w, dtype=path.dtype, device=path.device)[..., None]
    latent = (1.0 - weight) * lo + weight * hi
    return torch.cat([latent, decoder(latent)], dim=-1)
