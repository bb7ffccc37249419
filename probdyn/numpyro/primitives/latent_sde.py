"""Latent SDEs for irregularly sampled series (Li, Wong, Chen & Duvenaud, AISTATS 2020).

A variational auto-encoder whose latent is a whole stochastic path ``z_b(t)``:

* generative model, per series ``b``: ``z0_b ~ Normal(0, I)``; the *prior* SDE
  ``dz = f_p(z) dt + g(z) dW`` from the common ``t0``; every observed entry is
  ``y_bij ~ Normal(decoder(z_b(t_bi))_j, obs_scale)``;
* amortised guide: a GRU reads each series backwards in time and gives
  ``q(z0_b | series)`` and a per-time context ``c_b(t)`` (a summary of the
  observations after ``t``); the *posterior* SDE is
  ``dz = f_q(z, c_b(t)) dt + g(z) dW``, with the same diagonal diffusion ``g``.

Both SDEs are stepped by Euler–Maruyama on one grid through ``t0`` and every
observed time of the batch (steps at most ``dt``). The Brownian path is the
sample site ``f"{name}.path_noise"`` ``(B, num_steps, latent_dim)`` of both the
model and the guide, which makes the Girsanov path KL an ordinary part of
NumPyro's ELBO (no special engine):

* **model**: ``path_noise ~ Normal(0, 1)``; the path is the prior Euler scheme
  ``z_{k+1} = z_k + f_p(z_k) h_k + g(z_k) sqrt(h_k) e_k`` driven by it.
* **guide**: draw ``eps ~ Normal(0, 1)`` (from the guide's PRNG key), step the
  posterior scheme ``z_{k+1} = z_k + f_q h_k + g sqrt(h_k) eps_k`` and compute
  ``u_k = (f_q - f_p)(z_k) / g(z_k)``. The site's value is
  ``e_k = eps_k + u_k sqrt(h_k)``: the prior noise that gives the same Euler
  step, so the model replays the guide's path exactly (up to rounding).

The guide's density of that value, and why the ELBO's path term is Li et al.'s
``-1/2 sum_k |u_k|^2 h_k``::

    eps -> e is triangular with unit diagonal (u_k depends on eps_<k only), so
        log q(e) = log N(eps; 0, I).
    log p(e) - log q(e) = sum_k [-|eps_k + u_k sqrt(h_k)|^2 + |eps_k|^2] / 2
                        = -sum_k u_k . eps_k sqrt(h_k) - 1/2 sum_k |u_k|^2 h_k.
    M = sum_k u_k . eps_k sqrt(h_k) has mean zero under q (eps_k is independent of
        u_k and has mean zero), and so does its gradient (d u_k is a function of
        eps_<k too). The guide reports log q(e) - M (a Delta site with that log
        density), which leaves the ELBO's expectation and its gradient's
        expectation unchanged and makes the per-path term exactly
        log p(e) - (log q(e) - M) = -1/2 sum_k |u_k|^2 h_k,
    the Euler discretisation of the Girsanov KL integral (1/2) int |u|^2 dt.

The guide also records ``f"{name}.path_kl"`` ``(B,)`` (that sum, per series) and
``f"{name}.posterior_path"`` ``(B, num_steps + 1, latent_dim)`` (its path on the
grid, see `LatentSDE.grid`) as deterministic sites, for monitoring.

Fit it with the ``VI`` engine and the guide::

    post = probdyn.fit(lsde.model, times, values, mask, t0=0.0,
                       engine=probdyn.VI(guide=lsde.guide, num_steps=...))

then interpolate or forecast with ``post.predict(times, values, mask, t0=0.0,
target_times=new_times, sites=["latent_sde.forecast"])`` (same ``times`` and
``mask`` as in fitting: the posterior holds the draws of ``path_noise`` on that
grid), encode new series with `LatentSDE.predict`, or sample the learned prior
with `LatentSDE.sample_prior`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, ArrayLike, Float
from numpyro import handlers
from numpyro.infer import Predictive

from probdyn.numpyro.bridge import ConcreteValueError, as_key
from probdyn.numpyro.primitives.bnn import ACTIVATIONS, MLP, _init_mlp, lift
from probdyn.numpyro.primitives.ode import _concrete
from probdyn.primitives.init_weights import init_diffusion as _init_diffusion
from probdyn.primitives.init_weights import init_gru as _init_gru
from probdyn.primitives.sde import time_grid

__all__ = ["LatentSDE"]

_WEIGHTS = dist.Normal(0.0, 1.0)  # unused by param sites; `lift` needs a prior argument
_G_FLOOR = 1e-3  # the diffusion is in (_G_FLOOR, 1): u = (f_q - f_p) / g stays finite
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# -- networks -----------------------------------------------------------------------------
class _DiagonalDiffusion(eqx.Module):
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
        return _G_FLOOR + (1.0 - _G_FLOOR) * jax.nn.sigmoid(out)


class _ContextEncoder(eqx.Module):
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
def _prior_path(
    drift: MLP, diffusion: _DiagonalDiffusion, z0: Array, h: Array, noise: Array
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
def _posterior_path(
    prior_drift: MLP,
    posterior_drift: MLP,
    diffusion: _DiagonalDiffusion,
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
    log_q = jnp.sum(-0.5 * eps**2 - _HALF_LOG_2PI - u * eps * root[:, None], axis=(1, 2))
    kl = 0.5 * jnp.sum(u**2 * h[:, None], axis=(1, 2))
    return path, jnp.swapaxes(e_prior, 0, 1), log_q, kl


@eqx.filter_jit
def _encode(
    encoder: _ContextEncoder,
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
def _decode(decoder: MLP, path: Array, idx: ArrayLike, nxt: ArrayLike, w: ArrayLike) -> Array:
    """The decoded ``path`` ``(B, N, L)`` at fractional grid positions ``(B, T)``.

    Linear interpolation between grid points, exact at them (weight 0 or 1).
    """
    lo = jnp.take_along_axis(path, jnp.asarray(idx)[..., None], axis=1)
    hi = jnp.take_along_axis(path, jnp.asarray(nxt)[..., None], axis=1)
    weight = jnp.asarray(w, path.dtype)[..., None]
    latent = (1.0 - weight) * lo + weight * hi
    return jnp.concatenate([latent, decoder(latent)], axis=-1)


def _positions(grid: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left grid index, right grid index and weight of each time (clamped to the grid)."""
    n = len(grid)
    idx = np.clip(np.searchsorted(grid, t, side="right") - 1, 0, n - 1)
    nxt = np.minimum(idx + 1, n - 1)
    span = grid[nxt] - grid[idx]
    safe = np.where(span > 0, span, 1.0)
    w = np.where(span > 0, np.clip((t - grid[idx]) / safe, 0.0, 1.0), 0.0)
    return idx, nxt, w


