"""Helpers shared by the Pyro runners: keys, isolation, tracing, checks, versions.

Randomness: probdyn never reads or disturbs the global torch RNG (nor numpy's or
Python's), nor the user's Pyro parameter store. Every run happens inside
`isolated`, which forks the RNG states, seeds torch from the run's own seed and
swaps in an empty private parameter store; all of it is restored on exit.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import Unit
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

from probdyn.core.assemble import package_versions
from probdyn.engines.checks import check_observed_sites, distribution_class_error
from probdyn.engines.keys import int_key

__all__ = [
    "as_seed",
    "check_observed",
    "isolated",
    "latent_sites",
    "observed_sites",
    "param_sites",
    "plate_nesting",
    "plates_complete",
    "sub_seed",
    "to_numpy",
    "to_torch",
    "torch_seed",
    "trace_model",
    "uncondition",
    "versions",
    "with_params",
]

_SEED_BOUND = 2**63


def as_seed(key: Any) -> int:
    """An int seed or a ``torch.Generator`` -> the run's integer seed.

    A generator is not used directly: one seed is drawn from it (advancing it),
    so the same generator state gives the same run.

    An int seed is returned as it is: any seed in ``[0, 2**64)`` (the rule of
    `probdyn.engines.keys`) seeds torch and `sub_seed` directly.

    Raises:
        TypeError: if ``key`` is neither.
        ValueError: if an int key is outside ``[0, 2**64)``.
    """
    if isinstance(key, torch.Generator):
        return int(torch.randint(0, _SEED_BOUND - 1, (), generator=key, dtype=torch.int64))
    seed = int_key(key)
    if seed is not None:
        return seed
    raise TypeError(
        f"key={key!r}: expected an int seed or a torch.Generator "
        "(torch.Generator().manual_seed(0))."
    )


def sub_seed(seed: int, *path: int) -> int:
    """An independent seed for one part of a run (a chain, the forward pass, ...)."""
    state = np.random.SeedSequence([seed, *path]).generate_state(1, np.uint64)[0]
    return int(state) % _SEED_BOUND


def torch_seed(seed: int) -> int:
    """The seed a torch CPU generator gets for a seed in ``[0, 2**64)``.

    That generator (mt19937) keeps only the low 32 bits of its seed, so ``2**32`` would
    give the draws of 0: a seed below ``2**32`` is used as it is (results stay the
    same), a larger one is hashed into 32 bits with `numpy.random.SeedSequence`.
    """
    if seed < 2**32:
        return seed
    return int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])


@contextlib.contextmanager
def isolated(seed: int) -> Iterator[None]:
    """Run a block with torch seeded from ``seed`` and a private, empty Pyro
    parameter store; restore the global RNG states and the user's store after."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]), pyro.get_param_store().scope():
        torch.manual_seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def to_torch(value: Any) -> Any:
    """NumPy arrays -> tensors (floating arrays in torch's default dtype), so that
    a model can be given the same NumPy data on either backend. Anything else is
    returned unchanged."""
    if isinstance(value, np.ndarray):
        if np.issubdtype(value.dtype, np.floating):
            return torch.as_tensor(value, dtype=torch.get_default_dtype())
        return torch.as_tensor(value)
    return value


