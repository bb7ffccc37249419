"""Deep-ensemble runner for NumPyro models: ``num_members`` MAP fits in one program.

What a member optimises
-----------------------
Every latent sample site ``z`` is written ``z = T(u)`` with ``T =
biject_to(support)`` and ``u`` unconstrained; every ``param`` site likewise with
the bijection of its ``constraint``. A member moves ``u`` to maximise the log
joint density in *constrained* space, with no Jacobian term (a MAP estimate, as
``AutoDelta`` in ``_map.py``)::

    log p(z, y) = sum over sample sites of scale * sum(fn.log_prob(value))

computed here from a trace of the model with the member's values substituted:
``handlers.substitute`` maps ``u`` to ``T(u)`` while the model runs (so supports
that depend on other sites are handled), ``handlers.trace`` records the sites,
and the sum runs over every sample site: latent sites, observed sites and
``numpyro.factor`` terms, each times its plate ``scale`` (subsampling);
``handlers.mask`` is honoured because NumPyro turns it into a masked
distribution. Plates with ``subsample_size`` draw a new subsample at every step
(the trace is seeded with ``fold_in(member key, step)``).

Initialisation: ``u = m + init_scale * N(0, 1)`` per member and element, where
``m = T^-1(prior median)`` for latent sites (a child's median taken with its
parents at their medians, as the model runs) and ``T^-1(initial value)`` for
``param`` sites; anchored members start the same way (not at their anchor), as
the `Ensemble` docstring says. The prior median is exact where the prior (inside
any ``Independent`` / ``expand`` / ``mask`` wrappers) is univariate and has an
inverse CDF (Normal, Cauchy, Laplace, LogNormal, HalfNormal, HalfCauchy,
Exponential, Uniform, Gumbel, truncated Normal, ...); for a multivariate prior it
is the mean (the median of symmetric ones such as MultivariateNormal), and
otherwise the element-wise median of 2001 prior draws in unconstrained space.

Anchored members (``anchored=True``, randomised MAP; Pearce et al., 2020)
----------------------------------------------------------------------------
Member ``k`` runs the model once under its own seed, which draws
``theta_k ~ p(theta)`` (``param`` sites at their initial values), and keeps
``u_anchor = T^-1(theta_k)``. It then maximises a modified log joint:

* each latent site's prior term becomes ``fn.log_prob(T(u - u_anchor + m))``:
  the prior moved, in unconstrained space, so that its median sits on the
  anchor. For a real-support Normal prior this is ``log N(z; theta_k, scale)``.
* each observed site whose distribution is Gaussian (``Normal``,
  ``MultivariateNormal`` or ``LowRankMultivariateNormal``, looked up through
  ``Independent`` / ``expand`` / ``mask`` wrappers) gets its observations shifted
  by one fixed draw of its noise, ``eps_k = fn.sample() - fn.mean`` evaluated at
  ``theta_k``; its term is ``fn.log_prob(y + eps_k)``.
* other observed sites and ``factor`` terms are kept as they are; the run warns
  once (``UserWarning`` naming them) that the ensemble is then an approximation.

With Gaussian priors, a Gaussian likelihood of known scale and a mean linear in
the latents, the optimum is a linear function of ``(theta_k, eps_k)`` whose
distribution is exactly the posterior, so the members are independent exact
posterior draws. Elsewhere (non-Gaussian priors or noise, a noise scale that is a
latent, nonlinear models such as BNNs) the members are an approximation.
``param`` sites have no prior, so they are not anchored.

Optimiser: optax ``adam``, ``adamw`` (its default weight decay, 1e-4, pulls
``u`` towards 0 in unconstrained space, so the optimum moves slightly off the
MAP) or ``sgd``, with the learning rate decayed exponentially to
``final_learning_rate_fraction`` of itself (as VI, but computed in the working
precision: see `_optimizer`). All members' updates are one
``vmap``; steps run in compiled ``lax.scan`` blocks of ``ceil(num_steps / 50)``
steps (at most 50 blocks; the progress bar advances per block, and steps of the
last block past ``num_steps`` change nothing). The member-stacked state is passed
through `shard_leading` first, so with several devices and a member count that
divides by their number the members are split across them and the compiled
program follows that sharding; otherwise everything runs on one device.

Results
-------
Latent and ``param`` values per member are the draws of one chain, ``(1,
num_members, *event)``. ``traces["loss"]`` is ``(num_members, num_steps)``: the
objective minimised (the negative log joint; the anchored one for anchored
members) before each step. ``sample_stats["lp"]`` is the model's log joint
(un-anchored, constrained space, no Jacobian) at each member's final values.
Steps whose loss or gradient is not finite are skipped for that member (as
NumPyro's ``stable_update``); members whose final loss is not finite are kept
and counted in a warning. ``attrs["num_devices"]`` is the number of devices the
members ran on (see `shard_leading`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from tqdm.auto import tqdm

from probdyn.core.engines import Ensemble
from probdyn.core.posterior import Posterior
from probdyn.engines.checks import check_ensemble_fittable
from probdyn.engines.ensemble_warnings import warn_non_finite, warn_not_jittered
from probdyn.engines.losses import check_final_loss, learning_rate_fix
from probdyn.numpyro.bridge import as_key, check_observed, is_factor, trace_model
from probdyn.numpyro.engines.batching import batch_size, map_batched
from probdyn.numpyro.engines.shard import num_devices_of, shard_leading
from probdyn.numpyro.engines.timing import CompileTimer
from probdyn.numpyro.postprocess import build_posterior
from probdyn.numpyro.primitives.ode import reset_failed_solves

__all__ = ["run_ensemble"]

Tree = dict[str, Any]

_WRAPPERS = (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)
_GAUSSIAN = (dist.Normal, dist.MultivariateNormal, dist.LowRankMultivariateNormal)
_MEDIAN_DRAWS = 2001
_MAX_BLOCKS = 50  # compiled blocks of steps per run, at most (see _optimise)
_OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "sgd": optax.sgd,
}


def _base(fn: dist.Distribution) -> dist.Distribution:
    """The distribution inside ``Independent`` / ``expand`` / ``mask`` wrappers."""
    while isinstance(fn, _WRAPPERS):
        fn = fn.base_dist
    return fn


def _param_constraint(site: dict[str, Any]) -> Any:
    return site["kwargs"].get("constraint", constraints.real)


def _unconstrained_median(fn: dist.Distribution, key: jax.Array) -> jax.Array:
    """``T^-1(median of fn)`` (see the module docstring for which median)."""
    transform = biject_to(fn.support)
    base = _base(fn)
    if not base.event_shape:
        try:
            median = base.icdf(jnp.full(base.batch_shape, 0.5))
            return transform.inv(jnp.broadcast_to(median, fn.shape()))
        except (NotImplementedError, ImportError):  # ImportError: needs tfp (Gamma, Beta)
            pass
    draws = jnp.median(transform.inv(fn.sample(key, (_MEDIAN_DRAWS,))), axis=0)
    if not base.event_shape:
        return draws
    try:
        mean = transform.inv(jnp.broadcast_to(fn.mean, fn.shape()))
    except NotImplementedError:
        return draws
    return jnp.where(jnp.all(jnp.isfinite(mean)), mean, draws)


def _constrainer(u: Tree) -> Callable[[dict[str, Any]], Any]:
    """A ``substitute_fn`` that puts ``T(u[name])`` at latent and param sites."""

    def value(msg: dict[str, Any]) -> Any:
        name = msg.get("name")
        if name not in u:
            return None
        if msg["type"] == "sample" and not msg["is_observed"]:
            return biject_to(msg["fn"].support)(u[name])
        if msg["type"] == "param":
            return biject_to(_param_constraint(msg))(u[name])
        return None

    return value


def _scaled_sum(log_prob: jax.Array, scale: Any) -> jax.Array:
    return jnp.sum(log_prob if scale is None else scale * log_prob)


class _Problem:
    """The model, its sites and the ensemble's objective."""

    def __init__(
        self,
        model: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        trace: dict[str, Any],
        engine: Ensemble,
    ) -> None:
        self.model, self.args, self.kwargs, self.engine = model, args, kwargs, engine
        self.latent = [
            n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]
        ]
        self.params = [n for n, s in trace.items() if s["type"] == "param"]
        self.jittered: list[str] = []
        if engine.anchored:
            self.jittered = [
                n
                for n, s in trace.items()
                if s["type"] == "sample"
                and s["is_observed"]
                and not is_factor(s)
                and isinstance(_base(s["fn"]), _GAUSSIAN)
            ]

    def run(self, values: Callable[[dict[str, Any]], Any], key: jax.Array) -> dict[str, Any]:
        model = handlers.seed(handlers.substitute(self.model, substitute_fn=values), key)
        return handlers.trace(model).get_trace(*self.args, **self.kwargs)

    def terms(
        self, u: Tree, member: Tree, median: Tree, step: jax.Array
    ) -> tuple[jax.Array, jax.Array, Tree]:
        """``(objective to minimise, log joint, constrained values)`` of one member."""
        trace = self.run(_constrainer(u), jax.random.fold_in(member["key"], step))
        objective = log_joint = jnp.zeros(())
        for name, site in trace.items():
            if site["type"] != "sample":
                continue
            fn, scale = site["fn"], site["scale"]
            term = _scaled_sum(fn.log_prob(site["value"]), scale)
            log_joint = log_joint + term
            if name in member["anchor"]:
                shift = u[name] - member["anchor"][name] + median[name]
                term = _scaled_sum(fn.log_prob(biject_to(fn.support)(shift)), scale)
            elif name in member["jitter"]:
                term = _scaled_sum(fn.log_prob(site["value"] + member["jitter"][name]), scale)
            objective = objective + term
        values = {n: trace[n]["value"] for n in self.latent + self.params}
        return -objective, log_joint, values

    def centre(self, values: Tree, key: jax.Array) -> tuple[Tree, Tree]:
        """The unconstrained prior medians of the latent sites, and the centre of the
        members' starts (those medians, and the params' initial values).

        The model runs with every latent site set to ``T(median of its prior)`` as
        it is reached, so a child's median is taken with its parents at their
        medians (as the Pyro runner's `prior_medians`), not at a random draw.
        ``values`` are the latent and param values of a first trace of the model;
        the params keep theirs (their initial values).
        """
        keys = jax.random.split(key, len(self.latent)) if self.latent else key[None]
        site_keys = dict(zip(self.latent, keys))
        found: Tree = {}

        def at_median(msg: dict[str, Any]) -> Any:
            name = msg.get("name")
            if msg["type"] == "sample" and not msg["is_observed"] and name in site_keys:
                found[name] = _unconstrained_median(msg["fn"], site_keys[name])
                return biject_to(msg["fn"].support)(found[name])
            if msg["type"] == "param" and name in values:
                return values[name]
            return None

        trace = self.run(at_median, key)
        median = {n: found[n] for n in self.latent}
        centre = dict(median)
        for n in self.params:
            centre[n] = biject_to(_param_constraint(trace[n])).inv(trace[n]["value"])
        return median, centre

    def init(
        self,
        values: Tree,
        key: jax.Array,
        noise: jax.Array,
        anchor_keys: jax.Array | None,
        optimizer: optax.GradientTransformation,
    ) -> tuple[Tree, ...]:
        """Prior medians, and per member: start ``u``, optimiser state, anchors.

        ``noise`` is ``(num_members, size)`` standard normal, ``size`` the number of
        unconstrained elements (drawn outside: eager draws are compiled once per
        shape and cached, a draw inside this per-model program is compiled anew by
        every fit, at seconds per threefry draw on CPU).
        """
        median, centre = self.centre(values, key)
        flat, unravel = ravel_pytree(centre)
        u = jax.vmap(unravel)(flat + self.engine.init_scale * noise)
        anchors: Tree = {"anchor": {}, "jitter": {}}
        if anchor_keys is not None:
            anchor, jitter = jax.vmap(self._anchor)(anchor_keys)
            anchors = {"anchor": anchor, "jitter": jitter}
        return median, u, jax.vmap(optimizer.init)(u), anchors

    def _anchor(self, key: jax.Array) -> tuple[Tree, Tree]:
        """One member's anchor ``T^-1(theta_k)``, ``theta_k`` a prior draw, and the
        noise draws ``fn.sample() - fn.mean`` at ``theta_k`` of the jittered sites."""
        k_prior, k_noise = jax.random.split(key)
        prior = self.run(lambda msg: None, k_prior)
        anchor = {n: biject_to(prior[n]["fn"].support).inv(prior[n]["value"]) for n in self.latent}
        noise_keys = jax.random.split(k_noise, max(len(self.jittered), 1))
        jitter = {
            n: prior[n]["fn"].sample(kn) - prior[n]["fn"].mean
            for n, kn in zip(self.jittered, noise_keys)
        }
        return anchor, jitter


