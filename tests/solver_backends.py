"""The two backends as the NeuralODE / NeuralSDE tests see them.

A test that asserts the same thing on both backends takes a ``backend`` fixture
(``params=BACKENDS``, set up by `backend_context`) and writes its model once against a
`Backend`: its array module ``xp`` (``jax.numpy`` or ``torch``), its ``dist`` and
``sample``, its primitives, and the few operations whose spelling differs (tracing,
conditioning, the log density, exact comparison). The Pyro backend is skipped
cleanly where torch, pyro, torchdiffeq or torchsde is missing, and runs in float64
with one intra-op thread, as the other Pyro tests do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

BACKENDS = ("numpyro", "pyro")


def adaptive_bound(tol: float, exact: Any) -> float:
    """Largest allowed |error| of an adaptive solve at ``rtol = atol = tol``.

    With the local error held at ``tol`` per step, the global error of a short,
    non-expanding problem is at most the sum of the local errors; the solves of
    these tests take fewer than 100 steps, so a solution is within
    ``100 * tol * (1 + |z|)`` of the truth.
    """
    return 100 * tol * (1 + float(np.max(np.abs(np.asarray(exact)))))


class Backend:
    """What a test needs of one backend (the NumPyro and Pyro subclasses fill it in)."""

    name: str
    xp: Any  # the array module: jax.numpy or torch
    dist: Any  # numpyro.distributions or pyro.distributions
    sample: Callable[..., Any]  # numpyro.sample or pyro.sample
    NeuralODE: Any
    NeuralSDE: Any
    failed_solves: Callable[[], int]
    reset_failed_solves: Callable[[], None]

    def __repr__(self) -> str:
        return self.name

    def asarray(self, x: Any) -> Any:
        """``x`` as the backend's array (float64 for floats)."""
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        """An array of the backend as a NumPy array."""
        raise NotImplementedError

    def key(self, seed: int) -> Any:
        """A `NeuralSDE` key other than an int seed for ``seed``."""
        raise NotImplementedError

    def sample_sites(self, model: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
        """One seeded run of ``model``: its sample sites (name -> site dict with
        ``"value"`` and ``"fn"``) and what it returned."""
        raise NotImplementedError

    def seeded(self, model: Callable[[], Any], seed: int) -> Any:
        """What ``model()`` returns when run with the PPL's seed ``seed``."""
        raise NotImplementedError

    def conditioned(self, model: Callable[[], Any], data: dict[str, Any]) -> np.ndarray:
        """What ``model()`` returns with the sites in ``data`` given (no gradients)."""
        raise NotImplementedError

    def log_density(self, model: Callable[..., Any], args: tuple, values: dict) -> float:
        """The joint log density of ``model(*args)`` at the latent ``values``."""
        raise NotImplementedError

    def sync(self) -> None:
        """Wait for the solves' host callbacks (the failure counter is then current)."""

    def assert_equal(self, actual: Any, expected: Any) -> None:
        """Exact equality, in the backend's own assertion."""
        raise NotImplementedError

    def allclose(self, a: Any, b: Any) -> bool:
        """The backend's ``allclose`` with its default tolerances."""
        raise NotImplementedError

    def solve_with(
        self,
        sde: Any,
        z0: Any,
        times: Any,
        noise: Any,
        levy: Any = None,
        args: Any = None,
        t0: Any = None,
    ) -> np.ndarray:
        """Solve ``sde`` with the given standard-normal increments (the latent sites'
        values), as a NumPy array."""
        data = {f"{sde.name}.noise": self.asarray(np.array(noise))}
        if levy is not None:
            data[f"{sde.name}.levy"] = self.asarray(np.array(levy))

        def model() -> Any:
            return sde(self.asarray(np.array(z0)), self.asarray(np.array(times)), args, t0=t0)

        return self.conditioned(model, data)


class NumPyroBackend(Backend):
    """NumPyro: ``jax.numpy`` arrays, ``numpyro.handlers``."""

    name = "numpyro"

    def __init__(self) -> None:
        import jax
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist
        from numpyro import handlers
        from numpyro.infer.util import log_density

        from probdyn.numpyro import NeuralODE, NeuralSDE
        from probdyn.numpyro.primitives.ode import failed_solves, reset_failed_solves

        self._jax, self._handlers, self._log_density = jax, handlers, log_density
        self.xp, self.dist, self.sample = jnp, dist, numpyro.sample
        self.NeuralODE, self.NeuralSDE = NeuralODE, NeuralSDE
        self.failed_solves, self.reset_failed_solves = failed_solves, reset_failed_solves

    def asarray(self, x: Any) -> Any:
        return self.xp.asarray(x)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def key(self, seed: int) -> Any:
        return self._jax.random.key(seed)

    def sample_sites(self, model: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
        import numpyro

        def returning() -> Any:
            return numpyro.deterministic("_return", model())

        h = self._handlers
        tr = h.trace(h.seed(returning, 0)).get_trace()
        sites = {n: s for n, s in tr.items() if s["type"] == "sample"}
        return sites, tr["_return"]["value"]

    def seeded(self, model: Callable[[], Any], seed: int) -> Any:
        return self._handlers.seed(model, seed)()

    def conditioned(self, model: Callable[[], Any], data: dict[str, Any]) -> np.ndarray:
        h = self._handlers
        return np.asarray(h.substitute(h.seed(model, 0), data=data)())

    def log_density(self, model: Callable[..., Any], args: tuple, values: dict) -> float:
        data = {k: self.asarray(v) for k, v in values.items()}
        lp, _ = self._log_density(model, args, {}, data)
        return float(lp)

    def sync(self) -> None:
        self._jax.effects_barrier()

    def assert_equal(self, actual: Any, expected: Any) -> None:
        np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))

    def allclose(self, a: Any, b: Any) -> bool:
        return bool(np.allclose(np.asarray(a), np.asarray(b)))


