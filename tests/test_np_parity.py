"""Backend parity of the neural processes: the same API, the same sites, and given the same
weights the same predictive (through both backends' amortised posteriors) and the same masked
training loss and gradient (float64); both backends' TaskStream runners draw the same batches
for the same int key and minimise the same per-point loss.

Both backends run the same float64 arithmetic (matrix products, a masked mean pool, an exact
softplus), so they differ only in summation order and library kernels: ~1e-15 relative per
operation, ~1e-13 through these small networks. 1e-10 is far above that and far below any
difference in the maths (a changed mask or pooling changes the outputs at ~1e-2 or more).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
jax = pytest.importorskip("jax")
pytest.importorskip("numpyro")

import jax.numpy as jnp  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as ndist  # noqa: E402
from numpyro import handlers  # noqa: E402
from numpyro.infer.util import log_density  # noqa: E402
from pyro import poutine  # noqa: E402

import probdyn  # noqa: E402
import probdyn.numpyro.primitives.neural_process as jnp_np  # noqa: E402
import probdyn.pyro.primitives.neural_process as torch_np  # noqa: E402
from probdyn.data import TaskStream, gp_task_stream, gp_tasks, stream_rng  # noqa: E402
from probdyn.pyro.bridge import with_params  # noqa: E402

TOL = 1e-10
FIELDS = ("x_context", "y_context", "mask_context", "x_target", "y_target", "mask_target")
NAMES = [
    "ANP",
    "CNP",
    "LNP",
    "AttentiveNP",
    "ConditionalNP",
    "LatentNP",
    "attentive_np_guide",
    "attentive_np_model",
    "conditional_np_model",
    "latent_np_guide",
    "latent_np_model",
]
METHODS = {
    "ANP": ["__call__", "attend", "latent"],
    "CNP": ["__call__"],
    "LNP": ["__call__", "latent"],
}
OPTIONS = {  # small networks with every option away from its default
    "conditional_np_model": {"hidden": 8, "encoder_depth": 2, "decoder_depth": 3},
    "attentive_np_model": {"hidden": 8, "num_heads": 2, "encoder_depth": 2, "decoder_depth": 3},
    "latent_np_model": {"hidden": 8, "latent_dim": 3, "encoder_depth": 2, "decoder_depth": 3},
}
# The attentive NP with its latent path (the full ANP), for the model and its guide.
LATENT_ANP = OPTIONS["attentive_np_model"] | {"latent_dim": 3}


pytestmark = pytest.mark.usefixtures("torch_float64_one_thread")


def _parameters(fn) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_same_names() -> None:
    assert jnp_np.__all__ == torch_np.__all__ == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_same_signatures(name: str) -> None:
    jax_obj, torch_obj = getattr(jnp_np, name), getattr(torch_np, name)
    assert _parameters(torch_obj) == _parameters(jax_obj)
    for method in METHODS.get(name, []):
        assert _parameters(getattr(torch_obj, method)) == _parameters(getattr(jax_obj, method))


def _jax_trace(model: str, tasks, params: dict | None = None, data=None, **options) -> dict:
    kw = {f: jnp.asarray(getattr(tasks, f)) for f in FIELDS}
    fn = getattr(jnp_np, model)
    if params:
        fn = handlers.substitute(fn, {k: jnp.asarray(v) for k, v in params.items()})
    if data:
        fn = handlers.condition(fn, {k: jnp.asarray(v) for k, v in data.items()})
    return handlers.trace(handlers.seed(fn, 0)).get_trace(**kw, **options)


def _torch_trace(model: str, tasks, params: dict | None = None, data=None, **options) -> dict:
    kw = {f: torch.as_tensor(getattr(tasks, f)) for f in FIELDS}
    fn = with_params(getattr(torch_np, model), params or {})
    if data:
        fn = poutine.condition(fn, {k: torch.as_tensor(v) for k, v in data.items()})
    with poutine.seed(rng_seed=0), pyro.get_param_store().scope(), torch.no_grad():
        return poutine.trace(fn).get_trace(**kw, **options).nodes


@pytest.mark.parametrize(
    ("model", "options"),
    [
        *OPTIONS.items(),
        ("latent_np_guide", OPTIONS["latent_np_model"]),
        ("attentive_np_model", LATENT_ANP),
        ("attentive_np_guide", LATENT_ANP),
    ],
    ids=[*OPTIONS, "latent_np_guide", "attentive_np_model-latent", "attentive_np_guide"],
)
def test_same_sites(model: str, options: dict) -> None:
    tasks = gp_tasks(2, key=0)
    options = options | {"min_sd": 0.05}
    jtr, ttr = _jax_trace(model, tasks, **options), _torch_trace(model, tasks, **options)
    kinds = ("param", "sample", "deterministic")
    shapes = lambda tr: {n: tuple(s["value"].shape) for n, s in tr.items() if s["type"] in kinds}
    assert shapes(ttr) == shapes(jtr)
    types = lambda tr, kind: sorted(n for n, s in tr.items() if s["type"] == kind)
    assert types(ttr, "param") == types(jtr, "param")
    observed = lambda tr: sorted(
        n
        for n, s in tr.items()
        if s["type"] == "sample" and s["is_observed"] and not n.startswith(("mean", "sd"))
    )
    assert observed(ttr) == observed(jtr) == ([] if model.endswith("guide") else ["y"])
    latent = lambda tr: sorted(
        n for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]
    )
    assert latent(ttr) == latent(jtr) == (["z"] if "latent_dim" in options else [])


def _weights(model: str, tasks, seed: int, **options) -> dict[str, np.ndarray]:
    # Random weights of the network's shapes at a Glorot-like scale with non-zero biases, so
    # every path of the network (and the sd head beyond its floor) is exercised.
    rng = np.random.default_rng(seed)
    out = {}
    for name, site in _jax_trace(model, tasks, **options).items():
        if site["type"] == "param":
            shape = site["value"].shape
            scale = 1.0 / np.sqrt(shape[0]) if len(shape) == 2 else 0.3
            out[name] = scale * rng.normal(size=shape)
    return out


_BACKENDS = {"numpyro": jnp_np, "pyro": torch_np}
_FITTED = {  # the network options each amortised posterior is fitted with
    "conditional_np_model": {"hidden": 16, "min_sd": 0.05},
    "attentive_np_model": {"hidden": 16, "min_sd": 0.05, "num_heads": 4},
}


@functools.cache
def _amortised(backend: str, model: str) -> probdyn.Posterior:
    """A posterior of ``model`` fitted for two steps on a TaskStream by ``backend``.

    To save a NumPyro compilation (several seconds), NumPyro's attentive posterior is the Pyro
    fit with NumPyro's model attached: an amortised posterior is only params and attributes,
    so it predicts on either backend (test_fitted_params_move_between_backends fits both).
    """
    fn = getattr(_BACKENDS[backend], model)
    if backend == "numpyro" and model == "attentive_np_model":
        post = _amortised("pyro", model)
        return dataclasses.replace(post, model=fn, attrs={**post.attrs, "backend": backend})
    engine = probdyn.VI(num_steps=2, progress_bar=False)
    return probdyn.fit(fn, gp_task_stream(4), engine=engine, key=0, **_FITTED[model])


@pytest.mark.parametrize(
    ("model", "activation"),
    [
        ("conditional_np_model", "relu"),
        ("conditional_np_model", "tanh"),
        ("conditional_np_model", "gelu"),
        ("attentive_np_model", "relu"),
        ("attentive_np_model", "tanh"),
    ],
)
def test_same_weights_same_predictive(model: str, activation: str) -> None:
    # Both backends' amortised posteriors, holding the same weights, predict the same mean and
    # sd on a batch of tasks (the activation, a network option, is given to predict).
    tasks = gp_tasks(5, key=3)
    weights = _weights(model, tasks, 1, **_FITTED[model], activation=activation)
    kw = {f: getattr(tasks, f) for f in FIELDS}
    out = {}
    for backend in _BACKENDS:
        post = dataclasses.replace(_amortised(backend, model), params=weights)
        assert post.amortized and post.backend == backend
        pred = post.predict(**kw, num_draws=1, sites=["mean", "sd"], activation=activation)
        out[backend] = pred["mean"][0, 0, ..., 0], pred["sd"][0, 0, ..., 0]
    (jmean, jsd), (tmean, tsd) = out["numpyro"], out["pyro"]
    assert tmean.shape == jmean.shape == (5, 50)
    np.testing.assert_allclose(tmean, jmean, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(tsd, jsd, rtol=TOL, atol=TOL)
    # The weights matter: the sd head is not stuck at its floor and the mean varies.
    assert jsd.max() > 0.1 and jmean.std() > 1e-2


def test_fitted_params_move_between_backends() -> None:
    # The params NumPyro fitted, copied into the Pyro posterior (and the other way round):
    # the same predictive mean and sd for a new task given as a context.
    model = "conditional_np_model"
    jpost, tpost = _amortised("numpyro", model), _amortised("pyro", model)
    assert sorted(jpost.params) == sorted(tpost.params)
    for name, value in jpost.params.items():
        assert np.shape(value) == np.shape(tpost.params[name])
    rng = np.random.default_rng(4)
    x_c, x_t = rng.uniform(-2, 2, 7), np.linspace(-2, 2, 11)
    context = (x_c, np.sin(2 * x_c))
    pred = lambda post: post.predict(x_t, context=context, num_draws=1, sites=["mean", "sd"])
    # np.array: NumPyro's params are read-only views of JAX arrays, which torch.as_tensor warns
    # about (pytest makes that warning an error).
    for fitted in (jpost.params, tpost.params):
        params = {k: np.array(v) for k, v in fitted.items()}
        a = pred(dataclasses.replace(jpost, params=params))
        b = pred(dataclasses.replace(tpost, params=params))
        assert a["mean"].shape == b["mean"].shape == (1, 1, 11)
        for site in ("mean", "sd"):
            np.testing.assert_allclose(b[site], a[site], rtol=TOL, atol=TOL)
    # The two fits started from different random weights (each backend draws its own).
    name = next(n for n in jpost.params if n.endswith("weight"))  # biases start at 0
    assert not np.allclose(jpost.params[name], tpost.params[name])


def _assert_same_predictive(jtr: dict, ttr: dict) -> None:
    """The same mean, sd and log density of ``"y"`` in a NumPyro and a Pyro trace."""
    for site in ("mean", "sd"):
        np.testing.assert_allclose(ttr[site]["value"], jtr[site]["value"], rtol=TOL, atol=TOL)
    np.testing.assert_allclose(
        float(ttr["y"]["fn"].log_prob(ttr["y"]["value"]).sum()),
        float(jtr["y"]["fn"].log_prob(jtr["y"]["value"]).sum()),
        rtol=TOL,
    )


def _assert_same_latent(guide: str, tasks, weights: dict, jtr: dict, ttr: dict, **options) -> None:
    """p(z | context) in the models' traces and q(z | targets) in ``guide``: the same on both
    backends; the guide sees the targets, so it differs from the model's prior."""
    jguide = _jax_trace(guide, tasks, weights, **options)
    tguide = _torch_trace(guide, tasks, weights, **options)
    for jt, tt in ((jtr, ttr), (jguide, tguide)):
        jd, td = jt["z"]["fn"].base_dist, tt["z"]["fn"].base_dist
        np.testing.assert_allclose(td.loc, jd.loc, rtol=TOL, atol=TOL)
        np.testing.assert_allclose(td.scale, jd.scale, rtol=TOL, atol=TOL)
    shift = jguide["z"]["fn"].base_dist.loc - jtr["z"]["fn"].base_dist.loc
    assert float(jnp.abs(shift).max()) > 1e-3


