"""The move kernels of the NumPyro tempered SMC runner, one compiled loop per stage.

The particles move together: every MCMC move of the whole cloud is one ``jax.vmap``
(or cache-sized batches, `probdyn.numpyro.engines.batching.map_batched`) of one
function, ``evaluate(u) = (logprior(u), loglik(u), grad of logprior + beta *
loglik)``, from one run of the model. A stage's moves are a ``jax.lax.while_loop``
whose every iteration makes exactly one such evaluation of the cloud, so the
compiled stage holds the model (an ODE solve, say) once, whatever the kernel, the
number of moves or the batch size:

* the first iteration of a stage evaluates the particles where they are, at the
  stage's temperature (their stored gradient was taken at the previous one);
  the random walk, which needs no gradient, skips it after the first stage;
* each HMC move takes ``num_leapfrog_steps`` iterations (one evaluation per
  leapfrog step); MALA and the random walk one.

Every particle's every move takes the stage's shared step size times its own jitter
factor, drawn afresh per move (see `probdyn.engines.smc_math.STEP_JITTER`),
preconditioned by the weighted
covariance ``L L^T`` of the particle cloud (`probdyn.engines.smc_preconditioner`;
``L`` diagonal or a dense Cholesky factor): HMC takes it as its inverse mass
matrix, MALA and the random walk as their proposal covariance (BlackJAX's
parametrisations: MALA proposes ``u + h L L^T grad + sqrt(2 h) L xi``). The kernels
are written in whitened coordinates: HMC's momentum ``r ~ N(0, I)`` moves the
position by ``h L r`` and is kicked by ``h L^T grad``.

The number of moves adapts (`probdyn.engines.smc_math.keep_moving`): the loop stops
once the particles' mean squared distance from where the stage started, in units of
the preconditioner, grows by less than `probdyn.engines.smc_math.MOVE_DISTANCE_GAIN`
over a move, or after ``max_moves`` moves; the last stage (``final``) instead once
every coordinate's correlation with the stage's start is at most
`probdyn.engines.smc_math.FINAL_CORRELATION`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from probdyn.engines import smc_math as _smc_math
from probdyn.numpyro.engines.batching import map_batched

__all__ = ["Cloud", "MoveStats", "evaluator", "move", "preconditioner_ops"]

# (u (N, D), beta) -> (logprior (N,), loglik (N,), gradient of the tempered target (N, D))
Evaluate = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


class Cloud(NamedTuple):
    """The particles with what one evaluation of the model says about them.

    Attributes:
        u: ``(N, D)`` unconstrained positions.
        logprior: ``(N,)`` log prior with ``log |det J|``.
        loglik: ``(N,)`` log likelihood (a non-finite one floored, see `loglik_floor`).
        grad: ``(N, D)`` gradient of ``logprior + beta * loglik`` at the temperature of
            the last evaluation (zeros for the random walk).
    """

    u: jax.Array
    logprior: jax.Array
    loglik: jax.Array
    grad: jax.Array


class MoveStats(NamedTuple):
    """What a stage's moves did: ``num_moves`` moves of the cloud (0: none), the mean
    acceptance probability over moves and particles (NaN if none), how many
    evaluations of the cloud they took, and the largest correlation over the
    coordinates between the particles and the stage's start after them (1 if none,
    `probdyn.engines.smc_math.start_correlation`)."""

    num_moves: jax.Array
    acceptance_rate: jax.Array
    num_evaluations: jax.Array
    correlation: jax.Array


def evaluator(
    log_parts: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    per_batch: int,
    needs_grad: bool,
) -> Evaluate:
    """``evaluate(u, beta)`` for a whole cloud, one particle's ``log_parts`` mapped over
    it (one ``vmap`` when ``per_batch`` is 0, else batches of ``per_batch``).

    A non-finite gradient becomes 0: such a particle (a failed solve) has the floored
    log likelihood, and its moves are rejected by the Metropolis test.
    """

    def one(u: jax.Array, beta: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        if not needs_grad:
            lp, ll = log_parts(u)
            return lp, ll, jnp.zeros_like(u)

        def target(v: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            lp, ll = log_parts(v)
            # At beta = 0 the likelihood is left out (0 * floor is 0 anyway).
            return lp + jnp.where(beta > 0, beta * ll, 0.0), (lp, ll)

        (_, (lp, ll)), grad = jax.value_and_grad(target, has_aux=True)(u)
        return lp, ll, jnp.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)

    return map_batched(one, per_batch, in_axes=(0, None))  # type: ignore[no-any-return]


class _Trajectory(NamedTuple):
    """A proposal under way: the point to evaluate next and what the kernel carries."""

    q: jax.Array  # (N, D) the point the next evaluation is at
    p: jax.Array  # (N, D) HMC's momentum (unused otherwise)
    log_q0: jax.Array  # (N,) HMC: minus the start's kinetic energy; MALA: the noise term
    leapfrog: jax.Array  # () leapfrog steps taken in this trajectory
    h: jax.Array  # (N, 1) this move's step size of each particle (jittered)


class _Loop(NamedTuple):
    key: jax.Array
    cloud: Cloud
    fresh: jax.Array  # () whether cloud.grad is at this stage's temperature
    traj: _Trajectory
    moves: jax.Array  # () completed moves
    accept_sum: jax.Array  # () sum over moves of the mean acceptance probability
    distance: jax.Array  # () mean squared distance from the start after the last move
    previous: jax.Array  # () the same after the move before
    correlation: jax.Array  # () largest correlation with the start after the last move
    going: jax.Array  # () whether to move again
    evaluations: jax.Array  # () evaluations of the cloud so far


def _tempered(lp: jax.Array, ll: jax.Array, beta: jax.Array) -> jax.Array:
    return lp + jnp.where(beta > 0, beta * ll, 0.0)


def move(
    key: jax.Array,
    cloud: Cloud,
    fresh: jax.Array,
    evaluate: Evaluate,
    *,
    kernel: str,
    num_leapfrog_steps: int,
    beta: jax.Array,
    step: jax.Array,
    jitter: float,
    precond: jax.Array,
    max_moves: jax.Array,
    adaptive: bool,
    final: jax.Array | bool = False,
) -> tuple[Cloud, MoveStats]:
    """Move the cloud at temperature ``beta`` by up to ``max_moves`` moves of ``kernel``.

    Args:
        key: the stage's key.
        cloud: the particles, with the values of their last evaluation.
        fresh: whether ``cloud.grad`` is already at ``beta`` (else the first iteration
            evaluates the particles where they are).
        evaluate: `evaluator`'s function of the cloud.
        kernel: ``"hmc"``, ``"mala"`` or ``"rw"``.
        num_leapfrog_steps: leapfrog steps per HMC move.
        beta: the temperature.
        step: the stage's step size (a scalar, or ``(N, 1)`` per particle).
        jitter: each move's step of each particle is ``step * exp(U(-jitter,
            jitter))``, drawn afresh per move (`probdyn.engines.smc_math.STEP_JITTER`).
        precond: the preconditioner's ``L``: ``(D,)`` per-coordinate standard
            deviations or a ``(D, D)`` lower Cholesky factor of the covariance.
        max_moves: at most this many moves (0: only the evaluation, if not fresh).
        adaptive: stop early by `probdyn.engines.smc_math.keep_moving`; else make
            ``max_moves`` moves.
        final: the last stage, at temperature 1: with ``adaptive``, move until the
            particles have decorrelated from their start (see `keep_moving`).

    Returns:
        The moved cloud (evaluated at ``beta``) and its `MoveStats`.
    """
    mul_l, mul_lt, whiten = preconditioner_ops(precond)
    steps_per_move = num_leapfrog_steps if kernel == "hmc" else 1
    start = cloud.u
    start_c = start - jnp.mean(start, axis=0)
    start_ss = jnp.sum(start_c**2, axis=0)
    zero = jnp.zeros((), cloud.u.dtype)

    def correlation(u: jax.Array) -> jax.Array:
        """The largest `_smc_math.start_correlation` over the coordinates."""
        uc = u - jnp.mean(u, axis=0)
        denom = jnp.sqrt(jnp.sum(uc**2, axis=0) * start_ss)
        ok = denom > 0
        rho = jnp.where(ok, jnp.sum(uc * start_c, axis=0) / jnp.where(ok, denom, 1.0), 1.0)
        return jnp.max(rho)

    def begin(key: jax.Array, c: Cloud) -> _Trajectory:
        """Start a proposal from ``c``: the first point to evaluate."""
        k_xi, k_h = jax.random.split(key)
        xi = jax.random.normal(k_xi, c.u.shape, c.u.dtype)
        n = c.u.shape[0]
        h = step * jnp.exp(jax.random.uniform(k_h, (n, 1), c.u.dtype, -jitter, jitter))
        none = jnp.zeros((), jnp.int32)
        if kernel == "hmc":
            # Whitened momentum r ~ N(0, I): inverse mass matrix L L^T.
            log_q0 = -0.5 * jnp.sum(xi**2, axis=-1)
            r = xi + 0.5 * h * mul_lt(c.grad)
            return _Trajectory(c.u + h * mul_l(r), r, log_q0, none, h)
        if kernel == "mala":
            q = c.u + h * mul_l(mul_lt(c.grad)) + jnp.sqrt(2 * h) * mul_l(xi)
            return _Trajectory(q, xi, 0.5 * jnp.sum(xi**2, axis=-1), none, h)
        q = c.u + h * mul_l(xi)
        return _Trajectory(q, xi, jnp.zeros(n, c.u.dtype), none, h)

    def finish(key: jax.Array, c: Cloud, t: _Trajectory, new: Cloud) -> tuple[Cloud, jax.Array]:
        """The Metropolis test of the proposal ``new`` (``t`` its trajectory)."""
        log_ratio = _tempered(new.logprior, new.loglik, beta) - _tempered(
            c.logprior, c.loglik, beta
        )
        if kernel == "hmc":
            log_ratio = log_ratio - 0.5 * jnp.sum(t.p**2, axis=-1) - t.log_q0
        elif kernel == "mala":
            back = whiten(c.u - new.u - t.h * mul_l(mul_lt(new.grad))) / jnp.sqrt(2 * t.h)
            log_ratio = log_ratio - 0.5 * jnp.sum(back**2, axis=-1) + t.log_q0
        log_ratio = jnp.nan_to_num(log_ratio, nan=-jnp.inf)
        accept_prob = jnp.exp(jnp.minimum(log_ratio, 0.0))
        keep = jax.random.uniform(key, accept_prob.shape, accept_prob.dtype) < accept_prob
        chosen = jax.tree.map(
            lambda a, b: jnp.where(keep.reshape(keep.shape + (1,) * (a.ndim - 1)), a, b), new, c
        )
        return chosen, jnp.mean(accept_prob)

    def cond(s: _Loop) -> jax.Array:
        return ~s.fresh | s.going

    def body(s: _Loop) -> _Loop:
        k_move, k_accept, k_next = jax.random.split(s.key, 3)
        x = jnp.where(s.fresh, s.traj.q, s.cloud.u)
        lp, ll, grad = evaluate(x, beta)
        evaluated = Cloud(x, lp, ll, grad)

        # Case 1: the stage's first evaluation, at the particles themselves.
        refreshed = evaluated

        # Case 2: a leapfrog step (or MALA's / the random walk's one evaluation).
        t = s.traj
        leapfrog = t.leapfrog + 1
        last = leapfrog >= steps_per_move
        if kernel == "hmc":
            p = t.p + jnp.where(last, 0.5, 1.0) * t.h * mul_lt(grad)
            q_next = x + t.h * mul_l(p)
            t_step = _Trajectory(q_next, p, t.log_q0, leapfrog, t.h)
        else:
            t_step = t._replace(leapfrog=leapfrog)
        accepted, rate = finish(k_accept, s.cloud, t_step, evaluated)
        moved = s.fresh & last  # a move completed in this iteration
        moves = s.moves + moved.astype(s.moves.dtype)
        d = jnp.mean(jnp.sum(whiten(accepted.u - start) ** 2, axis=-1))
        rho = correlation(accepted.u)
        keep_going = _keep_moving(moves, d, s.distance, max_moves, adaptive, final, rho)

        # Which case, and the state after it.
        cloud = jax.tree.map(
            lambda a, b, r: jnp.where(s.fresh, jnp.where(last, a, b), r),
            accepted,
            s.cloud,
            refreshed,
        )
        going = jnp.where(s.fresh, jnp.where(last, keep_going, s.going), s.going & (max_moves > 0))
        fresh_traj = begin(k_move, cloud)
        traj = jax.tree.map(lambda a, b: jnp.where(moved | ~s.fresh, a, b), fresh_traj, t_step)
        return _Loop(
            k_next,
            cloud,
            jnp.ones((), bool),
            traj,
            moves,
            s.accept_sum + jnp.where(moved, rate, 0.0),
            jnp.where(moved, d, s.distance),
            jnp.where(moved, s.distance, s.previous),
            jnp.where(moved, rho, s.correlation),
            going,
            s.evaluations + 1,
        )

    k0, k_loop = jax.random.split(key)
    first = begin(k0, cloud)
    init = _Loop(
        k_loop,
        cloud,
        jnp.asarray(fresh),
        first,
        jnp.zeros((), jnp.int32),
        zero,
        zero,
        zero,
        jnp.ones((), cloud.u.dtype),
        jnp.asarray(max_moves) > 0,
        jnp.zeros((), jnp.int32),
    )
    out = jax.lax.while_loop(cond, body, init)
    rate = jnp.where(out.moves > 0, out.accept_sum / jnp.maximum(out.moves, 1), jnp.nan)
    return out.cloud, MoveStats(out.moves, rate, out.evaluations, out.correlation)


def preconditioner_ops(
    precond: jax.Array,
) -> tuple[Callable[[jax.Array], jax.Array], ...]:
    """For rows ``x`` ``(N, D)``: ``x -> x L^T``, ``g -> g L`` and ``x -> x L^-T``, with
    ``L`` a ``(D,)`` diagonal or a ``(D, D)`` lower-triangular factor (so each row is
    mapped by ``L``, ``L^T`` and ``L^-1``)."""
    if precond.ndim == 1:
        return (lambda x: x * precond, lambda g: g * precond, lambda x: x / precond)
    inverse = solve_triangular(precond, jnp.eye(precond.shape[0], dtype=precond.dtype), lower=True)
    return (lambda x: x @ precond.T, lambda g: g @ precond, lambda x: x @ inverse.T)


def _keep_moving(
    moves: jax.Array,
    distance: jax.Array,
    previous: jax.Array,
    max_moves: jax.Array,
    adaptive: bool,
    final: jax.Array | bool,
    correlation: jax.Array,
) -> jax.Array:
    """`probdyn.engines.smc_math.keep_moving` in jax.numpy (``final``: the last stage,
    whose rule reads ``correlation``)."""
    more = moves < max_moves
    if not adaptive:
        return more
    growing = distance >= (1.0 + _smc_math.MOVE_DISTANCE_GAIN) * previous
    correlated = correlation > _smc_math.FINAL_CORRELATION
    return more & ((moves < _smc_math.MIN_MOVES) | jnp.where(final, correlated, growing))
