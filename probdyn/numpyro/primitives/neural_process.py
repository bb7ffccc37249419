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

The networks and their constructors are in `probdyn.numpyro.primitives.neural_process_networks`
(all re-exported here). What does not need NumPyro is shared with the Pyro twin in
`probdyn.primitives.neural_process`: the option checks, the network layouts and site names,
the guide's choice of set, and the bodies of the models and guides, which call this module's
operations (``_OPS``: the networks, the sample statements ``"z"`` and ``"y"``, the target mask).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array
from numpyro import handlers

from probdyn.data._tasks import TASK_FIELDS  # noqa: F401  (kept importable from here)
from probdyn.numpyro.primitives.neural_process_networks import (
    ANP,
    CNP,
    LNP,
    AttentiveNP,
    ConditionalNP,
    LatentNP,
)
from probdyn.primitives.neural_process import (
    NPOps,
    Task,
    run_attentive_np_guide,
    run_attentive_np_model,
    run_conditional_np_model,
    run_latent_np_guide,
    run_latent_np_model,
)

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


def _target_mask(mask_target: Any, shape: tuple[int, ...]) -> Array:
    """``mask_target`` as an array, or all True of ``shape`` (every target slot) if None."""
    return jnp.ones(shape, bool) if mask_target is None else jnp.asarray(mask_target)


def _observe(mean: Array, sd: Array, y_target: Array | None, mask_target: Any) -> None:
    """Sites ``"mean"``, ``"sd"`` and ``y ~ Normal(mean, sd)`` on the real target slots."""
    numpyro.deterministic("mean", mean)
    numpyro.deterministic("sd", sd)
    with handlers.mask(mask=_target_mask(mask_target, mean.shape[:-1])[..., None]):
        numpyro.sample("y", dist.Normal(mean, sd), obs=y_target)


def _sample_z(net: ANP | LNP, x: Array, y: Array, mask: Any) -> Array:
    """Site ``"z"``: a draw from the network's Gaussian over ``z`` given ``(x, y, mask)``."""
    loc, scale = net.latent(x, y, mask)
    return numpyro.sample("z", dist.Normal(loc, scale).to_event(1))


# What the shared model and guide bodies (``run_*``) call on this backend.
_OPS = NPOps(ConditionalNP, AttentiveNP, LatentNP, _sample_z, _observe, _target_mask)


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
    task = Task(x_context, y_context, mask_context, x_target, y_target, mask_target)
    run_conditional_np_model(_OPS, task, cnp_options)


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
    task = Task(x_context, y_context, mask_context, x_target, y_target, mask_target)
    run_attentive_np_model(_OPS, task, anp_options)


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
    task = Task(x_context, y_context, mask_context, x_target, y_target, mask_target)
    run_latent_np_model(_OPS, task, lnp_options)


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
    task = Task(x_context, y_context, mask_context, x_target, y_target, mask_target)
    run_latent_np_guide(_OPS, task, lnp_options)


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
    task = Task(x_context, y_context, mask_context, x_target, y_target, mask_target)
    run_attentive_np_guide(_OPS, task, anp_options)
