"""Bad data and models at `probdyn.fit` and `Posterior` (issue 17, cases 2, 3, 8 and 10),
on both backends.

* Observations that would be broadcast against the model's distribution for them (a
  ``(10, 1)`` column against a ``(10,)`` mean: 100 likelihood terms, not 10) are refused
  at ``fit`` and at ``log_likelihood_at``, naming the site, the argument and both shapes.
* A model that uses both NumPyro and Pyro is refused, with or without ``backend=``.
* NaN in a model input, a prediction input shaped unlike at fit, another backend's array
  type and a distribution class given as a prior each get an error naming the argument or
  site; following the NaN-observation hint (mask and fill) fits.
* Two fits in two threads both succeed, with the draws each gives alone.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from engine_backends import BACKENDS, use_backend

import probdyn

pytestmark = pytest.mark.usefixtures("torch_float64_one_thread")

X = np.linspace(-1.0, 1.0, 10)
Y = 2.0 * X + 0.1 * np.random.default_rng(0).normal(size=10)
QUICK = probdyn.Ensemble(num_members=2, num_steps=1, progress_bar=False)  # the fastest fit


# -- the models, in each PPL ----------------------------------------------------------------
def _np_line(x: Any, y: Any = None) -> None:
    w = numpyro.sample("w", dist.Normal(0.0, 5.0))
    numpyro.sample("y", dist.Normal(w * x, 0.1), obs=y)


def _np_offset(x: Any, y: Any = None) -> None:
    w = numpyro.sample("w", dist.Normal(0.0, 5.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(w * x + b, 0.1), obs=y)


def _np_design(x: Any, y: Any = None) -> None:
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
    numpyro.sample("y", dist.Normal(x @ w, 0.1), obs=y)


def _np_masked(x: Any, y: Any, mask: Any) -> None:
    w = numpyro.sample("w", dist.Normal(0.0, 5.0))
    with numpyro.handlers.mask(mask=mask):
        numpyro.sample("y", dist.Normal(w * x, 0.1), obs=y)


def _np_class_prior(x: Any, y: Any = None) -> None:
    w = numpyro.sample("w", dist.Normal)  # type: ignore[arg-type]
    numpyro.sample("y", dist.Normal(w * x, 0.1), obs=y)


def _np_plates(x: Any, y: Any = None) -> None:
    """Legitimate shapes: a plate, an event dimension, a scalar distribution (y3)."""
    w = numpyro.sample("w", dist.Normal(0.0, 5.0))
    with numpyro.plate("data", len(x)):
        numpyro.sample("y", dist.Normal(w * x, 0.1), obs=y)
    numpyro.sample("y2", dist.Normal(w * x, 0.1).to_event(1), obs=y)
    numpyro.sample("y3", dist.Normal(w, 5.0), obs=y)


def _pyro_models() -> SimpleNamespace:
    import pyro
    import pyro.distributions as pdist
    import torch

    def line(x: Any, y: Any = None) -> None:
        w = pyro.sample("w", pdist.Normal(0.0, 5.0))
        pyro.sample("y", pdist.Normal(w * x, 0.1), obs=y)

    def offset(x: Any, y: Any = None) -> None:
        w = pyro.sample("w", pdist.Normal(0.0, 5.0))
        b = pyro.sample("b", pdist.Normal(0.0, 1.0))
        pyro.sample("y", pdist.Normal(w * x + b, 0.1), obs=y)

    def design(x: Any, y: Any = None) -> None:
        w = pyro.sample("w", pdist.Normal(0.0, 1.0).expand([1]).to_event(1))
        pyro.sample("y", pdist.Normal(x @ w, 0.1), obs=y)

    def masked(x: Any, y: Any, mask: Any) -> None:
        w = pyro.sample("w", pdist.Normal(0.0, 5.0))
        with pyro.poutine.mask(mask=mask):
            pyro.sample("y", pdist.Normal(w * x, 0.1), obs=y)

    def class_prior(x: Any, y: Any = None) -> None:
        w = pyro.sample("w", pdist.Normal)  # type: ignore[arg-type]
        pyro.sample("y", pdist.Normal(w * x, 0.1), obs=y)

    def plates(x: Any, y: Any = None) -> None:
        w = pyro.sample("w", pdist.Normal(0.0, 5.0))
        with pyro.plate("data", len(x)):
            pyro.sample("y", pdist.Normal(w * x, 0.1), obs=y)
        pyro.sample("y2", pdist.Normal(w * x, 0.1).to_event(1), obs=y)
        # (a scalar distribution for a vector outside a plate, NumPyro's "y3", Pyro's
        # VI refuses itself: "invalid log_prob shape")

    return SimpleNamespace(
        line=line,
        offset=offset,
        design=design,
        masked=masked,
        class_prior=class_prior,
        plates=plates,
        foreign=jnp.asarray,
        foreign_name="JAX array",
        as_mask=torch.as_tensor,
        scalar_for_vector=False,
    )


def _numpyro_models() -> SimpleNamespace:
    torch = pytest.importorskip("torch")
    return SimpleNamespace(
        line=_np_line,
        offset=_np_offset,
        design=_np_design,
        masked=_np_masked,
        class_prior=_np_class_prior,
        plates=_np_plates,
        foreign=torch.as_tensor,
        foreign_name="torch.Tensor",
        as_mask=lambda m: m,
        scalar_for_vector=True,
    )


@pytest.fixture(params=BACKENDS)
def m(request: pytest.FixtureRequest) -> SimpleNamespace:
    backend = use_backend(request, request.param)
    return _numpyro_models() if backend == "numpyro" else _pyro_models()


# -- case 2: observations broadcast against the prediction ----------------------------------
@pytest.mark.parametrize(
    "x, y, shapes",
    [
        (X, Y[:, None], r"'y' has shape \(10, 1\) but .* has shape \(10,\)"),
        (X[:, None], Y, r"'y' has shape \(10,\) but .* has shape \(10, 1\)"),
    ],
    ids=["y-column", "x-column"],
)
def test_broadcast_observations_are_refused(
    m: SimpleNamespace, x: np.ndarray, y: np.ndarray, shapes: str
) -> None:
    with pytest.raises(ValueError, match=rf"fit\(y=\.\.\.\): observed site {shapes}.*\(10, 10\)"):
        probdyn.fit(m.line, x, y, engine=QUICK, key=0)


def test_log_likelihood_at_refuses_broadcast_observations(m: SimpleNamespace) -> None:
    post = probdyn.fit(m.line, X, Y, engine=QUICK, key=0)
    assert post.log_likelihood_at(X, Y)["y"].shape[2:] == (10,)
    with pytest.raises(ValueError, match=r"log_likelihood_at\(y=\.\.\.\): .*shape \(1,\)"):
        post.log_likelihood_at(X, Y[:1])


def test_plates_events_and_scalar_distributions_still_fit(m: SimpleNamespace) -> None:
    post = probdyn.fit(m.plates, X, Y, engine=QUICK, key=0)
    shapes = {k: v.shape[2:] for k, v in post.log_likelihood.items()}
    assert shapes == {"y": (10,), "y2": (), **({"y3": (10,)} if m.scalar_for_vector else {})}


# -- case 3: one model, two PPLs ------------------------------------------------------------
def test_a_model_using_both_ppls_is_refused() -> None:
    pytest.importorskip("pyro")
    import pyro
    import pyro.distributions as pdist

    def mixed(x: Any, y: Any = None) -> None:
        w = numpyro.sample("w", dist.Normal(0.0, 5.0))
        b = pyro.sample("b", pdist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(w * x + float(b), 0.1), obs=y)

    for backend in (None, "numpyro", "pyro"):
        with pytest.raises(ValueError, match=r"fit\(model='mixed'\): .*both NumPyro and Pyro"):
            probdyn.fit(mixed, X, Y, engine=QUICK, backend=backend)
    with pytest.raises(ValueError, match=r"fit\(backend='pyro'\): .*refers to numpyro"):
        probdyn.fit(_np_line, X, Y, engine=QUICK, backend="pyro")


def test_a_name_imported_in_the_model_body_is_not_read_as_a_global() -> None:
    """``from pyro.distributions import Normal`` inside a Pyro model, in a module whose
    global ``Normal`` is NumPyro's: the model uses one PPL and is not refused."""
    pytest.importorskip("pyro")
    from probdyn.core.fit import detect_backend

    module_globals: dict[str, Any] = {"Normal": dist.Normal}
    exec(
        "def model():\n"
        "    import pyro\n"
        "    from pyro.distributions import Normal\n"
        "    pyro.sample('a', Normal(0.0, 1.0))\n",
        module_globals,
    )
    assert detect_backend(module_globals["model"]) == "pyro"


