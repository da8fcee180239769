"""Batching and augmentation: pure functions of (key, step) with literal checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from card_jax.data import pipeline


def test_batches_of_an_epoch_are_disjoint_and_cover_the_data():
    key = pipeline.order_key(0, jnp.int32(3))
    batches = [np.asarray(pipeline.batch_indices(key, jnp.int32(s), 10, 3)) for s in range(3)]
    seen = np.concatenate(batches)
    assert len(set(seen.tolist())) == 9  # 3 full batches; the 10th example is dropped this epoch
    assert all(0 <= i < 10 for i in seen)
    next_epoch = np.asarray(pipeline.batch_indices(key, jnp.int32(3), 10, 3))
    again = np.asarray(pipeline.batch_indices(key, jnp.int32(3), 10, 3))
    np.testing.assert_array_equal(next_epoch, again)  # pure function of (key, step)


def test_order_depends_on_data_seed_and_realization():
    a = pipeline.batch_indices(pipeline.order_key(0, jnp.int32(0)), jnp.int32(0), 1000, 8)
    b = pipeline.batch_indices(pipeline.order_key(0, jnp.int32(1)), jnp.int32(0), 1000, 8)
    c = pipeline.batch_indices(pipeline.order_key(1, jnp.int32(0)), jnp.int32(0), 1000, 8)
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def test_a_precomputed_epoch_order_gives_the_same_batches():
    key = pipeline.order_key(0, jnp.int32(2))
    order_1 = (jnp.int32(1), pipeline.epoch_order(key, jnp.int32(1), 10))
    for step in range(9):  # epochs 0, 1 and 2 of 3 steps each
        plain = pipeline.batch_indices(key, jnp.int32(step), 10, 3)
        # The order of epoch 1 is used in epoch 1 and ignored (recomputed) in the others.
        with_order = jax.jit(pipeline.batch_indices, static_argnums=(2, 3))(
            key, jnp.int32(step), 10, 3, order_1)
        np.testing.assert_array_equal(with_order, plain)
    # It really is read: a wrong order tagged as epoch 1 changes epoch 1's batches only.
    fake = (jnp.int32(1), jnp.arange(10)[::-1])
    np.testing.assert_array_equal(pipeline.batch_indices(key, jnp.int32(3), 10, 3, fake),
                                  [9, 8, 7])
    np.testing.assert_array_equal(pipeline.batch_indices(key, jnp.int32(0), 10, 3, fake),
                                  pipeline.batch_indices(key, jnp.int32(0), 10, 3))


def test_to_float_scale():
    x = jnp.array([[[[0], [255]]]], dtype=jnp.uint8)
    np.testing.assert_allclose(pipeline.to_float(x), [[[[0.0], [1.0]]]])


def test_crop_and_flip_literal():
    image = jnp.arange(6, dtype=jnp.float32).reshape(1, 2, 3, 1)  # rows [0 1 2], [3 4 5]
    key = jax.random.key(0)
    same = pipeline.random_crop_flip(key, image, padding=0, flip=False)
    np.testing.assert_array_equal(same, image)
    outs = {tuple(np.asarray(pipeline.random_crop_flip(jax.random.key(s), image, 0, True)).ravel())
            for s in range(20)}
    assert outs == {(0, 1, 2, 3, 4, 5), (2, 1, 0, 5, 4, 3)}  # identity or mirrored columns


def test_crop_with_padding_shifts_content_and_fills_zeros():
    image = jnp.ones((64, 4, 4, 1))
    out = np.asarray(pipeline.random_crop_flip(jax.random.key(1), image, padding=1, flip=False))
    assert out.shape == image.shape
    sums = out.reshape(64, -1).sum(1)
    assert set(np.unique(sums)) <= {16.0, 12.0, 9.0}  # no shift, one-axis shift, both axes
    assert len(np.unique(sums)) == 3
