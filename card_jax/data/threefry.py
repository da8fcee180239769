"""JAX's default PRNG (threefry2x32) with its hash written out straight, for small draws.

On CPU, jaxlib lowers the Threefry-2x32 hash as a `while` loop of five iterations (four
rounds each) whose carried key schedule is rotated every iteration. XLA:CPU copies each
carried array on every iteration and runs every piece as a thunk of its own: AugMix's draws
for a batch of 128 images (16 hashes over a few hundred keys each) ran ~1,200 copies and took
0.5 ms of a 5 ms augmentation (benchmarks/README.md, section 24). Written out as the 20 rounds
it is, the hash is a few elementwise fusions. That pays off for many small draws; for one
large draw (Gaussian noise over a batch of images: 3.6 -> 5.9 ms) JAX's loop is faster.

`UNROLLED_THREEFRY` is a PRNG implementation (`jax.extend.random.define_prng_impl`) with
the key layout, seeding, split, fold-in and random bits of JAX's threefry2x32 in its
default (partitionable) mode, so `jax.random`'s samplers draw the same values from the same
key data (tests/test_threefry.py checks this against `jax.random`). `same_stream` moves a
threefry key onto it, or returns any other key unchanged.

The hash is the Threefry-2x32 of Salmon et al., "Parallel random numbers: as easy as 1, 2,
3" (SC 2011), with 20 rounds, as JAX uses it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import random as jex_random

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(v: jax.Array, bits: int) -> jax.Array:
    return (v << np.uint32(bits)) | (v >> np.uint32(32 - bits))


def hash_2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array,
              x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 (20 rounds) of the counter pairs (x1, x2) under the key (k1, k2); all
    uint32, broadcast together. Returns the two output words."""
    k1, k2, x1, x2 = (jnp.asarray(v, np.uint32) for v in (k1, k2, x1, x2))
    schedule = (k1, k2, k1 ^ k2 ^ _PARITY)
    a, b = x1 + schedule[0], x2 + schedule[1]
    for group in range(5):
        for r in _ROTATIONS[group % 2]:
            a = a + b
            b = a ^ _rotate_left(b, r)
        # Key injection after every four rounds: words s + 1 and s + 2 of the schedule, and
        # the injection count in the second word.
        a = a + schedule[(group + 1) % 3]
        b = b + schedule[(group + 2) % 3] + np.uint32(group + 1)
    return a, b


def _counters(shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The row-major position of every element of `shape` as (high, low) uint32 words, as
    JAX's `iota_2x32_shape` counts them."""
    size = int(np.prod(shape, dtype=np.int64))
    if size >= 2**32:
        raise NotImplementedError("more than 2**32 draws from one key")
    low = jax.lax.iota(np.uint32, size).reshape(shape)
    return jnp.zeros(shape, np.uint32), low


def _split(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`shape` new keys `[*shape, 2]`: the hash of each position under `key`."""
    high, low = _counters(shape)
    a, b = hash_2x32(key[0], key[1], high, low)
    return _computed_once(jnp.stack([a, b], axis=-1))


def _random_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    if bit_width not in (8, 16, 32, 64):
        raise TypeError(f"random bits of width {bit_width}: 8, 16, 32 or 64")
    high, low = _counters(shape)
    a, b = hash_2x32(key[0], key[1], high, low)
    if bit_width == 64:
        return _computed_once((a.astype(np.uint64) << np.uint64(32)) | b.astype(np.uint64))
    return _computed_once((a ^ b).astype(f"uint{bit_width}"))


def _fold_in(key: jax.Array, data) -> jax.Array:
    """The hash of the 64-bit seed of `data` (high word, low word) under `key`."""
    seed = jex_random.threefry_prng_impl.seed(jnp.asarray(data, np.uint32))
    a, b = hash_2x32(key[0], key[1], seed[:1], seed[1:])
    return _computed_once(jnp.concatenate([a, b]))


def _computed_once(hashed: jax.Array) -> jax.Array:
    """`hashed` in a buffer of its own. Straight-line hashes are cheap to fuse, so XLA fuses
    them into their consumers, which recompute them per element they produce: the draws of a
    crop or a mixing weight, once per pixel (a rolled loop's results are buffers anyway)."""
    return jax.lax.optimization_barrier(hashed)


UNROLLED_THREEFRY = jex_random.define_prng_impl(
    key_shape=(2,), seed=jex_random.threefry_prng_impl.seed, split=_split,
    random_bits=_random_bits, fold_in=_fold_in, name="threefry2x32_unrolled",
    tag="fry_u")


def same_stream(key: jax.Array) -> jax.Array:
    """`key` on `UNROLLED_THREEFRY` if it is a typed threefry2x32 key and JAX draws in its
    default partitionable mode (where the two give the same values); otherwise `key`."""
    if (not jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
            or jax.random.key_impl(key) != jex_random.threefry_prng_impl.name
            or not jax.config.jax_threefry_partitionable):
        return key
    return jax.random.wrap_key_data(jax.random.key_data(key), impl=UNROLLED_THREEFRY)