def _optimizer(engine: Ensemble) -> optax.GradientTransformation:
    """The optimiser, its learning rate ``lr * fraction ** (step / num_steps)``.

    Written here rather than as ``optax.exponential_decay``, which computes in
    float32 whatever the precision (its step counter is int32): under float64 that
    perturbs the rate in the 8th digit, and the members would not follow the Pyro
    runner's (``ExponentialLR``) path to float64 precision.
    """
    lr, num_steps = engine.learning_rate, engine.num_steps
    fraction = engine.final_learning_rate_fraction
    dtype = jnp.result_type(float)  # float64 under jax_enable_x64, else float32

    def schedule(count: jax.Array) -> jax.Array:
        return lr * jnp.power(fraction, jnp.asarray(count, dtype) / num_steps)

    return _OPTIMIZERS[engine.optimizer](schedule)


def _optimise(
    problem: _Problem,
    optimizer: optax.GradientTransformation,
    state: tuple[Tree, Any],
    members: Tree,
    median: Tree,
) -> tuple[tuple[Tree, Any], np.ndarray]:
    """Every member's optimisation, vmapped (in cache-sized batches of members on a CPU,
    see `_batching`), in compiled blocks of steps (lax.scan).

    Returns the final ``(u, optimiser state)`` and the losses, ``(members, steps)``.
    Blocks are ``ceil(num_steps / 50)`` steps long, so there are at most 50 of them
    (50 dispatches, 50 progress-bar updates); the last block may run past
    ``num_steps`` (by fewer steps than a block), and those steps leave the state as
    it is.
    """
    engine = problem.engine
    block = -(-engine.num_steps // _MAX_BLOCKS)

    def step(
        u: Tree, opt_state: Any, member: Tree, median: Tree, i: jax.Array
    ) -> tuple[Tree, Any, jax.Array]:
        loss_fn = lambda v: problem.terms(v, member, median, i)[0]
        loss, grad = jax.value_and_grad(loss_fn)(u)
        updates, new_opt_state = optimizer.update(grad, opt_state, u)
        new_u = optax.apply_updates(u, updates)
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grad)]))
        keep = (i < engine.num_steps) & jnp.isfinite(loss) & finite
        pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, old)
        return pick(new_u, u), pick(new_opt_state, opt_state), loss

    one = jax.tree.map(lambda a: a[0], (state[0], members))
    loss_grad = jax.grad(lambda v, m: problem.terms(v, m, median, jnp.asarray(0))[0])
    per_batch = batch_size(loss_grad, one, engine.num_members, engine.members_per_batch)
    all_members = map_batched(step, per_batch, in_axes=(0, 0, 0, None, None))

    # members and median are arguments, not closed-over constants, so that the
    # compiled block follows their sharding.
    @jax.jit
    def run_block(
        state: tuple[Tree, Any], members: Tree, median: Tree, start: jax.Array
    ) -> tuple[Any, jax.Array]:
        def body(s: tuple[Tree, Any], i: jax.Array) -> tuple[tuple[Tree, Any], jax.Array]:
            u, opt_state, loss = all_members(s[0], s[1], members, median, i)
            return (u, opt_state), loss

        return jax.lax.scan(body, state, start + jnp.arange(block))

    losses = []
    done = 0
    with tqdm(total=engine.num_steps, disable=not engine.progress_bar, desc="Ensemble") as bar:
        while done < engine.num_steps:
            state, loss = run_block(state, members, median, jnp.asarray(done))
            losses.append(np.asarray(loss))
            bar.update(min(block, engine.num_steps - done))
            done += block
            last = losses[-1][-1]
            finite = last[np.isfinite(last)]
            bar.set_postfix(loss=f"{float(np.median(finite)) if finite.size else np.nan:.4g}")
    return state, np.concatenate(losses)[: engine.num_steps].T


