"""The networks and Euler–Maruyama steps of the NumPyro `LatentSDE`.

The diagonal diffusion, the backwards GRU encoder, and the prior and posterior
Euler–Maruyama schemes (the posterior one also gives the path site's value, its
Girsanov log density and the path KL; see `probdyn.numpyro.primitives.latent_sde`
for the maths). `LatentSDE` builds the networks as param sites and calls these.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from probdyn.numpyro.primitives.bnn import MLP
from probdyn.primitives.latent_sde import G_FLOOR, HALF_LOG_2PI

__all__ = [
    "ContextEncoder",
    "DiagonalDiffusion",
    "decode",
    "encode",
    "posterior_path",
    "prior_path",
]


# -- networks -----------------------------------------------------------------------------
class DiagonalDiffusion(eqx.Module):
    """``g_i(z) = floor + (1 - floor) sigmoid(MLP_i(z_i))``: one scalar net per dimension.

    Each ``g_i`` depends on ``z_i`` only (diagonal noise, as in Li et al. and
    torchsde's latent SDE examples), with one softplus hidden layer.
    """

    w1: Float[Array, "L H"]
    b1: Float[Array, "L H"]
    w2: Float[Array, "L H"]
    b2: Float[Array, " L"]

    def __call__(self, z: Float[Array, "... L"]) -> Float[Array, "... L"]:
        hidden = jax.nn.softplus(z[..., None] * self.w1 + self.b1)
        out = jnp.sum(hidden * self.w2, axis=-1) + self.b2
        return G_FLOOR + (1.0 - G_FLOOR) * jax.nn.sigmoid(out)


class ContextEncoder(eqx.Module):
    """A GRU run backwards in time; heads for ``q(z0)`` and a per-time context.

    Input at each time: ``(values * mask, mask, t - t0)``; time points with no
    observed entry leave the hidden state unchanged. The hidden state at index
    ``j`` summarises the observations at indices ``>= j``; row ``T`` (appended)
    is the initial zero state (no observations left).
    """

    w: Float[Array, "n_in_h three_h"]
    b: Float[Array, " three_h"]
    z0_head: MLP
    context_head: MLP

    def __call__(
        self, times: Float[Array, " T"], values: Float[Array, "T D"], mask: Array, t0: Array
    ) -> tuple[Array, Array, Array]:
        hidden = self.b.shape[0] // 3
        observed = jnp.any(mask, axis=-1)
        m = mask.astype(values.dtype)
        x = jnp.concatenate([jnp.where(mask, values, 0.0), m, (times - t0)[:, None]], axis=-1)

        def step(h: Array, inp: tuple[Array, Array]) -> tuple[Array, Array]:
            xt, seen = inp
            gates = jnp.concatenate([xt, h]) @ self.w[:, : 2 * hidden] + self.b[: 2 * hidden]
            z, r = jax.nn.sigmoid(gates[:hidden]), jax.nn.sigmoid(gates[hidden:])
            cand = jnp.tanh(
                jnp.concatenate([xt, r * h]) @ self.w[:, 2 * hidden :] + self.b[2 * hidden :]
            )
            new = jnp.where(seen, (1 - z) * h + z * cand, h)
            return new, new

        h0 = jnp.zeros(hidden, values.dtype)
        _, hs = jax.lax.scan(step, h0, (x, observed), reverse=True)
        out = self.z0_head(hs[0])
        half = out.shape[-1] // 2
        context = self.context_head(jnp.concatenate([hs, h0[None]]))
        return out[:half], jax.nn.softplus(out[half:]) + 1e-4, context


# -- Euler–Maruyama -------------------------------------------------------------------------
# The numerical parts are filter-jitted: inside SVI's compiled step they are inlined; in
# eager model runs (tracing, NumPyro's initialisation) each is one cached call instead of
# a compile per operation.
@eqx.filter_jit
def prior_path(
    drift: MLP, diffusion: DiagonalDiffusion, z0: Array, h: Array, noise: Array
) -> Array:
    """The prior Euler scheme driven by standard normals ``noise`` ``(B, S, L)``.

    Returns the path on the grid, ``(B, S + 1, L)``.
    """

    def body(z: Array, step: tuple[Array, Array, Array]) -> tuple[Array, Array]:
        hk, root, e = step
        z1 = z + drift(z) * hk + diffusion(z) * root * e
        return z1, z1

    _, zs = jax.lax.scan(body, z0, (h, jnp.sqrt(h), jnp.swapaxes(noise, 0, 1)))
    return jnp.concatenate([z0[:, None], jnp.swapaxes(zs, 0, 1)], axis=1)


@eqx.filter_jit
def posterior_path(
    prior_drift: MLP,
    posterior_drift: MLP,
    diffusion: DiagonalDiffusion,
    z0: Array,
    h: Array,
    eps: Array,
    context: Array,
) -> tuple[Array, Array, Array, Array]:
    """The posterior Euler scheme driven by ``eps`` ``(B, S, L)`` with context ``(B, S, C)``.

    Returns the path ``(B, S + 1, L)``; the equivalent prior noise
    ``e = eps + u sqrt(h)`` ``(B, S, L)``, with ``u = (f_q - f_p) / g``; the guide's
    log density of ``e`` less the martingale term, ``(B,)``; and the path KL
    ``1/2 sum_k |u_k|^2 h_k``, ``(B,)``.
    """

    def body(z: Array, step: tuple[Array, Array, Array, Array]) -> tuple[Array, Any]:
        hk, root, e, c = step
        fp = prior_drift(z)
        fq = posterior_drift(jnp.concatenate([z, c], axis=-1))
        g = diffusion(z)
        u = (fq - fp) / g
        z1 = z + fq * hk + g * root * e
        return z1, (z1, e + u * root, u)

    root = jnp.sqrt(h)
    steps = (h, root, jnp.swapaxes(eps, 0, 1), jnp.swapaxes(context, 0, 1))
    _, (zs, e_prior, u) = jax.lax.scan(body, z0, steps)
    path = jnp.concatenate([z0[:, None], jnp.swapaxes(zs, 0, 1)], axis=1)
    u = jnp.swapaxes(u, 0, 1)
    # log q(e) = log N(eps; 0, I) (unit-triangular change of variables), minus the
    # zero-mean martingale sum_k u_k . eps_k sqrt(h_k) (see the module docstring).
    log_q = jnp.sum(-0.5 * eps**2 - HALF_LOG_2PI - u * eps * root[:, None], axis=(1, 2))
    kl = 0.5 * jnp.sum(u**2 * h[:, None], axis=(1, 2))
    return path, jnp.swapaxes(e_prior, 0, 1), log_q, kl


@eqx.filter_jit
def encode(
    encoder: ContextEncoder,
    times: Array,
    values: Array,
    mask: Array,
    t0: Array,
    context_index: Array,
) -> tuple[Array, Array, Array]:
    """``q(z0)``'s loc and scale ``(B, L)`` and the context of every step ``(B, S, C)``."""
    loc, scale, context = jax.vmap(encoder, in_axes=(0, 0, 0, None))(times, values, mask, t0)
    return loc, scale, jnp.take_along_axis(context, context_index[..., None], axis=1)


@eqx.filter_jit
def decode(decoder: MLP, path: Array, idx: ArrayLike, nxt: ArrayLike, w: ArrayLike) -> Array:
    """The decoded ``path`` ``(B, N, L)`` at fractional grid positions ``(B, T)``.

    Linear interpolation between grid points, exact at them (weight 0 or 1).
    """
    lo = jnp.take_along_axis(path, jnp.asarray(idx)[..., None], axis=1)
    hi = jnp.take_along_axis(path, jnp.asarray(nxt)[..., None], axis=1)
    weight = jnp.asarray(w, path.dtype)[..., None]
    latent = (1.0 - weight) * lo + weight * hi
    return jnp.concatenate([latent, decoder(latent)], axis=-1)
