"""Fourier basis and heat maps (SPEC §6): literal checks on tiny grids."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from card_jax.fourier import basis as basis_lib
from card_jax.fourier import heatmap as heatmap_lib


def test_every_basis_has_unit_norm():
    for h, w in [(8, 8), (5, 7), (4, 5)]:
        bases = basis_lib.all_bases(h, w)
        np.testing.assert_allclose(np.linalg.norm(bases.reshape(len(bases), -1), axis=1), 1.0,
                                   atol=1e-6)


def test_twins_share_the_basis():
    for h, w in [(6, 6), (5, 5), (4, 5)]:
        for i in range(h):
            for j in range(w):
                si, sj = basis_lib.symmetric_index(h, w, i, j)
                assert basis_lib.symmetric_index(h, w, si, sj) == (i, j)  # an involution
                np.testing.assert_array_equal(basis_lib.basis(h, w, i, j),
                                              basis_lib.basis(h, w, si, sj))


def test_dc_basis_is_constant_and_a_literal_pair():
    np.testing.assert_allclose(basis_lib.basis(32, 32, 16, 16), np.full((32, 32), 1 / 32),
                               atol=1e-7)
    np.testing.assert_allclose(basis_lib.basis(5, 5, 2, 2), np.full((5, 5), 1 / 5), atol=1e-7)
    # 4x4, position (2, 1) = frequency (0, -1): (1+i)/2 there and its conjugate at (2, 3)
    # give (cos + sin)(2 pi x / 4) / 4 along x, constant along y.
    row = np.array([1, 1, -1, -1]) / 4
    np.testing.assert_allclose(basis_lib.basis(4, 4, 2, 1), np.tile(row, (4, 1)), atol=1e-7)
    np.testing.assert_allclose(basis_lib.basis(4, 4, 2, 3), np.tile(row, (4, 1)), atol=1e-7)


def test_distinct_frequency_counts():
    assert basis_lib.distinct_frequencies(32, 32).shape == (514, 2)  # (1024 - 4) / 2 + 4
    assert basis_lib.distinct_frequencies(5, 5).shape == (13, 2)  # (25 - 1) / 2 + 1
    assert basis_lib.distinct_frequencies(4, 5).shape == (11, 2)  # (20 - 2) / 2 + 2
    assert basis_lib.all_bases(5, 5).shape == (13, 5, 5)
    # Representatives and their twins cover the grid exactly once per position.
    reps = basis_lib.distinct_frequencies(6, 6)
    twins = basis_lib.twin_positions(6, 6)
    covered = {tuple(p) for p in reps} | {tuple(p) for p in twins}
    assert covered == {(i, j) for i in range(6) for j in range(6)}


def test_perturb_clips_and_draws_independent_signs_per_channel():
    grey = jnp.full((64, 4, 4, 3), 0.5)
    dc = basis_lib.basis(4, 4, 2, 2)  # constant 1/4
    out = np.asarray(heatmap_lib.perturb(grey, dc, 1.0, jax.random.key(0)))
    per_channel = out.reshape(64, 16, 3)
    assert np.all(per_channel == per_channel[:, :1])  # one sign per image and channel
    assert set(np.unique(out)) == {0.25, 0.75}
    mixed = np.any(per_channel[:, 0, :] != per_channel[:, 0, :1], axis=1)
    assert 0.5 < mixed.mean() < 0.95  # P(not all 3 equal) = 3/4
    assert 0.35 < (per_channel[:, 0] > 0.5).mean() < 0.65
    clipped = np.asarray(heatmap_lib.perturb(grey, dc, 4.0, jax.random.key(0)))
    assert set(np.unique(clipped)) == {0.0, 1.0}  # 0.5 +- 1 clipped to [0, 1]


def _mean_model(delta):
    """Two realizations reading only the mean pixel m: r0 says class 1 iff |m - m0| > delta,
    r1 the opposite. Labels are 0, so r0 errs only when the mean moves."""
    m0 = 128.0 / 255.0

    def predict(x):
        moved = jnp.abs(x.mean((1, 2, 3)) - m0)
        r0 = jnp.stack([jnp.full_like(moved, delta), moved], -1)
        r1 = jnp.stack([moved, jnp.full_like(moved, delta)], -1)
        return jnp.stack([r0, r1])  # [R=2, B, 2]

    return predict


def test_heatmap_compiles_once_and_only_dc_moves_a_mean_reading_model():
    traces = []
    mean_model = _mean_model(0.01)

    def predict(x):
        traces.append(x.shape)
        return mean_model(x)

    images = np.full((10, 6, 6, 3), 128, np.uint8)  # 10 images, chunks of 4: ragged last chunk
    labels = np.zeros(10, np.int64)
    # eps small enough that nothing clips: |U| <= sqrt(2)/6, so 0.5 +- 0.12 at eps = 0.5.
    eps = (0.25, 0.4, 0.5)
    compiles = []

    def listener(name, secs, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    key = jax.random.key(0)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        err = heatmap_lib.heatmap(predict, images, labels, eps, key=key, batch_size=4,
                                  freq_chunk=5)  # 20 pairs -> 4 frequency chunks
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(traces) == 1 and len(compiles) == 1
    assert err.shape == (2, 3, 6, 6)
    centre = np.zeros((6, 6), bool)
    centre[3, 3] = True
    # DC shifts each channel by +-eps/6, the mean by at least eps/18 > 0.01: r0 always wrong.
    np.testing.assert_array_equal(err[0][:, centre], 1.0)
    np.testing.assert_array_equal(err[0][:, ~centre], 0.0)
    np.testing.assert_array_equal(err[1], 1.0 - err[0])


def test_heatmap_does_not_depend_on_chunking_and_uses_both_twins():
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (6, 4, 4, 1)).astype(np.uint8)
    labels = rng.randint(0, 2, 6)
    weights = jnp.asarray(rng.randn(16, 2).astype(np.float32))

    def predict(x):
        return (x.reshape(x.shape[0], -1) @ weights)[None]

    key = jax.random.key(3)
    a = heatmap_lib.heatmap(predict, images, labels, (2.0,), key=key, batch_size=6, freq_chunk=10)
    b = heatmap_lib.heatmap(predict, images, labels, (2.0,), key=key, batch_size=4, freq_chunk=3)
    np.testing.assert_array_equal(a, b)
    for i in range(4):
        for j in range(4):
            assert a[0, 0, i, j] == a[0, 0][basis_lib.symmetric_index(4, 4, i, j)]
    assert set(np.unique(a * 6)) <= set(range(7))  # error = wrong / N


def test_save_heatmaps_writes_png_and_npy(tmp_path):
    err = np.random.RandomState(0).rand(2, 3, 8, 8).astype(np.float32)
    paths = heatmap_lib.save_heatmaps(err, (3, 4, 6), tmp_path, "conv8 ep 80%",
                                      baseline_err=err[::-1])
    with open(paths["png"], "rb") as f:
        header = f.read(8)
    assert header == b"\x89PNG\r\n\x1a\n"
    assert paths["png"] == str(tmp_path / "conv8_ep_80.png")
    assert (tmp_path / "conv8_ep_80.png").stat().st_size > 1000
    np.testing.assert_array_equal(np.load(paths["npy"]), err)
