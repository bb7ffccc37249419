"""The networks of the neural processes on NumPyro: `CNP`, `ANP`, `LNP` and their constructors.

`ConditionalNP`, `AttentiveNP` and `LatentNP` are called inside a model: they check their
options and lay the network out with `probdyn.primitives.neural_process` (shared with the Pyro
twin), register the weights as ``param`` sites, and return an equinox module that maps a
(padded, masked) context set and target inputs to a per-point Gaussian predictive. The models
and guides that use them are in `probdyn.numpyro.primitives.neural_process`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from jaxtyping import Array, Float

from probdyn.numpyro.primitives.bnn import ACTIVATIONS, MLP, Linear
from probdyn.primitives.neural_process import (
    attentive_np_layout,
    check_latent_input,
    conditional_np_layout,
    latent_np_layout,
    missing_latent_path,
    param_layers,
)

__all__ = ["ANP", "CNP", "LNP", "AttentiveNP", "ConditionalNP", "LatentNP"]


def _masked_mean(h: Array, mask: Array) -> Array:
    """Mean of ``h (..., n, d)`` over the points where ``mask (..., n)`` is True."""
    w = jnp.asarray(mask, h.dtype)[..., None]
    # max(., 1) keeps an empty set finite (the mean is 0 then).
    return jnp.sum(w * h, axis=-2) / jnp.maximum(jnp.sum(w, axis=-2), 1.0)


def _per_target(r: Array, x_target: Array) -> Array:
    """A per-task vector ``(..., d)`` repeated for every target point: ``(..., n_t, d)``."""
    return jnp.broadcast_to(r[..., None, :], (*x_target.shape[:-1], r.shape[-1]))


def _latent_gaussian(
    encoder: MLP, head: MLP, x: Array, y: Array, mask: Array
) -> tuple[Array, Array]:
    """``(loc, scale)`` of ``z`` given the masked set ``(x, y)``: mean pool, then the head."""
    s = _masked_mean(encoder(jnp.concatenate([x, y], axis=-1)), mask)
    loc, raw = jnp.split(head(s), 2, axis=-1)
    # The 0.1 floor on the latent scale follows juho-lee/bnp and the DeepMind NP notebook.
    return loc, 0.1 + 0.9 * jax.nn.sigmoid(raw)


def _gaussian(out: Array, min_sd: float) -> tuple[Array, Array]:
    """The predictive ``(mean, sd)`` from the decoder's output ``[mu, raw]``."""
    mean, raw = jnp.split(out, 2, axis=-1)
    return mean, min_sd + (1.0 - min_sd) * jax.nn.softplus(raw)


class CNP(eqx.Module):
    """A conditional neural process with this run's weights (see `ConditionalNP`).

    ``r = mean_{i in context} encoder([x_i, y_i])``; ``[mu, raw] = decoder([x*, r])``;
    predictive ``N(mu, sd^2)`` with ``sd = min_sd + (1 - min_sd) softplus(raw)``.

    Example:
        >>> from numpyro import handlers
        >>> with handlers.seed(rng_seed=0):
        ...     cnp = ConditionalNP("cnp", hidden=8)
        >>> isinstance(cnp, CNP), cnp.min_sd
        (True, 0.1)
    """

    encoder: MLP
    decoder: MLP
    min_sd: float = eqx.field(static=True)

    def __call__(
        self,
        x_context: Float[Array, "batch n_c x_dim"],
        y_context: Float[Array, "batch n_c y_dim"],
        mask_context: Float[Array, "batch n_c"],
        x_target: Float[Array, "batch n_t x_dim"],
    ) -> tuple[Float[Array, "batch n_t y_dim"], Float[Array, "batch n_t y_dim"]]:
        h = self.encoder(jnp.concatenate([x_context, y_context], axis=-1))
        r = _per_target(_masked_mean(h, mask_context), x_target)
        return _gaussian(self.decoder(jnp.concatenate([x_target, r], axis=-1)), self.min_sd)


