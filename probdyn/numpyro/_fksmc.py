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

Data streaming rule. ``N`` is the size of the ``numpyro.plate`` that holds the
leading axis of every observed site; every array argument of the model
(positional or keyword) whose leading dimension is ``N`` is a per-data-point
array, and each step calls the model with those arrays cut to the ``batch_size``
rows of the batch. Each epoch visits the data in a fresh random order in
``N // batch_size`` batches (the remainder, different each epoch, is skipped).
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

from probdyn._engines import SMC
from probdyn._posterior import Posterior
from probdyn.numpyro._build import build_posterior
from probdyn.numpyro._ode import reset_failed_solves
from probdyn.numpyro._timing import CompileTimer
from probdyn.numpyro._util import as_key, check_observed, is_factor, trace_model

__all__ = ["RW_VARIANCE", "run_fksmc"]

RW_VARIANCE = 1e-2
"""Variance of the default random-walk jitter per step, ``SMC().jitter ** 2``
(Zhao et al. use 1e-2)."""


class _Stream(NamedTuple):
    """Where the per-data-point arrays sit among the model's arguments."""

    size: int  # N, the number of data points
    plates: frozenset[str]  # names of the plates over the data axis
    arg_pos: tuple[int, ...]  # positional arguments cut into batches
    kwarg_names: tuple[str, ...]  # keyword arguments cut into batches

    def data(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[jax.Array, ...]:
        return tuple(jnp.asarray(args[i]) for i in self.arg_pos) + tuple(
            jnp.asarray(kwargs[k]) for k in self.kwarg_names
        )

    def batch(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], data: tuple[Any, ...], idx: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The model's arguments with every per-data-point array cut to rows ``idx``."""
        cut = [d[idx] for d in data]
        new_args = list(args)
        for i, value in zip(self.arg_pos, cut):
            new_args[i] = value
        new_kwargs = dict(kwargs)
        for k, value in zip(self.kwarg_names, cut[len(self.arg_pos) :]):
            new_kwargs[k] = value
        return tuple(new_args), new_kwargs


class _State(NamedTuple):
    particles: dict[str, jax.Array]  # unconstrained, (num_particles, *event)
    psi: dict[str, jax.Array]  # unconstrained param sites
    opt_state: Any


def _leading(value: Any) -> int | None:
    shape = np.shape(value) if isinstance(value, (np.ndarray, jax.Array)) else ()
    return int(shape[0]) if shape else None


def _data_size(trace: dict[str, Any]) -> tuple[int, frozenset[str]]:
    """N and the plate(s) over the leading axis of the observed sites."""
    sizes: dict[str, int] = {}
    plates = set()
    for name, site in trace.items():
        if site["type"] != "sample" or not site["is_observed"] or is_factor(site):
            continue
        shape = np.shape(site["value"])
        batch_ndim = len(shape) - len(site["fn"].event_shape)
        frames = [f for f in site["cond_indep_stack"] if batch_ndim and f.dim == -batch_ndim]
        if not frames:
            raise ValueError(
                f"SMC(stream='minibatch'): observed site {name!r} (shape {shape}) is not inside "
                "a numpyro.plate over its leading axis, so probdyn cannot tell its data points "
                "apart. Observe it inside `with numpyro.plate('data', len(y)):` with one "
                "data point per row."
            )
        frame = frames[0]
        if frame.size != shape[0] or site.get("scale") is not None:
            raise ValueError(
                f"SMC(stream='minibatch'): observed site {name!r} is subsampled or scaled "
                f"(plate {frame.name!r} of size {frame.size}, value with {shape[0]} rows). "
                "Remove subsample_size / handlers.scale: probdyn cuts the data into batches "
                "itself (and scales the gradient for the params by N / batch_size)."
            )
        sizes[name] = int(shape[0])
        plates.add(frame.name)
    if not sizes:
        raise ValueError("SMC(stream='minibatch'): the model has no observed sites to stream.")
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"SMC(stream='minibatch'): the observed sites have different numbers of data "
            f"points {sizes}; every observed site must have one row per data point."
        )
    return next(iter(sizes.values())), frozenset(plates)


