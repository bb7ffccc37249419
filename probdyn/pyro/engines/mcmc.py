"""NUTS and HMC runners for Pyro models (Pyro's own kernels, wrapped).

Differences from the NumPyro runner, all forced by Pyro:

* Chains run one after another in this process, whatever ``chain_method`` says:
  ``"sequential"`` and ``"vectorized"`` both mean that here (Pyro's kernels
  have no vectorised chains), and ``"parallel"`` raises, because Pyro's
  multiprocess chains need picklable models and are fragile with torch threads.
  Each chain has its own seed derived from the key, so chain ``i`` does not
  depend on how many chains run.
* Pyro keeps only running means of the per-draw statistics, so they are
  recorded after each transition: ``diverging``, ``acceptance_rate`` (recovered
  exactly from the running mean), ``step_size``, ``lp`` (minus the potential
  energy), ``n_steps`` (potential-energy evaluations) and, for NUTS,
  ``tree_depth`` (as on NumPyro, ``floor(log2(n_steps)) + 1``). ``energy`` is not
  available: Pyro does not keep the momentum of the accepted state.
* ``HMC(num_steps=...)`` keeps the number of leapfrog steps fixed while the step
  size adapts (as NumPyro does); Pyro alone would keep the trajectory length fixed.
* No JIT: ``torch.jit.trace`` would freeze the control flow of adaptive ODE
  solvers, and on small models it saves little. ``compile_time`` is 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pyro import poutine
from pyro.infer import MCMC
from pyro.infer.autoguide import init_to_median, init_to_sample, init_to_value
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.infer.mcmc import HMC as PyroHMC
from pyro.infer.mcmc import NUTS as PyroNUTS
from torch.distributions import biject_to

from probdyn.core.engine_base import dense_mass_arg
from probdyn.core.engines import HMC, NUTS
from probdyn.core.posterior import Posterior
from probdyn.engines.checks import check_has_latent
from probdyn.engines.mcmc import (
    failed_solve_names,
    init_failure_error,
    init_strategy,
    posterior_starts,
    tree_depth,
)
from probdyn.pyro.bridge import (
    as_seed,
    check_observed,
    isolated,
    latent_sites,
    param_sites,
    sub_seed,
    to_torch_args,
    trace_model,
    with_params,
)
from probdyn.pyro.engines.map import map_estimate
from probdyn.pyro.postprocess import build_posterior
from probdyn.pyro.primitives.ode import reset_failed_solves

__all__ = ["run_mcmc"]


class _Counted:
    """A potential-energy function that counts its evaluations (= leapfrog steps)."""

    def __init__(self, fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, z: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        return self.fn(z)


class _Recorded:
    """Mixin over a Pyro HMC/NUTS kernel: record each kept transition's statistics.

    ``sample`` is Pyro's own; this only reads the kernel's state around it.
    """

    # State of the Pyro kernel this is mixed into (read here, never written,
    # except that potential_fn is wrapped to count its evaluations).
    potential_fn: Any
    step_size: float
    _t: int
    _warmup_steps: Any
    _mean_accept_prob: float
    _divergences: list[int]
    _potential_energy_last: Any

    def setup(self, warmup_steps: int, *args: Any, **kwargs: Any) -> None:
        self.transitions: list[dict[str, Any]] = []
        super().setup(warmup_steps, *args, **kwargs)  # type: ignore[misc]
        self.potential_fn = _Counted(self.potential_fn)

    def sample(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        calls, mean_before = self.potential_fn.calls, self._mean_accept_prob
        z = super().sample(params)  # type: ignore[misc]
        n = self._t - self._warmup_steps  # 1-based index of the kept draw
        if n > 0:
            # Pyro's running mean: m_n = m_{n-1} + (a_n - m_{n-1}) / n, solved for a_n.
            accept = mean_before + n * (self._mean_accept_prob - mean_before)
            self.transitions.append(
                {
                    "diverging": bool(self._divergences and self._divergences[-1] == n - 1),
                    "acceptance_rate": min(max(accept, 0.0), 1.0),
                    "step_size": float(self.step_size),
                    "lp": -float(self._potential_energy_last),
                    "n_steps": self.potential_fn.calls - calls,
                }
            )
        return z


class _NUTS(_Recorded, PyroNUTS):
    pass


class _HMC(_Recorded, PyroHMC):
    def __init__(self, model: Callable[..., Any], fixed_num_steps: int | None, **kw: Any) -> None:
        super().__init__(model, **kw)
        self._fixed_num_steps = fixed_num_steps

    @property
    def num_steps(self) -> int:
        if self._fixed_num_steps is not None:
            return self._fixed_num_steps
        return max(1, int(self.trajectory_length / self.step_size))


def _kernel(
    engine: NUTS | HMC, model: Callable[..., Any], dense: bool | list[tuple[str, ...]]
) -> _NUTS | _HMC:
    """Pyro's kernel for ``engine``, recording each draw's statistics (a MAP or
    posterior start is given to ``MCMC`` as ``initial_params``); ``dense`` is
    ``engine.dense_mass`` as `dense_mass_arg` gives it."""
    strategy = init_strategy(engine.init, init_to_sample, init_to_median)
    common = {
        "target_accept_prob": engine.target_accept,
        "full_mass": dense,
        "init_strategy": strategy,
    }
    if isinstance(engine, NUTS):
        return _NUTS(model, max_tree_depth=engine.max_tree_depth, **common)
    length = engine.trajectory_length or math.pi / 2
    adapt = engine.num_warmup > 0  # HMC(num_warmup=0): the step size as given (as NumPyro)
    return _HMC(
        model,
        fixed_num_steps=engine.num_steps,
        step_size=1.0 if engine.step_size is None else engine.step_size,
        trajectory_length=None if engine.num_steps is not None else length,
        adapt_step_size=adapt,
        adapt_mass_matrix=adapt,
        **common,
    )


def _unconstrain(trace: dict[str, Any], values: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Constrained values of latent sites -> the unconstrained space the kernel uses."""
    out = {}
    for name, value in values.items():
        site = trace[name]
        value = torch.as_tensor(np.asarray(value), dtype=site["value"].dtype)
        out[name] = biject_to(site["fn"].support).inv(value).detach()
    return out


