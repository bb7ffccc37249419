"""Latent SDEs for irregularly sampled series (Li, Wong, Chen & Duvenaud, AISTATS 2020), Pyro.

The twin of `probdyn.numpyro.primitives.latent_sde` (read its module docstring for the model and
for why the ELBO's path term is Li et al.'s Girsanov KL): the same constructor, defaults,
site names, shapes, step grid, networks and numbers, so one dict of weights is the same
model on both backends (tests/test_latent_sde_parity.py). In short:

* **model**: ``z0 ~ N(0, I)`` (or the learned diagonal Gaussian), the Brownian path is
  the sample site ``f"{name}.path_noise"`` ``(B, S, latent_dim)`` with a standard normal
  prior, and the *prior* Euler–Maruyama scheme
  ``z_{k+1} = z_k + f_p(z_k) h_k + g(z_k) sqrt(h_k) e_k`` is driven by it;
* **guide**: ``eps`` is drawn from torch's (active) RNG, the *posterior* scheme
  ``z_{k+1} = z_k + f_q(z_k, c_k) h_k + g(z_k) sqrt(h_k) eps_k`` is stepped, and the
  path site's value is ``e_k = eps_k + u_k sqrt(h_k)`` with ``u = (f_q - f_p) / g``
  (the prior noise that gives the same step): a ``Delta`` whose log density is
  ``sum_k log N(eps_k) - sum_k u_k . eps_k sqrt(h_k)``. Then, per path,
  ``log p(e) - log q(e) = -1/2 sum_k |u_k|^2 h_k`` exactly.

Differences from NumPyro, forced by torch: the Euler–Maruyama steps and the GRU are
Python loops over the grid (fine for the small grids of this model; no compilation),
the guide's ``eps`` comes from torch's global RNG (seeded by probdyn's runners inside
`probdyn.pyro.bridge.isolated`; seed it yourself with ``torch.manual_seed`` otherwise),
and ``times``/``mask`` may be NumPy arrays or tensors (both are always concrete).

Fit it with the ``VI`` engine and the guide::

    post = probdyn.fit(lsde.model, times, values, mask, t0=0.0,
                       engine=probdyn.VI(guide=lsde.guide, num_steps=...), backend="pyro")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import Tensor

from probdyn.primitives.init_weights import init_diffusion as _init_diffusion
from probdyn.primitives.init_weights import init_gru as _init_gru
from probdyn.primitives.init_weights import init_layers as _init_layers
from probdyn.primitives.sde import time_grid
from probdyn.pyro.bridge import as_seed, isolated, with_params
from probdyn.pyro.primitives.bnn import ACTIVATIONS, MLP, Linear

__all__ = ["LatentSDE"]

_G_FLOOR = 1e-3  # the diffusion is in (_G_FLOOR, 1): u = (f_q - f_p) / g stays finite
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _softplus(x: Tensor) -> Tensor:
    # log(1 + e^x) exactly, as jax.nn.softplus (torch's F.softplus returns x above 20).
    return torch.logaddexp(x, x.new_zeros(()))


def _standard_normal(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The guide's ``eps``: standard normals from torch's active RNG (a seam for tests)."""
    return torch.randn(shape, dtype=dtype)


def _guide_deterministic(name: str, value: Tensor) -> None:
    """``pyro.deterministic`` marked auxiliary: a guide-only record without Pyro's warning
    about guide sites missing from the model (its log density is zero either way)."""
    pyro.sample(
        name,
        dist.Delta(value, event_dim=value.ndim).mask(False),
        obs=value,
        infer={"_deterministic": True, "is_auxiliary": True},
    )


# -- initial weights: NumPy, the same numbers as the NumPyro twin -----------------------------
def _param(name: str, init: np.ndarray, **kwargs: Any) -> Tensor:
    """A ``pyro.param`` site initialised (lazily) at ``init`` in torch's default dtype."""

    def make() -> Tensor:
        return torch.tensor(init, dtype=torch.get_default_dtype())

    return pyro.param(name, make, **kwargs)


