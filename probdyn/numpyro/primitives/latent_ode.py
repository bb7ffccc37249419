"""Latent ODEs for irregularly sampled series (Chen et al. 2018; Rubanova et al. 2019).

A variational auto-encoder whose latent is the initial state ``z0`` of an ODE:

* generative model, per series ``b``: ``z0_b ~ Normal(0, I)``, ``z_b(t)`` solves
  ``dz/dt = f_theta(z)`` from the common ``t0``, and every observed entry is
  ``y_bij ~ Normal(decoder(z_b(t_bi))_j, obs_scale)``;
* amortised guide: a GRU reads each series backwards in time (the observed values,
  the observation mask and ``t - t0`` at each time) and gives the mean and scale of
  ``q(z0_b | series)``.

A batch of series of different lengths is padded to ``(B, T)`` times, ``(B, T, D)``
values and a boolean mask (`pad_series`). Missing values and padding are masked out
of the likelihood (their log density is exactly zero and their values never reach
it) and the encoder skips time points with no observed entry. Network weights are
``numpyro.param`` sites: the ODE field and decoder in the model, the encoder in the
guide.

Fit it with the ``VI`` engine and the encoder as the guide::

    post = probdyn.fit(lode.model, times, values, mask, t0=0.0,
                       engine=probdyn.VI(guide=lode.guide, num_steps=...))

then forecast or interpolate with ``post.predict(times, values, mask, t0=0.0,
target_times=new_times, sites=["latent.forecast"])``.
"""

from __future__ import annotations

from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, ArrayLike, Float
from numpyro.infer import Predictive

from probdyn.core.locking import locked
from probdyn.numpyro.bridge import as_key
from probdyn.numpyro.primitives.bnn import ACTIVATIONS, MLP, _init_mlp, lift
from probdyn.numpyro.primitives.ode import NeuralODE, _concrete
from probdyn.primitives.init_weights import init_gru as _init_gru
from probdyn.primitives.latent_ode import LatentODEBase, autonomous_field, nonfinite_value_error
from probdyn.primitives.series import PaddedSeries, pad_series

__all__ = ["LatentODE", "PaddedSeries", "pad_series"]

_WEIGHTS = dist.Normal(0.0, 1.0)  # unused by param sites; `lift` needs a prior argument


# -- the encoder ----------------------------------------------------------------------------
class GRUEncoder(eqx.Module):
    """A GRU run backwards in time over a series' observed points, then a linear head.

    Input at each time: ``(values * mask, mask, t - t0)``; time points with no
    observed entry leave the hidden state unchanged. Output: the loc and scale of
    a diagonal Gaussian over ``z0``.
    """

    w: Float[Array, "n_in_h three_h"]
    b: Float[Array, " three_h"]
    head: MLP

    def __call__(
        self,
        times: Float[Array, " T"],
        values: Float[Array, "T D"],
        mask: Array,
        t0: Array,
    ) -> tuple[Array, Array]:
        hidden = self.b.shape[0] // 3
        observed = jnp.any(mask, axis=-1)
        m = mask.astype(values.dtype)
        x = jnp.concatenate([jnp.where(mask, values, 0.0), m, (times - t0)[:, None]], axis=-1)

        def step(h: Array, inp: tuple[Array, Array]) -> tuple[Array, None]:
            xt, seen = inp
            gates = jnp.concatenate([xt, h]) @ self.w[:, : 2 * hidden] + self.b[: 2 * hidden]
            z, r = jax.nn.sigmoid(gates[:hidden]), jax.nn.sigmoid(gates[hidden:])
            cand = jnp.tanh(
                jnp.concatenate([xt, r * h]) @ self.w[:, 2 * hidden :] + self.b[2 * hidden :]
            )
            return jnp.where(seen, (1 - z) * h + z * cand, h), None

        h, _ = jax.lax.scan(step, jnp.zeros(hidden, values.dtype), (x, observed), reverse=True)
        out = self.head(h)
        half = out.shape[-1] // 2
        return out[:half], jax.nn.softplus(out[half:]) + 1e-4