class ANP(eqx.Module):
    """An attentive neural process with this run's weights (see `AttentiveNP`).

    ``v_i = encoder([x_i, y_i])``, ``k_i = key_query(x_i)`` over the context,
    ``q_j = key_query(x*_j)``; ``r_j = MultiHead(q_j, k, v)``, masked to the real context
    points; ``[mu, raw] = decoder([x*_j, r_j])``, ``sd = min_sd + (1 - min_sd) softplus(raw)``.
    With a latent path (``latent_encoder`` and ``latent_head`` set, as in `LNP`): ``z`` has
    the Gaussian ``latent(x, y, mask)`` and the decoder sees ``[x*_j, r_j, z]``.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro import handlers
        >>> with handlers.seed(rng_seed=0):
        ...     anp = AttentiveNP("a1", hidden=8, num_heads=2)
        >>> anp.attend(jnp.ones((2, 5, 1)), jnp.ones((2, 5, 1)), jnp.ones((2, 5)),
        ...            jnp.zeros((2, 7, 1))).shape
        (2, 7, 8)
    """

    encoder: MLP
    key_query: MLP
    query: MLP
    key: MLP
    value: MLP
    output: MLP
    decoder: MLP
    num_heads: int = eqx.field(static=True)
    min_sd: float = eqx.field(static=True)
    latent_encoder: MLP | None = None
    latent_head: MLP | None = None

    def latent(
        self,
        x: Float[Array, "batch n x_dim"],
        y: Float[Array, "batch n y_dim"],
        mask: Float[Array, "batch n"],
    ) -> tuple[Float[Array, "batch latent"], Float[Array, "batch latent"]]:
        """Location and scale of the Gaussian over ``z`` given the masked set ``(x, y)``.

        Raises:
            ValueError: if the network has no latent path.
        """
        if self.latent_encoder is None or self.latent_head is None:
            raise missing_latent_path()
        return _latent_gaussian(self.latent_encoder, self.latent_head, x, y, mask)

    def attend(
        self,
        x_context: Float[Array, "batch n_c x_dim"],
        y_context: Float[Array, "batch n_c y_dim"],
        mask_context: Float[Array, "batch n_c"],
        x_target: Float[Array, "batch n_t x_dim"],
    ) -> Float[Array, "batch n_t hidden"]:
        """The per-target representation ``r``: multi-head cross-attention to the context."""
        v = self.value(self.encoder(jnp.concatenate([x_context, y_context], axis=-1)))
        k = self.key(self.key_query(x_context))
        q = self.query(self.key_query(x_target))
        heads = lambda a: a.reshape(*a.shape[:-1], self.num_heads, -1)
        q, k, v = heads(q), heads(k), heads(v)  # (..., n, heads, d)
        logits = jnp.einsum("...thd,...chd->...htc", q, k) / np.sqrt(q.shape[-1])
        mask = jnp.asarray(mask_context, bool)[..., None, None, :]
        # Softmax over the real context points only; a finite fill (not -inf) keeps the
        # gradient finite, and an empty context gives all-zero weights (r = output bias).
        logits = jnp.where(mask, logits, -1e30)
        e = jnp.where(mask, jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), 0.0)
        w = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)
        r = jnp.einsum("...htc,...chd->...thd", w, v)
        return self.output(r.reshape(*r.shape[:-2], -1))

    def __call__(
        self,
        x_context: Float[Array, "batch n_c x_dim"],
        y_context: Float[Array, "batch n_c y_dim"],
        mask_context: Float[Array, "batch n_c"],
        x_target: Float[Array, "batch n_t x_dim"],
        z: Float[Array, "batch latent"] | None = None,
    ) -> tuple[Float[Array, "batch n_t y_dim"], Float[Array, "batch n_t y_dim"]]:
        parts = [x_target, self.attend(x_context, y_context, mask_context, x_target)]
        z_shape = None if z is None else jnp.shape(z)
        check_latent_input(self.latent_head is not None, z_shape, "array")
        if z is not None:
            parts.append(_per_target(z, x_target))
        return _gaussian(self.decoder(jnp.concatenate(parts, axis=-1)), self.min_sd)


