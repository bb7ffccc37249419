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

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, ArrayLike
from numpyro import handlers
from numpyro.infer import Predictive

from probdyn.core.locking import locked
from probdyn.numpyro.bridge import ConcreteValueError, as_key
from probdyn.numpyro.primitives.bnn import ACTIVATIONS, MLP, _init_mlp, lift
from probdyn.numpyro.primitives.latent_sde_networks import (
    ContextEncoder,
    DiagonalDiffusion,
    decode,
    encode,
    posterior_path,
    prior_path,
)
from probdyn.numpyro.primitives.ode import _concrete
from probdyn.primitives.init_weights import init_diffusion as _init_diffusion
from probdyn.primitives.init_weights import init_gru as _init_gru
from probdyn.primitives.latent_grid import BatchLayout, prior_target_times
from probdyn.primitives.latent_sde import LatentSDEBase

__all__ = ["LatentSDE"]

_WEIGHTS = dist.Normal(0.0, 1.0)  # unused by param sites; `lift` needs a prior argument


# -- the model ------------------------------------------------------------------------------
class LatentSDE(LatentSDEBase):
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

    _NOT_CONCRETE = ConcreteValueError

    # -- NumPy views of the arguments (the hooks of LatentSDEBase) ----------------------------
    def _as_numpy(self, x: Any) -> np.ndarray | None:
        """``x`` as a NumPy array, or None where it is a JAX tracer."""
        return _concrete(x)

    def _time_value(self, t0: Any) -> Any:
        """``t0``'s concrete value (None where traced)."""
        return _concrete(t0)

    def _values_array(self, values: Any) -> Array:
        """``values`` as a JAX array (possibly traced)."""
        return jnp.asarray(values)

    def _finite_values(self, values: Any, array: Any) -> np.ndarray | None:
        """The finite entries of the given ``values`` (None where traced)."""
        raw = _concrete(values)
        return None if raw is None else np.isfinite(np.asarray(raw, dtype=float))

    # -- networks as param sites ----------------------------------------------------------
    def _mlp(self, part: str, sizes: tuple[int, ...], act: str, seed: int) -> MLP:
        template = _init_mlp(sizes, ACTIVATIONS[act], seed=self._part_seed(seed))
        return lift(f"{self.name}.{part}", template, _WEIGHTS, bayesian=lambda p: False)

    def _shared(self) -> tuple[MLP, DiagonalDiffusion, MLP]:
        """The prior drift, diffusion and decoder (params of both model and guide)."""
        drift = self._mlp("prior_drift", self.prior_sizes, "softplus", 1)
        arrays = _init_diffusion(self.latent_dim, self.diffusion_hidden, self._part_seed(2))
        template = DiagonalDiffusion(*(jnp.asarray(a) for a in arrays))
        diffusion = lift(f"{self.name}.diffusion", template, _WEIGHTS, bayesian=lambda p: False)
        decoder = self._mlp("decoder", self.decoder_sizes, "relu", 3)
        return drift, diffusion, decoder

    def _encoder(self) -> ContextEncoder:
        """The backwards GRU and its heads (params of the guide)."""
        n_in = 2 * self.obs_dim + 1
        w, b = _init_gru(n_in, self.encoder_hidden, self._part_seed(4))
        identity = ACTIVATIONS["identity"]
        z0_sizes = (self.encoder_hidden, 2 * self.latent_dim)
        z0_head = _init_mlp(z0_sizes, identity, self._part_seed(5))
        ctx_head = _init_mlp((self.encoder_hidden, self.context_dim), identity, self._part_seed(6))
        template = ContextEncoder(jnp.asarray(w), jnp.asarray(b), z0_head, ctx_head)
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
        return self._plan(times, None, mask, t0).grid

    def _layout(self, times: Any, values: Any, mask: Any, t0: Any) -> BatchLayout:
        """The checked batch on its step grid, with JAX ``times``, ``values`` and ``mask``."""
        lay = self._plan(times, values, mask, t0)
        dtype = jnp.result_type(float)
        return lay._replace(times=jnp.asarray(lay.times, dtype), mask=jnp.asarray(lay.mask))

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
        path = prior_path(drift, diffusion, z0, h, noise)
        mean = decode(decoder, path, *lay.obs_pos)[..., self.latent_dim :]
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
        lay: BatchLayout,
        target_times: ArrayLike,
        path: Array,
        drift: MLP,
        diffusion: DiagonalDiffusion,
        decoder: MLP,
        series: numpyro.plate,
    ) -> None:
        """Record the decoded path at ``target_times`` (prior SDE past the grid's end)."""
        plan = self._forecast_plan(target_times, lay)
        if plan.extra is not None:
            h = jnp.asarray(np.diff(plan.extra), path.dtype)
            with series:
                noise = numpyro.sample(
                    f"{self.name}.forecast_noise",
                    dist.Normal(0.0, 1.0)
                    .expand([len(plan.extra) - 1, self.latent_dim])
                    .to_event(2),
                )
            ahead = prior_path(drift, diffusion, path[:, -1], h, noise)
            path = jnp.concatenate([path, ahead[:, 1:]], axis=1)
        both = decode(decoder, path, *plan.positions)
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
        lay = self._guide_layout(times, values, mask, t0)
        drift, diffusion, _ = self._shared()
        encoder = self._encoder()
        posterior_drift = self._mlp("posterior_drift", self.posterior_sizes, "softplus", 7)
        start = jnp.asarray(lay.t0, lay.times.dtype)
        loc, scale, context = encode(
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
        path, e_prior, log_q, kl = posterior_path(
            drift, posterior_drift, diffusion, z0, h, eps, context
        )
        with series:
            numpyro.sample(
                f"{self.name}.path_noise", dist.Delta(e_prior, log_density=log_q, event_dim=2)
            )
        numpyro.deterministic(f"{self.name}.path_kl", kl)
        numpyro.deterministic(f"{self.name}.posterior_path", path)

    # -- prediction ---------------------------------------------------------------------------
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
        names = self._prediction_sites()
        pred = Predictive(
            self.model,
            guide=self.guide,
            params=params,
            num_samples=num_draws,
            return_sites=list(names.values()),
        )
        out = pred(as_key(key), times, values, mask, t0=t0, target_times=target_times)
        return {k: np.asarray(out[v]) for k, v in names.items()}

    @locked
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
        target, times = prior_target_times(num_series, target_times)
        fixed = {k: jnp.asarray(v) for k, v in params.items()}

        @jax.jit
        def run(k: Array) -> tuple[Array, Array]:
            model = handlers.seed(handlers.substitute(self.model, data=fixed), k)
            tr = handlers.trace(model).get_trace(times, t0=t0, target_times=target)
            return tr[f"{self.name}.forecast"]["value"], tr[f"{self.name}.forecast_latent"]["value"]

        mean, latent = run(as_key(key))
        return {"mean": np.asarray(mean), "latent": np.asarray(latent)}