# -- the model ------------------------------------------------------------------------------
class LatentODE(LatentODEBase[NeuralODE]):
    """A latent ODE over a batch of irregularly sampled series with missing values.

    ``model`` and ``guide`` are a NumPyro model / amortised guide pair taking
    ``(times, values=None, mask=None, *, t0=None, target_times=None)``:

    * ``times`` ``(B, T)``, ``values`` ``(B, T, D)`` (NaN allowed where masked),
      ``mask`` ``(B, T)`` or ``(B, T, D)`` bool (default: the finite entries of
      ``values``); each row of ``times`` strictly increasing (see `pad_series`).
    * ``t0``: the common start of the latent ODE (default: the earliest time).
    * ``target_times`` ``(B, T')`` or ``(T',)``: also record the decoded mean at
      these times as the deterministic site ``f"{name}.forecast"`` ``(B, T', D)``
      (interpolation or extrapolation).

    Sites (``name`` prefixed): ``z0`` ``(B, latent_dim)`` in the plate
    ``series``; the observed ``y`` (masked); the params ``field.*`` and
    ``decoder.*`` (model) and ``encoder.*`` (guide).

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
        seed: seed of the initial network weights.

    Example:
        >>> import numpy as np
        >>> from numpyro import handlers
        >>> lode = LatentODE(obs_dim=2, latent_dim=3)
        >>> times = np.tile(np.linspace(0.0, 1.0, 5), (4, 1))
        >>> with handlers.seed(rng_seed=0):
        ...     tr = handlers.trace(lode.model).get_trace(times, target_times=times)
        >>> tr["latent.z0"].get("value").shape, tr["latent.forecast"].get("value").shape
        ((4, 3), (4, 5, 2))
    """

    def _neural_ode(self, name: str, options: dict[str, Any]) -> NeuralODE:
        return NeuralODE(autonomous_field, name=name, **options)

    # -- networks as param sites ----------------------------------------------------------
    def _mlp(self, part: str, sizes: tuple[int, ...], act: str, seed: int) -> MLP:
        template = _init_mlp(sizes, ACTIVATIONS[act], seed=self._weight_seed(seed))
        return lift(f"{self.name}.{part}", template, _WEIGHTS, bayesian=lambda p: False)

    def _encoder(self) -> GRUEncoder:
        n_in = 2 * self.obs_dim + 1
        w, b = _init_gru(n_in, self.encoder_hidden, self._weight_seed(3))
        head_sizes = (self.encoder_hidden, 2 * self.latent_dim)
        head = _init_mlp(head_sizes, ACTIVATIONS["identity"], self._weight_seed(4))
        template = GRUEncoder(jnp.asarray(w), jnp.asarray(b), head)
        return lift(f"{self.name}.encoder", template, _WEIGHTS, bayesian=lambda p: False)

    # -- data normalisation -----------------------------------------------------------------
    def _data(
        self, times: ArrayLike, values: ArrayLike | None, mask: ArrayLike | None, t0: Any
    ) -> tuple[Array, Array | None, Array, Array]:
        times = jnp.asarray(times)
        shape = self._observation_shape(tuple(times.shape))
        vals = None if values is None else jnp.asarray(values)
        if vals is not None:
            self._check_values_shape(tuple(vals.shape), shape)
        if mask is None:
            m = jnp.ones(shape, bool) if vals is None else jnp.isfinite(vals)
        else:
            m = jnp.asarray(mask).astype(bool)
            if self._mask_needs_axis(tuple(m.shape), shape):
                m = m[..., None]
            m = jnp.broadcast_to(m, shape)
        concrete = None if vals is None else _concrete(jnp.where(m, vals, 0.0))
        if concrete is not None and not np.all(np.isfinite(concrete)):
            raise nonfinite_value_error(np.argwhere(~np.isfinite(concrete))[0])
        start = jnp.min(times[:, 0]) if t0 is None else jnp.asarray(t0, times.dtype)
        return times, vals, m, start

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
        """The generative model (see the class docstring for the arguments)."""
        times, vals, m, start = self._data(times, values, mask, t0)
        field = self._mlp("field", self.field_sizes, "elu", 1)
        decoder = self._mlp("decoder", self.decoder_sizes, "relu", 2)
        series = numpyro.plate(f"{self.name}.series", times.shape[0])
        with series:
            z0 = numpyro.sample(
                f"{self.name}.z0", dist.Normal(0.0, 1.0).expand([self.latent_dim]).to_event(1)
            )
        mean = decoder(_solve(self.ode, z0, times, field, start))
        # Masked entries: exactly zero log density, and their (possibly NaN) values are
        # replaced before they reach the likelihood or its gradient.
        obs = None if vals is None else jnp.where(m, vals, 0.0)
        with series:
            numpyro.sample(
                f"{self.name}.y",
                dist.Normal(mean, self.obs_scale).mask(m).to_event(2),
                obs=obs,
            )
        if target_times is not None:
            target = jnp.asarray(target_times, times.dtype)
            if target.ndim == 1:
                target = jnp.broadcast_to(target, (times.shape[0], target.shape[0]))
            ahead = _solve(self.forecast_ode, z0, target, field, start)
            numpyro.deterministic(f"{self.name}.forecast", decoder(ahead))

    def guide(
        self,
        times: ArrayLike,
        values: ArrayLike | None = None,
        mask: ArrayLike | None = None,
        *,
        t0: Any = None,
        target_times: ArrayLike | None = None,
    ) -> None:
        """The amortised guide ``q(z0 | series)`` (same arguments as `model`)."""
        times, vals, m, start = self._data(times, values, mask, t0)
        if vals is None:
            raise ValueError("LatentODE.guide: values are required to encode the series.")
        encoder = self._encoder()
        loc, scale = jax.vmap(encoder, in_axes=(0, 0, 0, None))(times, vals, m, start)
        with numpyro.plate(f"{self.name}.series", times.shape[0]):
            numpyro.sample(f"{self.name}.z0", dist.Normal(loc, scale).to_event(1))

    @locked
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
        """Decoded trajectories at ``target_times`` with ``z0`` drawn from the guide.

        Args:
            params: fitted params (`Posterior.params` of the fit).
            times: ``(B, T)`` observation times of the series the encoder conditions on.
            values: ``(B, T, D)`` their values (NaN allowed where masked).
            mask: which entries were observed (default: the finite ones).
            target_times: ``(B, T')`` or ``(T',)`` times to predict at.
            key: an int seed or a JAX key.
            num_draws: draws of ``z0`` per series.
            t0: the latent ODE's start (use the value used in fitting).

        Returns:
            ``{"mean": (num_draws, B, T', D), "z0": (num_draws, B, latent_dim)}``;
            observation noise is ``obs_scale`` on top of ``mean``.

        Example:
            >>> pred = lode.predict(fit.params, t, y, target_times=t_new)  # doctest: +SKIP
        """
        pred = Predictive(
            self.model,
            guide=self.guide,
            params=params,
            num_samples=num_draws,
            return_sites=[f"{self.name}.forecast", f"{self.name}.z0"],
        )
        out = pred(as_key(key), times, values, mask, t0=t0, target_times=target_times)
        return {
            "mean": np.asarray(out[f"{self.name}.forecast"]),
            "z0": np.asarray(out[f"{self.name}.z0"]),
        }


def _solve(ode: NeuralODE, z0: Array, times: Array, field: MLP, t0: Array) -> Array:
    # 2-D times: one array (B, T, latent_dim), never the ragged list form.
    return cast(Array, ode(z0, times, field, t0=t0))
