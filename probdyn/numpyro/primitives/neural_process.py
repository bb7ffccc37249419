"""Neural processes (Garnelo et al. 2018a,b; Kim et al. 2019) as NumPyro model primitives.

`ConditionalNP` (mean-pooled), `AttentiveNP` (cross-attention) and `LatentNP` (global latent
``z``) are called inside a model: they register their weights as ``param`` sites and return an
equinox module that maps a (padded, masked) context set and target inputs to a per-point
Gaussian predictive. `conditional_np_model`, `attentive_np_model` and `latent_np_model` are
NumPyro models over a batch of tasks (observed site ``"y"``; the latent model also has the
sample site ``"z"``, and `latent_np_guide` is its amortised guide; so has the attentive model
given ``latent_dim``, with `attentive_np_guide`). Train them across tasks with
``probdyn.fit(model, probdyn.data.gp_task_stream(16), engine=probdyn.VI(...))`` (maximum
likelihood, or with ``VI(guide=latent_np_guide)`` the NP ELBO) and predict on a new task with
``posterior.predict(x_target, context=(x_context, y_context))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, Float
from numpyro import handlers

from probdyn.numpyro.primitives.bnn import ACTIVATIONS, MLP, Linear
from probdyn.primitives.validate import check_np_args

__all__ = [
    "ANP",
    "CNP",
    "LNP",
    "AttentiveNP",
    "ConditionalNP",
    "LatentNP",
    "attentive_np_guide",
    "attentive_np_model",
    "conditional_np_model",
    "latent_np_guide",
    "latent_np_model",
]

TASK_FIELDS = ("x_context", "y_context", "mask_context", "x_target", "y_target", "mask_target")


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
        out = self.decoder(jnp.concatenate([x_target, r], axis=-1))
        mean, raw = jnp.split(out, 2, axis=-1)
        return mean, self.min_sd + (1.0 - self.min_sd) * jax.nn.softplus(raw)


def _param_mlp(name: str, sizes: Sequence[int], activation: Callable[[Array], Array]) -> MLP:
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        # Glorot-uniform initial weights drawn from the seed handler's key, so the trainer's
        # key sets the initialisation.
        bound = float(np.sqrt(6.0 / (n_in + n_out)))
        weight = numpyro.param(
            f"{name}.layers.{i}.weight",
            lambda k, s=(n_in, n_out), b=bound: jax.random.uniform(k, s, minval=-b, maxval=b),
        )
        bias = numpyro.param(f"{name}.layers.{i}.bias", jnp.zeros(n_out))
        layers.append(Linear(weight, bias))
    return MLP(tuple(layers), activation)


def _check_np_args(
    fn: str, sizes: dict[str, int], min_sd: float, activation: str
) -> Callable[[Array], Array]:
    check_np_args(fn, sizes, min_sd, activation, list(ACTIVATIONS))
    return ACTIVATIONS[activation]


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
    sizes = {"x_dim": x_dim, "y_dim": y_dim, "hidden": hidden}
    sizes |= {"encoder_depth": encoder_depth, "decoder_depth": decoder_depth}
    act = _check_np_args("ConditionalNP", sizes, min_sd, activation)
    encoder = _param_mlp(f"{name}.encoder", [x_dim + y_dim] + [hidden] * encoder_depth, act)
    decoder = _param_mlp(
        f"{name}.decoder", [x_dim + hidden] + [hidden] * decoder_depth + [2 * y_dim], act
    )
    return CNP(encoder, decoder, float(min_sd))


def conditional_np_model(
    x_context: Array,
    y_context: Array,
    mask_context: Array,
    x_target: Array,
    y_target: Array | None = None,
    mask_target: Array | None = None,
    **cnp_options: Any,
) -> None:
    """A NumPyro model over a batch of tasks: a `ConditionalNP` named ``"cnp"`` and site ``"y"``.

    ``y ~ Normal(mean, sd)`` independently per target point, masked by ``mask_target``; the
    predictive mean and sd are recorded as deterministic sites ``"mean"`` and ``"sd"``.
    Arrays follow `probdyn.data.GPTaskBatch`: ``(batch, n, dim)`` with ``(batch, n)`` masks.

    Args:
        x_context: ``(batch, n_c, x_dim)`` context inputs.
        y_context: ``(batch, n_c, y_dim)`` context observations.
        mask_context: ``(batch, n_c)`` bool, the real context points.
        x_target: ``(batch, n_t, x_dim)`` target inputs.
        y_target: observed target values, or None to sample them.
        mask_target: which target slots are real (default all).
        **cnp_options: passed to `ConditionalNP` (e.g. ``hidden=64``).

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro import handlers
        >>> tr = handlers.trace(handlers.seed(conditional_np_model, 0)).get_trace(
        ...     jnp.ones((2, 5, 1)), jnp.ones((2, 5, 1)), jnp.ones((2, 5)), jnp.zeros((2, 7, 1)),
        ...     hidden=8)
        >>> tr["y"].get("value").shape
        (2, 7, 1)
    """
    cnp = ConditionalNP("cnp", **cnp_options)
    mean, sd = cnp(x_context, y_context, mask_context, x_target)
    numpyro.deterministic("mean", mean)
    numpyro.deterministic("sd", sd)
    mask = jnp.ones(mean.shape[:-1], bool) if mask_target is None else jnp.asarray(mask_target)
    with handlers.mask(mask=mask[..., None]):
        numpyro.sample("y", dist.Normal(mean, sd), obs=y_target)


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
            raise ValueError(
                "ANP.latent: this attentive NP has no latent path; build it with "
                "AttentiveNP(..., latent_dim=k) to have one."
            )
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
        if self.latent_head is None:
            if z is not None:
                raise ValueError(
                    f"ANP(z=<array of shape {tuple(jnp.shape(z))}>): this attentive NP has no "
                    "latent path; pass z=None, or build it with AttentiveNP(..., latent_dim=k)."
                )
        elif z is None:
            raise ValueError(
                "ANP(z=None): this attentive NP has a latent path and needs z of shape "
                "(batch, latent_dim), e.g. a draw from anp.latent(x_context, y_context, "
                "mask_context)."
            )
        else:
            parts.append(_per_target(z, x_target))
        mean, raw = jnp.split(self.decoder(jnp.concatenate(parts, axis=-1)), 2, axis=-1)
        return mean, self.min_sd + (1.0 - self.min_sd) * jax.nn.softplus(raw)


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
    sizes = {"x_dim": x_dim, "y_dim": y_dim, "hidden": hidden, "num_heads": num_heads}
    if latent_dim is not None:
        sizes["latent_dim"] = latent_dim
    sizes |= {"encoder_depth": encoder_depth, "decoder_depth": decoder_depth}
    act = _check_np_args("AttentiveNP", sizes, min_sd, activation)
    if hidden % num_heads:
        raise ValueError(
            f"AttentiveNP(num_heads={num_heads!r}): must divide hidden={hidden!r}, e.g. "
            "num_heads=8 with hidden=128."
        )
    encoder = _param_mlp(f"{name}.encoder", [x_dim + y_dim] + [hidden] * encoder_depth, act)
    key_query = _param_mlp(f"{name}.key_query", [x_dim, hidden, hidden], act)
    linear = {
        part: _param_mlp(f"{name}.attention.{part}", [hidden, hidden], act)
        for part in ("query", "key", "value", "output")
    }
    latent: dict[str, MLP] = {}
    if latent_dim is not None:
        set_sizes = [x_dim + y_dim] + [hidden] * encoder_depth
        latent["latent_encoder"] = _param_mlp(f"{name}.latent_encoder", set_sizes, act)
        head_sizes = [hidden, hidden, 2 * latent_dim]
        latent["latent_head"] = _param_mlp(f"{name}.latent_head", head_sizes, act)
    n_in = x_dim + hidden + (0 if latent_dim is None else latent_dim)
    decoder = _param_mlp(f"{name}.decoder", [n_in] + [hidden] * decoder_depth + [2 * y_dim], act)
    return ANP(
        encoder,
        key_query,
        decoder=decoder,
        num_heads=num_heads,
        min_sd=float(min_sd),
        **linear,
        **latent,
    )


def attentive_np_model(
    x_context: Array,
    y_context: Array,
    mask_context: Array,
    x_target: Array,
    y_target: Array | None = None,
    mask_target: Array | None = None,
    **anp_options: Any,
) -> None:
    """A NumPyro model over a batch of tasks: an `AttentiveNP` named ``"anp"`` and site ``"y"``.

    As `conditional_np_model` with the attentive network: ``y ~ Normal(mean, sd)`` per target
    point, masked by ``mask_target``, deterministic sites ``"mean"`` and ``"sd"``; train it by
    maximum likelihood with `probdyn.fit` on a `probdyn.data.TaskStream`. Given ``latent_dim``
    (the full ANP) it first draws ``z ~ p(z | context)`` (site ``"z"``,
    ``(batch, latent_dim)``, as in `latent_np_model`) and decodes given ``z``; train it then
    with ``VI(guide=attentive_np_guide)``, the NP ELBO.

    Args:
        x_context: ``(batch, n_c, x_dim)`` context inputs.
        y_context: ``(batch, n_c, y_dim)`` context observations.
        mask_context: ``(batch, n_c)`` bool, the real context points.
        x_target: ``(batch, n_t, x_dim)`` target inputs.
        y_target: observed target values, or None to sample them.
        mask_target: which target slots are real (default all).
        **anp_options: passed to `AttentiveNP` (e.g. ``hidden=64, latent_dim=32``).

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro import handlers
        >>> tr = handlers.trace(handlers.seed(attentive_np_model, 0)).get_trace(
        ...     jnp.ones((2, 5, 1)), jnp.ones((2, 5, 1)), jnp.ones((2, 5)), jnp.zeros((2, 7, 1)),
        ...     hidden=8, num_heads=2)
        >>> tr["y"].get("value").shape
        (2, 7, 1)
        >>> tr = handlers.trace(handlers.seed(attentive_np_model, 0)).get_trace(
        ...     jnp.ones((2, 5, 1)), jnp.ones((2, 5, 1)), jnp.ones((2, 5)), jnp.zeros((2, 7, 1)),
        ...     hidden=8, num_heads=2, latent_dim=3)
        >>> tr["z"].get("value").shape
        (2, 3)
    """
    anp = AttentiveNP("anp", **anp_options)
    z = None
    if anp.latent_head is not None:
        loc, scale = anp.latent(x_context, y_context, mask_context)
        z = numpyro.sample("z", dist.Normal(loc, scale).to_event(1))
    mean, sd = anp(x_context, y_context, mask_context, x_target, z)
    numpyro.deterministic("mean", mean)
    numpyro.deterministic("sd", sd)
    mask = jnp.ones(mean.shape[:-1], bool) if mask_target is None else jnp.asarray(mask_target)
    with handlers.mask(mask=mask[..., None]):
        numpyro.sample("y", dist.Normal(mean, sd), obs=y_target)


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
        mean, raw = jnp.split(self.decoder(jnp.concatenate(parts, axis=-1)), 2, axis=-1)
        return mean, self.min_sd + (1.0 - self.min_sd) * jax.nn.softplus(raw)


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
    sizes = {"x_dim": x_dim, "y_dim": y_dim, "hidden": hidden, "latent_dim": latent_dim}
    sizes |= {"encoder_depth": encoder_depth, "decoder_depth": decoder_depth}
    act = _check_np_args("LatentNP", sizes, min_sd, activation)
    set_sizes = [x_dim + y_dim] + [hidden] * encoder_depth
    latent_encoder = _param_mlp(f"{name}.latent_encoder", set_sizes, act)
    latent_head = _param_mlp(f"{name}.latent_head", [hidden, hidden, 2 * latent_dim], act)
    det = (
        _param_mlp(f"{name}.deterministic_encoder", set_sizes, act) if deterministic_path else None
    )
    n_in = x_dim + latent_dim + (hidden if deterministic_path else 0)
    decoder = _param_mlp(f"{name}.decoder", [n_in] + [hidden] * decoder_depth + [2 * y_dim], act)
    return LNP(latent_encoder, latent_head, det, decoder, float(min_sd))


def latent_np_model(
    x_context: Array,
    y_context: Array,
    mask_context: Array,
    x_target: Array,
    y_target: Array | None = None,
    mask_target: Array | None = None,
    **lnp_options: Any,
) -> None:
    """A NumPyro model over a batch of tasks: a `LatentNP` named ``"lnp"``, latent ``"z"``, ``"y"``.

    ``z ~ p(z | context)`` (site ``"z"``, ``(batch, latent_dim)``, the context-amortised
    Gaussian of `LNP.latent`), then ``y ~ Normal(mean, sd)`` independently per target point
    given ``z``, masked by ``mask_target``; deterministic sites ``"mean"`` and ``"sd"``. Pair
    it with `latent_np_guide` (``q(z | context and targets)``) in ``probdyn.fit(latent_np_model,
    stream, engine=probdyn.VI(guide=latent_np_guide))``: the loss is then
    the NP ELBO of Garnelo et al. (2018b),
    ``-E_q[log p(y_T | z)] + KL(q(z | T) || p(z | C))`` per target point.

    Args:
        x_context: ``(batch, n_c, x_dim)`` context inputs.
        y_context: ``(batch, n_c, y_dim)`` context observations.
        mask_context: ``(batch, n_c)`` bool, the real context points.
        x_target: ``(batch, n_t, x_dim)`` target inputs.
        y_target: observed target values, or None to sample them.
        mask_target: which target slots are real (default all).
        **lnp_options: passed to `LatentNP` (e.g. ``hidden=64``).

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro import handlers
        >>> tr = handlers.trace(handlers.seed(latent_np_model, 0)).get_trace(
        ...     jnp.ones((2, 5, 1)), jnp.ones((2, 5, 1)), jnp.ones((2, 5)), jnp.zeros((2, 7, 1)),
        ...     hidden=8, latent_dim=3)
        >>> tr["z"].get("value").shape, tr["y"].get("value").shape
        ((2, 3), (2, 7, 1))
    """
    lnp = LatentNP("lnp", **lnp_options)
    loc, scale = lnp.latent(x_context, y_context, mask_context)
    z = numpyro.sample("z", dist.Normal(loc, scale).to_event(1))
    mean, sd = lnp(x_context, y_context, mask_context, x_target, z)
    numpyro.deterministic("mean", mean)
    numpyro.deterministic("sd", sd)
    mask = jnp.ones(mean.shape[:-1], bool) if mask_target is None else jnp.asarray(mask_target)
    with handlers.mask(mask=mask[..., None]):
        numpyro.sample("y", dist.Normal(mean, sd), obs=y_target)


def latent_np_guide(
    x_context: Array,
    y_context: Array,
    mask_context: Array,
    x_target: Array,
    y_target: Array | None = None,
    mask_target: Array | None = None,
    **lnp_options: Any,
) -> None:
    """The amortised guide of `latent_np_model`: ``z ~ q(z | targets)``, sharing its weights.

    The set encoder of the model's `LatentNP` applied to the targets (which include the
    contexts in a `probdyn.data.GPTaskBatch`); without ``y_target`` (prediction) it falls back
    to the context, so the guide is then the model's ``p(z | context)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro import handlers
        >>> tr = handlers.trace(handlers.seed(latent_np_guide, 0)).get_trace(
        ...     jnp.ones((2, 5, 1)), jnp.ones((2, 5, 1)), jnp.ones((2, 5)), jnp.zeros((2, 7, 1)),
        ...     jnp.ones((2, 7, 1)), hidden=8, latent_dim=3)
        >>> tr["z"].get("value").shape
        (2, 3)
    """
    lnp = LatentNP("lnp", **lnp_options)
    if y_target is None:
        loc, scale = lnp.latent(x_context, y_context, mask_context)
    else:
        mask = jnp.ones(y_target.shape[:-1], bool) if mask_target is None else mask_target
        loc, scale = lnp.latent(x_target, y_target, mask)
    numpyro.sample("z", dist.Normal(loc, scale).to_event(1))


def attentive_np_guide(
    x_context: Array,
    y_context: Array,
    mask_context: Array,
    x_target: Array,
    y_target: Array | None = None,
    mask_target: Array | None = None,
    **anp_options: Any,
) -> None:
    """The amortised guide of `attentive_np_model` with ``latent_dim``: ``z ~ q(z | targets)``.

    As `latent_np_guide`: the latent encoder of the model's `AttentiveNP` (the same weights)
    applied to the targets (which include the contexts in a `probdyn.data.GPTaskBatch`);
    without ``y_target`` (prediction) it falls back to the context, so the guide is then the
    model's ``p(z | context)``.

    Raises:
        ValueError: if ``anp_options`` has no ``latent_dim`` (the model then has no latent
            site; fit it by maximum likelihood, ``VI()`` without a guide).

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro import handlers
        >>> tr = handlers.trace(handlers.seed(attentive_np_guide, 0)).get_trace(
        ...     jnp.ones((2, 5, 1)), jnp.ones((2, 5, 1)), jnp.ones((2, 5)), jnp.zeros((2, 7, 1)),
        ...     jnp.ones((2, 7, 1)), hidden=8, num_heads=2, latent_dim=3)
        >>> tr["z"].get("value").shape
        (2, 3)
    """
    if anp_options.get("latent_dim") is None:
        raise ValueError(
            f"attentive_np_guide(latent_dim={anp_options.get('latent_dim')!r}): the guide needs "
            "the latent path; pass latent_dim=k (e.g. 32), or fit the deterministic "
            "attentive_np_model by maximum likelihood with VI() and no guide."
        )
    anp = AttentiveNP("anp", **anp_options)
    if y_target is None:
        loc, scale = anp.latent(x_context, y_context, mask_context)
    else:
        mask = jnp.ones(y_target.shape[:-1], bool) if mask_target is None else mask_target
        loc, scale = anp.latent(x_target, y_target, mask)
    numpyro.sample("z", dist.Normal(loc, scale).to_event(1))
