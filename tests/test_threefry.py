"""The straight-line threefry PRNG (card_jax/data/threefry.py) draws JAX's values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import random as jex_random

from card_jax.data import threefry

# Known answers of Threefry-2x32 (20 rounds) from the Random123 reference implementation's
# tests: (key, counter) -> output words.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


@pytest.mark.parametrize("key, counter, want", KNOWN_ANSWERS)
def test_hash_gives_the_reference_answers(key, counter, want):
    words = [np.uint32(v) for v in key + counter]
    got = threefry.hash_2x32(*words)
    assert tuple(int(w) for w in got) == want
    # JAX's own hash, the one the draws must match.
    jax_words = jex_random.threefry_2x32(np.uint32(key), np.uint32(counter))
    assert tuple(int(w) for w in jax_words) == want


def _draws(key):
    """Every sampler AugMix and the training step use, and the key operations under them."""
    a, b = jax.random.split(key)
    c = jax.random.fold_in(b, 7)
    return {
        "split": jax.random.key_data(jax.random.split(a, (3, 4))),
        "fold_in": jax.random.key_data(c),
        "bits32": jax.random.bits(c, (5,)),
        "bits8": jax.random.bits(a, (3,), jnp.uint8),
        "bits16": jax.random.bits(b, (3,), jnp.uint16),
        "randint": jax.random.randint(a, (9,), 1, 4),
        "uniform": jax.random.uniform(b, (7,), minval=0.1, maxval=3.0),
        "bernoulli": jax.random.bernoulli(c, 0.5, (6,)),
        "exponential": jax.random.exponential(a, (3,)),
        "normal": jax.random.normal(b, (4,)),
        "permutation": jax.random.permutation(c, 11),
    }


@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1])
def test_same_values_as_jax_threefry(seed):
    key = jax.random.key(seed)
    fast = threefry.same_stream(key)
    assert jax.random.key_impl(fast) != jax.random.key_impl(key)
    want, got = jax.jit(_draws)(key), jax.jit(_draws)(fast)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # And under vmap over a batch of keys, as AugMix draws them.
    keys = jax.random.split(key, 16)
    want = jax.jit(jax.vmap(_draws))(keys)
    got = jax.jit(jax.vmap(lambda k: _draws(threefry.same_stream(k))))(keys)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_the_hash_is_straight_line_code():
    """The point of the module: JAX lowers its CPU hash as a loop, this one without."""
    def uniform(key):
        return jax.random.uniform(key, (8,))

    key = jax.random.key(0)
    text = jax.jit(lambda k: uniform(threefry.same_stream(k))).lower(key).as_text()
    assert "while" not in text
    assert "while" in jax.jit(uniform).lower(key).as_text()  # JAX's own, on CPU


def test_other_keys_are_left_alone():
    rbg = jax.random.key(0, impl="rbg")
    assert threefry.same_stream(rbg) is rbg
    raw = jax.random.PRNGKey(0)  # a legacy uint32[2] key
    assert threefry.same_stream(raw) is raw
    fast = threefry.same_stream(jax.random.key(0))
    assert threefry.same_stream(fast) is fast