class LNP(eqx.Module):
    """A latent neural process with this run's weights (see `LatentNP`).

    Latent path: ``s = mean_{i in set} latent_encoder([x_i, y_i])``,
    ``[m, raw] = latent_head(s)``, ``z ~ N(m, diag(0.1 + 0.9 sigmoid(raw))^2)``. Deterministic
    path (optional): ``r = mean_{i in context} deterministic_encoder([x_i, y_i])``. Decoder:
    ``[mu, raw] = decoder([x*, r, z])`` and ``sd = min_sd + (1 - min_sd) softplus(raw)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro import handlers
        >>> with handlers.seed(rng_seed=0):
        ...     lnp = LatentNP("l1", hidden=8, latent_dim=3)
        >>> loc, scale = lnp.latent(jnp.ones((2, 5, 1)), jnp.ones((2, 5, 1)), jnp.ones((2, 5)))
        >>> loc.shape, bool((scale >= 0.1).all())
        ((2, 3), True)
    """

    latent_encoder: MLP
    latent_head: MLP
    deterministic_encoder: MLP | None
    decoder: MLP
    min_sd: float = eqx.field(static=True)

    def latent(
        self,
        x: Float[Array, "batch n x_dim"],
        y: Float[Array, "batch n y_dim"],
        mask: Float[Array, "batch n"],
    ) -> tuple[Float[Array, "batch latent"], Float[Array, "batch latent"]]:
        """Location and scale of the Gaussian over ``z`` given the masked set ``(x, y)``."""
        return _latent_gaussian(self.latent_encoder, self.latent_head, x, y, mask)

    def __call__(
        self,
        x_context: Float[Array, "batch n_c x_dim"],
        y_context: Float[Array, "batch n_c y_dim"],
        mask_context: Float[Array, "batch n_c"],
        x_target: Float[Array, "batch n_t x_dim"],
        z: Float[Array, "batch latent"],
    ) -> tuple[Float[Array, "batch n_t y_dim"], Float[Array, "batch n_t y_dim"]]:
        parts = [x_target]
        if self.deterministic_encoder is not None:
            h = self.deterministic_encoder(jnp.concatenate([x_context, y_context], axis=-1))
            parts.append(_per_target(_masked_mean(h, mask_context), x_target))
        parts.append(_per_target(z, x_target))
        return _gaussian(self.decoder(jnp.concatenate(parts, axis=-1)), self.min_sd)


def _param_mlp(name: str, sizes: Sequence[int], activation: Callable[[Array], Array]) -> MLP:
    """An MLP of widths ``sizes`` whose weights are ``param`` sites ``f"{name}.layers.{i}..."``."""
    layers = []
    for layer in param_layers(name, sizes):
        # Glorot-uniform initial weights drawn from the seed handler's key, so the trainer's
        # key sets the initialisation.
        shape, bound = (layer.n_in, layer.n_out), layer.bound
        weight = numpyro.param(
            layer.weight,
            lambda k, s=shape, b=bound: jax.random.uniform(k, s, minval=-b, maxval=b),
        )
        bias = numpyro.param(layer.bias, jnp.zeros(layer.n_out))
        layers.append(Linear(weight, bias))
    return MLP(tuple(layers), activation)


def ConditionalNP(
    name: str,
    *,
    x_dim: int = 1,
    y_dim: int = 1,
    hidden: int = 128,
    encoder_depth: int = 3,
    decoder_depth: int = 2,
    min_sd: float = 0.1,
    activation: str = "relu",
) -> CNP:
    """A conditional neural process whose weights are ``param`` sites; call inside a model.

    Deterministic, mean-pooled path as in Garnelo et al. (2018) and juho-lee/bnp: an encoder
    MLP ``[x_dim + y_dim, hidden x encoder_depth]`` on each context pair, a masked mean pool,
    and a decoder MLP ``[x_dim + hidden, hidden x decoder_depth, 2 y_dim]`` giving a Gaussian
    mean and ``sd = min_sd + (1 - min_sd) softplus(raw)``. With ``min_sd = 0.1`` (the default,
    as in the reference code) no per-point log density can exceed
    ``-log(0.1 sqrt(2 pi)) = 1.384`` nats. Sites are ``f"{name}.encoder.layers.{i}.weight"``
    (and ``.bias``), likewise for ``decoder``.

    Args:
        name: prefix of the site names.
        x_dim: input dimension.
        y_dim: output dimension.
        hidden: width of every hidden layer and of the representation ``r``.
        encoder_depth: number of hidden layers of the encoder MLP.
        decoder_depth: number of hidden layers of the decoder MLP.
        min_sd: floor of the predictive sd, in ``(0, 1)``.
        activation: a name from ``"relu"``, ``"tanh"``, ``"gelu"``, ``"silu"``, ``"elu"``, ...

    Returns:
        A `CNP`; ``cnp(x_c, y_c, mask_c, x_t)`` returns ``(mean, sd)``, each
        ``(batch, n_t, y_dim)``.

    Raises:
        ValueError: for a non-positive size, ``min_sd`` outside ``(0, 1)`` or an unknown
            activation.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro import handlers
        >>> with handlers.seed(rng_seed=0):
        ...     cnp = ConditionalNP("cnp", hidden=16)
        >>> mean, sd = cnp(jnp.ones((2, 5, 1)), jnp.ones((2, 5, 1)), jnp.ones((2, 5)),
        ...                jnp.zeros((2, 7, 1)))
        >>> mean.shape, bool((sd >= 0.1).all())
        ((2, 7, 1), True)
    """
    layout = conditional_np_layout(
        name, x_dim, y_dim, hidden, encoder_depth, decoder_depth, min_sd, activation, ACTIVATIONS
    )
    return CNP(**layout.build(_param_mlp))