def _warn_approximate(trace: dict[str, Any], jittered: list[str]) -> None:
    others = [
        n
        for n, s in trace.items()
        if s["type"] == "sample" and s["is_observed"] and n not in jittered
    ]
    warn_not_jittered(others)


def _check_sites(trace: dict[str, Any], problem: _Problem) -> None:
    """Raise unless the members have values to optimise, all of them continuous."""
    check_ensemble_fittable(bool(problem.latent or problem.params), "numpyro")
    for name in problem.latent:
        if trace[name]["fn"].is_discrete:
            raise ValueError(
                f"fit(engine=Ensemble(...)): latent site {name!r} is discrete "
                f"({type(trace[name]['fn']).__name__}); ensemble members optimise continuous "
                "values only. Marginalise it out of the model, or use NUTS with enumeration."
            )


def run_ensemble(
    model: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    engine: Ensemble,
    key: int | jax.Array,
) -> Posterior:
    """Fit ``num_members`` MAP (or anchored, randomised-MAP) members in one program.

    See the module docstring for the objective, the initialisation, the anchored
    variant and the layout of the result.
    """
    rng = as_key(key)
    trace = trace_model(model, args, kwargs, rng)
    observed = check_observed(trace)
    problem = _Problem(model, args, kwargs, trace, engine)
    _check_sites(trace, problem)
    if engine.anchored:
        _warn_approximate(trace, problem.jittered)
    optimizer = _optimizer(engine)
    k_init = jax.random.fold_in(rng, 3)  # fold_in(key, 1) is the forward pass's
    reset_failed_solves()
    start = time.perf_counter()
    with CompileTimer() as timer:
        first = {n: trace[n]["value"] for n in problem.latent + problem.params}
        k_centre, k_start, k_steps, k_anchor = jax.random.split(k_init, 4)
        size = jax.eval_shape(lambda: ravel_pytree(problem.centre(first, k_centre)[1])[0])
        members: Tree = {"key": jax.random.split(k_steps, engine.num_members)}
        noise = jax.random.normal(k_start, (engine.num_members, *size.shape), size.dtype)
        anchor_keys = jax.random.split(k_anchor, engine.num_members) if engine.anchored else None
        init = jax.jit(partial(problem.init, optimizer=optimizer))
        median, u, opt_state, anchors = init(first, k_centre, noise, anchor_keys)
        members.update(anchors)
        # The member axis is split across devices when it divides evenly (_shard.py);
        # the compiled programs below follow that sharding.
        u, opt_state, members = shard_leading((u, opt_state, members))
        (u, _), losses = _optimise(problem, optimizer, (u, opt_state), members, median)
        final = jax.jit(jax.vmap(problem.terms, in_axes=(0, 0, None, None)))
        loss, log_joint, values = final(u, members, median, jnp.asarray(engine.num_steps))
        num_devices = num_devices_of(jax.tree.leaves(values)[0])
        loss, log_joint, values = jax.tree.map(np.asarray, (loss, log_joint, values))
    wall = time.perf_counter() - start
    check_final_loss(losses, *learning_rate_fix(engine))
    warn_non_finite(losses, loss)
    return build_posterior(
        model=model,
        args=args,
        kwargs=kwargs,
        engine=engine,
        key=key,
        latent={n: v[None] for n, v in values.items()},
        params={},
        observed=observed,
        sample_stats={"lp": log_joint[None]},
        traces={"loss": losses},
        wall_time=wall,
        compile_time=timer.seconds,
        extra_attrs={"num_devices": num_devices},
    )
