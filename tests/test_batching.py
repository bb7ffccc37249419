"""Cache-sized batches for SMC particles and ensemble members
(`probdyn.numpyro.engines.batching`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from probdyn.numpyro.engines.batching import (
    CPU_BATCH_BYTES,
    LOOP_MIN_BATCH,
    batch_size,
    has_loop,
    map_batched,
)


def _step(u: jax.Array, state: dict[str, jax.Array], scale: jax.Array) -> tuple[jax.Array, ...]:
    return jnp.sin(u) * scale + state["a"], jnp.sum(u**2)


@pytest.mark.parametrize("size", [1, 3, 4, 7])
def test_map_batched_equals_vmap_with_shared_arguments(size: int) -> None:
    # 7 items in batches of 3 leaves a remainder batch of 1; size 7 is a single batch.
    rng = np.random.default_rng(0)
    u = jnp.asarray(rng.normal(size=(7, 2)))
    state = {"a": jnp.asarray(rng.normal(size=(7, 2)))}
    scale = jnp.asarray(2.5)
    expected = jax.vmap(_step, in_axes=(0, 0, None))(u, state, scale)
    got = map_batched(_step, size, in_axes=(0, 0, None))(u, state, scale)
    for e, g in zip(expected, got, strict=True):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-12)


def test_map_batched_zero_is_one_vmap_and_bad_axes_raise() -> None:
    f = map_batched(_step, 0, in_axes=(0, 0, None))
    u = jnp.ones((3, 2))
    out = f(u, {"a": jnp.zeros((3, 2))}, jnp.asarray(1.0))
    np.testing.assert_allclose(out[0], np.sin(1.0))
    with pytest.raises(ValueError, match="in_axes must be 0 or None"):
        map_batched(_step, 2, in_axes=(1, 0, None))


def test_batch_size_reads_the_temporaries_of_one_item() -> None:
    # A 20 000 x 50 float64 activation is 8 MB, twice CPU_BATCH_BYTES: one item per batch.
    # A scalar computation fits any number of items: one vmap (0).
    x = jnp.linspace(-1.0, 1.0, 20_000)

    def big(w: jax.Array) -> jax.Array:
        return jax.grad(lambda v: jnp.sum(jax.nn.relu(x[:, None] * v[None, :]) ** 2))(w)

    on_cpu = jax.default_backend() == "cpu"  # a GPU takes every item in one vmap
    assert batch_size(big, (jnp.ones(50),), count=256, fixed=None) == (1 if on_cpu else 0)
    assert batch_size(jnp.sin, (jnp.ones(()),), count=256, fixed=None) == 0
    if on_cpu:
        temp = jax.jit(big).lower(jnp.ones(50)).compile().memory_analysis().temp_size_in_bytes
        assert temp > CPU_BATCH_BYTES
    # A fixed size wins; one at least as large as the count means one vmap.
    assert batch_size(big, (jnp.ones(50),), count=256, fixed=16) == 16
    assert batch_size(big, (jnp.ones(50),), count=256, fixed=256) == 0


def test_batch_size_is_the_most_items_that_fit() -> None:
    # Temporaries of t bytes per item: floor(CPU_BATCH_BYTES / t) items per batch.
    def item(w: jax.Array) -> jax.Array:
        return jax.grad(lambda v: jnp.sum(jnp.tanh(jnp.outer(v, v))))(w)

    w = jnp.ones(300)
    if jax.default_backend() != "cpu":  # a GPU takes every item in one vmap
        assert batch_size(item, (w,), count=10_000, fixed=None) == 0
        return
    temp = jax.jit(item).lower(w).compile().memory_analysis().temp_size_in_bytes
    assert 0 < temp < CPU_BATCH_BYTES
    expected = CPU_BATCH_BYTES // temp
    assert batch_size(item, (w,), count=10 * expected, fixed=None) == expected
    assert batch_size(item, (w,), count=expected, fixed=None) == 0


def _loop_with_big_temporaries(w: jax.Array) -> jax.Array:
    """A while loop (as in an adaptive ODE solve) whose iterations sort a 40 000 x 50
    array (8 MB or more of temporaries, at least twice CPU_BATCH_BYTES): the memory
    rule alone would map one item at a time."""
    x = jnp.linspace(-1.0, 1.0, 40_000)

    def body(carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        i, v = carry
        return i + 1, v + 1e-3 * jnp.sort(x[:, None] * v[None, :], axis=0)[-1]

    return jax.lax.while_loop(lambda c: c[0] < 3, body, (jnp.zeros((), jnp.int32), w))[1]


def test_a_model_with_a_loop_is_never_mapped_one_item_at_a_time() -> None:
    # The no-silent-serial rule: an automatic batch for a computation with a loop holds
    # at least LOOP_MIN_BATCH items (all of them when there are fewer); a batch of 1 for
    # it is only ever the user's choice, and then a warning says what it costs.
    w = jnp.ones(50)
    assert has_loop(_loop_with_big_temporaries, (w,))
    assert not has_loop(jnp.sin, (w,))
    on_cpu = jax.default_backend() == "cpu"
    if on_cpu:
        temp = (
            jax.jit(_loop_with_big_temporaries).lower(w).compile().memory_analysis()
        ).temp_size_in_bytes
        assert temp > CPU_BATCH_BYTES  # the memory rule alone says 1
    auto = batch_size(_loop_with_big_temporaries, (w,), count=1000, fixed=None)
    assert auto == (LOOP_MIN_BATCH if on_cpu else 0)
    assert batch_size(_loop_with_big_temporaries, (w,), count=LOOP_MIN_BATCH, fixed=None) == 0
    with pytest.warns(RuntimeWarning, match="one at a time"):
        assert batch_size(_loop_with_big_temporaries, (w,), count=1000, fixed=1) == 1
