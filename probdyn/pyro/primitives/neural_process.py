"""Neural processes (Garnelo et al. 2018a,b; Kim et al. 2019) as Pyro model primitives.

The twin of `probdyn.numpyro.primitives.neural_process`: the same names, signatures, site names,
shapes and numbers. `ConditionalNP` (mean-pooled), `AttentiveNP` (cross-attention) and
`LatentNP` (global latent ``z``) are called inside a model: they register their weights as
``param`` sites and return a plain callable that maps a (padded, masked) context set and target
inputs to a per-point Gaussian predictive. `conditional_np_model`, `attentive_np_model` and
`latent_np_model` are Pyro models over a batch of tasks (observed site ``"y"``; the latent
model also has the sample site ``"z"``, and `latent_np_guide` is its amortised guide; so has
the attentive model given ``latent_dim``, with `attentive_np_guide`). Train them across
tasks with ``probdyn.fit(model, probdyn.data.gp_task_stream(16), engine=probdyn.VI(...))``
(maximum likelihood, or with ``VI(guide=latent_np_guide)`` the NP ELBO; see
`probdyn.pyro.engines.vi_stream`) and predict on a new task with
``posterior.predict(x_target, context=(x_context, y_context))``.

The networks and their constructors are in `probdyn.pyro.primitives.neural_process_networks`
(all re-exported here). What does not need Pyro is shared with the NumPyro twin in
`probdyn.primitives.neural_process`: the option checks, the network layouts and site names,
the guide's choice of set, and the bodies of the models and guides, which call this module's
operations (``_OPS``: the networks, the sample statements ``"z"`` and ``"y"``, the target mask).
"""