@pytest.mark.parametrize("deterministic_path", [True, False])
def test_latent_np_same_weights_same_numbers(deterministic_path: bool) -> None:
    options = {"hidden": 16, "latent_dim": 3, "deterministic_path": deterministic_path}
    tasks = gp_tasks(5, key=4)
    weights = _weights("latent_np_model", tasks, 2, **options)
    z = np.random.default_rng(3).normal(size=(5, 3))
    jtr = _jax_trace("latent_np_model", tasks, weights, {"z": z}, **options)
    ttr = _torch_trace("latent_np_model", tasks, weights, {"z": z}, **options)
    _assert_same_predictive(jtr, ttr)  # the decoder given z
    _assert_same_latent("latent_np_guide", tasks, weights, jtr, ttr, **options)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_attentive_np_with_latent_path_same_weights_same_numbers(activation: str) -> None:
    options = {"hidden": 16, "num_heads": 4, "latent_dim": 3, "activation": activation}
    tasks = gp_tasks(5, key=6)
    weights = _weights("attentive_np_model", tasks, 5, **options)
    z = np.random.default_rng(7).normal(size=(5, 3))
    jtr = _jax_trace("attentive_np_model", tasks, weights, {"z": z}, **options)
    ttr = _torch_trace("attentive_np_model", tasks, weights, {"z": z}, **options)
    _assert_same_predictive(jtr, ttr)  # the decoder given z and the attention to the context
    # The weights and z matter: the sd head is off its floor, and another z moves the mean.
    jsd = np.asarray(jtr["sd"]["value"])
    assert jsd.max() > 0.1 and float(np.std(jtr["mean"]["value"])) > 1e-2
    other = _jax_trace("attentive_np_model", tasks, weights, {"z": z + 1.0}, **options)
    assert float(jnp.abs(other["mean"]["value"] - jtr["mean"]["value"]).max()) > 1e-3
    _assert_same_latent("attentive_np_guide", tasks, weights, jtr, ttr, **options)


