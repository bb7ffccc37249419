"""Bad input at the engines: int keys, engine configs that cannot work, diverging
optimisers and NumPy integers (issue 17, cases 4 and 5), on both backends.

* An int ``key`` must be in ``[0, 2**64)`` on both backends (`probdyn.engines.keys`); a
  seed below ``2**32`` is the same JAX key as ever, a larger one a key of its own.
* A config that cannot give a usable run is refused when it is built: an infinite step
  size, NUTS without warmup, HMC without warmup or step size, SMC with one particle, a
  ``dense_mass`` in a form the PPLs do not take.
* An optimisation whose loss ends NaN or inf raises a ``FloatingPointError`` naming
  ``learning_rate``, on both backends (`probdyn.engines.losses`).
* A NumPy integer is an integer wherever probdyn takes one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from engine_backends import BACKENDS, models, use_backend

import probdyn
from probdyn.engines.losses import check_final_loss

pytestmark = pytest.mark.usefixtures("torch_float64_one_thread")

Y = np.random.default_rng(0).normal(1.0, 1.0, size=20)  # for the ``in_plate`` model
QUICK = probdyn.Ensemble(num_members=2, num_steps=1, progress_bar=False)  # the fastest fit


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return use_backend(request, request.param)


# -- case 4: int keys ------------------------------------------------------------------------


@pytest.mark.parametrize("key", [-1, 2**64, np.int64(-3)])
def test_int_key_out_of_range_is_refused(backend: str, key: int) -> None:
    with pytest.raises(ValueError, match=r"key=.*must be in \[0, 2\*\*64\)"):
        probdyn.fit(models(backend).in_plate, Y, engine=QUICK, key=key)


def test_bool_key_is_refused(backend: str) -> None:
    with pytest.raises(TypeError, match="key=True"):
        probdyn.fit(models(backend).in_plate, Y, engine=QUICK, key=True)


def test_large_keys_are_their_own_streams(backend: str) -> None:
    """``2**32`` is not seed 0 again, seeds up to ``2**64 - 1`` run, a NumPy integer is
    the int it holds, and ``attrs["seed"]`` records the int given (fit and predict)."""
    fit = lambda key: probdyn.fit(models(backend).in_plate, Y, engine=QUICK, key=key)
    zero, big = fit(0), fit(np.uint64(2**32))
    assert not np.array_equal(zero.samples["mu"], big.samples["mu"])
    assert big.attrs["seed"] == 2**32 and type(big.attrs["seed"]) is int
    top = zero.predict(Y, key=2**64 - 1)["y"]
    np.testing.assert_array_equal(zero.predict(Y, key=np.uint64(2**64 - 1))["y"], top)
    assert not np.array_equal(top, zero.predict(Y, key=2**32 - 1)["y"])
    with pytest.raises(ValueError, match=r"key=-1: an int key must be in \[0, 2\*\*64\)"):
        zero.predict(Y, key=-1)


def test_jax_keys_below_2_32_are_unchanged() -> None:
    """Every existing result stays bit-identical: a seed below ``2**32`` is
    ``PRNGKey(seed)``; a larger one is ``[hi, lo]`` (``PRNGKey`` under 64-bit JAX)."""
    jax = pytest.importorskip("jax")
    from probdyn.numpyro.bridge import as_key, seed_record

    for seed in (0, 1, 2**31, 2**32 - 1):
        np.testing.assert_array_equal(as_key(seed), jax.random.PRNGKey(seed))
    np.testing.assert_array_equal(as_key(2**32 + 7), [1, 7])
    np.testing.assert_array_equal(as_key(2**64 - 1), [2**32 - 1, 2**32 - 1])
    assert seed_record(np.uint64(2**63)) == 2**63


def test_torch_seeds_use_all_64_bits() -> None:
    """torch's CPU generator keeps 32 bits of its seed: a seed below ``2**32`` is used
    as it is, a larger one is hashed, so ``2**32`` does not repeat seed 0."""
    torch = pytest.importorskip("torch")
    from probdyn.pyro.bridge import torch_seed

    assert [torch_seed(s) for s in (0, 7, 2**32 - 1)] == [0, 7, 2**32 - 1]
    assert torch_seed(2**32) not in (0, 2**32) and torch_seed(2**32) < 2**32
    draw = lambda s: torch.randn(3, generator=torch.Generator().manual_seed(torch_seed(s)))
    assert not torch.equal(draw(2**32), draw(0))
    assert not torch.equal(draw(2**64 - 1), draw(2**32 - 1))


# -- case 5: engine configs that cannot work -------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: probdyn.HMC(step_size=math.inf), ValueError, r"HMC\(step_size=inf\)"),
        (lambda: probdyn.HMC(step_size=math.nan), ValueError, r"HMC\(step_size=nan\)"),
        (lambda: probdyn.HMC(trajectory_length=math.inf), ValueError, "trajectory_length=inf"),
        (lambda: probdyn.NUTS(num_warmup=0), ValueError, r"NUTS\(num_warmup=0\).*>= 100"),
        (lambda: probdyn.HMC(num_warmup=0), ValueError, r"HMC\(num_warmup=0\).*step_size"),
        (lambda: probdyn.SMC(num_particles=1), ValueError, r"SMC\(num_particles=1\).*at least 2"),
        (lambda: probdyn.NUTS(dense_mass="yes"), TypeError, r"NUTS\(dense_mass='yes'\).*tuples"),
        (lambda: probdyn.HMC(dense_mass=["a"]), TypeError, r"HMC\(dense_mass=\['a'\]\)"),
        (lambda: probdyn.NUTS(dense_mass=[("a",), ("a",)]), ValueError, "more than one block"),
        (lambda: probdyn.VI(learning_rate=math.inf), ValueError, r"VI\(learning_rate=inf\)"),
        (lambda: probdyn.Ensemble(learning_rate=math.inf), ValueError, "learning_rate=inf"),
        (lambda: probdyn.NUTS(num_chains=True), ValueError, r"NUTS\(num_chains=True\)"),
        (lambda: probdyn.NUTS(num_chains=2.0), ValueError, r"NUTS\(num_chains=2.0\)"),
    ],
)
def test_configs_that_cannot_work_are_refused(make, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_hmc_without_warmup_uses_the_given_step_size(backend: str) -> None:
    engine = probdyn.HMC(0, 5, step_size=0.25, num_steps=4, progress_bar=False)
    post = probdyn.fit(models(backend).in_plate, Y, engine=engine, key=0)
    np.testing.assert_array_equal(post.sample_stats["step_size"], 0.25)


def test_dense_mass_blocks_name_latent_sites(backend: str) -> None:
    engine = probdyn.NUTS(5, 5, dense_mass=[("mu", "sigma")], progress_bar=False)
    with pytest.raises(ValueError, match=r"dense_mass=.*\['sigma'\] is not a latent site"):
        probdyn.fit(models(backend).in_plate, Y, engine=engine, key=0)


@pytest.mark.parametrize(
    "engine",
    [
        probdyn.VI(learning_rate=1e30, num_steps=20, num_draws=4, progress_bar=False),
        probdyn.VI(learning_rate=1e30, num_steps=20, guide="lowrank", progress_bar=False),
        probdyn.Ensemble(num_members=3, num_steps=20, learning_rate=1e30, progress_bar=False),
        probdyn.SMC(8, stream="minibatch", batch_size=5, learning_rate=1e200, progress_bar=False),
    ],
    ids=["vi-normal", "vi-lowrank", "ensemble", "smc-minibatch"],
)
def test_diverging_optimiser_raises(backend: str, engine: probdyn.AbstractEngine) -> None:
    """A positive latent site (its log jumps by ~1e30: exp gives 0 or inf) makes the
    loss non-finite even in float64; so does the param ``loc`` at 1e200 (squared)."""
    setting = rf"{type(engine).__name__}\(learning_rate={engine.learning_rate!r}\)"
    with pytest.raises(FloatingPointError, match=setting.replace("+", r"\+") + ".*diverged"):
        probdyn.fit(models(backend).scale_and_loc, Y, engine=engine, key=0)


def test_final_loss_rule() -> None:
    """Non-finite steps that the run recovers from are not an error (they are skipped);
    a loss that ends non-finite is, from the step where it became so for good."""
    check_final_loss([1.0, math.nan, math.inf, 0.5], "VI(learning_rate=0.1)", "lower it")
    check_final_loss([[1.0, math.nan], [1.0, 0.5]], "Ensemble(learning_rate=0.1)", "lower it")
    with pytest.raises(FloatingPointError, match="became NaN at step 4 of 5"):
        check_final_loss([1.0, math.nan, 2.0, math.nan, math.nan], "VI(learning_rate=0.1)", "")
    with pytest.raises(
        FloatingPointError, match=r"all 2 members became infinite \(the first at step 1 of 2\)"
    ):
        check_final_loss([[1.0, math.inf], [math.inf, math.inf]], "Ensemble(...)", "lower it")


# -- case 5: NumPy integers ------------------------------------------------------------------


def test_numpy_integers_are_integers() -> None:
    engine = probdyn.Ensemble(num_members=np.int64(10), num_steps=np.array(5))
    assert (engine.num_members, engine.num_steps) == (10, 5)
    assert type(engine.num_members) is int and engine.to_dict()["num_members"] == 10
    assert probdyn.NUTS(num_chains=np.uint8(2)).num_chains == 2
    assert probdyn.SMC(num_particles=np.int32(4), temperatures=np.array([0.5, 1.0])).temperatures


def test_numpy_layer_sizes(backend: str) -> None:
    mlp = pytest.importorskip(f"probdyn.{backend}").BayesianMLP
    seed = {"numpyro": "numpyro.handlers", "pyro": "pyro.poutine"}[backend]
    with pytest.importorskip(seed).seed(rng_seed=0):
        net = mlp("f", np.array([1, 4, 1]), bayesian_layers=[np.int64(-1)])
    assert net is not None
    with pytest.raises(ValueError, match=r"BayesianMLP\(sizes=\[1, True, 1\]\)"):
        mlp("f", [1, True, 1])


@pytest.mark.parametrize(
    "make",
    [
        lambda k: probdyn.data.synthetic_predator_prey(seed=k),
        lambda k: probdyn.data.spirals(num_series=2, key=k),
        lambda k: probdyn.data.ou_dataset(key=k),
        lambda k: probdyn.data.gp_tasks(num_tasks=2, key=k),
    ],
    ids=["predator_prey", "spirals", "ou", "gp_tasks"],
)
def test_data_set_seeds_follow_the_key_rule(make: Any) -> None:
    """The data generators take the same int keys as fit: [0, 2**64), NumPy integers
    included; negative, too large or bool seeds are refused naming the argument."""
    a, b = make(np.uint64(2**63)), make(2**63)
    first = lambda d: np.asarray(next(v for v in vars(d).values() if isinstance(v, np.ndarray)))
    np.testing.assert_array_equal(first(a), first(b))
    for bad, error in [(-1, ValueError), (2**64, ValueError), (True, TypeError)]:
        with pytest.raises(error, match=r"(seed|key)=.*(\[0, 2\*\*64\)|not a seed)"):
            make(bad)