def _param_mlp(name: str, sizes: tuple[int, ...], act: str, seed: int) -> MLP:
    layers = tuple(
        Linear(_param(f"{name}.layers.{i}.weight", w), _param(f"{name}.layers.{i}.bias", b))
        for i, (w, b) in enumerate(_init_layers(sizes, seed))
    )
    return MLP(layers, ACTIVATIONS[act])


# -- networks -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _DiagonalDiffusion:
    """``g_i(z) = floor + (1 - floor) sigmoid(MLP_i(z_i))``: one scalar net per dimension."""

    w1: Tensor  # (L, H)
    b1: Tensor  # (L, H)
    w2: Tensor  # (L, H)
    b2: Tensor  # (L,)

    def __call__(self, z: Tensor) -> Tensor:
        hidden = _softplus(z[..., None] * self.w1 + self.b1)
        out = torch.sum(hidden * self.w2, dim=-1) + self.b2
        return _G_FLOOR + (1.0 - _G_FLOOR) * torch.sigmoid(out)


@dataclass(frozen=True)
class _ContextEncoder:
    """A GRU run backwards in time over a batch; heads for ``q(z0)`` and a per-time context.

    The equations of the NumPyro twin's ``_ContextEncoder`` (one series there, the
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
        return out[:, :half], _softplus(out[:, half:]) + 1e-4, context


# -- Euler–Maruyama -------------------------------------------------------------------------
def _prior_path(
    drift: MLP, diffusion: _DiagonalDiffusion, z0: Tensor, h: Tensor, noise: Tensor
) -> Tensor:
    """The prior Euler scheme driven by ``noise`` ``(..., B, S, L)``; path ``(..., B, S+1, L)``."""
    root = torch.sqrt(h)
    z, zs = z0, [z0]
    for k in range(h.shape[0]):
        z = z + drift(z) * h[k] + diffusion(z) * root[k] * noise[..., k, :]
        zs.append(z)
    return torch.stack(zs, dim=-2)


def _posterior_path(
    prior_drift: MLP,
    posterior_drift: MLP,
    diffusion: _DiagonalDiffusion,
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
    terms = -0.5 * eps**2 - _HALF_LOG_2PI - u_all * eps * root[:, None]
    log_q = torch.sum(terms, dim=(-2, -1))
    kl = 0.5 * torch.sum(u_all**2 * h[:, None], dim=(-2, -1))
    return path, torch.stack(es, dim=-2), log_q, kl


def _gather(path: Tensor, index: np.ndarray) -> Tensor:
    """``path[..., b, index[b, t], :]`` for ``path`` ``(..., B, N, L)``, ``index`` ``(B, T)``."""
    idx = torch.as_tensor(index, dtype=torch.long, device=path.device)
    shape = (*path.shape[:-2], idx.shape[-1], path.shape[-1])
    return torch.gather(path, -2, idx[..., None].expand(shape))


def _decode(decoder: MLP, path: Tensor, idx: np.ndarray, nxt: np.ndarray, w: np.ndarray) -> Tensor:
    """The latent state and decoded mean, concatenated, at fractional grid positions.

    Linear interpolation between grid points, exact at them (weight 0 or 1).
    """
    lo, hi = _gather(path, idx), _gather(path, nxt)
    weight = torch.as_tensor(w, dtype=path.dtype, device=path.device)[..., None]
    latent = (1.0 - weight) * lo + weight * hi
    return torch.cat([latent, decoder(latent)], dim=-1)


def _positions(grid: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left grid index, right grid index and weight of each time (clamped to the grid)."""
    n = len(grid)
    idx = np.clip(np.searchsorted(grid, t, side="right") - 1, 0, n - 1)
    nxt = np.minimum(idx + 1, n - 1)
    span = grid[nxt] - grid[idx]
    safe = np.where(span > 0, span, 1.0)
    w = np.where(span > 0, np.clip((t - grid[idx]) / safe, 0.0, 1.0), 0.0)
    return idx, nxt, w


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _tensor(x: Any, dtype: torch.dtype) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(dtype)
    return torch.as_tensor(np.array(x, dtype=np.float64), dtype=dtype)  # a writable copy