def test_same_masked_loss_and_gradient() -> None:
    options = {"hidden": 16}
    tasks = gp_tasks(4, key=5)
    weights = _weights("conditional_np_model", tasks, 2, **options)
    # Junk in every padded slot: both backends must ignore it in the loss and its gradient.
    kw = {f: np.array(getattr(tasks, f)) for f in FIELDS}
    kw["x_context"][~tasks.mask_context] = 7.0
    kw["y_context"][~tasks.mask_context] = -7.0
    kw["y_target"][~tasks.mask_target] = 99.0

    def jax_loss(p):
        data = {k: jnp.asarray(v) for k, v in kw.items()}
        logp, _ = log_density(jnp_np.conditional_np_model, (), {**data, **options}, p)
        return -logp / jnp.sum(data["mask_target"])

    jloss, jgrad = jax.value_and_grad(jax_loss)({k: jnp.asarray(v) for k, v in weights.items()})

    def torch_loss(params, data):
        fn = with_params(torch_np.conditional_np_model, params)
        tr = poutine.trace(fn).get_trace(**data, **options)
        return -tr.log_prob_sum() / data["mask_target"].sum()

    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in weights.items()}
    tloss = torch_loss(tparams, {k: torch.as_tensor(v) for k, v in kw.items()})
    tloss.backward()

    np.testing.assert_allclose(float(tloss.detach()), float(jloss), rtol=TOL)
    for name, p in tparams.items():
        np.testing.assert_allclose(p.grad.numpy(), np.asarray(jgrad[name]), rtol=TOL, atol=TOL)
    # The clean batch gives the same loss, on both backends.
    clean = {f: torch.as_tensor(getattr(tasks, f)) for f in FIELDS}
    with torch.no_grad():
        tclean = torch_loss(tparams, clean)
    np.testing.assert_allclose(float(tclean), float(jloss), rtol=TOL)


