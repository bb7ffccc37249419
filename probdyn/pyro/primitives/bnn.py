"""Bayesian neural networks for Pyro: any torch network, lifted to sample sites.

Call these *inside* a model. Each call registers the network's weights as sample
sites (Bayesian) or ``param`` sites (deterministic) and returns an ordinary
callable holding this run's weights: it can be called thousands of times inside
an ODE solve without touching the PPL again.

Site names, shapes and priors are those of `probdyn.numpyro`, so the same dict of
weights is the same network in both backends. Weights are stored ``(in, out)``
(``x @ weight + bias``), not torch's ``(out, in)``.

Why not return a ``PyroModule``: a ``PyroModule`` with ``PyroSample`` attributes
issues a ``pyro.sample`` each time an attribute is read outside its own context,
so calling it inside a solver would create new sites on every evaluation. Here
the sites are declared once per model run and the network gets plain tensors.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import Tensor

from probdyn.primitives.validate import check_mlp_args, layer_index

__all__ = ["MLP", "BayesianMLP", "lift"]

PriorSpec: TypeAlias = (
    dist.Distribution
    | Mapping[str, dist.Distribution]
    | Callable[[str, tuple[int, ...]], dist.Distribution]
)


def _identity(x: Tensor) -> Tensor:
    return x


def _gelu(x: Tensor) -> Tensor:
    # jax.nn.gelu defaults to the tanh approximation; torch to the exact erf form.
    # Match the NumPyro twin so the same weights give the same network.
    return F.gelu(x, approximate="tanh")


def _softplus(x: Tensor) -> Tensor:
    # log(1 + e^x) exactly, as jax.nn.softplus; torch's F.softplus returns x itself
    # above x = 20, which differs from the NumPyro twin by up to 2e-9.
    return torch.logaddexp(x, x.new_zeros(()))


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "gelu": _gelu,
    "silu": F.silu,
    "softplus": _softplus,
    "sigmoid": torch.sigmoid,
    "elu": F.elu,
    "identity": _identity,
}


@dataclass(frozen=True)
class Linear:
    """An affine layer ``x @ weight + bias`` (weight shaped ``(in, out)``)."""

    weight: Tensor
    bias: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


@dataclass(frozen=True)
class MLP:
    """A multilayer perceptron that maps ``(..., sizes[0])`` to ``(..., sizes[-1])``.

    A plain callable over tensors (not an ``nn.Module``): leading batch dimensions
    are broadcast, and calling it never touches Pyro.

    Example:
        >>> import torch
        >>> layer = Linear(torch.ones(2, 3), torch.zeros(3))
        >>> MLP((layer,), torch.tanh)(torch.ones(4, 2)).shape
        torch.Size([4, 3])
    """

    layers: tuple[Linear, ...]
    activation: Callable[[Tensor], Tensor]

    def __call__(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


def _resolve_prior(prior: PriorSpec, path: str, shape: tuple[int, ...]) -> dist.TorchDistribution:
    d: Any
    if isinstance(prior, dist.Distribution):
        d = prior
    elif isinstance(prior, Mapping):
        matches = [v for k, v in prior.items() if k == path or fnmatch.fnmatchcase(path, k)]
        if not matches:
            raise ValueError(
                f"prior: no entry of the prior mapping matches parameter {path!r}; add it "
                f"(keys may be glob patterns such as '*.bias'). Keys given: {list(prior)}."
            )
        d = matches[0]
    else:
        d = prior(path, shape)
    if not isinstance(d, dist.Distribution):
        raise TypeError(
            f"prior: for parameter {path!r} got {d!r}, which is not a "
            "pyro.distributions.Distribution. Give e.g. dist.Normal(0, 1)."
        )
    d = cast(dist.TorchDistribution, d)  # every concrete Pyro distribution is one
    batch_shape, event_shape = tuple(d.batch_shape), tuple(d.event_shape)
    if event_shape:
        if batch_shape + event_shape != shape:
            raise ValueError(
                f"prior: the distribution for {path!r} has shape "
                f"{batch_shape + event_shape}, but the parameter is {shape}."
            )
        return d.to_event(len(batch_shape))
    return d.expand(shape).to_event(len(shape))


def _check_prior(prior: Any) -> None:
    if isinstance(prior, (dist.Distribution, Mapping)) or callable(prior):
        return
    raise TypeError(
        f"prior={prior!r} is not a distribution, a mapping from parameter path to "
        "distribution, or a callable (path, shape) -> distribution. "
        "Give e.g. prior=dist.Normal(0, 1)."
    )


def _named_tensors(module: Any) -> list[tuple[str, Tensor]]:
    if isinstance(module, MLP):
        return [
            (f"layers.{i}.{field}", getattr(layer, field))
            for i, layer in enumerate(module.layers)
            for field in ("weight", "bias")
        ]
    if isinstance(module, PyroModule):
        raise TypeError(
            f"lift(module={type(module).__name__}): a PyroModule declares its own sites. "
            "Give a plain torch.nn.Module (or an MLP, or a mapping of tensors)."
        )
    if isinstance(module, torch.nn.Module):
        return list(module.named_parameters())
    if isinstance(module, Mapping) and all(isinstance(v, Tensor) for v in module.values()):
        return [(str(k), v) for k, v in module.items()]
    raise TypeError(
        f"lift(module={module!r}): expected a torch.nn.Module, an MLP, or a mapping from "
        "name to tensor."
    )


def _rebuild(module: Any, values: dict[str, Tensor]) -> Any:
    if isinstance(module, MLP):
        layers = tuple(
            Linear(values[f"layers.{i}.weight"], values[f"layers.{i}.bias"])
            for i in range(len(module.layers))
        )
        return MLP(layers, module.activation)
    if isinstance(module, torch.nn.Module):
        return _with_tensors(module, values)
    return {str(k): values[str(k)] for k in module}


def _with_tensors(module: torch.nn.Module, values: dict[str, Tensor]) -> torch.nn.Module:
    # Copy the module without copying its parameters' data (they are replaced), then
    # put this run's tensors where the parameters were, as plain attributes, so that
    # gradients flow to the sample sites. Tied parameters keep sharing one value.
    params = dict(module.named_parameters(remove_duplicate=False))
    by_id = {id(p): values[name] for name, p in module.named_parameters()}
    new = copy.deepcopy(module, memo={id(p): None for p in params.values()})
    for path, p in params.items():
        owner_path, _, leaf = path.rpartition(".")
        owner = new.get_submodule(owner_path)
        del owner._parameters[leaf]
        setattr(owner, leaf, by_id[id(p)])
    return new


def lift(
    name: str,
    module: Any,
    prior: PriorSpec,
    *,
    bayesian: Callable[[str], bool] | None = None,
) -> Any:
    """Turn the parameters of a torch network into sample (or param) sites.

    Must be called inside a Pyro model. Each parameter with path ``p`` (as in
    ``module.named_parameters()``) becomes the sample site ``f"{name}.{p}"`` under
    ``prior``; parameters for which ``bayesian(p)`` is False become ``param`` sites
    initialised at the module's current values (deterministic weights, learned by
    VI, fixed under NUTS).

    Args:
        name: prefix of the site names.
        module: a ``torch.nn.Module`` (not a ``PyroModule``), an `MLP`, or a mapping
            from name to tensor.
        prior: a distribution (every weight i.i.d.), a mapping from parameter path
            (exact or glob pattern, e.g. ``"layers.0.*"``) to distribution, or a
            callable ``(path, shape) -> distribution``.
        bayesian: which paths are stochastic; default all.

    Returns:
        A copy of the module holding this run's weights (the module given is not
        changed). Calling it does not touch Pyro.

    Raises:
        TypeError: if ``prior`` is not a distribution, mapping or callable, or
            ``module`` is not a network.
        ValueError: if a prior mapping has no entry for a parameter.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> net = torch.nn.Linear(2, 1)
        >>> with pyro.poutine.seed(rng_seed=0):
        ...     sampled = lift("net", net, dist.Normal(0.0, 1.0))
        >>> sampled.weight.shape
        torch.Size([1, 2])
    """
    _check_prior(prior)
    values = {}
    for p, leaf in _named_tensors(module):
        shape = tuple(leaf.shape)
        if bayesian is None or bayesian(p):
            values[p] = pyro.sample(f"{name}.{p}", _resolve_prior(prior, p, shape))
        else:
            values[p] = pyro.param(f"{name}.{p}", leaf.detach().clone())
    return _rebuild(module, values)


def _init_mlp(sizes: Sequence[int], activation: Callable[[Tensor], Tensor], seed: int) -> MLP:
    # Deterministic layers start at a Glorot-style scale, drawn from a local generator
    # (never torch's global RNG); Bayesian ones are overwritten by their sample sites.
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.get_default_dtype()
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        w = torch.randn(n_in, n_out, generator=gen, dtype=dtype) / n_in**0.5
        layers.append(Linear(w, torch.zeros(n_out, dtype=dtype)))
    return MLP(tuple(layers), activation)


def BayesianMLP(
    name: str,
    sizes: Sequence[int],
    activation: str | Callable[[Tensor], Tensor] = "tanh",
    prior: PriorSpec | None = None,
    bayesian_layers: Sequence[int] | None = None,
) -> MLP:
    """A multilayer perceptron whose weights are sample sites; call inside a model.

    Sites are named ``f"{name}.layers.{i}.weight"`` (shape ``(in, out)``) and
    ``f"{name}.layers.{i}.bias"``. Layers not in ``bayesian_layers`` are ``param``
    sites (a partial BNN).

    Args:
        name: prefix of the site names; unique within the model.
        sizes: layer widths, input first, e.g. ``[2, 16, 2]``.
        activation: ``"tanh"``, ``"relu"``, ``"gelu"`` (tanh approximation, as in
            JAX), ``"silu"``, ``"softplus"``, ``"sigmoid"``, ``"elu"``,
            ``"identity"`` or a callable.
        prior: a distribution (default ``Normal(0, 1)`` for every weight), a
            mapping from path (e.g. ``"layers.0.weight"``, ``"*.bias"``) to
            distribution, or a callable ``(path, shape) -> distribution``.
        bayesian_layers: indices of the stochastic layers (negative indices count
            from the output, so ``[-1]`` is a last-layer BNN); default all.

    Returns:
        An `MLP` holding this run's weights; ``mlp(x)`` maps ``(..., sizes[0])`` to
        ``(..., sizes[-1])``.

    Raises:
        TypeError: if ``prior`` is not a distribution, mapping or callable.
        ValueError: for bad ``sizes``, ``activation`` or ``bayesian_layers``.

    Example:
        >>> import torch, pyro
        >>> with pyro.poutine.seed(rng_seed=0):
        ...     net = BayesianMLP("f", [2, 8, 1])
        >>> net(torch.ones(5, 2)).shape
        torch.Size([5, 1])
    """
    act = check_mlp_args(name, sizes, activation, ACTIVATIONS)
    prior = dist.Normal(0.0, 1.0) if prior is None else prior
    _check_prior(prior)
    chosen = layer_index(bayesian_layers, len(sizes) - 1)
    template = _init_mlp(sizes, act, seed=len(name))

    def is_bayesian(path: str) -> bool:
        return chosen is None or int(path.split(".")[1]) in chosen

    return lift(name, template, prior, bayesian=is_bayesian)
