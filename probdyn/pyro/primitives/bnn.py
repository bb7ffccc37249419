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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import Tensor

from probdyn.primitives.bnn import MLPBackend, bayesian_mlp, mlp_paths, prior_resolver
from probdyn.primitives.bnn import PriorSpec as _PriorSpec

__all__ = ["MLP", "BayesianMLP", "lift"]

PriorSpec: TypeAlias = _PriorSpec[dist.Distribution]


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


def _named_tensors(module: Any) -> list[tuple[str, Tensor]]:
    if isinstance(module, MLP):
        tensors = [t for layer in module.layers for t in (layer.weight, layer.bias)]
        return list(zip(mlp_paths(len(module.layers)), tensors))
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
        tensors = [values[p] for p in mlp_paths(len(module.layers))]
        layers = tuple(Linear(w, b) for w, b in zip(tensors[::2], tensors[1::2]))
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
    site_prior = prior_resolver(prior, dist.Distribution, "pyro")
    values = {}
    for p, leaf in _named_tensors(module):
        shape = tuple(leaf.shape)
        if bayesian is None or bayesian(p):
            values[p] = pyro.sample(f"{name}.{p}", site_prior(p, shape))
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


# What the backend-neutral `bayesian_mlp` recipe needs from this backend.
_BACKEND = MLPBackend(dist.Distribution, dist.Normal, ACTIVATIONS, _init_mlp, lift)


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
    return bayesian_mlp(_BACKEND, name, sizes, activation, prior, bayesian_layers)