# -- case 10: errors that name the argument -------------------------------------------------
def test_nan_in_a_model_input_names_it(m: SimpleNamespace) -> None:
    x = X.copy()
    x[3] = np.nan
    msg = r"(?s)fit\(x=\.\.\.\): x has 1 NaN/inf value\(s\) \(first at \(3,\)\).*finite inputs"
    with pytest.raises(ValueError, match=msg):
        probdyn.fit(m.line, x, Y, engine=QUICK, key=0)
    with pytest.raises(ValueError, match=msg):
        probdyn.fit(m.line, x=x, y=Y, engine=QUICK, key=0)


def test_a_prediction_input_of_the_wrong_shape_names_it(m: SimpleNamespace) -> None:
    post = probdyn.fit(m.design, X[:, None], Y, engine=QUICK, key=0)
    assert post.predict(X[:5, None])["y"].shape[2:] == (5,)
    with pytest.raises(ValueError, match=r"predict\(x=\.\.\.\): x has shape \(5,\), .*\(10, 1\)"):
        post.predict(X[:5])


def test_another_backends_array_names_it(m: SimpleNamespace) -> None:
    with pytest.raises(TypeError, match=rf"fit\(x=\.\.\.\): a {m.foreign_name} .*np.asarray\(x\)"):
        probdyn.fit(m.line, m.foreign(X), Y, engine=QUICK, key=0)
    post = probdyn.fit(m.line, X, Y, engine=QUICK, key=0)
    with pytest.raises(TypeError, match=rf"predict\(x=\.\.\.\): a {m.foreign_name}"):
        post.predict(m.foreign(X))


