"""Conditional neural process (Garnelo et al. 2018) as a NumPyro model primitive.

`ConditionalNP` is called inside a model: it registers the encoder and decoder weights as
``param`` sites and returns an equinox module that maps a (padded, masked) context set and
target inputs to a per-point Gaussian predictive. `conditional_np_model` is the NumPyro model
over a batch of tasks (its observed site is ``"y"``), and `train_np` fits its params by
maximum likelihood across task batches with optax.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from jaxtyping import Array, Float
from numpyro import handlers
from numpyro.infer.util import log_density
from tqdm.auto import tqdm

from probdyn.numpyro._bnn import ACTIVATIONS, MLP, Linear
from probdyn.numpyro._util import as_key

__all__ = [
    "CNP",
    "ConditionalNP",
    "NPTrainResult",
    "conditional_np_model",
    "predict_np",
    "train_np",
]

TASK_FIELDS = ("x_context", "y_context", "mask_context", "x_target", "y_target", "mask_target")


class CNP(eqx.Module):
    """A conditional neural process with this run's weights (see `ConditionalNP`).

    ``r = mean_{i in context} encoder([x_i, y_i])``; ``[mu, raw] = decoder([x*, r])``;
    predictive ``N(mu, sd^2)`` with ``sd = min_sd + (1 - min_sd) softplus(raw)``.
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
        w = jnp.asarray(mask_context, h.dtype)[..., None]
        # Masked mean pool; max(., 1) keeps an empty context finite (r = 0 then).
        r = jnp.sum(w * h, axis=-2) / jnp.maximum(jnp.sum(w, axis=-2), 1.0)
        r = jnp.broadcast_to(r[..., None, :], (*x_target.shape[:-1], r.shape[-1]))
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
        x_dim, y_dim: input and output dimensions.
        hidden: width of every hidden layer and of the representation ``r``.
        encoder_depth, decoder_depth: number of hidden layers of each MLP.
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
    for arg, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"ConditionalNP({arg}={value!r}): must be a positive int.")
    if not 0.0 < min_sd < 1.0:
        raise ValueError(f"ConditionalNP(min_sd={min_sd!r}): must lie in (0, 1), e.g. 0.1.")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"ConditionalNP(activation={activation!r}): choose one of {sorted(ACTIVATIONS)}."
        )
    act = ACTIVATIONS[activation]
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
        x_context, y_context, mask_context, x_target: the conditioning set and target inputs.
        y_target: observed target values, or None to sample them.
        mask_target: which target slots are real (default all).
        **cnp_options: passed to `ConditionalNP` (e.g. ``hidden=64``).

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro import handlers
        >>> tr = handlers.trace(handlers.seed(conditional_np_model, 0)).get_trace(
        ...     jnp.ones((2, 5, 1)), jnp.ones((2, 5, 1)), jnp.ones((2, 5)), jnp.zeros((2, 7, 1)),
        ...     hidden=8)
        >>> tr["y"]["value"].shape
        (2, 7, 1)
    """
    cnp = ConditionalNP("cnp", **cnp_options)
    mean, sd = cnp(x_context, y_context, mask_context, x_target)
    numpyro.deterministic("mean", mean)
    numpyro.deterministic("sd", sd)
    mask = jnp.ones(mean.shape[:-1], bool) if mask_target is None else jnp.asarray(mask_target)
    with handlers.mask(mask=mask[..., None]):
        numpyro.sample("y", dist.Normal(mean, sd), obs=y_target)


@dataclasses.dataclass(frozen=True)
class NPTrainResult:
    """Trained params of a neural-process model and the loss trace.

    Attributes:
        params: ``{site: array}``, the model's ``param`` sites after training.
        losses: ``(num_steps,)`` negative target log-likelihood per target point.
    """

    params: dict[str, Array]
    losses: np.ndarray


def _task_kwargs(batch: Any) -> dict[str, Array]:
    return {f: jnp.asarray(getattr(batch, f)) for f in TASK_FIELDS}


_DEFAULT_OPTIMIZER = optax.adam(5e-4)


def _check_hashable(extra: dict[str, Any]) -> None:
    try:
        hash(tuple(sorted(extra.items())))
    except TypeError as err:
        raise TypeError(
            f"train_np(model_kwargs={extra!r}): values must be hashable (ints, floats, "
            "strings, tuples); they configure the network, not the data."
        ) from err


@functools.lru_cache(maxsize=16)
def _step_fn(
    model: Callable[..., Any], opt: optax.GradientTransformation, extra: tuple[tuple[str, Any], ...]
) -> Callable[..., Any]:
    # Cached per (model, optimizer, options) so repeated trainings reuse one compiled step.
    options = dict(extra)

    def loss_fn(p: dict[str, Array], batch: dict[str, Array]) -> Array:
        logp, _ = log_density(model, (), {**batch, **options}, p)
        return -logp / jnp.sum(batch["mask_target"])

    @jax.jit
    def step(p: Any, s: Any, batch: dict[str, Array]) -> tuple[Any, Any, Array]:
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    return step


def train_np(
    model: Callable[..., Any],
    sample_tasks: Callable[[np.random.Generator], Any],
    *,
    num_steps: int,
    key: int | jax.Array = 0,
    optimizer: optax.GradientTransformation | None = None,
    model_kwargs: dict[str, Any] | None = None,
    progress_bar: bool = False,
) -> NPTrainResult:
    """Fit a neural-process model's params by maximum likelihood across task batches.

    Every step draws a fresh batch ``sample_tasks(rng)`` (e.g. ``lambda r: gp_tasks(16,
    key=r)``) and takes one optimiser step on the negative log-likelihood of the observed
    site(s) per target point, ``-log p(y_T | x_T, context) / sum(mask_target)``. For
    `conditional_np_model` the targets include the contexts (see `probdyn.data.GPTaskBatch`).

    Args:
        model: a NumPyro model taking the `GPTaskBatch` fields as keyword arguments, whose
            only non-observed sites are ``param`` sites (e.g. `conditional_np_model`).
        sample_tasks: draws one batch (an object with the `GPTaskBatch` array fields) from
            a ``numpy.random.Generator``; batches must keep their shapes (no recompiles).
        num_steps: number of optimiser steps.
        key: int seed or JAX key; sets the initial weights and the task stream.
        optimizer: an optax transformation (default Adam, learning rate 5e-4).
        model_kwargs: extra keyword arguments for the model (e.g. ``{"hidden": 64}``).
        progress_bar: show a tqdm bar.

    Returns:
        An `NPTrainResult`.

    Raises:
        ValueError: if ``num_steps`` is not a positive int.
        TypeError: if a ``model_kwargs`` value is not hashable.

    Example:
        >>> from probdyn.data._gp_tasks import gp_tasks
        >>> res = train_np(conditional_np_model, lambda r: gp_tasks(4, key=r), num_steps=3,
        ...                model_kwargs={"hidden": 8})
        >>> res.losses.shape
        (3,)
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"train_np(num_steps={num_steps!r}): must be a positive int.")
    jkey = as_key(key)
    rng = np.random.default_rng(np.asarray(jkey).tolist())
    extra = dict(model_kwargs or {})
    _check_hashable(extra)
    opt = _DEFAULT_OPTIMIZER if optimizer is None else optimizer

    first = _task_kwargs(sample_tasks(rng))
    tr = handlers.trace(handlers.seed(model, jkey)).get_trace(**first, **extra)
    params = {n: s["value"] for n, s in tr.items() if s["type"] == "param"}
    state = opt.init(params)

    step = _step_fn(model, opt, tuple(sorted(extra.items())))

    losses = np.empty(num_steps)
    batch = first
    for i in tqdm(range(num_steps), disable=not progress_bar, desc="train_np"):
        params, state, loss = step(params, state, batch)
        losses[i] = float(loss)
        batch = _task_kwargs(sample_tasks(rng))
    return NPTrainResult(params=params, losses=losses)


def predict_np(
    model: Callable[..., Any],
    params: dict[str, Array],
    tasks: Any,
    *,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Predictive mean and sd ``(batch, n_t)`` of a trained 1-output NP model on a task batch.

    Example:
        >>> from probdyn.data._gp_tasks import gp_tasks
        >>> res = train_np(conditional_np_model, lambda r: gp_tasks(4, key=r), num_steps=1,
        ...                model_kwargs={"hidden": 8})
        >>> mean, sd = predict_np(conditional_np_model, res.params, gp_tasks(3, key=1),
        ...                       model_kwargs={"hidden": 8})
        >>> mean.shape
        (3, 50)
    """
    kwargs = {**_task_kwargs(tasks), "y_target": None, **(model_kwargs or {})}
    tr = handlers.trace(handlers.seed(handlers.substitute(model, params), 0)).get_trace(**kwargs)
    return np.asarray(tr["mean"]["value"][..., 0]), np.asarray(tr["sd"]["value"][..., 0])
