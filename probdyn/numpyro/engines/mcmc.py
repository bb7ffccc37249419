"""NUTS and HMC runners for NumPyro models (NumPyro's own kernels, wrapped)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from numpyro import handlers
from numpyro.infer import HMC as NumPyroHMC
from numpyro.infer import MCMC, init_to_median, init_to_sample
from numpyro.infer import NUTS as NumPyroNUTS
from numpyro.infer.util import (
    constrain_fn,
)

from probdyn.core.engine_base import dense_mass_arg
from probdyn.core.engines import HMC, NUTS
from probdyn.core.posterior import Posterior
from probdyn.engines.checks import check_has_latent
from probdyn.engines.mcmc import (
    failed_solve_names,
    init_failure_error,
    init_strategy,
    tree_depth,
)
from probdyn.numpyro.bridge import as_key, check_observed, site_trace
from probdyn.numpyro.engines.starts import chain_starts
from probdyn.numpyro.engines.timing import CompileTimer
from probdyn.numpyro.postprocess import build_posterior
from probdyn.numpyro.primitives.ode import reset_failed_solves

__all__ = ["run_mcmc"]

_EXTRA_FIELDS = ("accept_prob", "num_steps", "energy", "potential_energy", "adapt_state.step_size")


def _kernel(
    engine: NUTS | HMC, model: Callable[..., Any], dense: bool | list[tuple[str, ...]]
) -> Any:
    """NumPyro's kernel for ``engine`` (a MAP or posterior start is given to ``run``);
    ``dense`` is ``engine.dense_mass`` as `dense_mass_arg` gives it."""
    strategy = init_strategy(engine.init, init_to_sample, init_to_median)
    if isinstance(engine, NUTS):
        return NumPyroNUTS(
            model,
            target_accept_prob=engine.target_accept,
            max_tree_depth=engine.max_tree_depth,
            dense_mass=dense,
            init_strategy=strategy,
        )
    adapt = engine.num_warmup > 0  # HMC(num_warmup=0): the step size as given
    return NumPyroHMC(
        model,
        step_size=1.0 if engine.step_size is None else engine.step_size,
        num_steps=engine.num_steps,
        trajectory_length=(
            None if engine.num_steps is not None else engine.trajectory_length or np.pi / 2
        ),
        target_accept_prob=engine.target_accept,
        dense_mass=dense,
        adapt_step_size=adapt,
        adapt_mass_matrix=adapt,
        init_strategy=strategy,
    )


def _failed_at_init(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    rng: jax.Array,
    engine: NUTS | HMC,
    init_params: Any,
) -> list[str]:
    """The ODE/SDE primitives whose solves fail at the (first chain's) initial point.

    Run once the kernel has found no valid start, to say why: the model is traced
    at the start NumPyro tried (the init strategy's, or the given MAP/posterior
    start) and its failed-solve factor sites are read.
    """
    seeded = handlers.seed(model, rng)
    if init_params is None:
        strategy = init_strategy(engine.init, init_to_sample, init_to_median)
        seeded = handlers.substitute(seeded, substitute_fn=strategy)
    else:
        first = init_params if engine.num_chains == 1 else jax.tree.map(lambda x: x[0], init_params)
        seeded = handlers.substitute(seeded, data=constrain_fn(model, args, kwargs, first))
    try:
        tr = handlers.trace(seeded).get_trace(*args, **kwargs)
    except Exception:  # the model fails outright: NumPyro's own error says more
        return []
    factors = {n: s["fn"].log_prob(s["value"]) for n, s in tr.items() if s["type"] == "sample"}
    return failed_solve_names(factors)


def _constrain_only(
    kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Callable[..., Any]:
    """Map unconstrained draws to constrained ones without re-running the model.

    NumPyro re-runs the model for every draw when it has deterministic sites; we
    compute those (with the log likelihood and predictive) in one compiled pass
    afterwards, so during sampling a change of variables is enough. The kernel's
    transforms are known once it has traced the model (in ``MCMC.run``, before the
    loop that calls this); models whose supports depend on other sites get the
    kernel's replaying constrain function instead.
    """

    def constrain(z: Any) -> Any:
        return kernel.get_constrain_fn(args, kwargs)(z)

    return constrain


def _sample_stats(extra: dict[str, Any], nuts: bool) -> dict[str, np.ndarray]:
    n_steps = np.asarray(extra["num_steps"])
    stats = {
        "diverging": np.asarray(extra["diverging"]),
        "acceptance_rate": np.asarray(extra["accept_prob"]),
        "n_steps": n_steps,
        "energy": np.asarray(extra["energy"]),
        "lp": -np.asarray(extra["potential_energy"]),
        "step_size": np.asarray(extra["adapt_state.step_size"]),
    }
    if nuts:
        stats["tree_depth"] = tree_depth(n_steps)
    return stats


def _forget_sampling_loops() -> None:
    """Drop NumPyro's compiled sampling loops from JAX's cache.

    Without a progress bar, NumPyro runs the chain through ``jit(_fori_collect_loop)``
    with the loop body as a static argument, and that body is a new ``jit`` wrapper on
    every run: the cache never hits again, yet each entry keeps its executable and the
    sampler's closures alive. Measured on a small BNN: about 25 MB more per fit, without
    bound (a 50-fit SBC run), against about 3 MB with this; the fits take as long.
    """
    try:
        from numpyro.util import _fori_collect_loop

        loop: Any = jax.jit(_fori_collect_loop, static_argnums=(0, 1), donate_argnums=3)
        loop.clear_cache()
    except (ImportError, AttributeError):  # NumPyro or JAX internals changed: only a leak
        pass


def run_mcmc(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: NUTS | HMC,
    key: int | jax.Array,
) -> Posterior:
    """Run NumPyro's NUTS or HMC and return a `Posterior` (chains x draws).

    Raises:
        RuntimeError: no valid initial point because every solve of an ODE/SDE
            failed there (the message names it; `init_failure_error`), or
            ``chain_method="parallel"`` with a diffrax solve.
    """
    rng = as_key(key)
    trace = site_trace(model, args, kwargs, rng)
    observed = check_observed(trace)
    latent = [n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]]
    params = {n: s["value"] for n, s in trace.items() if s["type"] == "param"}
    check_has_latent(latent)
    run_model, init_params, fixed = chain_starts(
        engine.init,
        model,
        args,
        kwargs,
        latent,
        list(params),
        engine.num_chains,
        jax.random.fold_in(rng, 2),
    )
    params = {**params, **fixed}
    kernel = _kernel(engine, run_model, dense_mass_arg(engine, latent))
    mcmc = MCMC(
        kernel,
        postprocess_fn=_constrain_only(kernel, args, kwargs),
        num_warmup=engine.num_warmup,
        num_samples=engine.num_samples,
        num_chains=engine.num_chains,
        chain_method=engine.chain_method,
        progress_bar=engine.progress_bar,
    )
    reset_failed_solves()
    start = time.perf_counter()
    with CompileTimer() as timer:
        try:
            mcmc.run(rng, *args, extra_fields=_EXTRA_FIELDS, init_params=init_params, **kwargs)
        except ValueError as err:
            if engine.chain_method == "parallel" and "Closure-converted" in str(err):
                raise RuntimeError(
                    "NUTS(chain_method='parallel') failed: NumPyro's parallel chains use pmap, "
                    "under which diffrax's checkpointed solver loop cannot be differentiated "
                    "(JAX/equinox limitation). Use chain_method='vectorized' or 'sequential'."
                ) from err
            raise
        except RuntimeError as err:
            if "Cannot find valid initial parameters" in str(err):
                failed = _failed_at_init(run_model, args, kwargs, rng, engine, init_params)
                if failed:
                    raise init_failure_error(type(engine).__name__, failed) from err
            raise
        samples = jax.block_until_ready(mcmc.get_samples(group_by_chain=True))
    wall = time.perf_counter() - start
    extra = mcmc.get_extra_fields(group_by_chain=True)
    _forget_sampling_loops()
    return build_posterior(
        model=model,
        args=args,
        kwargs=kwargs,
        engine=engine,
        key=key,
        latent={k: samples[k] for k in latent},
        params=params,
        observed=observed,
        sample_stats=_sample_stats(extra, isinstance(engine, NUTS)),
        wall_time=wall,
        compile_time=timer.seconds,
    )