def test_a_distribution_class_as_prior_names_the_site(m: SimpleNamespace) -> None:
    with pytest.raises(TypeError, match=r"sample site 'w' was given the class Normal"):
        probdyn.fit(m.class_prior, X, Y, engine=QUICK, key=0)


def test_following_the_nan_observation_hint_fits(m: SimpleNamespace) -> None:
    y = Y.copy()
    y[2] = np.nan
    hint = r"mask = np\.isfinite\(y\); y = np\.where\(mask, y, 0\.0\)"
    with pytest.raises(ValueError, match=rf"fit\(y=\.\.\.\): observed site 'y'.*NaN.*{hint}"):
        probdyn.fit(m.line, X, y, engine=QUICK, key=0)
    mask = np.isfinite(y)  # the hint, step by step
    with pytest.raises(ValueError, match=r"the site is masked: .*finite"):
        probdyn.fit(m.masked, X, y, m.as_mask(mask), engine=QUICK, key=0)
    y = np.where(mask, y, 0.0)
    post = probdyn.fit(m.masked, X, y, m.as_mask(mask), engine=QUICK, key=0)
    assert np.all(post.log_likelihood["y"][..., 2] == 0.0)  # the masked entry


# -- case 8: threads --------------------------------------------------------------------------
def test_two_threads_fit_as_each_does_alone(m: SimpleNamespace) -> None:
    engine = probdyn.Ensemble(num_members=2, num_steps=20, progress_bar=False)
    models = [m.line, m.offset]
    alone = [probdyn.fit(model, X, Y, engine=engine, key=3) for model in models]
    together: list[Any] = [None, None]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            together[i] = probdyn.fit(models[i], X, Y, engine=engine, key=3)
        except BaseException as err:  # reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for a, b in zip(alone, together):
        assert set(a.samples) == set(b.samples)
        for name in a.samples:
            np.testing.assert_array_equal(a.samples[name], b.samples[name])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "cls, method",
    [("LatentODE", "predict"), ("LatentSDE", "predict"), ("LatentSDE", "sample_prior")],
)
def test_latent_entry_points_wait_for_the_model_lock(backend: str, cls: str, method: str) -> None:
    """The latent models' own entry points run the model outside fit/Posterior: each
    waits while another thread holds the lock, and runs once it is released."""
    import importlib

    from probdyn.core.locking import model_lock

    fn = getattr(getattr(importlib.import_module(f"probdyn.{backend}"), cls), method)
    held, release, entered = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        with model_lock:
            held.set()
            release.wait(10)

    def call() -> None:
        entered.set()
        try:
            fn(None)  # past the lock, the body fails on the missing instance
        except Exception:
            pass

    holder, caller = threading.Thread(target=hold), threading.Thread(target=call)
    holder.start()
    held.wait(10)
    caller.start()
    entered.wait(10)
    caller.join(0.3)
    assert caller.is_alive(), f"{cls}.{method} ran while another thread held the lock"
    release.set()
    caller.join(10)
    holder.join(10)
    assert not caller.is_alive()
