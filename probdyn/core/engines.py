"""Engine configurations: small frozen dataclasses that say *what* to run.

A config holds no behaviour. The runner that carries it out is looked up in the
registry by ``(type(config), backend)`` (see `probdyn.core.backends`), so a new engine or
a new backend is a new config class plus one registered runner function.

Every config validates its fields when it is built and raises an error that names
the field, the value and the fix. Misspelt keyword arguments are caught too, with a
suggestion of the closest valid name (`probdyn.core.engine_base`: the base class and
the field checks the configs share).

This module is longer than 500 lines because every engine config keeps its whole
user documentation (most of the lines) beside its field checks, so that one file
lists every engine a user can choose.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from probdyn.core.engine_base import (
    AbstractEngine,
    _check_choice,
    _check_dense_mass,
    _check_positive_int,
    _check_positive_number,
    _check_probability,
)

__all__ = ["HMC", "MCLMC", "NUTS", "SMC", "VI", "AbstractEngine", "Ensemble", "ensemble_init"]

_CHAIN_METHODS = ("sequential", "vectorized", "parallel")
_INIT_STRATEGIES = ("median", "sample", "map")
_MCMC_INITS = (*_INIT_STRATEGIES, "ensemble")
_GUIDES = ("normal", "lowrank", "flow")
_OPTIMIZERS = ("adam", "adamw", "sgd")
_SMC_KERNELS = ("hmc", "mala", "rw")
_SMC_STREAMS = ("tempered", "minibatch")
_SMC_PRECONDITIONERS = ("auto", "dense", "diagonal")


def _check_mcmc(engine: NUTS | HMC) -> None:
    """The fields NUTS and HMC share; stores ``dense_mass`` in its checked form."""
    cls = type(engine).__name__
    _check_positive_int(cls, "num_warmup", engine.num_warmup, allow_zero=True)
    _check_positive_int(cls, "num_samples", engine.num_samples)
    _check_positive_int(cls, "num_chains", engine.num_chains)
    _check_probability(cls, "target_accept", engine.target_accept)
    _check_choice(cls, "chain_method", engine.chain_method, _CHAIN_METHODS)
    _check_init(cls, engine.init)
    if isinstance(engine.init, Ensemble) and engine.init.num_members < engine.num_chains:
        raise ValueError(
            f"{cls}(num_chains={engine.num_chains}, init=Ensemble(num_members="
            f"{engine.init.num_members})): one chain starts at each member, so the ensemble "
            "needs at least num_chains members."
        )
    object.__setattr__(engine, "dense_mass", _check_dense_mass(cls, engine.dense_mass))


def _check_init(cls: str, value: Any) -> None:
    """Raise unless ``init`` is a start strategy of an MCMC engine: one of
    ``_MCMC_INITS``, an `Ensemble` config or a ``Posterior``."""
    if isinstance(value, str):
        _check_choice(cls, "init", value, _MCMC_INITS)
        return
    if isinstance(value, Ensemble):  # validated when it was built
        return
    if type(value).__name__ != "Posterior":
        raise ValueError(
            f"{cls}(init={value!r}): init must be 'median', 'sample', 'map', 'ensemble', "
            "a probdyn.Ensemble(...) config (one chain from each of its MAP members) or a "
            "probdyn.Posterior (for example a VI fit, to start the chains from its draws)."
        )


def ensemble_init(engine: Any) -> Ensemble | None:
    """The `Ensemble` config an MCMC engine's ``init`` asks for, or None.

    ``init="ensemble"`` means ``Ensemble(num_members=num_chains)`` with the
    `Ensemble` defaults otherwise; an `Ensemble` config is used as given.

    Example:
        >>> ensemble_init(NUTS(num_chains=4, init="ensemble")).num_members
        4
        >>> ensemble_init(NUTS()) is None
        True
    """
    init = getattr(engine, "init", None)
    if isinstance(init, Ensemble):
        return init
    if init == "ensemble":
        return Ensemble(num_members=engine.num_chains, progress_bar=engine.progress_bar)
    return None


@dataclasses.dataclass(frozen=True)
class NUTS(AbstractEngine):
    """The No-U-Turn Sampler (the PPL's own kernel, wrapped).

    Args:
        num_warmup: adaptation steps per chain (step size and mass matrix); at least
            1, and 100 or more in practice: without adaptation NUTS would run at step
            size 1 with a unit mass matrix, and on most models every transition
            diverges (use ``HMC(num_warmup=0, step_size=...)`` to sample at a step
            size of your own).
        num_samples: draws kept per chain.
        num_chains: number of chains; the ``chain`` dimension of the posterior.
        target_accept: target mean acceptance probability during adaptation.
        max_tree_depth: cap on the trajectory doubling (at most ``2**depth - 1``
            gradient evaluations per draw).
        chain_method: ``"sequential"``, ``"vectorized"`` (one compiled program for
            all chains) or ``"parallel"`` (one device per chain, through NumPyro's
            pmap; models with a `NeuralODE` cannot use it with JAX 0.10, see the
            error message, and should use ``"vectorized"``). On the Pyro backend
            chains always run one after another in-process: ``"vectorized"`` means
            ``"sequential"`` there, and ``"parallel"`` raises a ValueError.
        init: ``"median"`` (prior medians), ``"sample"`` (prior draws),
            ``"map"`` (a MAP estimate found by Adam from the prior medians; every
            chain starts there, slightly jittered, and fitted ``param`` sites are
            held at their MAP values), ``"ensemble"`` or an `Ensemble` config (a
            deep ensemble is fitted first, in one vectorised program, and one chain
            starts at each member: the recommended start for neural models, see
            "Ensemble-started chains" below), or a ``Posterior`` (for example a VI
            fit, or an `Ensemble` fit): chains start from its draws, spread evenly
            over them, and its fitted deterministic parameters are held fixed.
        dense_mass: ``True`` adapts one dense mass matrix instead of a diagonal one;
            a list of tuples of latent site names, e.g. ``[("a", "b"), ("c",)]``, a
            dense block per tuple (the other sites diagonal), as NumPyro's
            ``dense_mass`` and Pyro's ``full_mass`` take it.
        progress_bar: show a progress bar.

    Ensemble-started chains (``init="ensemble"``): on a neural network's posterior
    NUTS from one start stays in the basin it starts in (the weights' symmetries
    and the many modes make between-basin moves practically impossible), and a
    chain started at the prior median spends its warm-up finding any basin. With
    ``init="ensemble"`` an `Ensemble` of ``num_chains`` MAP members is fitted first
    and chain ``k`` starts at member ``k`` (the deep-ensemble-initialised sampling
    of Sommer et al., ICML 2024 and ICLR 2025). Each chain then explores its
    member's basin and the pooled draws are a mixture of the basins, with equal
    weight per basin: that is not the posterior's weighting of the basins (which
    would need their posterior masses), but each within-basin part is sampled
    exactly. Read R-hat and ESS of *predictive* quantities
    (`Posterior.summary` of a deterministic site, or of ``predict`` output): weights
    differ between basins by construction, so their R-hat is large, while the
    functions the basins represent often agree. With ``chain_method="vectorized"``
    the chains run as one program. The `Ensemble`'s wall time is kept in
    ``posterior.attrs["init_wall_time"]``. Models with ``param`` sites are not
    supported (each member fits its own, and NUTS would need one set).

    Raises:
        ValueError: for a field out of range (``num_warmup=0`` included).
        TypeError: for ``dense_mass`` in any other form than those above.

    Example:
        >>> import probdyn
        >>> probdyn.NUTS(num_warmup=500, num_samples=500, num_chains=4)
        NUTS(num_warmup=500, num_samples=500, num_chains=4, target_accept=0.8, max_tree_depth=10, chain_method='sequential', init='median', dense_mass=False, progress_bar=True)
    """  # noqa: E501

    name: ClassVar[str] = "nuts"

    num_warmup: int = 500
    num_samples: int = 500
    num_chains: int = 1
    target_accept: float = 0.8
    max_tree_depth: int = 10
    chain_method: str = "sequential"
    init: Any = "median"
    dense_mass: bool | tuple[tuple[str, ...], ...] = False
    progress_bar: bool = True

    def _validate(self) -> None:
        cls = type(self).__name__
        _check_mcmc(self)
        _check_positive_int(cls, "max_tree_depth", self.max_tree_depth)
        if self.num_warmup == 0:
            raise ValueError(
                f"{cls}(num_warmup=0): NUTS tunes its step size and mass matrix during "
                "warmup; without it every transition uses step size 1 and a unit mass "
                "matrix, and on most models diverges. Give num_warmup >= 100 (default "
                "500), or HMC(num_warmup=0, step_size=...) to sample at a step size of "
                "your own."
            )


@dataclasses.dataclass(frozen=True)
class HMC(AbstractEngine):
    """Hamiltonian Monte Carlo with a fixed trajectory (the PPL's own kernel, wrapped).

    Args:
        num_warmup: adaptation steps per chain.
        num_samples: draws kept per chain.
        num_chains: number of chains.
        num_steps: leapfrog steps per draw. Give this or ``trajectory_length``.
        trajectory_length: integration time per draw (``step_size * num_steps``);
            used when ``num_steps`` is None. Default ``pi / 2``: once the mass
            matrix matches the posterior scale, a Gaussian posterior oscillates
            with period ``2 pi``, so a quarter period gives draws independent of
            the start, while NumPyro's default of ``2 pi`` returns close to the
            start (measured on a correlated linear regression: bulk ESS of 5-50
            per 1000 draws at ``2 pi`` against 300-1100 at ``pi / 2``).
        step_size: initial step size, adapted during warmup (None: 1.0). With
            ``num_warmup=0`` nothing is adapted: every draw uses this step size and a
            unit mass matrix, so it must be given.
        target_accept: target mean acceptance probability during adaptation.
        chain_method: as for `NUTS`.
        init: as for `NUTS`.
        dense_mass: as for `NUTS`.
        progress_bar: show a progress bar.

    Raises:
        ValueError: for a field out of range (an infinite ``step_size`` included), or
            ``num_warmup=0`` without a ``step_size``.
        TypeError: for ``dense_mass`` in a form `NUTS` does not accept.

    Example:
        >>> import probdyn
        >>> probdyn.HMC(num_warmup=200, num_samples=200, num_steps=16).num_steps
        16
    """

    name: ClassVar[str] = "hmc"

    num_warmup: int = 500
    num_samples: int = 500
    num_chains: int = 1
    num_steps: int | None = None
    trajectory_length: float | None = None
    step_size: float | None = None
    target_accept: float = 0.8
    chain_method: str = "sequential"
    init: Any = "median"
    dense_mass: bool | tuple[tuple[str, ...], ...] = False
    progress_bar: bool = True

    def _validate(self) -> None:
        cls = type(self).__name__
        _check_mcmc(self)
        if self.num_steps is not None:
            _check_positive_int(cls, "num_steps", self.num_steps)
        if self.trajectory_length is not None:
            _check_positive_number(cls, "trajectory_length", self.trajectory_length)
        if self.step_size is not None:
            _check_positive_number(cls, "step_size", self.step_size)
        elif self.num_warmup == 0:
            raise ValueError(
                f"{cls}(num_warmup=0) without step_size: the step size is adapted during "
                "warmup only, so with none every draw would use step size 1.0 whatever "
                "the model's scale. Give num_warmup >= 100, or the step size to use, "
                "e.g. HMC(num_warmup=0, step_size=0.1)."
            )


@dataclasses.dataclass(frozen=True)
class VI(AbstractEngine):
    """Stochastic variational inference with an automatic guide.

    The ELBO is maximised with Adam; the learning rate decays exponentially to
    ``final_learning_rate_fraction * learning_rate`` over the run, which removes most
    of the optimiser's end-of-run noise from the fitted guide. After fitting,
    ``num_draws`` draws are taken from the guide; the posterior layout is
    ``(1, num_draws, *event)``. Deterministic parameters (``param`` sites, such as
    the non-Bayesian layers of a partial BNN) are fitted too and kept on the
    posterior.

    Args:
        guide: ``"normal"`` (mean-field), ``"lowrank"`` (low-rank multivariate
            normal) or ``"flow"`` (inverse autoregressive flow); or a guide function
            of your own with the model's signature (e.g. an amortised encoder), which
            must sample every latent site of the model. Its ``param`` sites are fitted
            with the model's and kept in ``Posterior.params``; ``rank`` and ``init``
            do not apply to it.
        num_steps: optimisation steps.
        learning_rate: Adam's initial learning rate. Too large a rate makes the loss
            non-finite: a run whose loss is NaN or inf at its last step raises a
            ``FloatingPointError`` naming the step where it became so (earlier
            non-finite steps alone are skipped on NumPyro and only recorded).
        num_particles: Monte-Carlo samples per ELBO estimate.
        num_draws: draws from the fitted guide.
        rank: rank of the ``"lowrank"`` guide (None: the PPL's default).
        final_learning_rate_fraction: learning rate at the end, as a fraction of the
            initial one (1.0 turns the decay off).
        init: ``"median"``, ``"sample"`` or ``"map"`` (a MAP estimate found by
            Adam first): where the guide's location starts. Pyro's flow guide
            ignores it (it starts at a standard normal in unconstrained space).
        progress_bar: show a progress bar (with the current loss).
        checkpoint: a file to save the fit's state in (None: none), and to resume from
            when it exists: the optimiser state, the step count, the loss trace and the
            random state, so that a resumed fit gives the same result, bit for bit, as an
            uninterrupted one with the same key. The file must belong to the same fit
            (backend, model code, custom guide code, the settings of the object whose
            method the model or guide is, data, key and every setting but
            ``num_steps``, ``num_draws``, ``progress_bar`` and these two); another is refused with a
            ``ValueError`` that names what differs. Giving a finished run a larger
            ``num_steps`` continues it; the learning rate then follows the schedule of
            the new ``num_steps`` from the saved step on, ``learning_rate *
            final_learning_rate_fraction ** (step / num_steps)`` (it rises at the
            resumed step and decays to the same final fraction again: a warm restart).
            Written atomically (never half a file), without pickle.
        checkpoint_every: write the checkpoint after the step (on NumPyro: the compiled
            block of steps) that reaches each multiple of this many steps, at the end of
            the run, and on Ctrl-C (``KeyboardInterrupt``; on Pyro after the step under
            way).

    Example:
        >>> import probdyn
        >>> probdyn.VI(guide="lowrank", num_steps=2000).guide
        'lowrank'
        >>> probdyn.VI(checkpoint="run.ckpt", checkpoint_every=500).checkpoint
        'run.ckpt'
    """

    name: ClassVar[str] = "vi"

    guide: str | Callable[..., Any] = "normal"
    num_steps: int = 5000
    learning_rate: float = 0.01
    num_particles: int = 1
    num_draws: int = 1000
    rank: int | None = None
    final_learning_rate_fraction: float = 0.1
    init: str = "median"
    progress_bar: bool = True
    checkpoint: str | None = None
    checkpoint_every: int = 1000

    def _validate(self) -> None:
        cls = type(self).__name__
        path: Any = self.checkpoint
        if hasattr(path, "__fspath__"):  # a pathlib.Path: stored as a str
            object.__setattr__(self, "checkpoint", path.__fspath__())
        if self.checkpoint is not None and not isinstance(self.checkpoint, str):
            raise ValueError(
                f"{cls}(checkpoint={self.checkpoint!r}): give a file path (str or "
                "os.PathLike) or None."
            )
        if self.checkpoint is not None and not self.checkpoint.strip():
            raise ValueError(
                f"{cls}(checkpoint={self.checkpoint!r}): give a file name, e.g. "
                "checkpoint='fit.ckpt', or None for no checkpoint."
            )
        _check_positive_int(cls, "checkpoint_every", self.checkpoint_every)
        if callable(self.guide):
            if self.init != "median":
                raise ValueError(
                    f"{cls}(init={self.init!r}) with a custom guide: init applies to the "
                    "automatic guides only; a custom guide initialises its own params."
                )
        else:
            _check_choice(cls, "guide", self.guide, _GUIDES)
        _check_positive_int(cls, "num_steps", self.num_steps)
        _check_positive_int(cls, "num_particles", self.num_particles)
        _check_positive_int(cls, "num_draws", self.num_draws)
        if self.rank is not None:
            _check_positive_int(cls, "rank", self.rank)
        _check_positive_number(cls, "learning_rate", self.learning_rate)
        frac = self.final_learning_rate_fraction
        if not isinstance(frac, (int, float)) or not 0 < frac <= 1:
            raise ValueError(f"{cls}(final_learning_rate_fraction={frac!r}): must be in (0, 1].")
        _check_choice(cls, "init", self.init, _INIT_STRATEGIES)


@dataclasses.dataclass(frozen=True)
class Ensemble(AbstractEngine):
    """A deep ensemble: ``num_members`` MAP fits of the same model, one per random start.

    Every member maximises the model's log joint density (log prior + log
    likelihood) with the same optimiser, from its own initialisation: the prior
    median in the unconstrained space of each latent site, plus ``init_scale``
    times standard normal noise. ``param`` sites are fitted per member as well,
    starting at their initial value plus the same noise.
    All members run in one program: vectorised (``vmap``) and compiled once on
    JAX, batched with ``torch.func`` on PyTorch.

    Layout rule: the members are the draws of one chain, ``(1, num_members,
    *event)``, as for VI; per-member ``param`` values are stored the same way in
    ``samples`` (they differ between members, so they are draws, not fixed
    parameters). ``traces["loss"]`` is ``(num_members, num_steps)``: each
    member's negative log joint per step.

    With ``anchored=True`` the ensemble is a randomised-MAP ("anchored")
    ensemble: member ``k`` draws ``theta_k`` from the prior and replaces each
    latent site's prior ``p(z)`` by the prior shifted to be centred on that draw,
    ``p(z - theta_k + m)`` (``m`` the prior median, in unconstrained space), and
    jitters every observation by one draw of the observation noise. For a model
    with Gaussian priors and a Gaussian likelihood of known scale that is linear
    in the latents, each member is then an exact posterior draw; elsewhere it is
    an approximation (Pearce et al., 2020).

    Args:
        num_members: ensemble size (the draws of the posterior).
        num_steps: optimisation steps per member.
        learning_rate: initial learning rate; it decays exponentially to
            ``final_learning_rate_fraction`` of itself over the run. If every member
            ends at a non-finite loss the run raises a ``FloatingPointError``; if some
            do, it warns and keeps them.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        init_scale: standard deviation of the random initialisation around the
            prior median, in unconstrained space (0: every member starts at the
            median, which only makes sense with ``anchored=True``).
        anchored: randomised-MAP members (see above).
        final_learning_rate_fraction: learning rate at the end, as a fraction of
            the initial one (1.0 turns the decay off).
        members_per_batch: how many members the NumPyro backend steps at once:
            ``None`` picks it from the size of one member's gradient computation (on
            a CPU the most whose temporaries fit in about 4 MiB; with a GPU or
            several devices all of them), a number fixes it. Speed only: the members
            are the same up to floating-point rounding. The Pyro backend steps all
            members at once.
        progress_bar: show a progress bar.

    Example:
        >>> import probdyn
        >>> probdyn.Ensemble(num_members=10, num_steps=2000).num_members
        10
    """

    name: ClassVar[str] = "ensemble"

    num_members: int = 10
    num_steps: int = 2000
    learning_rate: float = 0.01
    optimizer: str = "adam"
    init_scale: float = 1.0
    anchored: bool = False
    final_learning_rate_fraction: float = 0.1
    members_per_batch: int | None = None
    progress_bar: bool = True

    def _validate(self) -> None:
        cls = type(self).__name__
        _check_positive_int(cls, "num_members", self.num_members)
        _check_positive_int(cls, "num_steps", self.num_steps)
        _check_positive_number(cls, "learning_rate", self.learning_rate)
        _check_choice(cls, "optimizer", self.optimizer, _OPTIMIZERS)
        if self.members_per_batch is not None:
            _check_positive_int(cls, "members_per_batch", self.members_per_batch)
        scale = self.init_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
            raise ValueError(f"{cls}(init_scale={scale!r}): must be a non-negative number.")
        if not isinstance(self.anchored, bool):
            raise ValueError(f"{cls}(anchored={self.anchored!r}): must be True or False.")
        frac = self.final_learning_rate_fraction
        if not isinstance(frac, (int, float)) or not 0 < frac <= 1:
            raise ValueError(f"{cls}(final_learning_rate_fraction={frac!r}): must be in (0, 1].")


@dataclasses.dataclass(frozen=True)
class SMC(AbstractEngine):
    """Sequential Monte Carlo: likelihood tempering, or data streaming (Feynman–Kac).

    ``stream="tempered"`` (default): particles start as prior draws and move through the
    tempered targets ``p(theta) p(y | theta)**beta`` from ``beta = 0`` to ``1``. At each
    stage the next ``beta`` is chosen by bisection so that the incremental weights keep
    an effective sample size of ``target_ess * num_particles``
    (``temperatures="adaptive"``), or taken from a given increasing sequence ending at
    1; then the particles are reweighted, resampled, and moved by up to
    ``num_mcmc_steps`` steps of an MCMC ``kernel`` that leaves the tempered target
    invariant, preconditioned by the particles' covariance (``preconditioner``), whose
    step size is adapted from the acceptance rate of the previous stage. With
    ``adaptive_moves`` a stage stops moving once the particles' mean squared distance
    from where the stage started levels off (they have forgotten their resampled
    starting points); the prior draws at temperature 0 are not moved. A last stage at
    temperature 1 resamples and moves the particles, so the draws are unweighted. The
    product of the mean incremental weights estimates the model evidence ``log p(y)``
    (``Posterior.log_evidence``); the schedule is ``traces["temperature"]``.

    ``stream="minibatch"`` is the open-horizon Feynman–Kac SMC of Zhao et al.
    (AISTATS 2024) for partial Bayesian neural networks: the data arrive in
    batches of ``batch_size`` (the time steps), particles track the posterior of
    the latent (stochastic) sites, and the model's ``param`` sites (the
    deterministic layers) are learned by Adam with the particle-weighted gradient
    of the log marginal likelihood.

    Layout rule: the particles are the draws of one chain, ``(1, num_particles,
    *event)``; ``sample_stats["log_weight"]`` holds their normalised log weights
    (uniform after the final resampling, in which case the draws are an
    unweighted sample).

    Args:
        num_particles: number of particles (the draws of the posterior).
        kernel: move kernel: ``"hmc"``, ``"mala"`` or ``"rw"`` (Gaussian random walk).
        num_mcmc_steps: kernel steps per stage (at most, with ``adaptive_moves``,
            except the last stage, see ``adaptive_moves``).
        target_ess: ESS fraction kept at each stage, in (0, 1).
        temperatures: ``"adaptive"`` or an increasing sequence of tempering
            exponents in (0, 1] ending at 1.
        num_leapfrog_steps: leapfrog steps per ``"hmc"`` move.
        stream: ``"tempered"`` or ``"minibatch"`` (Feynman–Kac, see above).
        batch_size: observations per time step (``stream="minibatch"`` only).
        num_epochs: passes over the data (``stream="minibatch"`` only).
        learning_rate: Adam learning rate for ``param`` sites
            (``stream="minibatch"`` only).
        jitter: standard deviation of the Gaussian random walk that moves every
            particle at every step, in unconstrained space (``stream="minibatch"``
            only; Zhao et al. use 0.1, sized for neural-network weights: on a
            model whose posterior is narrower it visibly widens the cloud).
        particles_per_batch: how many particles the NumPyro backend moves at once
            (``stream="tempered"``): ``None`` picks it from the size of one particle's
            gradient computation (on a CPU the most whose temporaries fit in about
            4 MiB, a cache-sized batch; with a GPU or several devices all of them), a
            number fixes it. Speed only: the draws are the same up to floating-point
            rounding. For a model with a loop (an adaptive ODE solve) the automatic
            batch holds at least 128 particles. The Pyro backend moves all particles
            at once.
        adaptive_moves: stop a stage's moves early once the particles have
            decorrelated from their starting points (the mean squared jump from the
            stage's start, in units of the particles' variance, grows by less than
            10 % over a move; at least 2 moves), and move the last stage's particles
            (the returned draws, at temperature 1) until every coordinate's
            correlation with their start is at most 0.1, up to 10 x
            ``num_mcmc_steps`` moves; ``False`` makes exactly
            ``num_mcmc_steps`` moves per stage (``stream="tempered"`` only;
            ``traces["num_moves"]`` records them).
        preconditioner: the metric of the moves (``stream="tempered"`` only): the
            weighted covariance of the particles before resampling, ``"dense"``
            (its Cholesky factor, shrunk towards the diagonal) or ``"diagonal"``
            (per-coordinate variances); ``"auto"`` is dense up to 100 dimensions
            with at least 10 particles per dimension. Dense moves cross a
            posterior with strongly correlated parameters (an ODE's rate
            constants) in a few steps where diagonal ones crawl; see
            `probdyn.engines.smc_preconditioner`.
        progress_bar: show a progress bar.

    Example:
        >>> import probdyn
        >>> probdyn.SMC(num_particles=500, kernel="mala").kernel
        'mala'
    """

    name: ClassVar[str] = "smc"

    num_particles: int = 1000
    kernel: str = "hmc"
    num_mcmc_steps: int = 10
    target_ess: float = 0.5
    temperatures: Any = "adaptive"
    num_leapfrog_steps: int = 5
    stream: str = "tempered"
    batch_size: int | None = None
    num_epochs: int = 1
    learning_rate: float = 0.01
    jitter: float = 0.1
    particles_per_batch: int | None = None
    progress_bar: bool = True
    adaptive_moves: bool = True
    preconditioner: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.temperatures, str):
            try:
                temps = tuple(float(t) for t in self.temperatures)
            except TypeError:
                temps = None  # reported by _validate
            if temps is not None:
                object.__setattr__(self, "temperatures", temps)
        super().__post_init__()

    def _validate(self) -> None:
        cls = type(self).__name__
        _check_positive_int(cls, "num_particles", self.num_particles)
        if self.num_particles < 2:
            raise ValueError(
                f"{cls}(num_particles={self.num_particles!r}): SMC needs at least 2 particles "
                "(it reweights and resamples them, and preconditions its moves by their "
                "variance); use hundreds, e.g. num_particles=1000."
            )
        _check_choice(cls, "kernel", self.kernel, _SMC_KERNELS)
        _check_positive_int(cls, "num_mcmc_steps", self.num_mcmc_steps)
        _check_probability(cls, "target_ess", self.target_ess)
        _check_positive_int(cls, "num_leapfrog_steps", self.num_leapfrog_steps)
        _check_choice(cls, "stream", self.stream, _SMC_STREAMS)
        _check_choice(cls, "preconditioner", self.preconditioner, _SMC_PRECONDITIONERS)
        _check_positive_int(cls, "num_epochs", self.num_epochs)
        _check_positive_number(cls, "learning_rate", self.learning_rate)
        _check_positive_number(cls, "jitter", self.jitter)
        if self.batch_size is not None:
            _check_positive_int(cls, "batch_size", self.batch_size)
        if self.particles_per_batch is not None:
            _check_positive_int(cls, "particles_per_batch", self.particles_per_batch)
        if self.stream == "minibatch" and self.batch_size is None:
            raise ValueError(f"{cls}(stream='minibatch'): give batch_size as well.")
        temps = self.temperatures
        if isinstance(temps, str):
            _check_choice(cls, "temperatures", temps, ("adaptive",))
            return
        if not isinstance(temps, tuple) or not temps:
            raise ValueError(
                f"{cls}(temperatures={temps!r}): give 'adaptive' or a non-empty sequence of "
                "numbers."
            )
        increasing = all(b > a for a, b in zip(temps, temps[1:]))
        if not (increasing and temps[0] > 0 and temps[-1] == 1.0):
            raise ValueError(
                f"{cls}(temperatures={temps!r}): the sequence must increase strictly, start "
                "above 0 and end at 1.0."
            )


@dataclasses.dataclass(frozen=True)
class MCLMC(AbstractEngine):
    """Microcanonical Langevin Monte Carlo (BlackJAX's sampler and tuner; NumPyro backend).

    MCLMC moves a particle at constant speed through the unconstrained latent space
    along the isokinetic dynamics whose stationary law is the posterior, partially
    refreshing its direction every step (the momentum decoherence length ``L``);
    it has no Metropolis test, so the step size sets a small asymptotic bias,
    controlled through the energy error (Robnik et al., JMLR 2023; Robnik,
    Cohn-Gordon and Seljak, 2024). Each chain tunes its own step size and ``L`` with BlackJAX's
    ``mclmc_find_L_and_step_size``, then takes ``num_samples * thinning`` steps and
    keeps every ``thinning``-th. All chains run as one program, vectorised with
    ``jax.vmap``. A step costs two gradient evaluations (the McLachlan integrator).

    The defaults follow the MILE recipe (Sommer et al., "Microcanonical Langevin
    Ensembles", ICLR 2025; their code, github.com/EmanuelSommer/MILE,
    ``experiments/replicate_uci/mclmc.yaml`` and ``src/training/warmup.py``): 50000
    tuning steps, split 80 / 10 / 10 % between the step-size phase, the step-size
    phase that also measures the posterior's scale, and the ``L`` phase from the
    chain's autocorrelation; 1000 draws per chain kept from 10000 steps
    (``thinning=10``); no diagonal preconditioning; 100 effective samples in the
    step-size average. MILE also decays the desired energy variance from 0.5 to 0.1
    during tuning; BlackJAX's tuner holds it fixed, and
    the default here is BlackJAX's 5e-4, whose bias is within the Monte-Carlo
    error of 1000 draws on the reference posteriors of `probdyn.testing` (0.1, MILE's
    final value, takes larger steps, with a bias that MILE found harmless for a
    network's predictions: give ``desired_energy_variance=0.1`` for that).
    ``init="ensemble"`` with one chain per member (MILE used 12) is the recipe for
    neural networks (see `NUTS` on ensemble-started chains).

    Args:
        num_warmup: tuning steps per chain (at least 20: every phase needs steps).
            The last phase keeps its ``num_warmup / 10`` positions to measure their
            autocorrelation: ``num_warmup / 10 * dim`` floats per chain in memory.
        num_samples: draws kept per chain.
        num_chains: number of chains; the ``chain`` dimension of the posterior.
        thinning: steps per kept draw.
        desired_energy_variance: the energy error variance per dimension the step
            size is tuned to; smaller is less biased and slower.
        diagonal_preconditioning: tune a diagonal inverse mass matrix from the
            posterior variances measured during tuning (helps when the latent
            scales differ widely; costs ``num_warmup / 30`` more steps).
        init: as for `NUTS`: ``"median"``, ``"sample"``, ``"map"``, ``"ensemble"``
            or an `Ensemble` config, or a ``Posterior``.
        progress_bar: show a progress bar.

    Raises:
        ValueError: for a field out of range.

    Example:
        >>> import probdyn
        >>> probdyn.MCLMC(num_warmup=2000, num_samples=500, num_chains=4).thinning
        10
    """

    name: ClassVar[str] = "mclmc"

    num_warmup: int = 50000
    num_samples: int = 1000
    num_chains: int = 1
    thinning: int = 10
    desired_energy_variance: float = 5e-4
    diagonal_preconditioning: bool = False
    init: Any = "median"
    progress_bar: bool = True

    def _validate(self) -> None:
        cls = type(self).__name__
        _check_positive_int(cls, "num_warmup", self.num_warmup)
        if self.num_warmup < 20:
            raise ValueError(
                f"{cls}(num_warmup={self.num_warmup!r}): the tuner splits its steps 80 / 10 / "
                "10 % between its phases, and each needs steps; give num_warmup >= 20, and "
                "thousands in practice (MILE used 50000 on neural networks)."
            )
        _check_positive_int(cls, "num_samples", self.num_samples)
        _check_positive_int(cls, "num_chains", self.num_chains)
        _check_positive_int(cls, "thinning", self.thinning)
        _check_positive_number(cls, "desired_energy_variance", self.desired_energy_variance)
        if not isinstance(self.diagonal_preconditioning, bool):
            raise ValueError(
                f"{cls}(diagonal_preconditioning={self.diagonal_preconditioning!r}): must be "
                "True or False."
            )
        _check_init(cls, self.init)


ENGINE_TYPES: dict[str, type[AbstractEngine]] = {
    "NUTS": NUTS,
    "HMC": HMC,
    "VI": VI,
    "Ensemble": Ensemble,
    "SMC": SMC,
    "MCLMC": MCLMC,
}