class PyroBackend(Backend):
    """Pyro: torch tensors (float64), ``pyro.poutine``."""

    name = "pyro"

    def __init__(self) -> None:
        import pyro
        import pyro.distributions as dist
        import torch
        from pyro import poutine

        from probdyn.pyro import NeuralODE, NeuralSDE
        from probdyn.pyro.primitives.ode import failed_solves, reset_failed_solves

        self._poutine = poutine
        self.xp, self.dist, self.sample = torch, dist, pyro.sample
        self.NeuralODE, self.NeuralSDE = NeuralODE, NeuralSDE
        self.failed_solves, self.reset_failed_solves = failed_solves, reset_failed_solves

    def asarray(self, x: Any) -> Any:
        return self.xp.as_tensor(x)

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.detach().cpu().numpy()

    def key(self, seed: int) -> Any:
        return self.xp.Generator().manual_seed(seed)

    def sample_sites(self, model: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
        p = self._poutine
        nodes = p.trace(p.seed(model, rng_seed=0)).get_trace().nodes
        sites = {n: s for n, s in nodes.items() if s["type"] == "sample"}
        return sites, nodes["_RETURN"]["value"]

    def seeded(self, model: Callable[[], Any], seed: int) -> Any:
        return self._poutine.seed(model, rng_seed=seed)()

    def conditioned(self, model: Callable[[], Any], data: dict[str, Any]) -> np.ndarray:
        with self.xp.no_grad():
            return self._poutine.condition(model, data=data)().numpy()

    def log_density(self, model: Callable[..., Any], args: tuple, values: dict) -> float:
        data = {k: self.asarray(v) for k, v in values.items()}
        tr = self._poutine.trace(self._poutine.condition(model, data=data)).get_trace(*args)
        return float(tr.log_prob_sum())

    def assert_equal(self, actual: Any, expected: Any) -> None:
        self.xp.testing.assert_close(actual, expected, rtol=0, atol=0)

    def allclose(self, a: Any, b: Any) -> bool:
        return bool(self.xp.allclose(a, b))


@contextlib.contextmanager
def backend_context(name: str) -> Iterator[Backend]:
    """The backend ``name``, set up for some tests and put back afterwards.

    For Pyro: skipped where its packages are missing; torch in float64 with one
    intra-op thread (the test models are tiny; on a shared machine a second OpenMP
    thread makes them far slower) and a clean param store.

    Use it in a fixture::

        @pytest.fixture(scope="module", params=BACKENDS)
        def backend(request):
            with backend_context(request.param) as b:
                yield b
    """
    if name == "numpyro":
        pytest.importorskip("numpyro")
        pytest.importorskip("diffrax")
        yield NumPyroBackend()
        return
    torch = pytest.importorskip("torch")
    pyro = pytest.importorskip("pyro")
    pytest.importorskip("torchdiffeq")
    pytest.importorskip("torchsde")
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    pyro.clear_param_store()
    try:
        yield PyroBackend()
    finally:
        pyro.clear_param_store()
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