def _starts_from_posterior(
    init: Posterior, trace: dict[str, Any], latent: list[str], num_chains: int
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """One start per chain from the posterior's draws, spread over them, in the
    kernel's unconstrained space (refused for an Ensemble fit's per-draw params)."""
    values, params = posterior_starts(init, latent, num_chains, list(param_sites(trace)))
    starts = [_unconstrain(trace, row) for row in values]
    return starts, {k: torch.as_tensor(v) for k, v in params.items()}


def _starts_from_map(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    trace: dict[str, Any],
    latent: list[str],
    num_chains: int,
    seed: int,
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Every chain starts at the MAP estimate, jittered by 1e-2 in unconstrained
    space so that chains are distinct (and R-hat means something)."""
    values, params = map_estimate(model, args, kwargs, sub_seed(seed, 2))
    centre = _unconstrain(trace, {s: values[s] for s in latent})
    gen = torch.Generator().manual_seed(sub_seed(seed, 3))
    starts = [
        {
            s: v + 1e-2 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
            for s, v in centre.items()
        }
        for _ in range(num_chains)
    ]
    return starts, params


def _failed_at_init(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: NUTS | HMC,
    start: dict[str, torch.Tensor] | None,
) -> list[str]:
    """The ODE/SDE primitives whose solves fail at a chain's initial point.

    Run once the kernel has found no valid start, to say why: the model is traced
    at a start of the kind Pyro tried (the init strategy's, or the given MAP or
    posterior start, which is unconstrained) and its failed-solve factor sites
    are read.
    """
    try:
        if start is None:
            strategy = init_strategy(engine.init, init_to_sample, init_to_median)
        else:
            prior: Any = poutine.trace(model).get_trace(*args, **kwargs).nodes
            values = {s: biject_to(prior[s]["fn"].support)(v) for s, v in start.items()}
            strategy = init_to_value(values=values)
        with torch.no_grad():
            tried: Any = poutine.trace(InitMessenger(strategy)(model)).get_trace(*args, **kwargs)
    except Exception:  # the model fails outright: Pyro's own error says more
        return []
    factors = {
        n: site["fn"].log_prob(site["value"])
        for n, site in tried.nodes.items()
        if site["type"] == "sample"
    }
    return failed_solve_names({n: v.detach().cpu().numpy() for n, v in factors.items()})


def _run_chain(
    engine: NUTS | HMC,
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    seed: int,
    start: dict[str, torch.Tensor] | None,
    dense: bool | list[tuple[str, ...]],
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    torch.manual_seed(seed)
    kernel = _kernel(engine, model, dense)
    mcmc = MCMC(
        kernel,
        num_samples=engine.num_samples,
        warmup_steps=engine.num_warmup,
        initial_params=start,
        num_chains=1,
        disable_progbar=not engine.progress_bar,
    )
    try:
        mcmc.run(*args, **kwargs)
    except ValueError as err:
        if "cannot find valid initial params" in str(err):
            failed = _failed_at_init(model, args, kwargs, engine, start)
            if failed:
                raise init_failure_error(type(engine).__name__, failed) from err
        raise
    samples = mcmc.get_samples(group_by_chain=True)
    return {k: v[0] for k, v in samples.items()}, kernel.transitions


def _sample_stats(per_chain: list[list[dict[str, Any]]], nuts: bool) -> dict[str, np.ndarray]:
    stats = {
        name: np.asarray([[row[name] for row in chain] for chain in per_chain])
        for name in per_chain[0][0]
    }
    if nuts:
        stats["tree_depth"] = tree_depth(stats["n_steps"])
    return stats


def run_mcmc(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: NUTS | HMC,
    key: int | torch.Generator,
) -> Posterior:
    """Run Pyro's NUTS or HMC and return a `Posterior` (chains x draws).

    See the module docstring for how this differs from the NumPyro runner.

    Raises:
        ValueError: for ``chain_method="parallel"``, a model without latent sites,
            or NaN/inf in observed data.
        RuntimeError: no valid initial point because every solve of an ODE/SDE
            failed there (the message names it; `init_failure_error`).
    """
    name = type(engine).__name__
    if engine.chain_method == "parallel":
        raise ValueError(
            f"{name}(chain_method='parallel') is not available on the Pyro backend: Pyro runs "
            "parallel chains in worker processes, which needs picklable models and is fragile "
            "with torch's threads. Use chain_method='sequential' (chains run one after "
            "another in this process; 'vectorized' does the same on Pyro)."
        )
    seed = as_seed(key)
    targs, tkwargs = to_torch_args(args, kwargs)
    with isolated(seed):
        trace = trace_model(model, targs, tkwargs)
        observed = check_observed(trace)
        latent = latent_sites(trace)
        params = param_sites(trace)
        check_has_latent(latent)
        dense = dense_mass_arg(engine, latent)
        starts: list[dict[str, torch.Tensor]] | None = None
        run_model = model
        if not isinstance(engine.init, str) or engine.init == "map":
            if isinstance(engine.init, str):
                starts, fixed = _starts_from_map(
                    model, targs, tkwargs, trace, latent, engine.num_chains, seed
                )
            else:
                starts, fixed = _starts_from_posterior(
                    engine.init, trace, latent, engine.num_chains
                )
            run_model = with_params(model, fixed)
            params = {**params, **fixed}
        reset_failed_solves()
        begin = time.perf_counter()
        chains = [
            _run_chain(
                engine,
                run_model,
                targs,
                tkwargs,
                sub_seed(seed, 0, c),
                None if starts is None else starts[c],
                dense,
            )
            for c in range(engine.num_chains)
        ]
        wall = time.perf_counter() - begin
    return build_posterior(
        model=model,
        args=args,
        kwargs=kwargs,
        engine=engine,
        seed=seed,
        latent={s: torch.stack([draws[s] for draws, _ in chains]) for s in latent},
        params=params,
        observed=observed,
        sample_stats=_sample_stats([stats for _, stats in chains], isinstance(engine, NUTS)),
        wall_time=wall,
    )
