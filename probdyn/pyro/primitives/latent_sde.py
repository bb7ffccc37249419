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

from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import Tensor

from probdyn.core.locking import locked
from probdyn.primitives.init_weights import init_diffusion as _init_diffusion
from probdyn.primitives.init_weights import init_gru as _init_gru
from probdyn.primitives.init_weights import init_layers as _init_layers
from probdyn.primitives.latent_grid import BatchLayout, prior_target_times
from probdyn.primitives.latent_sde import LatentSDEBase
from probdyn.pyro.bridge import as_seed, isolated, torch_seed, with_params
from probdyn.pyro.primitives.bnn import ACTIVATIONS, MLP, Linear
from probdyn.pyro.primitives.latent_sde_networks import (
    ContextEncoder,
    DiagonalDiffusion,
    decode,
    posterior_path,
    prior_path,
)

__all__ = ["LatentSDE"]


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


def _numpy(x: Any) -> np.ndarray:
    """A tensor (detached, on the CPU) or anything array-like as a NumPy array."""
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _tensor(x: Any, dtype: torch.dtype) -> Tensor:
    """A tensor or anything array-like as a tensor of ``dtype``."""
    if isinstance(x, Tensor):
        return x.to(dtype)
    return torch.as_tensor(np.array(x, dtype=np.float64), dtype=dtype)  # a writable copy


# -- the model ------------------------------------------------------------------------------
class LatentSDE(LatentSDEBase):
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

    # -- NumPy views of the arguments (the hooks of LatentSDEBase) ----------------------------
    def _as_numpy(self, x: Any) -> np.ndarray:
        """``x`` (a NumPy array, a tensor or a sequence) as a NumPy array."""
        return _numpy(x)

    def _time_value(self, t0: Any) -> np.ndarray:
        """``t0`` as a float64 NumPy array."""
        return np.asarray(_numpy(t0), dtype=np.float64)

    def _values_array(self, values: Any) -> Tensor:
        """``values`` as a tensor of torch's default dtype."""
        return _tensor(values, torch.get_default_dtype())

    def _finite_values(self, values: Any, array: Any) -> np.ndarray:
        """The finite entries of ``values`` as converted (``array``)."""
        return np.isfinite(_numpy(array))

    # -- networks as param sites ----------------------------------------------------------
    def _mlp(self, part: str, sizes: tuple[int, ...], act: str, seed: int) -> MLP:
        return _param_mlp(f"{self.name}.{part}", sizes, act, self._part_seed(seed))

    def _shared(self) -> tuple[MLP, DiagonalDiffusion, MLP]:
        """The prior drift, diffusion and decoder (params of both model and guide)."""
        drift = self._mlp("prior_drift", self.prior_sizes, "softplus", 1)
        arrays = _init_diffusion(self.latent_dim, self.diffusion_hidden, self._part_seed(2))
        diffusion = DiagonalDiffusion(
            *(
                _param(f"{self.name}.diffusion.{field}", a)
                for field, a in zip(("w1", "b1", "w2", "b2"), arrays)
            )
        )
        decoder = self._mlp("decoder", self.decoder_sizes, "relu", 3)
        return drift, diffusion, decoder

    def _encoder(self) -> ContextEncoder:
        """The backwards GRU and its heads (params of the guide)."""
        prefix = f"{self.name}.encoder"
        w, b = _init_gru(2 * self.obs_dim + 1, self.encoder_hidden, self._part_seed(4))
        return ContextEncoder(
            _param(f"{prefix}.w", w),
            _param(f"{prefix}.b", b),
            _param_mlp(
                f"{prefix}.z0_head",
                (self.encoder_hidden, 2 * self.latent_dim),
                "identity",
                self._part_seed(5),
            ),
            _param_mlp(
                f"{prefix}.context_head",
                (self.encoder_hidden, self.context_dim),
                "identity",
                self._part_seed(6),
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
        return self._plan(times, None, mask, t0).grid

    def _layout(self, times: Any, values: Any, mask: Any, t0: Any) -> BatchLayout:
        """The checked batch on its step grid, with ``times``, ``values`` and ``mask`` as
        tensors."""
        lay = self._plan(times, values, mask, t0)
        return lay._replace(
            times=torch.as_tensor(lay.times, dtype=torch.get_default_dtype()),
            mask=torch.as_tensor(np.array(lay.mask)),  # a writable copy
        )

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
        path = prior_path(drift, diffusion, z0, h, noise)
        mean = decode(decoder, path, *lay.obs_pos)[..., self.latent_dim :]
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
        lay: BatchLayout,
        target_times: Any,
        path: Tensor,
        drift: MLP,
        diffusion: DiagonalDiffusion,
        decoder: MLP,
        series: pyro.plate,
    ) -> None:
        """Record the decoded path at ``target_times`` (prior SDE past the grid's end)."""
        plan = self._forecast_plan(target_times, lay)
        if plan.extra is not None:
            h = torch.as_tensor(np.diff(plan.extra), dtype=path.dtype)
            standard = dist.Normal(
                torch.zeros((), dtype=path.dtype), torch.ones((), dtype=path.dtype)
            )
            with series:
                noise = pyro.sample(
                    f"{self.name}.forecast_noise",
                    standard.expand([len(plan.extra) - 1, self.latent_dim]).to_event(2),
                )
            ahead = prior_path(drift, diffusion, path[..., -1, :], h, noise)
            path = torch.cat([path, ahead[..., 1:, :]], dim=-2)
        both = decode(decoder, path, *plan.positions)
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
        lay = self._guide_layout(times, values, mask, t0)
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
        path, e_prior, log_q, kl = posterior_path(
            drift, posterior_drift, diffusion, z0, h, eps, context
        )
        with series:
            pyro.sample(
                f"{self.name}.path_noise", dist.Delta(e_prior, log_density=log_q, event_dim=2)
            )
        _guide_deterministic(f"{self.name}.path_kl", kl)
        _guide_deterministic(f"{self.name}.posterior_path", path)

    # -- prediction ---------------------------------------------------------------------------
    @locked
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
        names = self._prediction_sites()
        rows: dict[str, list[np.ndarray]] = {k: [] for k in names}
        with isolated(torch_seed(as_seed(key))), torch.no_grad():
            model, guide = with_params(self.model, params), with_params(self.guide, params)
            for _ in range(num_draws):
                g = poutine.trace(guide).get_trace(times, values, mask, t0=t0)
                m = poutine.trace(poutine.replay(model, trace=g)).get_trace(
                    times, values, mask, t0=t0, target_times=target_times
                )
                for k, v in names.items():
                    rows[k].append(_numpy(m.nodes[v]["value"]))
        return {k: np.stack(v) for k, v in rows.items()}

    @locked
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
        target, times = prior_target_times(num_series, target_times, _numpy)
        with isolated(torch_seed(as_seed(key))), torch.no_grad():
            model: Callable[..., Any] = with_params(self.model, params)
            tr = poutine.trace(model).get_trace(times, t0=t0, target_times=target)
        return {
            "mean": _numpy(tr.nodes[f"{self.name}.forecast"]["value"]),
            "latent": _numpy(tr.nodes[f"{self.name}.forecast_latent"]["value"]),
        }
