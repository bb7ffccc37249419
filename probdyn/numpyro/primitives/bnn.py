"""Bayesian neural networks for NumPyro: any equinox network, lifted to sample sites.

Call these *inside* a model. Each call registers the network's weights as sample
sites (Bayesian) or ``param`` sites (deterministic) and returns an ordinary
equinox module holding this run's weights: a pure function that can be called
thousands of times inside an ODE solve without touching the PPL again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, Float

from probdyn.primitives.bnn import MLPBackend, bayesian_mlp, prior_resolver
from probdyn.primitives.bnn import PriorSpec as _PriorSpec
from probdyn.primitives.init_weights import init_layers as _init_layers

__all__ = ["MLP", "BayesianMLP", "lift"]

PriorSpec: TypeAlias = _PriorSpec[dist.Distribution]

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "softplus": jax.nn.softplus,
    "sigmoid": jax.nn.sigmoid,
    "elu": jax.nn.elu,
    "identity": lambda x: x,
}


class Linear(eqx.Module):
    """An affine layer ``x @ weight + bias`` (weight shaped ``(in, out)``)."""

    weight: Float[Array, "n_in n_out"]
    bias: Float[Array, " n_out"]

    def __call__(self, x: Float[Array, "... n_in"]) -> Float[Array, "... n_out"]:
        return x @ self.weight + self.bias


class MLP(eqx.Module):
    """A multilayer perceptron that maps ``(..., sizes[0])`` to ``(..., sizes[-1])``.

    Leading batch dimensions are broadcast, so no ``vmap`` is needed.
    """

    layers: tuple[Linear, ...]
    activation: Callable[[Array], Array] = eqx.field(static=True)

    def __call__(self, x: Float[Array, "... n_in"]) -> Float[Array, "... n_out"]:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


def _path_str(path: Sequence[Any]) -> str:
    parts = []
    for k in path:
        for attr in ("name", "idx", "key"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return ".".join(parts)


def lift(
    name: str,
    module: Any,
    prior: PriorSpec,
    *,
    bayesian: Callable[[str], bool] | None = None,
) -> Any:
    """Turn the array leaves of an equinox module into sample (or param) sites.

    Must be called inside a NumPyro model. Each array leaf with path ``p`` becomes
    the sample site ``f"{name}.{p}"`` under ``prior``; leaves for which
    ``bayesian(p)`` is False become ``param`` sites initialised at the module's
    current values (deterministic weights, learned by VI, fixed under NUTS).

    Args:
        name: prefix of the site names.
        module: an equinox module (or any pytree of arrays).
        prior: a distribution (every weight i.i.d.), a mapping from parameter path
            (exact or glob pattern, e.g. ``"layers.0.*"``) to distribution, or a
            callable ``(path, shape) -> distribution``.
        bayesian: which paths are stochastic; default all.

    Returns:
        The module with this run's weights.

    Example:
        >>> import equinox as eqx, jax, numpyro.distributions as dist
        >>> from numpyro import handlers
        >>> net = eqx.nn.Linear(2, 1, key=jax.random.key(0))
        >>> with handlers.seed(rng_seed=0):
        ...     sampled = lift("net", net, dist.Normal(0, 1))
        >>> sampled.weight.shape
        (1, 2)
    """
    site_prior = prior_resolver(prior, dist.Distribution, "numpyro")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(module)
    new = []
    for path, leaf in leaves:
        if not eqx.is_array(leaf):
            new.append(leaf)
            continue
        p = _path_str(path)
        shape = tuple(jnp.shape(leaf))
        if bayesian is None or bayesian(p):
            new.append(numpyro.sample(f"{name}.{p}", site_prior(p, shape)))
        else:
            new.append(numpyro.param(f"{name}.{p}", leaf))
    return jax.tree_util.tree_unflatten(treedef, new)


def _init_mlp(sizes: Sequence[int], activation: Callable[[Array], Array], seed: int) -> MLP:
    layers = _init_layers(tuple(sizes), seed)
    return MLP(tuple(Linear(jnp.asarray(w), jnp.asarray(b)) for w, b in layers), activation)


# What the backend-neutral `bayesian_mlp` recipe needs from this backend.
_BACKEND = MLPBackend(dist.Distribution, dist.Normal, ACTIVATIONS, _init_mlp, lift)


def BayesianMLP(
    name: str,
    sizes: Sequence[int],
    activation: str | Callable[[Array], Array] = "tanh",
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
        activation: ``"tanh"``, ``"relu"``, ``"gelu"``, ``"silu"``, ``"softplus"``,
            ``"sigmoid"``, ``"elu"``, ``"identity"`` or a callable.
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
        >>> import jax.numpy as jnp
        >>> from numpyro import handlers
        >>> with handlers.seed(rng_seed=0):
        ...     net = BayesianMLP("f", [2, 8, 1])
        >>> net(jnp.ones((5, 2))).shape
        (5, 1)
    """
    return bayesian_mlp(_BACKEND, name, sizes, activation, prior, bayesian_layers)
