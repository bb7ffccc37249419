"""Latent ODEs for irregularly sampled series (Chen et al. 2018; Rubanova et al. 2019).

The Pyro twin of `probdyn.numpyro.primitives.latent_ode`: the same names, arguments, defaults, site
names, shapes and numbers (given the same weights, the same log density and the same
``q(z0)``; see tests/test_latent_parity.py). A variational auto-encoder whose latent is
the initial state ``z0`` of an ODE:

* generative model, per series ``b``: ``z0_b ~ Normal(0, I)``, ``z_b(t)`` solves
  ``dz/dt = f_theta(z)`` from the common ``t0``, and every observed entry is
  ``y_bij ~ Normal(decoder(z_b(t_bi))_j, obs_scale)``;
* amortised guide: a GRU reads each series backwards in time (the observed values,
  the observation mask and ``t - t0`` at each time) and gives the mean and scale of
  ``q(z0_b | series)``.

A batch of series of different lengths is padded to ``(B, T)`` times, ``(B, T, D)``
values and a boolean mask (`pad_series`, NumPy, shared with the NumPyro backend).
Missing values and padding are masked out of the likelihood (their log density is
exactly zero and their values never reach it) and the encoder skips time points with
no observed entry. Network weights are ``pyro.param`` sites, stored ``(in, out)`` as in
`probdyn.pyro.BayesianMLP`: the ODE field and decoder in the model, the encoder in the
guide. Their initial values are those of the NumPyro twin for the same ``seed``.

Fit it with the ``VI`` engine and the encoder as the guide::

    post = probdyn.fit(lode.model, times, values, mask, t0=0.0, backend="pyro",
                       engine=probdyn.VI(guide=lode.guide, num_steps=...))

then forecast or interpolate with ``post.predict(times, values, mask, t0=0.0,
target_times=new_times, sites=["latent.forecast"])``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor

from probdyn.core.locking import locked
from probdyn.primitives.init_weights import init_gru as _init_gru
from probdyn.primitives.init_weights import init_layers as _init_layers
from probdyn.primitives.latent_ode import LatentODEBase, autonomous_field, nonfinite_value_error
from probdyn.primitives.series import PaddedSeries, pad_series
from probdyn.pyro.bridge import as_seed, isolated, torch_seed, with_params
from probdyn.pyro.primitives.bnn import ACTIVATIONS, MLP, Linear
from probdyn.pyro.primitives.ode import NeuralODE

__all__ = ["LatentODE", "PaddedSeries", "pad_series"]


def _softplus(x: Tensor) -> Tensor:
    # log(1 + e^x) exactly, as jax.nn.softplus (torch's F.softplus returns x above x = 20).
    return torch.logaddexp(x, x.new_zeros(()))


# -- initial weights (NumPy, as in the NumPyro twin, so one seed is one network) -----------
def _param(name: str, init: np.ndarray) -> Tensor:
    # A lazy initial value: built only when the parameter store has none yet.
    return cast(
        Tensor,
        pyro.param(name, lambda: torch.tensor(init, dtype=torch.get_default_dtype())),
    )


def _param_mlp(name: str, sizes: tuple[int, ...], act: str, seed: int) -> MLP:
    layers = tuple(
        Linear(_param(f"{name}.layers.{i}.weight", w), _param(f"{name}.layers.{i}.bias", b))
        for i, (w, b) in enumerate(_init_layers(sizes, seed))
    )
    return MLP(layers, ACTIVATIONS[act])


# -- the encoder ----------------------------------------------------------------------------
@dataclass(frozen=True)
class GRUEncoder:
    """A GRU run backwards in time over each series' observed points, then a linear head.

    Input at each time: ``(values * mask, mask, t - t0)``; time points with no
    observed entry leave the hidden state unchanged. Output: the loc and scale of
    a diagonal Gaussian over ``z0``. The equations (and weight layout) of the NumPyro
    twin, run over a batch of series at once.
    """

    w: Tensor  # (n_in + hidden, 3 hidden): update, reset, candidate
    b: Tensor  # (3 hidden,)
    head: MLP

    def __call__(
        self, times: Tensor, values: Tensor, mask: Tensor, t0: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``times (B, T)``, ``values (B, T, D)``, ``mask (B, T, D)`` -> loc, scale ``(B, L)``."""
        hidden = self.b.shape[0] // 3
        observed = mask.any(-1)
        x = torch.cat(
            [
                torch.where(mask, values, values.new_zeros(())),
                mask.to(values.dtype),
                (times - t0)[..., None].to(values.dtype),
            ],
            dim=-1,
        )
        w_zr, w_c = self.w[:, : 2 * hidden], self.w[:, 2 * hidden :]
        b_zr, b_c = self.b[: 2 * hidden], self.b[2 * hidden :]
        h = values.new_zeros(times.shape[0], hidden)
        for t in reversed(range(times.shape[1])):
            xt = x[:, t]
            gates = torch.cat([xt, h], dim=-1) @ w_zr + b_zr
            z, r = torch.sigmoid(gates[:, :hidden]), torch.sigmoid(gates[:, hidden:])
            cand = torch.tanh(torch.cat([xt, r * h], dim=-1) @ w_c + b_c)
            h = torch.where(observed[:, t, None], (1 - z) * h + z * cand, h)
        out = self.head(h)
        half = out.shape[-1] // 2
        return out[:, :half], _softplus(out[:, half:]) + 1e-4


