"""Schedules and the SGD update on literal numbers (PyTorch SGD semantics)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from card_jax import optim


def test_cosine_schedule_endpoints_and_midpoint():
    s = optim.make_schedule("cosine", 0.1, total_steps=100, steps_per_epoch=10)
    np.testing.assert_allclose([s(0), s(50), s(100)], [0.1, 0.05, 0.0], atol=1e-7)


def test_step_schedule_milestones_in_epochs():
    s = optim.make_schedule("step", 0.1, 1000, steps_per_epoch=10, milestones=(2, 5), gamma=0.1)
    np.testing.assert_allclose([s(19), s(20), s(49), s(50)], [0.1, 0.01, 0.01, 0.001], rtol=1e-6)


def test_warmup_then_cosine():
    s = optim.make_schedule("cosine", 0.2, 110, steps_per_epoch=10, warmup_epochs=1)
    np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, 0.1, 0.2], atol=1e-7)


def test_sgd_matches_pytorch_update_rule():
    # PyTorch: g' = g + wd*w ; buf = m*buf + g' ; w -= lr*buf
    tx = optim.make_optimizer("sgd", optax.constant_schedule(0.1), momentum=0.9,
                              weight_decay=0.01)
    w = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.5, 0.5])}
    state = tx.init(w)
    buf = np.zeros(2)
    w_ref = np.array([1.0, -2.0])
    for _ in range(3):
        updates, state = tx.update(g, state, w)
        w = optax.apply_updates(w, updates)
        buf = 0.9 * buf + (0.5 + 0.01 * w_ref)
        w_ref = w_ref - 0.1 * buf
    np.testing.assert_allclose(w["w"], w_ref, rtol=1e-6)


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="schedule"):
        optim.make_schedule("linear", 0.1, 10, 1)
    with pytest.raises(ValueError, match="optim.name"):
        optim.make_optimizer("rmsprop", optax.constant_schedule(0.1))
