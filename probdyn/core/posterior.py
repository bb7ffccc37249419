"""The one result type every engine returns.

Layout rule (the posterior contract):

* every latent site is a NumPy array shaped ``(chain, draw, *event)``;
* MCMC: ``chain`` = chains, ``draw`` = kept draws;
* VI: one chain of ``num_draws`` draws from the fitted guide;
* later engines (ensembles, SMC) follow the same rule and document their axis.

The arrays are plain NumPy, so the core never needs the backend that produced
them. Predicting needs the model again: a freshly fitted posterior carries it, a
loaded one gets it from ``probdyn.load(path, model=...)`` or ``with_model``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from probdyn.core.backends import get_backend
from probdyn.core.locking import argument_labels, model_call, model_lock
from probdyn.engines.checks import explained

__all__ = ["Posterior", "check_inputs"]


def check_inputs(backend: str, labelled: list[tuple[str, Any]]) -> None:
    """The backend's check of a model's (labelled) arguments, e.g. no torch tensor for
    a NumPyro model; a backend without the ``check_inputs`` service checks nothing."""
    try:
        check = get_backend(backend).service("check_inputs")
    except NotImplementedError:
        return
    check(labelled)


@dataclasses.dataclass(eq=False)
class Posterior:
    """Draws, diagnostics and metadata of a fitted model, in one layout for every engine.

    Attributes:
        samples: site name -> array ``(chain, draw, *event)``; latent and
            deterministic sites.
        sample_stats: per-draw engine statistics ``(chain, draw)`` with ArviZ names
            (``diverging``, ``acceptance_rate``, ``tree_depth``, ``n_steps``,
            ``energy``, ``lp``, ``step_size``).
        posterior_predictive: observed site -> replicated data ``(chain, draw, *obs)``.
        log_likelihood: observed site -> pointwise log likelihood ``(chain, draw, *obs)``.
        observed_data: observed site -> the observed values.
        params: deterministic parameters (``param`` sites) at their fitted values.
        traces: engine-level curves, e.g. ``"elbo"`` for VI (one value per step).
        attrs: metadata: ``engine`` (the config as a dict), ``backend``, ``seed``,
            ``versions``, ``wall_time``, ``compile_time``, ``num_failed_solves``.

    Example:
        >>> import numpy as np, probdyn
        >>> post = probdyn.Posterior(samples={"mu": np.zeros((2, 100))})
        >>> post.num_chains, post.num_draws
        (2, 100)
    """

    samples: dict[str, np.ndarray]
    sample_stats: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    posterior_predictive: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    log_likelihood: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    observed_data: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    params: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    traces: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: Callable[..., Any] | None = dataclasses.field(default=None, repr=False)
    model_args: tuple[Any, ...] = dataclasses.field(default=(), repr=False)
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.samples:
            if self.params:  # an amortised fit: fitted params, no global draws
                return
            raise ValueError(
                "Posterior(samples={}): a posterior needs at least one site (or, for an "
                "amortised fit, its fitted params)."
            )
        shapes = {name: np.shape(v)[:2] for name, v in self.samples.items()}
        first = next(iter(shapes.values()))
        for name, shape in shapes.items():
            if len(shape) < 2 or shape != first:
                raise ValueError(
                    f"Posterior(samples): site {name!r} has leading shape {shape}, but every "
                    f"site must be shaped (chain, draw, *event) with (chain, draw) = {first}."
                )

    # -- layout -----------------------------------------------------------------
    @property
    def num_chains(self) -> int:
        """Size of the ``chain`` dimension (0 for an amortised posterior)."""
        if not self.samples:
            return 0
        return int(np.shape(next(iter(self.samples.values())))[0])

    @property
    def num_draws(self) -> int:
        """Size of the ``draw`` dimension (0 for an amortised posterior)."""
        if not self.samples:
            return 0
        return int(np.shape(next(iter(self.samples.values())))[1])

    @property
    def amortized(self) -> bool:
        """True for a model trained across a `probdyn.data.TaskStream` (e.g. a neural
        process): it holds fitted params and no draws; `predict` with ``context=``
        conditions it on a new task."""
        return bool(self.attrs.get("amortized", False))

    @property
    def log_evidence(self) -> float | None:
        """The engine's estimate of the log marginal likelihood ``log p(y)``.

        SMC estimates it (``attrs["log_evidence"]``); engines that do not give
        None.
        """
        value = self.attrs.get("log_evidence")
        return None if value is None else float(value)

    @property
    def backend(self) -> str:
        """The backend that produced the draws (``"numpyro"`` or ``"pyro"``)."""
        return str(self.attrs.get("backend", "numpyro"))

    def __repr__(self) -> str:
        engine = self.attrs.get("engine", {}).get("engine", "?")
        if self.amortized:
            stream = self.attrs.get("stream", {}).get("description", "?")
            return (
                f"Posterior(engine={engine}, backend={self.backend}, amortized over "
                f"{stream}, params={len(self.params)})"
            )
        sites = ", ".join(f"{k}{tuple(np.shape(v)[2:])}" for k, v in self.samples.items())
        return (
            f"Posterior(engine={engine}, backend={self.backend}, chains={self.num_chains}, "
            f"draws={self.num_draws}, sites=[{sites}])"
        )

    # -- prediction -------------------------------------------------------------
    def with_model(self, model: Callable[..., Any]) -> Posterior:
        """Return this posterior with ``model`` attached, so that `predict` works.

        Use it after `probdyn.load`, which cannot restore Python code from a file.
        """
        return dataclasses.replace(self, model=model)

    def predict(
        self,
        *args: Any,
        key: Any = 0,
        sites: list[str] | None = None,
        context: tuple[Any, Any] | None = None,
        num_draws: int | None = None,
        **kwargs: Any,
    ) -> dict[str, np.ndarray]:
        """Run the model forward for every draw on new inputs.

        Observed sites are re-sampled (the values passed for them are ignored), so
        passing the same arguments as at fit time gives the posterior predictive.

        An amortised posterior (a neural process trained on a
        `probdyn.data.TaskStream`) has no draws to run: ``num_draws`` forward runs of
        the model are made instead, each sampling the model's local latents (e.g. a
        latent NP's ``z ~ p(z | context)``) and observations afresh. Give the new task
        as ``predict(x_target, context=(x_context, y_context))``: 1-D arrays or
        ``(n, dim)`` arrays for one task, ``(batch, n, dim)`` for a batch.

        Args:
            *args: the model's positional arguments (e.g. new times, new x); with
                ``context``: the target inputs ``x_target``.
            key: an int seed or a backend key.
            sites: names of the sites to return; default: every sample and
                deterministic site that is not a latent site of the posterior.
            context: ``(x_context, y_context)`` of a new task (amortised posteriors).
            num_draws: number of forward runs of an amortised posterior (default: the
                engine's ``num_draws``).
            **kwargs: the model's keyword arguments (for an amortised posterior, added
                to the options it was fitted with).

        Returns:
            site name -> array ``(chain, draw, *shape)``; with ``context`` for one task,
            e.g. ``"y"``, ``"mean"`` and ``"sd"`` shaped ``(1, num_draws, n_target)``
            for 1-D ``y_context``.

        Raises:
            RuntimeError: if no model is attached (e.g. after `probdyn.load`).
            ValueError: ``context`` or ``num_draws`` on a posterior that is not
                amortised, or a malformed ``context``; the model fails on an input
                shaped unlike at fit past its first dimension (``x`` of shape ``(5,)``
                for a model fitted with ``(10, 1)``) or holding NaN or inf (the
                message names it: ``predict(x=...)``).
            TypeError: an argument is another backend's array (a torch tensor for a
                NumPyro model, a JAX array for a Pyro model).

        Example:
            >>> pred = post.predict(t_new, key=1, sites=["y"])  # doctest: +SKIP
            >>> pred["y"].shape  # (chain, draw, len(t_new), 2)  # doctest: +SKIP
            >>> pred = np_post.predict(x_new, context=(x_c, y_c), num_draws=200)  # doctest: +SKIP
            >>> pred["y"].shape  # (1, 200, len(x_new))  # doctest: +SKIP
        """
        self._require_model()
        args, kwargs, n, squeeze = self._amortized_call(args, kwargs, context, num_draws)
        # Each backend's ``predict`` service has the same signature
        # ``predict(post, args, kwargs, *, key, sites, num_draws)``.
        predict = get_backend(self.backend).service("predict")
        with self._checked("predict", args, kwargs):
            out = predict(self, args, kwargs, key=key, sites=sites, num_draws=n)
        return squeeze(out)

    def log_likelihood_at(
        self,
        *args: Any,
        key: Any = 0,
        context: tuple[Any, Any] | None = None,
        num_draws: int | None = None,
        **kwargs: Any,
    ) -> dict[str, np.ndarray]:
        """Pointwise log likelihood of new observations under every draw.

        Pass the model's arguments with the held-out observations in the observed
        site's argument (e.g. ``post.log_likelihood_at(t_test, y_test)``). The
        result feeds `probdyn.calibration.nlpd` for an exact negative log
        predictive density (log-mean-exp over draws). For an amortised posterior,
        ``post.log_likelihood_at(x_target, y_target, context=(x_c, y_c))`` scores the
        targets of a new task under ``num_draws`` runs (see `predict`).

        Args:
            *args: the model's positional arguments, observations included; with
                ``context``: ``(x_target, y_target)``.
            key: an int seed or a backend key (for any sampling inside the model).
            context: ``(x_context, y_context)`` of a new task (amortised posteriors).
            num_draws: number of runs of an amortised posterior.
            **kwargs: the model's keyword arguments.

        Returns:
            observed site name -> array ``(chain, draw, *obs)`` (event dimensions
            summed, masked entries 0).

        Raises:
            RuntimeError: if no model is attached (e.g. after `probdyn.load`).
            ValueError: if the held-out observations would be broadcast against the
                model's distribution for them (``y[:1]`` where the model predicts 10
                values), or as for `predict`.
            TypeError: as for `predict`.

        Example:
            >>> ll = post.log_likelihood_at(x_test, y_test)  # doctest: +SKIP
            >>> ll["y"].shape  # (chain, draw, len(y_test))  # doctest: +SKIP
        """
        args, kwargs, n, squeeze = self._amortized_call(args, kwargs, context, num_draws)
        with self._checked("log_likelihood_at", args, kwargs):
            _, loglik, _ = self._forward_draws(args, kwargs, key, num_draws=n)
        if not loglik:
            raise ValueError(
                "log_likelihood_at: the model has no observed sites for these arguments; "
                "pass the held-out observations in the observed site's argument."
            )
        return squeeze(loglik)

    def _require_model(self) -> None:
        if self.model is None:
            raise RuntimeError(
                "This Posterior has no model attached (it was probably loaded from a file). "
                "Call posterior.with_model(model) or probdyn.load(path, model=model) first."
            )

    @contextlib.contextmanager
    def _checked(self, verb: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[None]:
        """Run a model call as entry point ``verb``: arguments of another backend's
        array type refused, and a failure explained by an argument named (`explained`)."""
        self._require_model()
        assert self.model is not None
        with model_call(verb, self.model, args, kwargs) as labelled:
            check_inputs(self.backend, labelled)
            fitted = argument_labels(self.model, self.model_args, self.model_kwargs)
            with explained(labelled, fitted):
                yield

    def _amortized_call(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        context: tuple[Any, Any] | None,
        num_draws: int | None,
    ) -> tuple[tuple[Any, ...], dict[str, Any], int | None, Callable[[dict], dict]]:
        """The model call, number of runs and output reshaping for `predict` and
        `log_likelihood_at` (the identity for a posterior with draws)."""
        if not self.amortized:
            if context is not None or num_draws is not None:
                raise ValueError(
                    "context= and num_draws= apply to amortised posteriors (a model fitted on "
                    "a probdyn.data.TaskStream); this posterior has draws: pass the model's "
                    "arguments."
                )
            return args, kwargs, None, lambda out: out
        n = int(self.attrs.get("engine", {}).get("num_draws", 1000))
        if num_draws is not None:
            if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
                raise ValueError(f"num_draws={num_draws!r}: must be a positive int.")
            n = num_draws
        # The network options it was trained with (kept in attrs, so a loaded posterior
        # rebuilds the same network).
        options = self.attrs.get("stream", {}).get("options", {})
        kwargs = {**options, **self.model_kwargs, **kwargs}
        if context is None:
            return args, kwargs, n, lambda out: out
        from probdyn.data._tasks import context_call

        fields = self.attrs.get("stream", {}).get("fields", [])
        task_kwargs, squeeze = context_call(args, context, fields)
        return (), {**kwargs, **task_kwargs}, n, squeeze

    def _forward_draws(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: Any,
        num_draws: int | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Deterministic sites, pointwise log likelihood and replicated observations
        per draw, from one run of the model per draw (the backend's forward pass);
        ``num_draws`` runs for an amortised posterior."""
        self._require_model()
        forward_draws = get_backend(self.backend).service("forward_draws")
        latent = set(self.attrs.get("latent_sites", self.samples))
        out: tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]
        with model_lock:  # also for probdyn.compare, which calls this directly
            out = forward_draws(
                self.model,
                args,
                kwargs,
                self.samples,
                self.params,
                key,
                latent=latent,
                num_draws=num_draws,
            )
        return out

    # -- summaries and conversion ------------------------------------------------
    def summary(self, *, max_elements: int | None = 10, **kwargs: Any) -> Any:
        """ArviZ summary with one row per site for large sites.

        Sites with at most ``max_elements`` elements get one row per element, as in
        ``az.summary``. Larger sites (a BNN's weight matrices) get one row, named
        ``"site (n elements, worst)"``, that aggregates over elements: the mean and sd
        columns are averages of the per-element values, ``ess_bulk``/``ess_tail`` are
        minima and ``r_hat`` is the maximum, so the row shows the worst-mixing element.
        MCMC rows with ``r_hat > 1.05`` or a small ESS are marked in a ``flag`` column
        and a UserWarning names them; one chain gets split R-hat, and engines with
        independent draws (VI, Ensemble, SMC) no R-hat. Printing the table shows
        every column and notes on how to read it (`probdyn.core.summary`).

        Args:
            max_elements: sites larger than this are aggregated. ``None`` disables
                aggregation.
            **kwargs: passed to ``arviz.summary`` (e.g. ``hdi_prob``).

        Returns:
            A ``pandas.DataFrame`` with one row per element (small sites) or per site
            (large sites).
        """
        from probdyn.core.summary import summarize

        return summarize(self, max_elements=max_elements, **kwargs)

    def to_arviz(self):  # type: ignore[no-untyped-def]
        """Convert to ``arviz.InferenceData`` (groups posterior, sample_stats,
        posterior_predictive, log_likelihood, observed_data)."""
        from probdyn.core.arviz import to_inference_data

        return to_inference_data(self)

    def save(self, path: str) -> None:
        """Write the posterior to a netCDF file (no pickle). Load with `probdyn.load`.

        The file is written beside ``path`` and renamed onto it, so an existing file
        is replaced only by a complete one: if writing fails, it is left as it was.
        Site and param names HDF5 cannot hold (with a ``/``) are stored escaped and
        read back as they were.

        Raises:
            FileNotFoundError: if the directory of ``path`` does not exist.
            IsADirectoryError: if ``path`` is a directory.
        """
        from probdyn.core.io import save

        save(self, path)

    def draws(self, flatten: bool = False) -> Mapping[str, np.ndarray]:
        """The latent draws, optionally flattened to ``(chain * draw, *event)``."""
        if not flatten:
            return dict(self.samples)
        return {k: np.reshape(v, (-1, *np.shape(v)[2:])) for k, v in self.samples.items()}