class _Layout(NamedTuple):
    """The batch's arrays and its (NumPy, concrete) step grid."""

    times: Array  # (B, T)
    values: Array | None  # (B, T, D), NaN allowed where masked
    mask: Array  # (B, T, D) bool
    t0: float
    grid: np.ndarray  # (S + 1,) float64: t0 and every observed time
    obs_pos: tuple[np.ndarray, np.ndarray, np.ndarray]  # each (B, T): times on the grid
    context_index: np.ndarray  # (B, S): first index of series b after grid[k]


# -- the model ------------------------------------------------------------------------------
class LatentSDE:
    """A latent SDE over a batch of irregularly sampled series with missing values.

    ``model`` and ``guide`` are a NumPyro model / amortised guide pair taking
    ``(times, values=None, mask=None, *, t0=None, target_times=None)``:

    * ``times`` ``(B, T)``, ``values`` ``(B, T, D)`` (NaN allowed where masked),
      ``mask`` ``(B, T)`` or ``(B, T, D)`` bool (default: the finite entries of
      ``values``; every entry when ``values`` is None); each row of ``times``
      strictly increasing (see `pad_series`). ``times`` and ``mask`` must be
      concrete (NumPy arrays): the step grid, hence the sites' shapes, is built
      from them.
    * ``t0``: the common start of the latent SDE (default: the earliest observed
      time). Pass the same ``times``, ``mask`` and ``t0`` when predicting with a
      fitted posterior.
    * ``target_times`` ``(B, T')`` or ``(T',)``: also record the decoded mean
      along the path at these times as the deterministic site
      ``f"{name}.forecast"`` ``(B, T', D)`` (and the latent state as
      ``f"{name}.forecast_latent"`` ``(B, T', latent_dim)``). Within the grid the
      path is interpolated linearly between grid points (exact at grid points);
      after its last point the *prior* SDE continues the path (forecasting),
      driven by the standard-normal site ``f"{name}.forecast_noise"``
      ``(B, S', latent_dim)`` on a grid through the later target times. That
      site is not a latent of a fitted posterior, so `Posterior.predict` draws it
      afresh for each draw.

    The step grid (`grid`): ``t0``, every time at which some series has an
    observed entry, and extra points so that no step exceeds ``dt``; ``S`` steps.

    Sites (``name`` prefixed): in the plate ``f"{name}.series"``, ``z0``
    ``(B, latent_dim)``, ``path_noise`` ``(B, S, latent_dim)`` (the Brownian
    increments over ``sqrt(h)``, see the module docstring for the guide's value
    and density), the observed ``y`` (masked); params ``prior_drift.*``,
    ``diffusion.*`` and ``decoder.*`` (model and guide), ``z0_loc`` and
    ``z0_scale`` (model, with ``z0_prior="learned"``), ``encoder.*`` and
    ``posterior_drift.*`` (guide). The guide also records the deterministic
    ``path_kl`` ``(B,)`` and ``posterior_path`` ``(B, S + 1, latent_dim)``.

    Networks: prior drift ``f_p(z)`` and posterior drift ``f_q(z, c)``, softplus
    MLPs (autonomous, as in torchsde's examples: time enters the posterior only
    through the context); diffusion ``g_i(z_i)``, one small net per latent
    dimension with a sigmoid output in ``(0.001, 1)``; decoder an MLP (ReLU;
    linear with the default ``decoder_sizes=()``).

    Args:
        obs_dim: D, the observation dimension.
        latent_dim: dimension of the latent state.
        dt: the largest Euler–Maruyama step.
        drift_sizes: hidden widths of both drift MLPs.
        diffusion_hidden: hidden width of each per-dimension diffusion net.
        decoder_sizes: hidden widths of the decoder MLP (``()``: linear).
        encoder_hidden: GRU hidden size.
        context_dim: size of the per-time context passed to the posterior drift.
        obs_scale: the fixed observation noise standard deviation (not learned).
        z0_prior: ``"standard"``: ``z0 ~ N(0, I)``; ``"learned"``: ``z0 ~
            N(z0_loc, diag(z0_scale)^2)`` with the model params ``z0_loc`` and
            ``z0_scale`` (as torchsde's examples), which lets the prior's initial
            spread match the encoder's instead of the decoder absorbing it.
        max_steps: the most grid steps a solve may take.
        name: site-name prefix.
        seed: seed of the initial network weights.

    Raises:
        ValueError: a non-positive size, ``obs_scale`` or ``dt``, or an empty name
            (the message names the argument and the fix).

    Example:
        >>> import numpy as np
        >>> from numpyro import handlers
        >>> lsde = LatentSDE(obs_dim=2, latent_dim=3, dt=0.25)
        >>> times = np.tile(np.linspace(0.0, 1.0, 5), (4, 1))
        >>> with handlers.seed(rng_seed=0):
        ...     tr = handlers.trace(lsde.model).get_trace(times, target_times=[0.5, 1.5])
        >>> noise, forecast = tr["latent_sde.path_noise"], tr["latent_sde.forecast"]
        >>> noise.get("value").shape, forecast.get("value").shape
        ((4, 4, 3), (4, 2, 2))
    """

    def __init__(
        self,
        obs_dim: int,
        latent_dim: int = 4,
        *,
        dt: float,
        drift_sizes: Sequence[int] = (32, 32),
        diffusion_hidden: int = 16,
        decoder_sizes: Sequence[int] = (),
        encoder_hidden: int = 32,
        context_dim: int = 16,
        obs_scale: float = 0.1,
        z0_prior: str = "standard",
        max_steps: int = 4096,
        name: str = "latent_sde",
        seed: int = 0,
    ) -> None:
        for field, v in (
            ("obs_dim", obs_dim),
            ("latent_dim", latent_dim),
            ("diffusion_hidden", diffusion_hidden),
            ("encoder_hidden", encoder_hidden),
            ("context_dim", context_dim),
            ("max_steps", max_steps),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(
                    f"LatentSDE({field}={v!r}): must be a positive integer; give e.g. {field}=4."
                )
        for field, sizes in (("drift_sizes", drift_sizes), ("decoder_sizes", decoder_sizes)):
            if isinstance(sizes, (str, int)) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes
            ):
                raise ValueError(
                    f"LatentSDE({field}={sizes!r}): must be a sequence of positive integers "
                    f"(hidden widths), e.g. {field}=(32, 32) or ()."
                )
        for field, x in (("obs_scale", obs_scale), ("dt", dt)):
            if (
                isinstance(x, bool)
                or not isinstance(x, (int, float))
                or not (math.isfinite(x) and x > 0)
            ):
                raise ValueError(
                    f"LatentSDE({field}={x!r}): must be a positive finite number, e.g. {field}=0.1."
                )
        if z0_prior not in ("standard", "learned"):
            raise ValueError(
                f"LatentSDE(z0_prior={z0_prior!r}): give 'standard' (N(0, I)) or 'learned' "
                "(a diagonal Gaussian with learned location and scale)."
            )
        if not isinstance(name, str) or not name:
            raise ValueError(f"LatentSDE(name={name!r}): give a non-empty site-name prefix.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"LatentSDE(seed={seed!r}): must be an integer, e.g. seed=0.")
        self.obs_dim, self.latent_dim, self.dt = obs_dim, latent_dim, float(dt)
        self.prior_sizes = (latent_dim, *drift_sizes, latent_dim)
        self.posterior_sizes = (latent_dim + context_dim, *drift_sizes, latent_dim)
        self.decoder_sizes = (latent_dim, *decoder_sizes, obs_dim)
        self.diffusion_hidden, self.encoder_hidden = diffusion_hidden, encoder_hidden
        self.context_dim, self.obs_scale = context_dim, float(obs_scale)
        self.z0_prior, self.max_steps, self.name, self.seed = z0_prior, max_steps, name, seed

    def __repr__(self) -> str:
        return (
            f"LatentSDE(obs_dim={self.obs_dim}, latent_dim={self.latent_dim}, dt={self.dt}, "
            f"drift={list(self.prior_sizes)}, diffusion_hidden={self.diffusion_hidden}, "
            f"decoder={list(self.decoder_sizes)}, encoder_hidden={self.encoder_hidden}, "
            f"context_dim={self.context_dim}, obs_scale={self.obs_scale}, "
            f"z0_prior={self.z0_prior!r}, name={self.name!r})"
        )

    # -- networks as param sites ----------------------------------------------------------
    def _mlp(self, part: str, sizes: tuple[int, ...], act: str, seed: int) -> MLP:
        template = _init_mlp(sizes, ACTIVATIONS[act], seed=self.seed * 7919 + seed)
        return lift(f"{self.name}.{part}", template, _WEIGHTS, bayesian=lambda p: False)

    def _shared(self) -> tuple[MLP, _DiagonalDiffusion, MLP]:
        """The prior drift, diffusion and decoder (params of both model and guide)."""
        drift = self._mlp("prior_drift", self.prior_sizes, "softplus", 1)
        arrays = _init_diffusion(self.latent_dim, self.diffusion_hidden, self.seed * 7919 + 2)
        template = _DiagonalDiffusion(*(jnp.asarray(a) for a in arrays))
        diffusion = lift(f"{self.name}.diffusion", template, _WEIGHTS, bayesian=lambda p: False)
        decoder = self._mlp("decoder", self.decoder_sizes, "relu", 3)
        return drift, diffusion, decoder

    def _encoder(self) -> _ContextEncoder:
        n_in = 2 * self.obs_dim + 1
        w, b = _init_gru(n_in, self.encoder_hidden, self.seed * 7919 + 4)
        identity = ACTIVATIONS["identity"]
        seed = self.seed * 7919
        z0_head = _init_mlp((self.encoder_hidden, 2 * self.latent_dim), identity, seed + 5)
        ctx_head = _init_mlp((self.encoder_hidden, self.context_dim), identity, seed + 6)
        template = _ContextEncoder(jnp.asarray(w), jnp.asarray(b), z0_head, ctx_head)
        return lift(f"{self.name}.encoder", template, _WEIGHTS, bayesian=lambda p: False)

    # -- data and grid ----------------------------------------------------------------------
    def grid(self, times: ArrayLike, mask: ArrayLike | None = None, t0: Any = None) -> np.ndarray:
        """The Euler–Maruyama grid of a batch: ``t0``, every observed time, steps <= ``dt``.

        Args:
            times: ``(B, T)`` times.
            mask: ``(B, T)`` or ``(B, T, D)`` observation mask (default: all observed).
            t0: the start (default: the earliest observed time).

        Returns:
            The float64 grid ``(S + 1,)``; ``path_noise`` has ``S`` steps.

        Example:
            >>> import numpy as np
            >>> LatentSDE(obs_dim=1, dt=0.25).grid(np.array([[0.0, 0.3, 1.0]])).tolist()
            [0.0, 0.25, 0.3, 0.5, 0.75, 1.0]
        """
        return self._layout(times, None, mask, t0).grid

    def _layout(
        self, times: ArrayLike, values: ArrayLike | None, mask: ArrayLike | None, t0: Any
    ) -> _Layout:
        t = _concrete(times)
        if t is None:
            raise ConcreteValueError(
                "LatentSDE: times must be concrete (a NumPy array, not a traced value): the "
                "step grid, hence the shape of the path_noise site, is built from them."
            )
        t = np.asarray(t, dtype=np.float64)
        if t.ndim != 2 or t.size == 0:
            raise ValueError(
                f"LatentSDE: times must be (series, time), got shape {t.shape}; pad ragged "
                "series with pad_series."
            )
        if not np.all(np.isfinite(t)) or np.any(np.diff(t, axis=1) <= 0):
            raise ValueError(
                "LatentSDE: each row of times must be finite and strictly increasing; sort "
                "the series (pad_series does) and drop duplicate times."
            )
        shape = (*t.shape, self.obs_dim)
        vals = None if values is None else jnp.asarray(values)
        if vals is not None and vals.shape != shape:
            raise ValueError(
                f"LatentSDE: values has shape {vals.shape}, expected {shape} "
                "(series, time, obs_dim) to match times."
            )
        m = self._mask(mask, values, t.shape, shape)
        raw = None if values is None else _concrete(values)
        if raw is not None:
            bad = m & ~np.isfinite(np.asarray(raw, dtype=float))
            if bad.any():
                b, i, d = (int(k) for k in np.argwhere(bad)[0])
                raise ValueError(
                    f"LatentSDE: values[{b}, {i}, {d}] is not finite but mask marks it "
                    "observed; set mask False there (or leave mask=None to mask every NaN)."
                )
        observed = np.unique(t[m.any(-1)]) if m.any() else np.unique(t)
        start = float(observed[0]) if t0 is None else _scalar_time(t0)
        if start > observed[0]:
            raise ValueError(
                f"LatentSDE: t0={start} is after the first observed time {observed[0]}; z0 "
                "is the state at t0, so give t0 <= every observed time."
            )
        grid = _grid(start, observed, self.dt, self.max_steps)
        # Context of step k (from grid[k]): the encoder state at the first time of the
        # series after grid[k], i.e. a summary of the observations still to come.
        context_index = np.stack([np.searchsorted(row, grid[:-1], side="right") for row in t])
        dtype = jnp.result_type(float)
        return _Layout(
            jnp.asarray(t, dtype),
            vals,
            jnp.asarray(m),
            start,
            grid,
            _positions(grid, t),
            context_index,
        )

    def _mask(
        self,
        mask: ArrayLike | None,
        values: ArrayLike | None,
        tshape: tuple[int, ...],
        shape: tuple[int, ...],
    ) -> np.ndarray:
        if mask is None:
            if values is None:
                return np.ones(shape, bool)
            v = _concrete(values)
            if v is None:
                raise ValueError(
                    "LatentSDE: values are traced, so the default mask (their finite "
                    "entries) is unknown; pass mask as a concrete boolean array."
                )
            return np.isfinite(np.asarray(v, dtype=float))
        given = _concrete(mask)
        if given is None:
            raise ConcreteValueError(
                "LatentSDE: mask must be concrete (a NumPy array): the step grid goes "
                "through every observed time."
            )
        m = np.asarray(given).astype(bool)
        if m.shape == tshape:
            m = m[..., None]
        if m.ndim != 3 or m.shape[:2] != tshape or m.shape[2] not in (1, self.obs_dim):
            raise ValueError(f"LatentSDE: mask has shape {m.shape}; give {tshape} or {shape}.")
        return np.broadcast_to(m, shape)

    # -- model and guide --------------------------------------------------------------------
    def model(
        self,
        times: ArrayLike,
        values: ArrayLike | None = None,
        mask: ArrayLike | None = None,
        *,
        t0: Any = None,
        target_times: ArrayLike | None = None,
    ) -> None:
        """The generative model (see the class docstring for the arguments and sites)."""
        lay = self._layout(times, values, mask, t0)
        drift, diffusion, decoder = self._shared()
        num_series, steps = lay.times.shape[0], len(lay.grid) - 1
        h = jnp.asarray(np.diff(lay.grid), lay.times.dtype)
        series = numpyro.plate(f"{self.name}.series", num_series)
        loc: Any = 0.0
        scale: Any = 1.0
        if self.z0_prior == "learned":
            zeros = jnp.zeros(self.latent_dim, h.dtype)
            loc = numpyro.param(f"{self.name}.z0_loc", zeros)
            scale = numpyro.param(
                f"{self.name}.z0_scale", jnp.ones_like(zeros), constraint=dist.constraints.positive
            )
        with series:
            z0 = numpyro.sample(
                f"{self.name}.z0", dist.Normal(loc, scale).expand([self.latent_dim]).to_event(1)
            )
            noise = numpyro.sample(
                f"{self.name}.path_noise",
                dist.Normal(0.0, 1.0).expand([steps, self.latent_dim]).to_event(2),
            )
        path = _prior_path(drift, diffusion, z0, h, noise)
        mean = _decode(decoder, path, *lay.obs_pos)[..., self.latent_dim :]
        # Masked entries: exactly zero log density, and their (possibly NaN) values are
        # replaced before they reach the likelihood or its gradient.
        obs = None if lay.values is None else jnp.where(lay.mask, lay.values, 0.0)
        with series:
            numpyro.sample(
                f"{self.name}.y",
                dist.Normal(mean, self.obs_scale).mask(lay.mask).to_event(2),
                obs=obs,
            )
        if target_times is not None:
            self._forecast(lay, target_times, path, drift, diffusion, decoder, series)

    def _forecast(
        self,
        lay: _Layout,
        target_times: ArrayLike,
        path: Array,
        drift: MLP,
        diffusion: _DiagonalDiffusion,
        decoder: MLP,
        series: numpyro.plate,
    ) -> None:
        given = _concrete(target_times)
        if given is None:
            raise ConcreteValueError("LatentSDE: target_times must be concrete (a NumPy array).")
        target = np.asarray(given, dtype=np.float64)
        num_series = lay.times.shape[0]
        if target.ndim == 1:
            target = np.broadcast_to(target, (num_series, target.shape[0]))
        if target.ndim != 2 or target.shape[0] != num_series or not np.all(np.isfinite(target)):
            raise ValueError(
                f"LatentSDE: target_times has shape {target.shape}; give finite times shaped "
                f"({num_series}, T') or (T',)."
            )
        if target.size and target.min() < lay.t0:
            raise ValueError(
                f"LatentSDE: target_times has {target.min()}, before t0={lay.t0}; the latent "
                "path starts at t0."
            )
        grid = lay.grid
        later = np.unique(target[target > grid[-1]])
        if later.size:
            extra = _grid(float(grid[-1]), later, self.dt, self.max_steps)
            h = jnp.asarray(np.diff(extra), path.dtype)
            with series:
                noise = numpyro.sample(
                    f"{self.name}.forecast_noise",
                    dist.Normal(0.0, 1.0).expand([len(extra) - 1, self.latent_dim]).to_event(2),
                )
            ahead = _prior_path(drift, diffusion, path[:, -1], h, noise)
            path = jnp.concatenate([path, ahead[:, 1:]], axis=1)
            grid = np.concatenate([grid, extra[1:]])
        both = _decode(decoder, path, *_positions(grid, target))
        numpyro.deterministic(f"{self.name}.forecast_latent", both[..., : self.latent_dim])
        numpyro.deterministic(f"{self.name}.forecast", both[..., self.latent_dim :])

    def guide(
        self,
        times: ArrayLike,
        values: ArrayLike | None = None,
        mask: ArrayLike | None = None,
        *,
        t0: Any = None,
        target_times: ArrayLike | None = None,
    ) -> None:
        """The amortised guide: ``q(z0 | series)`` and the posterior SDE's path.

        Same arguments as `model` (``target_times`` is ignored). Needs a PRNG key
        (run it seeded, as SVI and Predictive do): the posterior path's standard
        normals are drawn from ``numpyro.prng_key()``.
        """
        lay = self._layout(times, values, mask, t0)
        if lay.values is None:
            raise ValueError("LatentSDE.guide: values are required to encode the series.")
        drift, diffusion, _ = self._shared()
        encoder = self._encoder()
        posterior_drift = self._mlp("posterior_drift", self.posterior_sizes, "softplus", 7)
        start = jnp.asarray(lay.t0, lay.times.dtype)
        loc, scale, context = _encode(
            encoder, lay.times, lay.values, lay.mask, start, jnp.asarray(lay.context_index)
        )
        num_series, steps = lay.times.shape[0], len(lay.grid) - 1
        key = numpyro.prng_key()
        if key is None:
            raise ValueError(
                "LatentSDE.guide: no PRNG key; run the guide under a seed handler "
                "(numpyro.handlers.seed(lsde.guide, rng_seed=0)), as SVI and Predictive do."
            )
        eps = jax.random.normal(key, (num_series, steps, self.latent_dim), loc.dtype)
        h = jnp.asarray(np.diff(lay.grid), loc.dtype)
        series = numpyro.plate(f"{self.name}.series", num_series)
        with series:
            z0 = numpyro.sample(f"{self.name}.z0", dist.Normal(loc, scale).to_event(1))
        path, e_prior, log_q, kl = _posterior_path(
            drift, posterior_drift, diffusion, z0, h, eps, context
        )
        with series:
            numpyro.sample(
                f"{self.name}.path_noise", dist.Delta(e_prior, log_density=log_q, event_dim=2)
            )
        numpyro.deterministic(f"{self.name}.path_kl", kl)
        numpyro.deterministic(f"{self.name}.posterior_path", path)

    # -- prediction ---------------------------------------------------------------------------
    def predict(
        self,
        params: dict[str, Any],
        times: ArrayLike,
        values: ArrayLike,
        mask: ArrayLike | None = None,
        *,
        target_times: ArrayLike,
        key: Any = 0,
        num_draws: int = 100,
        t0: Any = None,
    ) -> dict[str, np.ndarray]:
        """Decoded paths at ``target_times`` for (new) series, encoded by the guide.

        Each draw takes ``z0`` and the path from the guide up to the last observed
        time and continues with the prior SDE.

        Args:
            params: fitted params (``post.params``).
            times: ``(B, T)`` observation times of the series the encoder conditions on.
            values: ``(B, T, D)`` their values (NaN allowed where masked).
            mask: which entries were observed (default: the finite ones).
            target_times: ``(B, T')`` or ``(T',)`` times to predict at.
            key: an int seed or a JAX key.
            num_draws: draws per series.
            t0: the latent SDE's start (use the value used in fitting).

        Returns:
            ``{"mean": (num_draws, B, T', D), "latent": (num_draws, B, T', latent_dim),
            "z0": (num_draws, B, latent_dim)}``; observation noise is ``obs_scale``
            on top of ``mean``.

        Example:
            >>> pred = lsde.predict(post.params, t, y, target_times=t_new)  # doctest: +SKIP
        """
        names = {
            "mean": f"{self.name}.forecast",
            "latent": f"{self.name}.forecast_latent",
            "z0": f"{self.name}.z0",
        }
        pred = Predictive(
            self.model,
            guide=self.guide,
            params=params,
            num_samples=num_draws,
            return_sites=list(names.values()),
        )
        out = pred(as_key(key), times, values, mask, t0=t0, target_times=target_times)
        return {k: np.asarray(out[v]) for k, v in names.items()}

    def sample_prior(
        self,
        params: dict[str, Any],
        target_times: ArrayLike,
        *,
        num_series: int,
        t0: float,
        key: Any = 0,
    ) -> dict[str, np.ndarray]:
        """Paths of the learned prior: ``z0 ~ N(0, I)``, the prior SDE, decoded.

        Args:
            params: fitted params (``post.params``); missing ones keep their
                initial values.
            target_times: ``(T',)`` increasing times, all at or after ``t0``.
            num_series: how many independent paths.
            t0: the start of the latent SDE (use the value used in fitting).
            key: an int seed or a JAX key.

        Returns:
            ``{"mean": (num_series, T', D), "latent": (num_series, T', latent_dim)}``
            (decoded mean; observation noise is ``obs_scale`` on top).

        Example:
            >>> import numpy as np
            >>> lsde = LatentSDE(obs_dim=3, dt=0.1)
            >>> out = lsde.sample_prior({}, np.array([0.5, 1.0]), num_series=8, t0=0.0)
            >>> out["mean"].shape
            (8, 2, 3)
        """
        if isinstance(num_series, bool) or not isinstance(num_series, int) or num_series <= 0:
            raise ValueError(
                f"LatentSDE.sample_prior(num_series={num_series!r}): must be a positive "
                "integer, e.g. num_series=100."
            )
        target = np.asarray(target_times, dtype=np.float64)
        if target.ndim != 1 or target.size == 0:
            raise ValueError(
                f"LatentSDE.sample_prior: target_times has shape {target.shape}; give a "
                "non-empty 1-D array of times."
            )
        times = np.broadcast_to(target, (num_series, target.size))
        fixed = {k: jnp.asarray(v) for k, v in params.items()}

        @jax.jit
        def run(k: Array) -> tuple[Array, Array]:
            model = handlers.seed(handlers.substitute(self.model, data=fixed), k)
            tr = handlers.trace(model).get_trace(times, t0=t0, target_times=target)
            return tr[f"{self.name}.forecast"]["value"], tr[f"{self.name}.forecast_latent"]["value"]

        mean, latent = run(as_key(key))
        return {"mean": np.asarray(mean), "latent": np.asarray(latent)}


def _grid(t0: float, times: np.ndarray, dt: float, max_steps: int) -> np.ndarray:
    try:
        grid, _ = time_grid(t0, times, dt, max_steps)
    except ValueError as err:
        raise ValueError(str(err).replace("NeuralSDE", "LatentSDE", 1)) from None
    return grid


def _scalar_time(t0: Any) -> float:
    value = _concrete(t0)
    if value is None or np.size(value) != 1 or not np.isfinite(value).all():
        raise ValueError(f"LatentSDE: t0={t0!r} must be a concrete, finite scalar time.")
    return float(np.asarray(value).reshape(()))