# -- the model ------------------------------------------------------------------------------
def _tensor(x: Any, dtype: torch.dtype | None = None) -> Tensor:
    if isinstance(x, Tensor):
        return x if dtype is None else x.to(dtype)
    a = np.asarray(x)
    if not a.flags.writeable:  # torch warns on read-only arrays (broadcast views)
        a = np.array(a)
    if dtype is None and np.issubdtype(a.dtype, np.floating):
        dtype = torch.get_default_dtype()
    return torch.as_tensor(a, dtype=dtype)


class LatentODE(LatentODEBase[NeuralODE]):
    """A latent ODE over a batch of irregularly sampled series with missing values.

    ``model`` and ``guide`` are a Pyro model / amortised guide pair taking
    ``(times, values=None, mask=None, *, t0=None, target_times=None)`` (tensors or
    NumPy arrays; NumPy floats become torch's default dtype):

    * ``times`` ``(B, T)``, ``values`` ``(B, T, D)`` (NaN allowed where masked),
      ``mask`` ``(B, T)`` or ``(B, T, D)`` bool (default: the finite entries of
      ``values``); each row of ``times`` strictly increasing (see `pad_series`).
    * ``t0``: the common start of the latent ODE (default: the earliest time).
    * ``target_times`` ``(B, T')`` or ``(T',)``: also record the decoded mean at
      these times as the deterministic site ``f"{name}.forecast"`` ``(B, T', D)``
      (interpolation or extrapolation).

    Sites (``name`` prefixed): ``z0`` ``(B, latent_dim)`` in the plate
    ``series``; the observed ``y`` (masked); the params ``field.*`` and
    ``decoder.*`` (model) and ``encoder.*`` (guide). All as in
    `probdyn.numpyro.primitives.latent_ode.LatentODE`, whose params load here by name.

    Args:
        obs_dim: D, the observation dimension.
        latent_dim: dimension of ``z0``.
        field_sizes: hidden widths of the ODE field MLP (ELU).
        decoder_sizes: hidden widths of the decoder MLP (ReLU).
        encoder_hidden: GRU hidden size.
        obs_scale: the fixed observation noise standard deviation.
        solver: passed to `NeuralODE`, as are ``rtol``, ``atol``, ``max_steps``,
            ``adjoint`` and ``dt0`` (a
            fixed-step solver such as ``"heun"`` needs ``dt0``).
        name: site-name prefix.
        seed: seed of the initial network weights (the NumPyro twin's for that seed).

    Raises:
        ValueError: for a non-positive ``obs_dim``, ``latent_dim``,
            ``encoder_hidden`` or ``obs_scale``, or bad solver options.

    Example:
        >>> import numpy as np
        >>> from pyro import poutine
        >>> lode = LatentODE(obs_dim=2, latent_dim=3)
        >>> times = np.tile(np.linspace(0.0, 1.0, 5), (4, 1))
        >>> with poutine.seed(rng_seed=0):
        ...     tr = poutine.trace(lode.model).get_trace(times, target_times=times)
        >>> tuple(tr.nodes["latent.z0"].get("value").shape)
        (4, 3)
        >>> tuple(tr.nodes["latent.forecast"].get("value").shape)
        (4, 5, 2)
    """

    def _neural_ode(self, name: str, options: dict[str, Any]) -> NeuralODE:
        return NeuralODE(autonomous_field, name=name, **options)

    # -- networks as param sites ----------------------------------------------------------
    def _mlp(self, part: str, sizes: tuple[int, ...], act: str, seed: int) -> MLP:
        return _param_mlp(f"{self.name}.{part}", sizes, act, self._weight_seed(seed))

    def _encoder(self) -> GRUEncoder:
        prefix = f"{self.name}.encoder"
        w, b = _init_gru(2 * self.obs_dim + 1, self.encoder_hidden, self._weight_seed(3))
        w_site, b_site = _param(f"{prefix}.w", w), _param(f"{prefix}.b", b)
        head_sizes = (self.encoder_hidden, 2 * self.latent_dim)
        head = _param_mlp(f"{prefix}.head", head_sizes, "identity", self._weight_seed(4))
        return GRUEncoder(w_site, b_site, head)

    # -- data normalisation -----------------------------------------------------------------
    def _data(
        self, times: Any, values: Any, mask: Any, t0: Any
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        times = _tensor(times)
        shape = self._observation_shape(tuple(times.shape))
        vals = None if values is None else _tensor(values)
        if vals is not None:
            self._check_values_shape(tuple(vals.shape), shape)
        if mask is None:
            m = torch.ones(shape, dtype=torch.bool) if vals is None else torch.isfinite(vals)
        else:
            m = _tensor(mask).to(torch.bool)
            if self._mask_needs_axis(tuple(m.shape), shape):
                m = m[..., None]
            m = m.expand(shape)
        if vals is not None:
            bad = m & ~torch.isfinite(vals)
            if bool(bad.any()):
                raise nonfinite_value_error(torch.nonzero(bad)[0].tolist())
        start = times[:, 0].min() if t0 is None else _tensor(t0, times.dtype)
        return times, vals, m, start

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
        """The generative model (see the class docstring for the arguments)."""
        times, vals, m, start = self._data(times, values, mask, t0)
        field = self._mlp("field", self.field_sizes, "elu", 1)
        decoder = self._mlp("decoder", self.decoder_sizes, "relu", 2)
        series = pyro.plate(f"{self.name}.series", times.shape[0], dim=-1)
        zero = times.new_zeros(())
        with series:
            z0 = pyro.sample(
                f"{self.name}.z0", dist.Normal(zero, 1.0).expand([self.latent_dim]).to_event(1)
            )
        mean = decoder(_solve(self.ode, z0, times, field, start))
        # Masked entries: exactly zero log density, and their (possibly NaN) values are
        # replaced before they reach the likelihood or its gradient.
        obs = None if vals is None else torch.where(m, vals, vals.new_zeros(()))
        with series:
            pyro.sample(
                f"{self.name}.y",
                dist.Normal(mean, self.obs_scale).mask(m).to_event(2),
                obs=obs,
            )
        if target_times is not None:
            target = _tensor(target_times, times.dtype)
            if target.ndim == 1:
                target = target.expand(times.shape[0], target.shape[0])
            ahead = _solve(self.forecast_ode, z0, target, field, start)
            pyro.deterministic(f"{self.name}.forecast", decoder(ahead))

    def guide(
        self,
        times: Any,
        values: Any = None,
        mask: Any = None,
        *,
        t0: Any = None,
        target_times: Any = None,
    ) -> None:
        """The amortised guide ``q(z0 | series)`` (same arguments as `model`)."""
        times, vals, m, start = self._data(times, values, mask, t0)
        if vals is None:
            raise ValueError("LatentODE.guide: values are required to encode the series.")
        loc, scale = self._encoder()(times, vals, m, start)
        with pyro.plate(f"{self.name}.series", times.shape[0], dim=-1):
            pyro.sample(f"{self.name}.z0", dist.Normal(loc, scale).to_event(1))

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
        """Decoded trajectories at ``target_times`` with ``z0`` drawn from the guide.

        Runs in a private parameter store and with torch's RNG seeded from ``key``;
        neither the user's store nor the global RNG is changed.

        Args:
            params: fitted params (``Posterior.params``, from either backend).
            times: ``(B, T)`` observation times of the series the encoder conditions on.
            values: ``(B, T, D)`` their values (NaN allowed where masked).
            mask: which entries were observed (default: the finite ones).
            target_times: ``(B, T')`` or ``(T',)`` times to predict at.
            key: an int seed or a ``torch.Generator``.
            num_draws: draws of ``z0`` per series.
            t0: the latent ODE's start (use the value used in fitting).

        Returns:
            ``{"mean": (num_draws, B, T', D), "z0": (num_draws, B, latent_dim)}``;
            observation noise is ``obs_scale`` on top of ``mean``.

        Example:
            >>> pred = lode.predict(post.params, t, y, target_times=t_new)  # doctest: +SKIP
        """
        model, guide = with_params(self.model, params), with_params(self.guide, params)
        means: list[Tensor] = []
        z0s: list[Tensor] = []
        with isolated(torch_seed(as_seed(key))), torch.no_grad():
            for _ in range(num_draws):
                q = poutine.trace(guide).get_trace(times, values, mask, t0=t0)
                tr = poutine.trace(poutine.replay(model, trace=q)).get_trace(
                    times, values, mask, t0=t0, target_times=target_times
                )
                means.append(cast(Tensor, tr.nodes[f"{self.name}.forecast"]["value"]))
                z0s.append(cast(Tensor, q.nodes[f"{self.name}.z0"]["value"]))
        return {"mean": torch.stack(means).numpy(), "z0": torch.stack(z0s).numpy()}


def _solve(ode: NeuralODE, z0: Tensor, times: Tensor, field: MLP, t0: Tensor) -> Tensor:
    # 2-D times: one tensor (B, T, latent_dim), never the ragged list form.
    return cast(Tensor, ode(z0, times, field, t0=t0))