def to_torch_args(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`to_torch` on every positional and keyword argument."""
    return tuple(to_torch(a) for a in args), {k: to_torch(v) for k, v in kwargs.items()}


def to_numpy(value: Any) -> np.ndarray:
    """A tensor (or anything array-like) -> a NumPy array, detached from autograd."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def trace_model(
    model: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Run the model once and return its trace's sites (name -> site dict).

    Raises:
        TypeError: naming the site, for a distribution class given to ``pyro.sample``.
    """
    try:
        with torch.no_grad():
            return dict(poutine.trace(model).get_trace(*args, **kwargs).nodes)
    except TypeError as err:
        better = distribution_class_error(err, "pyro.primitives")
        if better is None:
            raise
        raise better from err


def is_factor(site: dict[str, Any]) -> bool:
    fn: Any = site.get("fn")
    while hasattr(fn, "base_dist"):  # masked / independent wrappers
        fn = fn.base_dist
    return isinstance(fn, Unit)


def is_deterministic(site: dict[str, Any]) -> bool:
    return bool((site.get("infer") or {}).get("_deterministic"))


def is_plate(site: dict[str, Any]) -> bool:
    return isinstance(site.get("fn"), _Subsample)


def latent_sites(trace: dict[str, Any]) -> list[str]:
    """Names of the latent sample sites (not plates, factors or deterministics)."""
    return [
        name
        for name, site in trace.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not is_plate(site)
        and not is_factor(site)
    ]


def observed_sites(trace: dict[str, Any]) -> dict[str, Any]:
    """Observed sample sites (``pyro.deterministic`` and ``pyro.factor`` excluded)."""
    return {
        name: site
        for name, site in trace.items()
        if site["type"] == "sample"
        and site["is_observed"]
        and not is_factor(site)
        and not is_deterministic(site)
    }


def param_sites(trace: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's ``pyro.param`` sites at their traced (constrained) values."""
    return {n: s["value"].detach().clone() for n, s in trace.items() if s["type"] == "param"}


def plate_nesting(trace: dict[str, Any]) -> int:
    """How many nested ``pyro.plate`` dimensions the model uses (0 without plates).

    Given to Pyro's ELBOs as ``max_plate_nesting``: with it, a site whose batch
    dimensions are not all declared as plates is accepted, as on NumPyro (Pyro's
    default, infinite nesting, rejects such models under SVI but not under MCMC).
    """
    dims = [
        -frame.dim
        for site in trace.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None
    ]
    return max(dims, default=0)


def plates_complete(trace: dict[str, Any]) -> bool:
    """Whether every batch dimension of every sample site is one of its plates.

    Only then can ELBO particles be vectorised safely: Pyro puts the particle
    dimension left of the plates, where an undeclared batch dimension of the same
    size would silently pair particles with data points.
    """
    for site in trace.values():
        if site["type"] != "sample" or is_plate(site) or is_deterministic(site):
            continue
        if is_factor(site):
            continue
        with torch.no_grad():
            shape = site["fn"].log_prob(site["value"]).shape
        plates = {f.dim: f.size for f in site["cond_indep_stack"] if f.vectorized}
        for i, size in enumerate(reversed(shape), start=1):
            if size != 1 and plates.get(-i) != size:
                return False
    return True


def check_observed(trace: dict[str, Any]) -> dict[str, np.ndarray]:
    """Return the observed values; raise if any would be broadcast against their
    distribution, or contain NaN or inf (`probdyn.engines.checks`)."""
    sites = observed_sites(trace)
    out = {name: to_numpy(site["value"]) for name, site in sites.items()}
    check_observed_sites(
        sites,
        out,
        "wrap the sample statement in `with pyro.poutine.mask(mask=torch.as_tensor({mask})):` "
        "or pass pyro.sample(..., obs={y}, obs_mask=torch.as_tensor({mask}))",
    )
    return out


def with_params(model: Callable[..., Any], params: dict[str, Any]) -> Callable[..., Any]:
    """The model with its ``pyro.param`` sites held at ``params``.

    ``poutine.substitute`` replaces the value a ``pyro.param`` call returns; this
    covers plain ``pyro.param`` and ``PyroParam`` attributes of a ``PyroModule``.
    """
    if not params:
        return model
    # as_tensor keeps the dtype the values were fitted in (also after save/load); a
    # read-only array (NumPy's view of a JAX array) is copied, as torch needs a writable one.
    return _SubstituteParams({k: _tensor(v) for k, v in params.items()})(model)


def _tensor(value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray) and not value.flags.writeable:
        value = np.array(value)
    return torch.as_tensor(value)


class _SubstituteParams(Messenger):
    """``poutine.substitute`` for param sites, silent about names that are not param
    sites: a draw of an ensemble holds latent sites and per-member params side by
    side, and Pyro's own substitute warns about the latent names."""

    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.data = data

    def _pyro_param(self, msg: Any) -> None:
        name = pyro.params.user_param_name(msg["name"])  # as poutine.substitute does
        if name in self.data:
            msg["value"] = self.data[name]


class uncondition(Messenger):
    """Turn observed sample sites into latent ones, so that they are re-sampled.

    Unlike ``pyro.poutine.uncondition``, deterministic and factor sites are left alone.
    """

    def _pyro_sample(self, msg: Any) -> None:
        if msg["is_observed"] and not is_deterministic(msg) and not is_factor(msg):
            msg["is_observed"] = False
            msg["value"] = None
            msg["done"] = False


def versions() -> dict[str, str]:
    """Versions of probdyn and of the packages that produced a posterior."""
    return package_versions(("torch", "pyro-ppl", "torchdiffeq", "torchsde", "arviz"))