# -- the TaskStream runners: the same batches and the same per-point loss ---------------------

_DRAWN: list[np.ndarray] = []  # the y_target of every batch _RECORDED draws, in order


def _record(rng: np.random.Generator):
    tasks = gp_tasks(3, key=rng)
    _DRAWN.append(tasks.y_target)
    return tasks


_RECORDED = TaskStream(_record, description="recorded")  # one stream: NumPyro compiles once


def _torch_mean(x_context, y_context, mask_context, x_target, y_target=None, mask_target=None):
    # y_bi ~ N(w, 1) on the real target slots, w a param: maximum likelihood (no latent site).
    w = pyro.param("w", lambda: torch.tensor(W))
    mask = torch.as_tensor(mask_target)[..., None]
    pyro.sample("y", pyro.distributions.Normal(w, 1.0).mask(mask), obs=y_target)


def _jax_mean(x_context, y_context, mask_context, x_target, y_target=None, mask_target=None):
    w = numpyro.param("w", jnp.asarray(W))
    with handlers.mask(mask=jnp.asarray(mask_target)[..., None]):
        numpyro.sample("y", ndist.Normal(w, 1.0), obs=y_target)


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_same_task_stream_for_an_int_key(seed: int) -> None:
    # Both runners draw their batches from stream_rng(key) for an int key: the first batch sets
    # the params up, then one batch per step. With a learning rate of 1e-12, w stays at its
    # initial value, so each step's loss is the exact -mean log N(y; w, 1) over that batch's
    # real targets: the same on both backends, step by step.
    engine = probdyn.VI(num_steps=3, learning_rate=1e-12, progress_bar=False)
    drawn, losses = {}, {}
    for backend, model in (("numpyro", _jax_mean), ("pyro", _torch_mean)):
        _DRAWN.clear()
        post = probdyn.fit(model, _RECORDED, engine=engine, key=seed, backend=backend)
        drawn[backend], losses[backend] = list(_DRAWN), post.traces["loss"]
    assert len(drawn["numpyro"]) == len(drawn["pyro"]) == 4
    rng = stream_rng(seed)
    for a, b in zip(drawn["numpyro"], drawn["pyro"]):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(b, gp_tasks(3, key=rng).y_target)
    assert not np.array_equal(drawn["pyro"][1], drawn["pyro"][2])  # a fresh batch every step
    exact = []
    for y, mask in ((b, b != 0) for b in drawn["pyro"][1:]):
        # padded slots of gp_tasks are exactly 0; a real y is 0 with probability 0
        exact.append(-np.mean((-0.5 * np.log(2 * np.pi) - 0.5 * (y - W) ** 2)[mask]))
    np.testing.assert_allclose(losses["numpyro"], exact, rtol=TOL)
    np.testing.assert_allclose(losses["pyro"], exact, rtol=TOL)