from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from probdyn.primitives.neural_process import (
    NPOps,
    Task,
    run_attentive_np_guide,
    run_attentive_np_model,
    run_conditional_np_model,
    run_latent_np_guide,
    run_latent_np_model,
)
from probdyn.pyro.primitives.neural_process_networks import (
    ANP,
    CNP,
    LNP,
    AttentiveNP,
    ConditionalNP,
    LatentNP,
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


def _target_mask(mask_target: Any, shape: tuple[int, ...]) -> Tensor:
    """``mask_target`` as a bool tensor, or all True of ``shape`` (every target slot) if None."""
    if mask_target is None:
        return torch.ones(shape, dtype=torch.bool)
    return torch.as_tensor(mask_target, dtype=torch.bool)


def _observe(mean: Tensor, sd: Tensor, y_target: Tensor | None, mask_target: Any) -> None:
    """Sites ``"mean"``, ``"sd"`` and ``y ~ Normal(mean, sd)`` on the real target slots."""
    pyro.deterministic("mean", mean)
    pyro.deterministic("sd", sd)
    mask = _target_mask(mask_target, mean.shape[:-1])
    pyro.sample("y", dist.Normal(mean, sd).mask(mask[..., None]), obs=y_target)


def _sample_z(net: ANP | LNP, x: Tensor, y: Tensor, mask: Any) -> Tensor:
    """Site ``"z"``: a draw from the network's Gaussian over ``z`` given ``(x, y, mask)``."""
    loc, scale = net.latent(x, y, mask)
    return pyro.sample("z", dist.Normal(loc, scale).to_event(1))


# What the shared model and guide bodies (``run_*``) call on this backend.
_OPS = NPOps(ConditionalNP, AttentiveNP, LatentNP, _sample_z, _observe, _target_mask)


def conditional_np_model(
    x_context: Tensor,
    y_context: Tensor,
    mask_context: Tensor,
    x_target: Tensor,
    y_target: Tensor | None = None,
    mask_target: Tensor | None = None,
    **cnp_options: Any,
) -> None:
    """A Pyro model over a batch of tasks: a `ConditionalNP` named ``"cnp"`` and site ``"y"``.

    ``y ~ Normal(mean, sd)`` independently per target point, masked by ``mask_target``; the
    predictive mean and sd are recorded as deterministic sites ``"mean"`` and ``"sd"``.
    Arrays follow `probdyn.data.GPTaskBatch` (as tensors): ``(batch, n, dim)`` with
    ``(batch, n)`` bool masks.

    Args:
        x_context: ``(batch, n_c, x_dim)`` context inputs.
        y_context: ``(batch, n_c, y_dim)`` context observations.
        mask_context: ``(batch, n_c)`` bool, the real context points.
        x_target: ``(batch, n_t, x_dim)`` target inputs.
        y_target: observed target values, or None to sample them.
        mask_target: which target slots are real (default all).
        **cnp_options: passed to `ConditionalNP` (e.g. ``hidden=64``).

    Example:
        >>> import torch, pyro
        >>> with pyro.poutine.seed(rng_seed=0):
        ...     tr = pyro.poutine.trace(conditional_np_model).get_trace(
        ...         torch.ones(2, 5, 1), torch.ones(2, 5, 1), torch.ones(2, 5, dtype=torch.bool),
        ...         torch.zeros(2, 7, 1), hidden=8)
        >>> tuple(tr.nodes["y"].get("value").shape)
        (2, 7, 1)
    """
    task = Task(x_context, y_context, mask_context, x_target, y_target, mask_target)
    run_conditional_np_model(_OPS, task, cnp_options)


def attentive_np_model(
    x_context: Tensor,
    y_context: Tensor,
    mask_context: Tensor,
    x_target: Tensor,
    y_target: Tensor | None = None,
    mask_target: Tensor | None = None,
    **anp_options: Any,
) -> None:
    """A Pyro model over a batch of tasks: an `AttentiveNP` named ``"anp"`` and site ``"y"``.

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
        >>> import torch, pyro
        >>> with pyro.poutine.seed(rng_seed=0):
        ...     tr = pyro.poutine.trace(attentive_np_model).get_trace(
        ...         torch.ones(2, 5, 1), torch.ones(2, 5, 1), torch.ones(2, 5, dtype=torch.bool),
        ...         torch.zeros(2, 7, 1), hidden=8, num_heads=2, latent_dim=3)
        >>> tuple(tr.nodes["z"].get("value").shape), tuple(tr.nodes["y"].get("value").shape)
        ((2, 3), (2, 7, 1))
    """
    task = Task(x_context, y_context, mask_context, x_target, y_target, mask_target)
    run_attentive_np_model(_OPS, task, anp_options)


def latent_np_model(
    x_context: Tensor,
    y_context: Tensor,
    mask_context: Tensor,
    x_target: Tensor,
    y_target: Tensor | None = None,
    mask_target: Tensor | None = None,
    **lnp_options: Any,
) -> None:
    """A Pyro model over a batch of tasks: a `LatentNP` named ``"lnp"``, latent ``"z"``, ``"y"``.

    ``z ~ p(z | context)`` (site ``"z"``, ``(batch, latent_dim)``, the context-amortised
    Gaussian of `LNP.latent`), then ``y ~ Normal(mean, sd)`` independently per target point
    given ``z``, masked by ``mask_target``; deterministic sites ``"mean"`` and ``"sd"``. Pair
    it with `latent_np_guide` (``q(z | context and targets)``), ``probdyn.fit(latent_np_model,
    stream, engine=probdyn.VI(guide=latent_np_guide))``: the loss is then the NP ELBO of
    Garnelo et al. (2018b),
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
        >>> import torch, pyro
        >>> with pyro.poutine.seed(rng_seed=0):
        ...     tr = pyro.poutine.trace(latent_np_model).get_trace(
        ...         torch.ones(2, 5, 1), torch.ones(2, 5, 1), torch.ones(2, 5, dtype=torch.bool),
        ...         torch.zeros(2, 7, 1), hidden=8, latent_dim=3)
        >>> tuple(tr.nodes["z"].get("value").shape), tuple(tr.nodes["y"].get("value").shape)
        ((2, 3), (2, 7, 1))
    """
    task = Task(x_context, y_context, mask_context, x_target, y_target, mask_target)
    run_latent_np_model(_OPS, task, lnp_options)


def latent_np_guide(
    x_context: Tensor,
    y_context: Tensor,
    mask_context: Tensor,
    x_target: Tensor,
    y_target: Tensor | None = None,
    mask_target: Tensor | None = None,
    **lnp_options: Any,
) -> None:
    """The amortised guide of `latent_np_model`: ``z ~ q(z | targets)``, sharing its weights.

    The set encoder of the model's `LatentNP` applied to the targets (which include the
    contexts in a `probdyn.data.GPTaskBatch`); without ``y_target`` (prediction) it falls back
    to the context, so the guide is then the model's ``p(z | context)``.

    Example:
        >>> import torch, pyro
        >>> with pyro.poutine.seed(rng_seed=0):
        ...     tr = pyro.poutine.trace(latent_np_guide).get_trace(
        ...         torch.ones(2, 5, 1), torch.ones(2, 5, 1), torch.ones(2, 5, dtype=torch.bool),
        ...         torch.zeros(2, 7, 1), torch.ones(2, 7, 1), hidden=8, latent_dim=3)
        >>> tuple(tr.nodes["z"].get("value").shape)
        (2, 3)
    """
    task = Task(x_context, y_context, mask_context, x_target, y_target, mask_target)
    run_latent_np_guide(_OPS, task, lnp_options)


def attentive_np_guide(
    x_context: Tensor,
    y_context: Tensor,
    mask_context: Tensor,
    x_target: Tensor,
    y_target: Tensor | None = None,
    mask_target: Tensor | None = None,
    **anp_options: Any,
) -> None:
    """The amortised guide of `attentive_np_model` with ``latent_dim``: ``z ~ q(z | targets)``.

    The twin of `probdyn.numpyro`'s ``attentive_np_guide``; as `latent_np_guide`: the latent
    encoder of the model's `AttentiveNP` (the same weights) applied to the targets (which
    include the contexts in a `probdyn.data.GPTaskBatch`); without ``y_target`` (prediction)
    it falls back to the context, so the guide is then the model's ``p(z | context)``.

    Raises:
        ValueError: if ``anp_options`` has no ``latent_dim`` (the model then has no latent
            site; fit it by maximum likelihood, ``VI()`` without a guide).

    Example:
        >>> import torch, pyro
        >>> with pyro.poutine.seed(rng_seed=0):
        ...     tr = pyro.poutine.trace(attentive_np_guide).get_trace(
        ...         torch.ones(2, 5, 1), torch.ones(2, 5, 1), torch.ones(2, 5, dtype=torch.bool),
        ...         torch.zeros(2, 7, 1), torch.ones(2, 7, 1), hidden=8, num_heads=2,
        ...         latent_dim=3)
        >>> tuple(tr.nodes["z"].get("value").shape)
        (2, 3)
    """
    task = Task(x_context, y_context, mask_context, x_target, y_target, mask_target)
    run_attentive_np_guide(_OPS, task, anp_options)
