"""Backend-neutral pieces of the neural processes (NumPy only).

Both backends' `ConditionalNP`, `AttentiveNP` and `LatentNP`, their models and their
guides read from here, so that the two cannot drift apart: the argument checks and
their messages; the layout of every network (which MLPs it is made of, the prefixes of
their ``param`` sites, their widths, and the order in which their params are created,
which fixes the initial weights a seed gives); the errors of a latent path asked for
where there is none; which set (the context or the targets) an amortised guide
encodes; and the bodies of the models and guides (``run_*``), written in the backend
operations of `NPOps`.

Each backend keeps the tensor maths: its MLP of ``param`` sites (the layers of
`param_layers`, handed to `NetworkLayout.build`), the pooling, attention and Gaussian
heads, and the sample statements (`NPOps.sample_z`, `NPOps.observe`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np

from probdyn.core.engine_base import as_int

__all__ = [
    "MLPSpec",
    "NPOps",
    "NetworkLayout",
    "ParamLayer",
    "Task",
    "attentive_np_layout",
    "check_guide_latent_dim",
    "check_latent_input",
    "check_np_args",
    "conditional_np_layout",
    "guide_set",
    "latent_np_layout",
    "missing_latent_path",
    "param_layers",
    "run_attentive_np_guide",
    "run_attentive_np_model",
    "run_conditional_np_model",
    "run_latent_np_guide",
    "run_latent_np_model",
]

Act = TypeVar("Act")  # a backend's activation function
Net = TypeVar("Net")  # a backend's MLP


def check_np_args(
    fn: str,
    sizes: Mapping[str, int],
    min_sd: float,
    activation: str,
    activations: Mapping[str, Act],
) -> Act:
    """Check a neural process's options; return the activation function they name.

    Args:
        fn: the constructor's name, for the messages (e.g. ``"ConditionalNP"``).
        sizes: argument name -> value of every size option, checked in this order.
        min_sd: the floor of the predictive sd.
        activation: the activation's name.
        activations: the backend's table of activation functions by name.

    Returns:
        ``activations[activation]``.

    Raises:
        ValueError: for a size that is not a positive int, ``min_sd`` outside
            (0, 1), or an unknown activation.
    """
    for arg, value in sizes.items():
        if (as_int(value) or 0) < 1:
            raise ValueError(f"{fn}({arg}={value!r}): must be a positive int.")
    if not 0.0 < min_sd < 1.0:
        raise ValueError(f"{fn}(min_sd={min_sd!r}): must lie in (0, 1), e.g. 0.1.")
    if activation not in activations:
        raise ValueError(f"{fn}(activation={activation!r}): choose one of {sorted(activations)}.")
    return activations[activation]


class ParamLayer(NamedTuple):
    """One affine layer of an MLP whose weights are ``param`` sites.

    Args:
        weight: the site name of its ``(n_in, n_out)`` weight.
        bias: the site name of its ``(n_out,)`` bias (initially 0).
        n_in: its input width.
        n_out: its output width.
        bound: the Glorot-uniform bound: the weight starts ``U(-bound, bound)``.
    """

    weight: str
    bias: str
    n_in: int
    n_out: int
    bound: float


def param_layers(name: str, sizes: Sequence[int]) -> list[ParamLayer]:
    """The layers of an MLP of widths ``sizes`` (input first) named ``name``, in site order.

    Sites are ``f"{name}.layers.{i}.weight"`` and ``f"{name}.layers.{i}.bias"``; the
    bound is ``sqrt(6 / (n_in + n_out))``.
    """
    return [
        ParamLayer(
            f"{name}.layers.{i}.weight",
            f"{name}.layers.{i}.bias",
            n_in,
            n_out,
            float(np.sqrt(6.0 / (n_in + n_out))),
        )
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]))
    ]


class MLPSpec(NamedTuple):
    """One MLP of a neural process.

    Args:
        field: the network's attribute that holds it (e.g. ``"encoder"``).
        site: the prefix of its ``param`` sites (e.g. ``"cnp.encoder"``).
        sizes: its widths, input first.
    """

    field: str
    site: str
    sizes: list[int]


@dataclasses.dataclass(frozen=True)
class NetworkLayout(Generic[Act]):
    """What a checked neural process is made of, ready for a backend to build.

    Args:
        mlps: its MLPs, in the order their params are created.
        activation: the backend's activation function of every MLP.
        fields: the network's other attributes (``min_sd``, ``num_heads``, and None for
            an absent optional path).
    """

    mlps: tuple[MLPSpec, ...]
    activation: Act
    fields: dict[str, Any]

    def build(self, param_mlp: Callable[[str, Sequence[int], Act], Net]) -> dict[str, Any]:
        """The network's attributes: ``param_mlp(site, sizes, activation)`` per MLP, in order.

        Args:
            param_mlp: the backend's MLP whose weights are ``param`` sites named
                ``f"{site}.layers.{i}.weight"`` (and ``.bias``).

        Returns:
            A dict of keyword arguments for the backend's network class.
        """
        built = {
            spec.field: param_mlp(spec.site, spec.sizes, self.activation) for spec in self.mlps
        }
        return built | self.fields


def _set_encoder(name: str, part: str, x_dim: int, y_dim: int, hidden: int, depth: int) -> MLPSpec:
    """An MLP ``[x_dim + y_dim, hidden x depth]`` applied to each ``(x_i, y_i)`` of a set."""
    return MLPSpec(part, f"{name}.{part}", [x_dim + y_dim] + [hidden] * depth)


def _decoder(name: str, n_in: int, hidden: int, depth: int, y_dim: int) -> MLPSpec:
    """The decoder ``[n_in, hidden x depth, 2 y_dim]``: a mean and a raw sd per output."""
    return MLPSpec("decoder", f"{name}.decoder", [n_in] + [hidden] * depth + [2 * y_dim])


def _latent_head(name: str, hidden: int, latent_dim: int) -> MLPSpec:
    """The head ``[hidden, hidden, 2 latent_dim]``: location and raw scale of ``z``."""
    return MLPSpec("latent_head", f"{name}.latent_head", [hidden, hidden, 2 * latent_dim])


def conditional_np_layout(
    name: str,
    x_dim: int,
    y_dim: int,
    hidden: int,
    encoder_depth: int,
    decoder_depth: int,
    min_sd: float,
    activation: str,
    activations: Mapping[str, Act],
) -> NetworkLayout[Act]:
    """Check `ConditionalNP`'s options (its arguments, in order) and lay the network out.

    Args:
        activations: the backend's table of activation functions by name.

    Raises:
        ValueError: as `check_np_args`.
    """
    sizes = {"x_dim": x_dim, "y_dim": y_dim, "hidden": hidden}
    sizes |= {"encoder_depth": encoder_depth, "decoder_depth": decoder_depth}
    act = check_np_args("ConditionalNP", sizes, min_sd, activation, activations)
    mlps = (
        _set_encoder(name, "encoder", x_dim, y_dim, hidden, encoder_depth),
        _decoder(name, x_dim + hidden, hidden, decoder_depth, y_dim),
    )
    return NetworkLayout(mlps, act, {"min_sd": float(min_sd)})


def attentive_np_layout(
    name: str,
    x_dim: int,
    y_dim: int,
    hidden: int,
    num_heads: int,
    latent_dim: int | None,
    encoder_depth: int,
    decoder_depth: int,
    min_sd: float,
    activation: str,
    activations: Mapping[str, Act],
) -> NetworkLayout[Act]:
    """Check `AttentiveNP`'s options (its arguments, in order) and lay the network out.

    Args:
        activations: the backend's table of activation functions by name.

    Raises:
        ValueError: as `check_np_args`, or ``num_heads`` not dividing ``hidden``.
    """
    sizes = {"x_dim": x_dim, "y_dim": y_dim, "hidden": hidden, "num_heads": num_heads}
    if latent_dim is not None:
        sizes["latent_dim"] = latent_dim
    sizes |= {"encoder_depth": encoder_depth, "decoder_depth": decoder_depth}
    act = check_np_args("AttentiveNP", sizes, min_sd, activation, activations)
    if hidden % num_heads:
        raise ValueError(
            f"AttentiveNP(num_heads={num_heads!r}): must divide hidden={hidden!r}, e.g. "
            "num_heads=8 with hidden=128."
        )
    mlps = [
        _set_encoder(name, "encoder", x_dim, y_dim, hidden, encoder_depth),
        MLPSpec("key_query", f"{name}.key_query", [x_dim, hidden, hidden]),
    ]
    for part in ("query", "key", "value", "output"):
        mlps.append(MLPSpec(part, f"{name}.attention.{part}", [hidden, hidden]))
    if latent_dim is not None:
        mlps.append(_set_encoder(name, "latent_encoder", x_dim, y_dim, hidden, encoder_depth))
        mlps.append(_latent_head(name, hidden, latent_dim))
    n_in = x_dim + hidden + (0 if latent_dim is None else latent_dim)
    mlps.append(_decoder(name, n_in, hidden, decoder_depth, y_dim))
    return NetworkLayout(tuple(mlps), act, {"num_heads": num_heads, "min_sd": float(min_sd)})


def latent_np_layout(
    name: str,
    x_dim: int,
    y_dim: int,
    hidden: int,
    latent_dim: int,
    encoder_depth: int,
    decoder_depth: int,
    deterministic_path: bool,
    min_sd: float,
    activation: str,
    activations: Mapping[str, Act],
) -> NetworkLayout[Act]:
    """Check `LatentNP`'s options (its arguments, in order) and lay the network out.

    Without ``deterministic_path`` the layout's fields hold ``deterministic_encoder=None``.

    Args:
        activations: the backend's table of activation functions by name.

    Raises:
        ValueError: as `check_np_args`.
    """
    sizes = {"x_dim": x_dim, "y_dim": y_dim, "hidden": hidden, "latent_dim": latent_dim}
    sizes |= {"encoder_depth": encoder_depth, "decoder_depth": decoder_depth}
    act = check_np_args("LatentNP", sizes, min_sd, activation, activations)
    mlps = [
        _set_encoder(name, "latent_encoder", x_dim, y_dim, hidden, encoder_depth),
        _latent_head(name, hidden, latent_dim),
    ]
    fields: dict[str, Any] = {"min_sd": float(min_sd)}
    if deterministic_path:
        det = _set_encoder(name, "deterministic_encoder", x_dim, y_dim, hidden, encoder_depth)
        mlps.append(det)
    else:
        fields["deterministic_encoder"] = None
    n_in = x_dim + latent_dim + (hidden if deterministic_path else 0)
    mlps.append(_decoder(name, n_in, hidden, decoder_depth, y_dim))
    return NetworkLayout(tuple(mlps), act, fields)


def missing_latent_path() -> ValueError:
    """The error of ``ANP.latent`` on an attentive NP built without ``latent_dim``."""
    return ValueError(
        "ANP.latent: this attentive NP has no latent path; build it with "
        "AttentiveNP(..., latent_dim=k) to have one."
    )


def check_latent_input(
    has_latent_path: bool, z_shape: Sequence[int] | None, array_word: str
) -> None:
    """Check the ``z`` given to an attentive NP against whether it has a latent path.

    Args:
        has_latent_path: whether the network was built with ``latent_dim``.
        z_shape: the shape of the ``z`` given, or None when none was.
        array_word: what the backend calls an array in the message (``"array"``,
            ``"tensor"``).

    Raises:
        ValueError: for a ``z`` without a latent path, or none with one.
    """
    if not has_latent_path:
        if z_shape is not None:
            raise ValueError(
                f"ANP(z=<{array_word} of shape {tuple(z_shape)}>): this attentive NP has no "
                "latent path; pass z=None, or build it with AttentiveNP(..., latent_dim=k)."
            )
    elif z_shape is None:
        raise ValueError(
            "ANP(z=None): this attentive NP has a latent path and needs z of shape "
            "(batch, latent_dim), e.g. a draw from anp.latent(x_context, y_context, "
            "mask_context)."
        )


def check_guide_latent_dim(anp_options: Mapping[str, Any]) -> None:
    """Refuse `attentive_np_guide` for an attentive NP without a latent path.

    Raises:
        ValueError: if ``anp_options`` has no ``latent_dim`` (or it is None).
    """
    if anp_options.get("latent_dim") is None:
        raise ValueError(
            f"attentive_np_guide(latent_dim={anp_options.get('latent_dim')!r}): the guide needs "
            "the latent path; pass latent_dim=k (e.g. 32), or fit the deterministic "
            "attentive_np_model by maximum likelihood with VI() and no guide."
        )


class Task(NamedTuple):
    """A batch of tasks as the NP models and guides take it.

    The fields of `probdyn.data.GPTaskBatch`, as the backend's arrays: ``(batch, n, dim)``
    inputs and observations, ``(batch, n)`` bool masks of the real points.
    """

    x_context: Any
    y_context: Any
    mask_context: Any
    x_target: Any
    y_target: Any = None
    mask_target: Any = None

    @property
    def context(self) -> tuple[Any, Any, Any]:
        """The context set ``(x_context, y_context, mask_context)``."""
        return self.x_context, self.y_context, self.mask_context

    @property
    def inputs(self) -> tuple[Any, Any, Any, Any]:
        """What a network maps to the predictive: the context set and ``x_target``."""
        return self.x_context, self.y_context, self.mask_context, self.x_target


@dataclasses.dataclass(frozen=True)
class NPOps:
    """The backend operations the NP models and guides below are written in.

    Args:
        conditional_np: the backend's `ConditionalNP`.
        attentive_np: the backend's `AttentiveNP`.
        latent_np: the backend's `LatentNP`.
        sample_z: ``(net, x, y, mask) -> z``: site ``"z"``, a draw from ``net.latent``'s
            Gaussian given the set ``(x, y, mask)`` (its last axis the event).
        observe: ``(mean, sd, y_target, mask_target)``: deterministic sites ``"mean"``
            and ``"sd"`` and ``y ~ Normal(mean, sd)`` on the real target slots.
        target_mask: ``(mask_target, shape) -> mask``: the given mask as a bool array,
            or all True of ``shape`` (every target slot) when it is None.
    """

    conditional_np: Callable[..., Any]
    attentive_np: Callable[..., Any]
    latent_np: Callable[..., Any]
    sample_z: Callable[[Any, Any, Any, Any], Any]
    observe: Callable[[Any, Any, Any, Any], None]
    target_mask: Callable[[Any, Any], Any]


def guide_set(task: Task, target_mask: Callable[[Any, Any], Any]) -> tuple[Any, Any, Any]:
    """The set ``(x, y, mask)`` an amortised guide encodes into ``q(z | set)``.

    The targets (which include the contexts in a `probdyn.data.GPTaskBatch`) when
    ``y_target`` is given; without it (prediction) the context, so that the guide is then
    the model's ``p(z | context)``.

    Args:
        task: the batch of tasks.
        target_mask: as `NPOps.target_mask`.
    """
    if task.y_target is None:
        return task.context
    mask = target_mask(task.mask_target, task.y_target.shape[:-1])
    return task.x_target, task.y_target, mask


def run_conditional_np_model(ops: NPOps, task: Task, options: Mapping[str, Any]) -> None:
    """The body of ``conditional_np_model``: a `ConditionalNP` ``"cnp"`` and site ``"y"``."""
    cnp = ops.conditional_np("cnp", **options)
    mean, sd = cnp(*task.inputs)
    ops.observe(mean, sd, task.y_target, task.mask_target)


def run_attentive_np_model(ops: NPOps, task: Task, options: Mapping[str, Any]) -> None:
    """The body of ``attentive_np_model``: an `AttentiveNP` ``"anp"``, with a latent path
    first ``z ~ p(z | context)``, then site ``"y"``."""
    anp = ops.attentive_np("anp", **options)
    z = None if anp.latent_head is None else ops.sample_z(anp, *task.context)
    mean, sd = anp(*task.inputs, z)
    ops.observe(mean, sd, task.y_target, task.mask_target)


def run_latent_np_model(ops: NPOps, task: Task, options: Mapping[str, Any]) -> None:
    """The body of ``latent_np_model``: a `LatentNP` ``"lnp"``, ``z ~ p(z | context)``, ``"y"``."""
    lnp = ops.latent_np("lnp", **options)
    z = ops.sample_z(lnp, *task.context)
    mean, sd = lnp(*task.inputs, z)
    ops.observe(mean, sd, task.y_target, task.mask_target)


def run_latent_np_guide(ops: NPOps, task: Task, options: Mapping[str, Any]) -> None:
    """The body of ``latent_np_guide``: ``z ~ q(z | guide_set)``, the model's `LatentNP`."""
    ops.sample_z(ops.latent_np("lnp", **options), *guide_set(task, ops.target_mask))


def run_attentive_np_guide(ops: NPOps, task: Task, options: Mapping[str, Any]) -> None:
    """The body of ``attentive_np_guide``: as `run_latent_np_guide` with the `AttentiveNP`.

    Raises:
        ValueError: if ``options`` has no ``latent_dim`` (the model then has no latent site).
    """
    check_guide_latent_dim(options)
    ops.sample_z(ops.attentive_np("anp", **options), *guide_set(task, ops.target_mask))