def AttentiveNP(
    name: str,
    *,
    x_dim: int = 1,
    y_dim: int = 1,
    hidden: int = 128,
    num_heads: int = 8,
    latent_dim: int | None = None,
    encoder_depth: int = 3,
    decoder_depth: int = 2,
    min_sd: float = 0.1,
    activation: str = "relu",
) -> ANP:
    """An attentive (conditional) neural process with ``param``-site weights; call in a model.

    The deterministic path of Kim et al. (2019) in the form of juho-lee/bnp's CANP, without
    self-attention, residual connections or layer norm: values ``encoder([x_i, y_i])`` (an MLP
    ``[x_dim + y_dim, hidden x encoder_depth]``); keys and queries from one MLP
    ``key_query = [x_dim, hidden, hidden]`` on the context and target inputs; ``num_heads``-head
    scaled dot-product attention with linear maps ``query``, ``key``, ``value`` and ``output``
    (``hidden -> hidden``), masked to the real context points; and the decoder of
    `ConditionalNP` on ``[x*, r(x*)]``. Attention lets the prediction at ``x*`` weigh the nearby
    context points, the fix Kim et al. give for the CNP's underfitting of its own context.
    Sites are ``f"{name}.{part}.layers.{i}.weight"`` (and ``.bias``) for part in ``encoder``,
    ``key_query``, ``attention.query``, ``attention.key``, ``attention.value``,
    ``attention.output``, ``decoder``.

    With ``latent_dim=k`` it is the full ANP of Kim et al. (2019): a global latent path as in
    `LatentNP` (a set encoder ``latent_encoder = [x_dim + y_dim, hidden x encoder_depth]``, a
    masked mean pool and ``latent_head = [hidden, hidden, 2 k]``; scale
    ``0.1 + 0.9 sigmoid(raw)``) is added, and the decoder's input becomes ``[x*, r(x*), z]``
    (``x_dim + hidden + k`` wide). Its extra sites are ``f"{name}.latent_encoder..."`` and
    ``f"{name}.latent_head..."``; with ``latent_dim=None`` the network and sites are the
    deterministic ones above.

    Args:
        name: prefix of the site names.
        x_dim: input dimension.
        y_dim: output dimension.
        hidden: width of every hidden layer and of the representation ``r``.
        num_heads: number of attention heads; must divide ``hidden``.
        latent_dim: dimension of the global latent ``z``, or None for no latent path.
        encoder_depth: number of hidden layers of the value (and latent) encoder.
        decoder_depth: number of hidden layers of the decoder.
        min_sd: floor of the predictive sd, in ``(0, 1)``.
        activation: a name from ``"relu"``, ``"tanh"``, ``"gelu"``, ``"silu"``, ``"elu"``, ...

    Returns:
        An `ANP`; ``anp(x_c, y_c, mask_c, x_t)`` (with a latent path
        ``anp(x_c, y_c, mask_c, x_t, z)``) returns ``(mean, sd)``, each
        ``(batch, n_t, y_dim)``; with a latent path ``anp.latent(x, y, mask)`` gives the
        ``(loc, scale)`` of ``z`` given a set.

    Raises:
        ValueError: for a non-positive size, ``num_heads`` not dividing ``hidden``, ``min_sd``
            outside ``(0, 1)`` or an unknown activation.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro import handlers
        >>> with handlers.seed(rng_seed=0):
        ...     anp = AttentiveNP("anp", hidden=16, num_heads=4)
        ...     full = AttentiveNP("full", hidden=16, num_heads=4, latent_dim=3)
        >>> mean, sd = anp(jnp.ones((2, 5, 1)), jnp.ones((2, 5, 1)), jnp.ones((2, 5)),
        ...                jnp.zeros((2, 7, 1)))
        >>> mean.shape, bool((sd >= 0.1).all())
        ((2, 7, 1), True)
        >>> loc, scale = full.latent(jnp.ones((2, 5, 1)), jnp.ones((2, 5, 1)), jnp.ones((2, 5)))
        >>> full(jnp.ones((2, 5, 1)), jnp.ones((2, 5, 1)), jnp.ones((2, 5)),
        ...      jnp.zeros((2, 7, 1)), loc)[0].shape
        (2, 7, 1)
    """
    sizes = (x_dim, y_dim, hidden, num_heads, latent_dim, encoder_depth, decoder_depth)
    layout = attentive_np_layout(name, *sizes, min_sd, activation, ACTIVATIONS)
    return ANP(**layout.build(_param_mlp))


