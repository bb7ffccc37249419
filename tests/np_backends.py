"""Adapters that let one neural-process test run on both backends (tests/test_np.py,
tests/test_np_training.py): arrays, seeded traces with params held and ``z`` conditioned, log
densities, the backend's global state, and a short fit through probdyn.fit.

Each adapter's ``mod`` is the backend's public namespace (``probdyn.numpyro`` or
``probdyn.pyro``), so a test names a model as ``getattr(backend.mod, "latent_np_model")``. Pyro
is imported only when its adapter is built: `backend_for` skips the test without torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer.util import log_density

import probdyn
import probdyn.numpyro
from probdyn.data import gp_task_stream

FIELDS = ("x_context", "y_context", "mask_context", "x_target", "y_target", "mask_target")
BACKENDS = ["numpyro", "pyro"]
STREAM = gp_task_stream(4)


class NumPyroBackend:
    """The NumPyro side: JAX arrays, `handlers` for seeds, substitution and conditioning."""

    name = "numpyro"
    mod: ModuleType = probdyn.numpyro
    fit_options: ClassVar[dict[str, Any]] = {}  # probdyn.fit tells the backend from the model

    def asarray(self, x: Any) -> Any:
        """``x`` as a JAX array (None stays None)."""
        return None if x is None else jnp.asarray(x)

    def trace(self, fn: Callable, data: dict, params=None, z=None, **options) -> dict:
        """One seeded run of ``fn`` with ``params`` held and ``z`` conditioned: its sites."""
        if z is not None:
            fn = handlers.condition(fn, {"z": jnp.asarray(z)})
        if params is not None:
            fn = handlers.substitute(fn, {k: jnp.asarray(v) for k, v in params.items()})
        return handlers.trace(handlers.seed(fn, 0)).get_trace(**data, **options)

    def log_density(self, model: Callable, values: dict, **options) -> Callable[[dict], float]:
        """``data -> log p(data)`` with the params (and latent sites) held at ``values``."""
        logp = jax.jit(lambda k: log_density(model, (), {**k, **options}, values)[0])
        return lambda data: float(logp(data))

    def seeded(self) -> contextlib.AbstractContextManager:
        """A context in which primitives can be called outside a model run."""
        return handlers.seed(rng_seed=0)

    @contextlib.contextmanager
    def leaves_global_state_alone(self) -> Iterator[None]:
        """Nothing to check: JAX has no global RNG or param store."""
        yield


class PyroBackend:
    """The Pyro side: torch tensors, `poutine` and `with_params`, an isolated param store."""

    name = "pyro"
    fit_options: ClassVar[dict[str, Any]] = {"backend": "pyro"}

    def __init__(self) -> None:
        import pyro
        import torch
        from pyro import poutine

        import probdyn.pyro
        from probdyn.pyro.bridge import with_params

        self.mod, self.torch, self.pyro, self.poutine = probdyn.pyro, torch, pyro, poutine
        self.with_params = with_params

    def asarray(self, x: Any) -> Any:
        """``x`` as a torch tensor (None stays None)."""
        return None if x is None else self.torch.as_tensor(x)

    def trace(self, fn: Callable, data: dict, params=None, z=None, **options) -> dict:
        """One seeded run of ``fn`` with ``params`` held and ``z`` conditioned: its sites."""
        poutine, torch = self.poutine, self.torch
        if z is not None:
            fn = poutine.condition(fn, data={"z": torch.as_tensor(z)})
        fn = self.with_params(fn, params or {})
        with poutine.seed(rng_seed=0), self.pyro.get_param_store().scope(), torch.no_grad():
            return poutine.trace(fn).get_trace(**data, **options).nodes

    def log_density(self, model: Callable, values: dict, **options) -> Callable[[dict], float]:
        """``data -> log p(data)`` with the params (and latent sites) held at ``values``."""
        params = {k: v for k, v in values.items() if k != "z"}
        if "z" in values:
            model = self.poutine.condition(model, data={"z": self.torch.as_tensor(values["z"])})
        fn = self.with_params(model, params)
        return lambda data: float(
            self.poutine.trace(fn).get_trace(**data, **options).log_prob_sum()
        )

    def seeded(self) -> contextlib.AbstractContextManager:
        """A context in which primitives can be called outside a model run (own param store)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.poutine.seed(rng_seed=0))
        stack.enter_context(self.pyro.get_param_store().scope())
        return stack

    @contextlib.contextmanager
    def leaves_global_state_alone(self) -> Iterator[None]:
        """Neither the global torch RNG nor the user's param store is touched."""
        self.pyro.clear_param_store()
        self.torch.manual_seed(123)
        before = self.torch.get_rng_state()
        yield
        assert self.torch.equal(self.torch.get_rng_state(), before)
        assert len(self.pyro.get_param_store()) == 0


Backend = NumPyroBackend | PyroBackend


def backend_for(request: pytest.FixtureRequest) -> Backend:
    """The adapter of ``request.param`` (one of `BACKENDS`): the ``backend`` fixture's value.

    Pyro's needs torch (else the test is skipped) and turns on ``torch_float64_one_thread``.
    """
    if request.param == "pyro":
        pytest.importorskip("torch")
        pytest.importorskip("pyro")
        request.getfixturevalue("torch_float64_one_thread")
        return PyroBackend()
    return NumPyroBackend()


def to_numpy(value: Any) -> np.ndarray:
    """A JAX array or a (detached) torch tensor as a NumPy array."""
    return np.asarray(value.detach() if hasattr(value, "detach") else value)


def sites(tr: dict) -> dict:
    """The param, sample and deterministic sites of a trace, their values as NumPy arrays."""
    kinds = ("param", "sample", "deterministic")
    return {n: {**s, "value": to_numpy(s["value"])} for n, s in tr.items() if s["type"] in kinds}


def params_of(tr: dict) -> dict:
    """The param sites of a trace: name -> NumPy array."""
    return {n: s["value"] for n, s in sites(tr).items() if s["type"] == "param"}


def as_data(backend: Backend, arrays: dict) -> dict:
    """The task fields among ``arrays`` as the backend's arrays (None stays None)."""
    return {f: backend.asarray(arrays[f]) for f in FIELDS if f in arrays}


def task_data(backend: Backend, tasks) -> dict:
    """Every field of a `probdyn.data.GPTaskBatch` as the backend's arrays."""
    return as_data(backend, {f: getattr(tasks, f) for f in FIELDS})


def z_dist(tr: dict) -> tuple[np.ndarray, np.ndarray]:
    """The location and scale of the Gaussian of the trace's site ``"z"``."""
    base = tr["z"]["fn"].base_dist
    return to_numpy(base.loc), to_numpy(base.scale)


def fit(backend: Backend, model: str, num_steps: int = 3, key=0, stream=STREAM, **options):
    """A short `probdyn.VI` fit of the backend's ``model`` (by name) on ``stream``; the latent
    NP with its amortised guide, every other model with VI's default guide."""
    guide = {"latent_np_model": "latent_np_guide"}.get(model)
    engine = probdyn.VI(
        guide=getattr(backend.mod, guide) if guide else "normal",
        num_steps=num_steps,
        progress_bar=False,
    )
    return probdyn.fit(getattr(backend.mod, model), stream, engine=engine, key=key, **options)