class _Layout(NamedTuple):
    """The batch's tensors and its (NumPy) step grid."""

    times: Tensor  # (B, T)
    values: Tensor | None  # (B, T, D), NaN allowed where masked
    mask: Tensor  # (B, T, D) bool
    t0: float
    grid: np.ndarray  # (S + 1,) float64: t0 and every observed time
    obs_pos: tuple[np.ndarray, np.ndarray, np.ndarray]  # each (B, T): times on the grid
    context_index: np.ndarray  # (B, S): first index of series b after grid[k]


# -- the model ------------------------------------------------------------------------------
class LatentSDE:
    """A latent SDE over a batch of irregularly sampled series with missing values (Pyro).

    The twin of `probdyn.numpyro.LatentSDE` (see it for the full description): the
    same arguments, sites, shapes and numbers. ``model`` and ``guide`` are a Pyro model
    / amortised guide pair taking ``(times, values=None, mask=None, *, t0=None,
    target_times=None)``: ``times`` ``(B, T)``, ``values`` ``(B, T, D)`` (NaN allowed
    where masked), ``mask`` ``(B, T)`` or ``(B, T, D)`` bool (default: the finite
    entries of ``values``; every entry when ``values`` is None), as NumPy arrays or
    tensors; ``t0`` the common start of the latent SDE (default: the earliest observed
    time); ``target_times`` ``(B, T')`` or ``(T',)`` also records the deterministic
    sites ``f"{name}.forecast"`` ``(B, T', D)`` and ``f"{name}.forecast_latent"``
    ``(B, T', latent_dim)`` (interpolated on the grid; after its end the prior SDE
    continues, driven by the standard-normal site ``f"{name}.forecast_noise"``).

    Sites (``name`` prefixed): in the plate ``f"{name}.series"``, ``z0``
    ``(B, latent_dim)``, ``path_noise`` ``(B, S, latent_dim)``, the observed ``y``
    (masked); params ``prior_drift.*``, ``diffusion.*``, ``decoder.*`` (model and
    guide), ``z0_loc``/``z0_scale`` (model, ``z0_prior="learned"``), ``encoder.*`` and
    ``posterior_drift.*`` (guide). The guide also records the deterministic
    ``path_kl`` ``(B,)`` and ``posterior_path`` ``(B, S + 1, latent_dim)``. Weights
    are stored ``(in, out)`` and start at the NumPyro twin's initial values.

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
        z0_prior: ``"standard"`` (``N(0, I)``) or ``"learned"`` (params ``z0_loc``
            and ``z0_scale``).
        max_steps: the most grid steps a solve may take.
        name: site-name prefix.
        seed: seed of the initial network weights.

    Raises:
        ValueError: a non-positive size, ``obs_scale`` or ``dt``, or an empty name
            (the message names the argument and the fix).

    Example:
        >>> import numpy as np, pyro
        >>> lsde = LatentSDE(obs_dim=2, latent_dim=3, dt=0.25)
        >>> times = np.tile(np.linspace(0.0, 1.0, 5), (4, 1))
        >>> tr = pyro.poutine.trace(lsde.model).get_trace(times, target_times=[0.5, 1.5])
        >>> tuple(tr.nodes["latent_sde.path_noise"].get("value").shape)
        (4, 4, 3)
        >>> tuple(tr.nodes["latent_sde.forecast"].get("value").shape)
        (4, 2, 2)
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
        return _param_mlp(f"{self.name}.{part}", sizes, act, self.seed * 7919 + seed)

    def _shared(self) -> tuple[MLP, _DiagonalDiffusion, MLP]:
        """The prior drift, diffusion and decoder (params of both model and guide)."""
        drift = self._mlp("prior_drift", self.prior_sizes, "softplus", 1)
        arrays = _init_diffusion(self.latent_dim, self.diffusion_hidden, self.seed * 7919 + 2)
        diffusion = _DiagonalDiffusion(
            *(
                _param(f"{self.name}.diffusion.{field}", a)
                for field, a in zip(("w1", "b1", "w2", "b2"), arrays)
            )
        )
        decoder = self._mlp("decoder", self.decoder_sizes, "relu", 3)
        return drift, diffusion, decoder

    def _encoder(self) -> _ContextEncoder:
        prefix, seed = f"{self.name}.encoder", self.seed * 7919
        w, b = _init_gru(2 * self.obs_dim + 1, self.encoder_hidden, seed + 4)
        return _ContextEncoder(
            _param(f"{prefix}.w", w),
            _param(f"{prefix}.b", b),
            _param_mlp(
                f"{prefix}.z0_head",
                (self.encoder_hidden, 2 * self.latent_dim),
                "identity",
                seed + 5,
            ),
            _param_mlp(
                f"{prefix}.context_head",
                (self.encoder_hidden, self.context_dim),
                "identity",
                seed + 6,
            ),
        )

    # -- data and grid ----------------------------------------------------------------------
    def grid(self, times: Any, mask: Any = None, t0: Any = None) -> np.ndarray:
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

    def _layout(self, times: Any, values: Any, mask: Any, t0: Any) -> _Layout:
        t = np.array(_numpy(times), dtype=np.float64)  # a writable copy, as torch wants
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
        dtype = torch.get_default_dtype()
        vals = None if values is None else _tensor(values, dtype)
        if vals is not None and tuple(vals.shape) != shape:
            raise ValueError(
                f"LatentSDE: values has shape {tuple(vals.shape)}, expected {shape} "
                "(series, time, obs_dim) to match times."
            )
        m = self._mask(mask, vals, t.shape, shape)
        if vals is not None:
            bad = m & ~np.isfinite(_numpy(vals))
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
        return _Layout(
            torch.as_tensor(t, dtype=dtype),
            vals,
            torch.as_tensor(np.array(m)),  # a writable copy
            start,
            grid,
            _positions(grid, t),
            context_index,
        )

    def _mask(
        self,
        mask: Any,
        values: Tensor | None,
        tshape: tuple[int, ...],
        shape: tuple[int, ...],
    ) -> np.ndarray:
        if mask is None:
            if values is None:
                return np.ones(shape, bool)
            return np.isfinite(_numpy(values))
        m = _numpy(mask).astype(bool)
        if m.shape == tshape:
            m = m[..., None]
        if m.ndim != 3 or m.shape[:2] != tshape or m.shape[2] not in (1, self.obs_dim):
            raise ValueError(f"LatentSDE: mask has shape {m.shape}; give {tshape} or {shape}.")
        return np.broadcast_to(m, shape)

    # -- model and guide --------------------------------------------------------------------
    def model(
        self,
        times: Any,
        values: Any = None,
        mask: Any = None,
        *,
        t0: Any = None,
        target_times: Any = None,
    ) -> None:
        """The generative model (see the class docstring for the arguments and sites)."""
        lay = self._layout(times, values, mask, t0)
        drift, diffusion, decoder = self._shared()
        num_series, steps = lay.times.shape[0], len(lay.grid) - 1
        dtype = lay.times.dtype
        h = torch.as_tensor(np.diff(lay.grid), dtype=dtype)
        series = pyro.plate(f"{self.name}.series", num_series, dim=-1)
        loc = torch.zeros(self.latent_dim, dtype=dtype)
        scale = torch.ones(self.latent_dim, dtype=dtype)
        if self.z0_prior == "learned":
            loc = _param(f"{self.name}.z0_loc", np.zeros(self.latent_dim))
            scale = _param(
                f"{self.name}.z0_scale",
                np.ones(self.latent_dim),
                constraint=dist.constraints.positive,
            )
        with series:
            z0 = pyro.sample(f"{self.name}.z0", dist.Normal(loc, scale).to_event(1))
            standard = dist.Normal(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype))
            noise = pyro.sample(
                f"{self.name}.path_noise", standard.expand([steps, self.latent_dim]).to_event(2)
            )
        path = _prior_path(drift, diffusion, z0, h, noise)
        mean = _decode(decoder, path, *lay.obs_pos)[..., self.latent_dim :]
        # Masked entries: exactly zero log density, and their (possibly NaN) values are
        # replaced before they reach the likelihood or its gradient.
        obs = None if lay.values is None else torch.where(lay.mask, lay.values, 0.0)
        with series:
            pyro.sample(
                f"{self.name}.y",
                dist.Normal(mean, self.obs_scale).mask(lay.mask).to_event(2),
                obs=obs,
            )
        if target_times is not None:
            self._forecast(lay, target_times, path, drift, diffusion, decoder, series)

    def _forecast(
        self,
        lay: _Layout,
        target_times: Any,
        path: Tensor,
        drift: MLP,
        diffusion: _DiagonalDiffusion,
        decoder: MLP,
        series: pyro.plate,
    ) -> None:
        target = np.asarray(_numpy(target_times), dtype=np.float64)
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
            h = torch.as_tensor(np.diff(extra), dtype=path.dtype)
            standard = dist.Normal(
                torch.zeros((), dtype=path.dtype), torch.ones((), dtype=path.dtype)
            )
            with series:
                noise = pyro.sample(
                    f"{self.name}.forecast_noise",
                    standard.expand([len(extra) - 1, self.latent_dim]).to_event(2),
                )
            ahead = _prior_path(drift, diffusion, path[..., -1, :], h, noise)
            path = torch.cat([path, ahead[..., 1:, :]], dim=-2)
            grid = np.concatenate([grid, extra[1:]])
        both = _decode(decoder, path, *_positions(grid, target))
        pyro.deterministic(f"{self.name}.forecast_latent", both[..., : self.latent_dim])
        pyro.deterministic(f"{self.name}.forecast", both[..., self.latent_dim :])

    def guide(
        self,
        times: Any,
        values: Any = None,
        mask: Any = None,
        *,
        t0: Any = None,
        target_times: Any = None,
    ) -> None:
        """The amortised guide: ``q(z0 | series)`` and the posterior SDE's path.

        Same arguments as `model` (``target_times`` is ignored). The posterior path's
        standard normals are drawn from torch's active RNG (probdyn's runners seed it).
        """
        lay = self._layout(times, values, mask, t0)
        if lay.values is None:
            raise ValueError("LatentSDE.guide: values are required to encode the series.")
        drift, diffusion, _ = self._shared()
        encoder = self._encoder()
        posterior_drift = self._mlp("posterior_drift", self.posterior_sizes, "softplus", 7)
        loc, scale, context = encoder(lay.times, lay.values, lay.mask, lay.t0)
        index = torch.as_tensor(lay.context_index, dtype=torch.long)
        context = torch.gather(context, 1, index[..., None].expand(*index.shape, self.context_dim))
        num_series, steps = lay.times.shape[0], len(lay.grid) - 1
        h = torch.as_tensor(np.diff(lay.grid), dtype=loc.dtype)
        series = pyro.plate(f"{self.name}.series", num_series, dim=-1)
        with series:
            z0 = pyro.sample(f"{self.name}.z0", dist.Normal(loc, scale).to_event(1))
        # One eps per path: z0's leading dims (a vectorised particle plate included).
        eps = _standard_normal((*z0.shape[:-1], steps, self.latent_dim), loc.dtype)
        path, e_prior, log_q, kl = _posterior_path(
            drift, posterior_drift, diffusion, z0, h, eps, context
        )
        with series:
            pyro.sample(
                f"{self.name}.path_noise", dist.Delta(e_prior, log_density=log_q, event_dim=2)
            )
        _guide_deterministic(f"{self.name}.path_kl", kl)
        _guide_deterministic(f"{self.name}.posterior_path", path)

    # -- prediction ---------------------------------------------------------------------------
    def predict(
        self,
        params: dict[str, Any],
        times: Any,
        values: Any,
        mask: Any = None,
        *,
        target_times: Any,
        key: Any = 0,
        num_draws: int = 100,
        t0: Any = None,
    ) -> dict[str, np.ndarray]:
        """Decoded paths at ``target_times`` for (new) series, encoded by the guide.

        Each draw takes ``z0`` and the path from the guide up to the last observed
        time and continues with the prior SDE.

        Args:
            params: fitted params (``post.params``); missing ones keep their initial
                values.
            times: ``(B, T)`` observation times of the series the encoder conditions on.
            values: ``(B, T, D)`` their values (NaN allowed where masked).
            mask: which entries were observed (default: the finite ones).
            target_times: ``(B, T')`` or ``(T',)`` times to predict at.
            key: an int seed or a ``torch.Generator`` (the global torch RNG is left
                untouched).
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
        rows: dict[str, list[np.ndarray]] = {k: [] for k in names}
        with isolated(as_seed(key)), torch.no_grad():
            model, guide = with_params(self.model, params), with_params(self.guide, params)
            for _ in range(num_draws):
                g = poutine.trace(guide).get_trace(times, values, mask, t0=t0)
                m = poutine.trace(poutine.replay(model, trace=g)).get_trace(
                    times, values, mask, t0=t0, target_times=target_times
                )
                for k, v in names.items():
                    rows[k].append(_numpy(m.nodes[v]["value"]))
        return {k: np.stack(v) for k, v in rows.items()}

    def sample_prior(
        self,
        params: dict[str, Any],
        target_times: Any,
        *,
        num_series: int,
        t0: float,
        key: Any = 0,
    ) -> dict[str, np.ndarray]:
        """Paths of the learned prior: ``z0`` from its prior, the prior SDE, decoded.

        Args:
            params: fitted params (``post.params``); missing ones keep their
                initial values.
            target_times: ``(T',)`` increasing times, all at or after ``t0``.
            num_series: how many independent paths.
            t0: the start of the latent SDE (use the value used in fitting).
            key: an int seed or a ``torch.Generator``.

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
        target = np.asarray(_numpy(target_times), dtype=np.float64)
        if target.ndim != 1 or target.size == 0:
            raise ValueError(
                f"LatentSDE.sample_prior: target_times has shape {target.shape}; give a "
                "non-empty 1-D array of times."
            )
        times = np.broadcast_to(target, (num_series, target.size))
        with isolated(as_seed(key)), torch.no_grad():
            model: Callable[..., Any] = with_params(self.model, params)
            tr = poutine.trace(model).get_trace(times, t0=t0, target_times=target)
        return {
            "mean": _numpy(tr.nodes[f"{self.name}.forecast"]["value"]),
            "latent": _numpy(tr.nodes[f"{self.name}.forecast_latent"]["value"]),
        }


def _grid(t0: float, times: np.ndarray, dt: float, max_steps: int) -> np.ndarray:
    try:
        grid, _ = time_grid(t0, times, dt, max_steps)
    except ValueError as err:
        raise ValueError(str(err).replace("NeuralSDE", "LatentSDE", 1)) from None
    return grid


def _scalar_time(t0: Any) -> float:
    value = np.asarray(_numpy(t0), dtype=np.float64)
    if value.size != 1 or not np.isfinite(value).all():
        raise ValueError(f"LatentSDE: t0={t0!r} must be a concrete, finite scalar time.")
    return float(value.reshape(()))
