"""Open-horizon Feynman–Kac SMC for NumPyro models (``SMC(stream="minibatch")``).

Zhao, Mair, Schön and Sjölund (AISTATS 2024) treat the mini-batches of a data set
as the time steps of a Feynman–Kac flow over the stochastic weights ``phi`` of a
partial Bayesian neural network. One particle cloud, started from the prior, is
kept for the whole run; at every step, on one mini-batch:

1. every particle is jittered by a Gaussian random walk (standard deviation
   ``engine.jitter``, default 0.1, i.e. variance `RW_VARIANCE`, in the
   unconstrained space of each latent site);
2. particles are reweighted by the mini-batch likelihood under the current
   deterministic weights ``psi`` (the model's ``param`` sites);
3. ``psi`` takes one Adam step along the particle-weighted Fisher-identity
   gradient ``(N / B) sum_i w_i grad_psi log p(batch | phi_i, psi)``;
4. the particles are resampled (stratified, every step).

The weighted average in step 3 uses the normalised weights of step 2 rather than
the resampled cloud (the reference code averages over the resampled particles):
both have the same expectation, and resampling only adds noise.

The log mean incremental weight of each step, ``log sum_i w_i p(batch | phi_i)``,
is ``traces["log_marginal_increment"]``; summed over the first epoch it estimates
``log p(y; psi)`` of the state-space model whose weights random-walk between
batches (for small jitter, close to the static model's evidence).

Data streaming rule: see `probdyn.engines.fk_stream` (shared with the Pyro runner).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from blackjax.smc.resampling import stratified
from numpyro import handlers
from numpyro.infer.util import _transforms_from_trace
from tqdm.auto import tqdm

from probdyn.core.engines import SMC
from probdyn.core.posterior import Posterior
from probdyn.engines import fk_stream as streaming
from probdyn.engines.fk_stream import RW_VARIANCE
from probdyn.engines.losses import check_final_loss, learning_rate_fix
from probdyn.numpyro.bridge import as_key, check_observed, is_factor, trace_model
from probdyn.numpyro.engines.timing import CompileTimer
from probdyn.numpyro.postprocess import build_posterior
from probdyn.numpyro.primitives.ode import reset_failed_solves

__all__ = ["RW_VARIANCE", "run_fksmc"]


class _State(NamedTuple):
    particles: dict[str, jax.Array]  # unconstrained, (num_particles, *event)
    psi: dict[str, jax.Array]  # unconstrained param sites
    opt_state: Any


def _leading(value: Any) -> int | None:
    shape = np.shape(value) if isinstance(value, (np.ndarray, jax.Array)) else ()
    return int(shape[0]) if shape else None


def _observed(trace: dict[str, Any]) -> dict[str, streaming.ObservedSite]:
    """The observed and factor sites of a trace, described for `probdyn.engines.fk_stream`."""
    out = {}
    for name, site in trace.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        shape = np.shape(site["value"])
        out[name] = streaming.ObservedSite(
            rows=int(shape[0]) if shape else 0,
            batch_ndim=len(shape) - len(site["fn"].event_shape),
            frames=tuple((f.name, f.dim, f.size) for f in site["cond_indep_stack"]),
            scaled=site.get("scale") is not None,
            is_factor=is_factor(site),
        )
    return out


def _stream(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    trace: dict[str, Any],
    batch_size: int,
) -> streaming.Stream:
    """Find the data axis; check that cutting the arguments cuts the observations."""
    n, plates = streaming.data_size(_observed(trace))
    streaming.check_batch_size(batch_size, n)
    stream = streaming.find_stream(args, kwargs, n, plates, _leading)
    small = streaming.probe_rows(n, batch_size)
    host = stream.data(args, kwargs, np.asarray)
    b_args, b_kwargs = stream.batch(args, kwargs, host, np.arange(small))
    found: dict[str, streaming.ObservedSite] = {}

    def probe() -> int:
        found.update(_observed(trace_model(model, b_args, b_kwargs)))
        return 0

    try:
        # Abstract evaluation: shapes and plates only, nothing is compiled or run.
        jax.eval_shape(probe)
    except Exception as err:
        raise streaming.cut_failed(n, small, err) from err
    streaming.check_cut(stream, small, found)
    return stream


def _ess(log_w: jax.Array) -> jax.Array:
    """ESS of normalised log weights, ``1 / sum w_i^2``."""
    return jnp.exp(-jax.scipy.special.logsumexp(2.0 * log_w))


def _make_epoch(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    stream: streaming.Stream,
    transforms: dict[str, Any],
    weights: dict[str, float],
    engine: SMC,
    optimizer: optax.GradientTransformation,
) -> Callable[..., Any]:
    """One jitted epoch: a ``lax.scan`` of OHSMC steps over the epoch's batches."""
    n, b, p = stream.size, engine.batch_size or 0, engine.num_particles
    scale = float(engine.jitter)

    def loglik(z: dict[str, Any], psi: dict[str, Any], b_args: Any, b_kwargs: Any) -> Any:
        values = {k: transforms[k](v) for k, v in {**z, **psi}.items()}
        run = handlers.substitute(handlers.seed(model, 0), data=values)
        tr = handlers.trace(run).get_trace(*b_args, **b_kwargs)
        total = jnp.zeros(())
        for name, weight in weights.items():
            site = tr[name]
            lp = site["fn"].log_prob(site["value"])
            if site.get("mask") is not None:
                lp = jnp.where(site["mask"], lp, 0.0)
            total = total + weight * jnp.sum(lp)
        return total

    def step(state: _State, inputs: tuple[Any, Any, Any]) -> tuple[_State, tuple[Any, ...]]:
        key, idx, data = inputs
        k_jitter, k_resample = jax.random.split(key)
        names = sorted(state.particles)
        keys = dict(zip(names, jax.random.split(k_jitter, len(names))))
        z = {
            k: v + scale * jax.random.normal(keys[k], v.shape, v.dtype)
            for k, v in state.particles.items()
        }
        b_args, b_kwargs = stream.batch(args, kwargs, data, idx)

        def all_logliks(psi: dict[str, Any]) -> Any:
            return jax.vmap(lambda zi: loglik(zi, psi, b_args, b_kwargs))(z)

        if state.psi:
            ll, pullback = jax.vjp(all_logliks, state.psi)
        else:
            ll = all_logliks(state.psi)
        ll = jnp.where(jnp.isnan(ll), -jnp.inf, ll)
        top = jax.scipy.special.logsumexp(ll)
        ok = jnp.isfinite(top)
        log_w = jnp.where(ok, ll - top, -jnp.log(p))
        w = jnp.exp(log_w)
        loss = -(n / b) * jnp.sum(jnp.where(w > 0, w * ll, 0.0))
        psi, opt_state = state.psi, state.opt_state
        if psi:
            # No gradient from a step whose particles all have zero likelihood.
            (grad,) = pullback(-(n / b) * jnp.where(ok, w, 0.0))
            updates, opt_state = optimizer.update(grad, opt_state, psi)
            psi = optax.apply_updates(psi, updates)
        ancestors = stratified(k_resample, w, p)
        z = {k: v[ancestors] for k, v in z.items()}
        out = (top - jnp.log(p), _ess(log_w), loss)
        return _State(z, psi, opt_state), out

    @jax.jit
    def epoch(state: _State, key: Any, order: Any, data: tuple[Any, ...]) -> Any:
        def body(s: _State, ki: tuple[Any, Any]) -> tuple[_State, Any]:
            return step(s, (ki[0], ki[1], data))

        return jax.lax.scan(body, state, (jax.random.split(key, order.shape[0]), order))

    return epoch