def LatentNP(
    name: str,
    *,
    x_dim: int = 1,
    y_dim: int = 1,
    hidden: int = 128,
    latent_dim: int = 128,
    encoder_depth: int = 3,
    decoder_depth: int = 2,
    deterministic_path: bool = True,
    min_sd: float = 0.1,
    activation: str = "relu",
) -> LNP:
    """A latent neural process whose weights are ``param`` sites; call inside a model.

    The NP of Garnelo et al. (2018b) as in juho-lee/bnp: a global latent ``z`` whose Gaussian
    is amortised by a set encoder (an MLP ``[x_dim + y_dim, hidden x encoder_depth]``, a masked
    mean pool and a head ``[hidden, hidden, 2 latent_dim]``; scale ``0.1 + 0.9 sigmoid(raw)``),
    an optional deterministic mean-pooled path as in `ConditionalNP`, and a decoder MLP
    ``[x_dim + hidden + latent_dim, hidden x decoder_depth, 2 y_dim]`` (without the
    deterministic path its input is ``x_dim + latent_dim``). Sites are
    ``f"{name}.latent_encoder.layers.{i}.weight"`` (and ``.bias``), likewise for
    ``latent_head``, ``deterministic_encoder`` and ``decoder``.

    Args:
        name: prefix of the site names.
        x_dim: input dimension.
        y_dim: output dimension.
        hidden: width of every hidden layer and of the representation ``r``.
        latent_dim: dimension of ``z``.
        encoder_depth: number of hidden layers of the set encoders.
        decoder_depth: number of hidden layers of the decoder.
        deterministic_path: also condition the decoder on a mean-pooled ``r`` of the context.
        min_sd: floor of the predictive sd, in ``(0, 1)``.
        activation: a name from ``"relu"``, ``"tanh"``, ``"gelu"``, ``"silu"``, ``"elu"``, ...

    Returns:
        An `LNP`: ``lnp.latent(x, y, mask)`` gives the ``(loc, scale)`` of ``z`` given a set,
        and ``lnp(x_c, y_c, mask_c, x_t, z)`` the predictive ``(mean, sd)``, each
        ``(batch, n_t, y_dim)``.

    Raises:
        ValueError: for a non-positive size, ``min_sd`` outside ``(0, 1)`` or an unknown
            activation.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro import handlers
        >>> with handlers.seed(rng_seed=0):
        ...     lnp = LatentNP("lnp", hidden=16, latent_dim=4)
        >>> loc, scale = lnp.latent(jnp.ones((2, 5, 1)), jnp.ones((2, 5, 1)), jnp.ones((2, 5)))
        >>> mean, sd = lnp(jnp.ones((2, 5, 1)), jnp.ones((2, 5, 1)), jnp.ones((2, 5)),
        ...                jnp.zeros((2, 7, 1)), loc)
        >>> loc.shape, mean.shape
        ((2, 4), (2, 7, 1))
    """
    sizes = (x_dim, y_dim, hidden, latent_dim, encoder_depth, decoder_depth)
    layout = latent_np_layout(name, *sizes, deterministic_path, min_sd, activation, ACTIVATIONS)
    return LNP(**layout.build(_param_mlp))