# -- training with a guide: both backends minimise the same negative ELBO per target point ------

W, A, C, NOISE = 0.3, 0.8, -1.2, 0.5


def _torch_toy(x_context, y_context, mask_context, x_target, y_target=None, mask_target=None):
    # z_b ~ N(0, 1) per task, y_bi ~ N(z_b + w, NOISE^2) on the real target slots.
    w = pyro.param("w", lambda: torch.tensor(W))
    z = pyro.sample("z", pyro.distributions.Normal(torch.zeros(x_target.shape[0], 1), 1.0))
    mean = (z[:, None, :] + w).expand(x_target.shape)
    mask = torch.as_tensor(mask_target)[..., None]
    pyro.sample("y", pyro.distributions.Normal(mean, NOISE).mask(mask), obs=y_target)


def _torch_toy_guide(x_context, y_context, mask_context, x_target, y_target=None, mask_target=None):
    # q(z_b) = N(a * mean of task b's y, exp(c)^2): amortised over the target set.
    a = pyro.param("a", lambda: torch.tensor(A))
    c = pyro.param("c", lambda: torch.tensor(C))
    m = torch.as_tensor(mask_target).to(y_target.dtype)[..., None]
    ybar = (m * y_target).sum(1) / m.sum(1)
    pyro.sample("z", pyro.distributions.Normal(a * ybar, torch.exp(c)))


def _jax_toy(x_context, y_context, mask_context, x_target, y_target=None, mask_target=None):
    w = numpyro.param("w", jnp.asarray(W))
    z = numpyro.sample("z", ndist.Normal(jnp.zeros((x_target.shape[0], 1)), 1.0))
    mean = jnp.broadcast_to(z[:, None, :] + w, x_target.shape)
    with handlers.mask(mask=jnp.asarray(mask_target)[..., None]):
        numpyro.sample("y", ndist.Normal(mean, NOISE), obs=y_target)


def _jax_toy_guide(x_context, y_context, mask_context, x_target, y_target=None, mask_target=None):
    a = numpyro.param("a", jnp.asarray(A))
    c = numpyro.param("c", jnp.asarray(C))
    m = jnp.asarray(mask_target, y_target.dtype)[..., None]
    ybar = (m * y_target).sum(1) / m.sum(1)
    numpyro.sample("z", ndist.Normal(a * ybar, jnp.exp(c)))


def _toy_neg_elbo(tasks) -> float:
    # -ELBO = -sum_b E_q[log p(y_b | z_b)] + sum_b KL(N(m_b, s^2) || N(0, 1)), per target point.
    mask, y = tasks.mask_target, tasks.y_target[..., 0]
    n = mask.sum(1)
    m = A * np.where(mask, y, 0.0).sum(1) / n
    s2 = np.exp(2 * C)
    sq = np.where(mask, (y - W - m[:, None]) ** 2, 0.0).sum(1)
    exp_loglik = -0.5 * n * np.log(2 * np.pi * NOISE**2) - (sq + n * s2) / (2 * NOISE**2)
    kl = 0.5 * (s2 + m**2 - 1.0) - 0.5 * np.log(s2)
    return float((kl - exp_loglik).sum() / mask.sum())


def test_train_with_guide_minimises_the_same_elbo() -> None:
    # With a learning rate of 1e-12 the params stay at their initial values (to ~1e-10), and
    # the stream returns the same batch every step, so every step is an independent one-draw
    # estimate of the same negative ELBO per point (the KL is analytic, the likelihood term a
    # draw of z ~ q): its mean over 200 steps lies within 4 SE (sd / sqrt(200)) of the exact
    # value, on both backends.
    tasks = gp_tasks(4, key=11)
    exact = _toy_neg_elbo(tasks)
    stream = TaskStream(lambda rng: tasks, description="one fixed batch")
    for backend, model, guide in (
        ("numpyro", _jax_toy, _jax_toy_guide),
        ("pyro", _torch_toy, _torch_toy_guide),
    ):
        engine = probdyn.VI(guide=guide, num_steps=200, learning_rate=1e-12, progress_bar=False)
        post = probdyn.fit(model, stream, engine=engine, key=0, backend=backend)
        losses = post.traces["loss"]
        se = losses.std(ddof=1) / np.sqrt(losses.size)
        assert losses.shape == (200,) and se > 0 and abs(losses.mean() - exact) < 4 * se
        # The fitted params are the model's and the guide's, still at their initial values.
        assert sorted(post.params) == ["a", "c", "w"]
        np.testing.assert_allclose([post.params[k] for k in "acw"], [A, C, W], atol=1e-8)