def _initial_particles(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    latent: list[str],
    transforms: dict[str, Any],
    num_particles: int,
    key: jax.Array,
) -> dict[str, jax.Array]:
    """Prior draws, mapped to unconstrained space."""

    def draw(k: jax.Array) -> dict[str, Any]:
        tr = handlers.trace(handlers.seed(model, k)).get_trace(*args, **kwargs)
        return {s: transforms[s].inv(tr[s]["value"]) for s in latent}

    return jax.jit(lambda k: jax.vmap(draw)(jax.random.split(k, num_particles)))(key)


def _check_sites(trace: dict[str, Any]) -> tuple[list[str], list[str]]:
    latent = [n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]]
    params = [n for n, s in trace.items() if s["type"] == "param"]
    if not latent:
        raise streaming.no_latent_error()
    return latent, params


def run_fksmc(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: SMC,
    key: Any,
) -> Posterior:
    """Open-horizon Feynman–Kac SMC (Zhao et al., 2024): stream mini-batches, learn ``param`` s.

    Latent sites are tracked by ``engine.num_particles`` particles; ``param``
    sites (deterministic weights) are learned by Adam at ``engine.learning_rate``.
    The model streams its data as follows: ``N`` is the size of the plate over
    the leading axis of the observed site(s), and every array argument with ``N``
    rows is cut into batches of ``engine.batch_size`` rows (see the module
    docstring). Each of ``engine.num_epochs`` epochs visits the data in a new
    random order. ``engine.kernel``, ``num_mcmc_steps``, ``target_ess`` and the
    tempering options are not used: the move is the random-walk jitter of the
    paper (sd ``engine.jitter``), and the cloud is resampled at every step.

    Returns:
        A `Posterior` with the final particles as draws ``(1, num_particles, *event)``
        (constrained), the learned ``param`` values in ``params``,
        ``sample_stats["log_weight"]`` (uniform: the cloud is resampled every step)
        and per-step ``traces``: ``"log_marginal_increment"``, ``"ess"`` (before
        resampling), ``"loss"`` (``-(N/B)`` times the particle-weighted batch log
        likelihood, whose ``psi``-gradient Adam follows) and ``"batch_index"``
        (the data rows of each batch, ``(num_steps, batch_size)``).

    Raises:
        ValueError: if the model has no latent sites or has latent sites inside the
            data plate, its observations are not in a plate over their leading axis,
            no argument holds the data, cutting the arguments does not cut the
            observations, or ``batch_size`` is missing or exceeds the number of data
            points.

    Example:
        >>> import numpy as np, numpyro, numpyro.distributions as dist, probdyn
        >>> from probdyn.numpyro.engines.fksmc import run_fksmc
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
        ...     with numpyro.plate("data", len(y)):
        ...         numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> engine = probdyn.SMC(num_particles=100, stream="minibatch", batch_size=5,
        ...                      progress_bar=False)
        >>> run_fksmc(model, (np.ones(20),), {}, engine, 0).samples["mu"].shape
        (1, 100)
    """
    batch_size = streaming.check_batch_size(engine.batch_size)
    rng = as_key(key)
    trace = trace_model(model, args, kwargs, rng)
    observed = check_observed(trace)
    latent, param_names = _check_sites(trace)
    info = _transforms_from_trace(trace)
    if info.dynamic_support:
        raise ValueError(
            "SMC(stream='minibatch'): a latent site's support depends on other values; the "
            "random-walk jitter needs fixed supports. Reparametrise the site."
        )
    transforms = info.inv_transforms
    stream = _stream(model, args, kwargs, trace, batch_size)
    streaming.check_global_latents(
        {n: [f.name for f in trace[n]["cond_indep_stack"]] for n in latent}, stream.plates
    )
    weights = streaming.site_weights(_observed(trace), stream, batch_size)
    optimizer = optax.adam(engine.learning_rate)
    epoch = _make_epoch(model, args, kwargs, stream, transforms, weights, engine, optimizer)
    steps = stream.size // batch_size
    data = stream.data(args, kwargs, jnp.asarray)
    reset_failed_solves()
    start = time.perf_counter()
    with CompileTimer() as timer:
        k_init, k_order, k_steps = jax.random.split(rng, 3)
        seed = np.asarray(as_key(k_order)).ravel().tolist()
        orders = streaming.batch_orders(seed, stream.size, engine.num_epochs, batch_size)
        host = tuple(np.asarray(d) for d in data)
        first_args, first_kwargs = stream.batch(args, kwargs, host, np.arange(batch_size))
        particles = _initial_particles(
            model, first_args, first_kwargs, latent, transforms, engine.num_particles, k_init
        )
        psi = {k: transforms[k].inv(jnp.asarray(trace[k]["value"])) for k in param_names}
        # Strong dtypes: a weakly typed initial param (numpyro.param("b", 0.0)) would
        # otherwise change type after the first Adam step and recompile the epoch.
        state = jax.tree.map(
            lambda a: jax.lax.convert_element_type(a, jnp.result_type(a)),
            _State(particles, psi, optimizer.init(psi)),
        )
        outputs = []
        with tqdm(
            total=engine.num_epochs * steps,
            disable=not engine.progress_bar,
            desc="SMC (minibatch)",
        ) as bar:
            for e in range(engine.num_epochs):
                state, out = epoch(state, jax.random.fold_in(k_steps, e), orders[e], data)
                outputs.append(jax.tree.map(np.asarray, out))
                bar.update(steps)
                bar.set_postfix(loss=f"{float(outputs[-1][2][-1]):.4g}")
        state = jax.block_until_ready(state)
    wall = time.perf_counter() - start
    log_inc, ess, loss = (np.concatenate([o[i] for o in outputs]) for i in range(3))
    if param_names:  # learned by Adam: a loss that ends non-finite means they diverged
        check_final_loss(loss, *learning_rate_fix(engine))
    draws = {k: transforms[k](v)[None] for k, v in state.particles.items()}
    fitted = {k: transforms[k](v) for k, v in state.psi.items()}
    return build_posterior(
        model=model,
        args=args,
        kwargs=kwargs,
        engine=engine,
        key=key,
        latent=draws,
        params=fitted,
        observed=observed,
        sample_stats={
            "log_weight": np.full((1, engine.num_particles), -np.log(engine.num_particles))
        },
        traces={
            "log_marginal_increment": log_inc,
            "ess": ess,
            "loss": loss,
            "batch_index": np.asarray(orders).reshape(-1, batch_size),
        },
        wall_time=wall,
        compile_time=timer.seconds,
    )