def _stream(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    trace: dict[str, Any],
    batch_size: int,
) -> _Stream:
    """Find the data axis; check that cutting the arguments cuts the observations."""
    n, plates = _data_size(trace)
    if batch_size > n:
        raise ValueError(
            f"SMC(batch_size={batch_size}): larger than the {n} data points of the observed "
            f"site(s); give batch_size <= {n}."
        )
    stream = _Stream(
        size=n,
        plates=plates,
        arg_pos=tuple(i for i, a in enumerate(args) if _leading(a) == n),
        kwarg_names=tuple(k for k, a in kwargs.items() if _leading(a) == n),
    )
    if not stream.arg_pos and not stream.kwarg_names:
        raise ValueError(
            f"SMC(stream='minibatch'): no argument of the model is an array with {n} rows (the "
            "size of the observed sites' plate). Pass the observations (and inputs) to the "
            "model as arguments, one row per data point, so that probdyn can cut them into "
            "batches."
        )
    small = min(batch_size, n - 1) if n > 1 else 1
    host = tuple(np.asarray(d) for d in stream.data(args, kwargs))
    b_args, b_kwargs = stream.batch(args, kwargs, host, np.arange(small))
    found: dict[str, tuple[int, list[tuple[str, int]]]] = {}

    def probe() -> int:
        tr = trace_model(model, b_args, b_kwargs)
        for name, site in tr.items():
            if site["type"] == "sample" and site["is_observed"] and not is_factor(site):
                frames = [(f.name, f.size) for f in site["cond_indep_stack"]]
                found[name] = (np.shape(site["value"])[0], frames)
        return 0

    try:
        # Abstract evaluation: shapes and plates only, nothing is compiled or run.
        jax.eval_shape(probe)
    except Exception as err:
        raise ValueError(
            f"SMC(stream='minibatch'): the model failed when its {n}-row array arguments were "
            f"cut to {small} rows ({type(err).__name__}: {err}). Size the data plate from the "
            "arguments (numpyro.plate('data', len(x))) rather than a fixed number."
        ) from err
    for name, (rows, frames) in found.items():
        if rows != small:
            raise ValueError(
                f"SMC(stream='minibatch'): observed site {name!r} keeps {rows} rows when the "
                f"model's {n}-row array arguments are cut to {small}. Pass its observations "
                "as an argument (obs=y, with y an argument of the model)."
            )
        fixed = [plate for plate, size in frames if plate in plates and size != small]
        if fixed:
            raise ValueError(
                f"SMC(stream='minibatch'): plate {fixed[0]!r} keeps size {n} when the model's "
                f"{n}-row array arguments are cut to {small} rows. Size the data plate from "
                "the arguments (numpyro.plate('data', len(x))) rather than a fixed number."
            )
    return stream


def _site_weights(trace: dict[str, Any], stream: _Stream, batch_size: int) -> dict[str, float]:
    """Observed and factor sites that make the batch potential, with their weights.

    A factor outside the data plate (for instance the rejection of a failed ODE
    solve) is counted at every step; weighting it by ``B / N`` counts it once per
    epoch, as each data point is.
    """
    out = {}
    for name, site in trace.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        in_plate = any(f.name in stream.plates for f in site["cond_indep_stack"])
        out[name] = 1.0 if (in_plate or not is_factor(site)) else batch_size / stream.size
    return out


def _ess(log_w: jax.Array) -> jax.Array:
    """ESS of normalised log weights, ``1 / sum w_i^2``."""
    return jnp.exp(-jax.scipy.special.logsumexp(2.0 * log_w))


def _make_epoch(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    stream: _Stream,
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


def _batch_orders(key: jax.Array, n: int, epochs: int, batch_size: int) -> np.ndarray:
    """Each epoch's batches, ``(epochs, n // batch_size, batch_size)`` data rows: a fresh
    random order of the data per epoch (NumPy, seeded by ``key``: nothing to compile)."""
    rng = np.random.default_rng(np.asarray(as_key(key)).ravel().tolist())
    steps = n // batch_size
    perms = np.stack([rng.permutation(n)[: steps * batch_size] for _ in range(epochs)])
    return perms.reshape(epochs, steps, batch_size)


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
        raise ValueError(
            "SMC(stream='minibatch'): the model has no latent sample sites, so there is no "
            "posterior for the particles to track. Give the stochastic weights a prior "
            "(BayesianMLP(..., bayesian_layers=[...])), or fit param-only models by "
            "optimisation (probdyn.VI or probdyn.Ensemble)."
        )
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
        >>> from probdyn.numpyro._fksmc import run_fksmc
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
        ...     with numpyro.plate("data", len(y)):
        ...         numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> engine = probdyn.SMC(num_particles=100, stream="minibatch", batch_size=5,
        ...                      progress_bar=False)
        >>> run_fksmc(model, (np.ones(20),), {}, engine, 0).samples["mu"].shape
        (1, 100)
    """
    if engine.batch_size is None:
        raise ValueError(
            "SMC(batch_size=None): the Feynman-Kac (minibatch) runner needs batch_size; give "
            "SMC(stream='minibatch', batch_size=...)."
        )
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
    batch_size = engine.batch_size
    stream = _stream(model, args, kwargs, trace, batch_size)
    local = [
        n for n in latent if any(f.name in stream.plates for f in trace[n]["cond_indep_stack"])
    ]
    if local:
        raise ValueError(
            f"SMC(stream='minibatch'): latent site(s) {local} sit inside the data plate (one "
            "value per data point); the particles track global unknowns only. Move them out of "
            "the plate, or use stream='tempered'."
        )
    weights = _site_weights(trace, stream, batch_size)
    optimizer = optax.adam(engine.learning_rate)
    epoch = _make_epoch(model, args, kwargs, stream, transforms, weights, engine, optimizer)
    steps = stream.size // batch_size
    data = stream.data(args, kwargs)
    reset_failed_solves()
    start = time.perf_counter()
    with CompileTimer() as timer:
        k_init, k_order, k_steps = jax.random.split(rng, 3)
        orders = _batch_orders(k_order, stream.size, engine.num_epochs, batch_size)
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
