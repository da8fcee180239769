"""CARD-Decks (card_jax.deck): spectral feature on literal images, exact nearest neighbours,
sharded deck inference, gating that runs only the chosen group, and the deck command end to
end on two tiny smoke runs (one AugMix, one Gaussian, R = 2 each, GMP at 80%)."""

from __future__ import annotations

import functools
import json
import math
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial import cKDTree

from card_jax import config_util, run, state as state_lib, train, xla_flags
from card_jax.data import corruption_sets
from card_jax.deck import gate as gate_lib
from card_jax.deck import members as members_lib
from card_jax.deck import predict, spectral
from card_jax.deck import run as deck_run
from tests.helpers import REPO, cli_env, run_cli, smoke_config

DECK = str(REPO / "configs" / "deck.py")
SCHEMA = {"kind", "n_members", "groups", "members", "model", "dataset", "method", "sparsity",
          "agnostic", "adaptive", "members_alone", "memory_mb", "packed_bytes",
          "inference_time_s", "gate", "config", "format_version"}
BLOCK = {"clean_acc", "ece_clean", "corruption_acc", "corruption_table", "corruption_names",
         "extra_corruption_table", "extra_corruption_names"}


# ---------------------------------------------------------------------------------------------
# Spectral feature on literal images (SPEC §1(d) defaults)


def _basis_image(size=32, u=3, v=4):
    """0.5 + 0.5 cos(2 pi (u y + v x) / size): DC 0.5 plus one Fourier pair at radius 5."""
    y, x = np.mgrid[:size, :size]
    return (0.5 + 0.5 * np.cos(2 * np.pi * (u * y + v * x) / size)).astype(np.float32)


def test_bins_of_a_32x32_image():
    radius, counts = spectral.radial_bins(32, 32)
    assert len(counts) == 23 and counts.sum() == 1024
    assert radius[16, 16] == 0 and radius[0, 0] == 22  # corner: floor(sqrt(2) * 16)
    # Radius 5: the integer points with 25 <= dy^2 + dx^2 < 36, counted by hand:
    # d^2 = 25: 12, 26: 8, 29: 8, 32: 4, 34: 8.
    assert counts[5] == 40


def test_constant_image_has_all_power_at_radius_zero():
    image = np.full((1, 32, 32, 3), 0.5, np.float32)
    radial = np.asarray(spectral.radial_spectrum(image))[0]
    assert radial.shape == (23,)
    assert radial[0] == pytest.approx((0.5 * 1024) ** 2)  # |sum of pixels|^2
    np.testing.assert_allclose(radial[1:], 0.0, atol=1e-6)
    plain = spectral.spectral_feature(image, spectral.SpectrumOptions(reciprocal=False))
    np.testing.assert_allclose(np.asarray(plain)[0], np.eye(23)[0], atol=1e-7)
    # Reciprocal (default): the 22 empty bins weigh 1e12 each, radius 0 only 1 / 512^2.
    feature = np.asarray(spectral.spectral_feature(image))[0]
    np.testing.assert_allclose(feature[1:], 1 / math.sqrt(22), rtol=1e-6)
    assert feature[0] == pytest.approx((1 / 512 ** 2) / (1e12 * math.sqrt(22)), rel=1e-3)


def test_fourier_basis_image_has_power_only_at_its_radius():
    plane = _basis_image()
    image = np.stack([plane] * 3, -1)[None]
    expected = np.zeros(23)
    expected[0] = 512.0 ** 2                # DC: 0.5 * 1024
    expected[5] = 2 * 256.0 ** 2 / 40       # two peaks of 0.5 * 0.5 * 1024, over 40 pixels
    for grayscale in ("mean", "luminance"):  # equal channels: both are the plane itself
        radial = spectral.radial_spectrum(image, spectral.SpectrumOptions(grayscale=grayscale))
        np.testing.assert_allclose(np.asarray(radial)[0], expected, rtol=1e-5, atol=1e-3)
    per_channel = spectral.radial_spectrum(image, spectral.SpectrumOptions(
        grayscale="per_channel"))
    np.testing.assert_allclose(np.asarray(per_channel)[0], np.tile(expected, 3),
                               rtol=1e-5, atol=1e-3)
    log_mag = spectral.radial_spectrum(image, spectral.SpectrumOptions(spectrum="log_magnitude"))
    expected_log = np.zeros(23)
    expected_log[0] = 20 * math.log10(1 + 512)
    expected_log[5] = 2 * 20 * math.log10(1 + 256) / 40
    np.testing.assert_allclose(np.asarray(log_mag)[0], expected_log, rtol=1e-5, atol=1e-4)
    plain = spectral.spectral_feature(image, spectral.SpectrumOptions(reciprocal=False))
    norm = math.hypot(expected[0], expected[5])
    np.testing.assert_allclose(np.asarray(plain)[0], expected / norm, atol=1e-6)


def test_impulse_has_a_flat_spectrum_and_uint8_is_scaled():
    image = np.zeros((1, 32, 32, 1), np.uint8)
    image[0, 5, 7, 0] = 255  # |FFT| = 1 at every frequency
    np.testing.assert_allclose(np.asarray(spectral.radial_spectrum(image))[0], 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(spectral.spectral_feature(image))[0],
                               1 / math.sqrt(23), rtol=1e-5)


def test_radial_spectrum_matches_a_numpy_fftshift_reference():
    images = np.random.RandomState(0).rand(2, 28, 30, 1).astype(np.float32)
    power = np.abs(np.fft.fftshift(np.fft.fft2(images[..., 0].astype(np.float64)),
                                   axes=(-2, -1))) ** 2
    radius, counts = spectral.radial_bins(28, 30)
    expected = np.stack([np.bincount(radius.ravel(), p.ravel()) / counts for p in power])
    np.testing.assert_allclose(np.asarray(spectral.radial_spectrum(images)), expected,
                               rtol=1e-5)


def test_d_ss_is_the_distance_from_the_batch_mean_to_the_nearest_reference():
    refs = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    batch = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    # q = (0.5, 0.5); nearest is (0.6, 0.8) at sqrt(0.01 + 0.09).
    assert float(spectral.d_ss(refs, batch)) == pytest.approx(math.sqrt(0.1), rel=1e-6)
    assert float(jax.jit(spectral.d_ss)(refs, batch, jnp.asarray([True, False]))) == 0.0


# ---------------------------------------------------------------------------------------------
# Exact nearest neighbours: KD-tree == brute force


@pytest.fixture(scope="module")
def references():
    """`[2, 5000, 23]` gate features: clean vs always-noisy random 32x32 images (5000 drawn
    without replacement from 6000, so no two representatives tie)."""
    images = (np.random.RandomState(1).rand(6000, 32, 32, 1) * 255).astype(np.uint8)
    return np.stack([gate_lib.representative_features(
        gate_lib.group_key(0, g), images, 5000, g, gaussian_always_noisy=True)
        for g in ("none", "gaussian")])


def test_kdtree_and_brute_force_find_the_same_neighbours(references):
    rng = np.random.RandomState(2)
    clean = rng.rand(100, 32, 32, 1).astype(np.float32)
    noisy = np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1).astype(np.float32)
    feats = np.concatenate([np.asarray(spectral.spectral_feature(clean)),
                            np.asarray(spectral.spectral_feature(noisy))])
    # Batch means (the paper's gating, direct path) and single images (per-example path).
    for queries in (np.stack([feats[:100].mean(0), feats[100:].mean(0), feats[:50].mean(0)]),
                    feats):
        brute = np.asarray(jax.jit(gate_lib.brute_force_distances)(references, queries))
        tree = gate_lib.KDTreeSearch(references).distances(queries)
        for i in range(len(queries) if len(queries) == 3 else 0):  # the batch-mean layout
            np.testing.assert_allclose(gate_lib.batch_query_distances(
                references.transpose(0, 2, 1), queries[i:i + 1]), brute[i:i + 1], atol=1e-7)
        np.testing.assert_allclose(brute, tree, atol=1e-6)
        np.testing.assert_array_equal(brute.argmin(-1), tree.argmin(-1))
        for g in range(2):
            # The representative found is a nearest one: in float64 it is as near as the
            # KD-tree's (indices may differ only between points tied to float32 rounding).
            _, index = spectral.nearest(jnp.asarray(references[g]), jnp.asarray(queries))
            ref64 = references[g].astype(np.float64)
            found = np.linalg.norm(ref64[np.asarray(index)] - queries, axis=-1)
            tree_distance, tree_index = cKDTree(ref64).query(queries)
            np.testing.assert_allclose(found, tree_distance, atol=1e-6)
            assert (np.asarray(index) == tree_index).mean() > 0.95
    gates = {nn: gate_lib.Gate(references, spectral.SpectrumOptions(), nn=nn)
             for nn in gate_lib.NN_METHODS}
    valid = np.ones(100, bool)
    for batch, group in ((clean, 0), (noisy, 1)):
        choices = {nn: g(batch, valid) for nn, g in gates.items()}
        assert int(choices["brute"][0][0]) == int(choices["kdtree"][0][0]) == group
        np.testing.assert_allclose(choices["brute"][1], choices["kdtree"][1], atol=1e-6)
        # The pure on-device gate agrees with the Gate's host-side choice.
        choice, distances = jax.jit(functools.partial(
            gate_lib.gate_scores, options=spectral.SpectrumOptions(), per_example=False))(
                jnp.asarray(references), batch, valid)
        assert choice.tolist() == choices["brute"][0].tolist() == [group]
        np.testing.assert_allclose(distances, choices["brute"][1], atol=1e-7)



def test_batch_gate_compiles_to_one_thread_on_cpu(references):
    """Batch gating is compiled with `xla_flags.single_thread_options` (no YNNPACK fusions
    on CPU), no loop is split across threads (`SPLIT_BYTES`), and the pieces give exactly the
    distances of the whole batch at once."""
    gate = gate_lib.Gate(references, spectral.SpectrumOptions())
    images = (np.random.RandomState(3).rand(100, 32, 32, 1) * 255).astype(np.uint8)
    valid = np.arange(100) < 90
    text = gate._distances.lower(gate.references, images, valid).compile().as_text()
    if xla_flags.single_thread_options():
        assert "__ynn_fusion" not in text
        assert "outer_dimension_partitions" not in text
    assert text.count(" fft(") == 2  # 100 images in two pieces of 50 (at most 80 each)

    def whole_batch(r, x, v):  # every feature at once, the groups in one search
        query = spectral.batch_mean(spectral.spectral_feature(x), v)[None]
        return gate_lib.brute_force_distances(r, query)

    choice, distances = gate(images, valid)
    np.testing.assert_array_equal(distances, jax.jit(whole_batch)(references, images, valid))
    assert choice.tolist() == [int(np.argmin(distances))]


def test_images_per_piece_keeps_the_widest_loop_under_split_bytes():
    # 32x32x1 uint8: the power spectrum, 32 x 17 complex in and float out, 6528 bytes/image.
    assert gate_lib.images_per_piece((100, 32, 32, 1), np.uint8,
                                     spectral.SpectrumOptions()) == 524287 // 6528 == 80
    # Three planes per image: 3 x 6528 = 19584 bytes; the conversion reads 3 x 1024 uint8
    # and writes 3 x 1024 floats (15360 bytes).
    assert gate_lib.images_per_piece((100, 32, 32, 3), np.uint8, spectral.SpectrumOptions(
        grayscale="per_channel")) == 524287 // 19584 == 26
    # The conversion is the widest for float 3-channel images: 1024 x (3 x 4 + 4) bytes.
    assert gate_lib.images_per_piece((100, 32, 32, 3), np.float32,
                                     spectral.SpectrumOptions()) == 524287 // 16384 == 31
    assert gate_lib.images_per_piece((8, 512, 512, 1), np.uint8,
                                     spectral.SpectrumOptions()) == 1
    # Equal pieces, the last one shorter only when the count does not divide.
    assert gate_lib._pieces(100, 80) == [slice(0, 50), slice(50, 100)]
    assert gate_lib._pieces(12000, 5461) == [slice(0, 4000), slice(4000, 8000),
                                             slice(8000, 12000)]
    assert gate_lib._pieces(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 9)]
    assert gate_lib._pieces(5, 0) == [slice(i, i + 1) for i in range(5)]


def test_batch_search_in_pieces_equals_one_search():
    """Representatives longer than one piece (`SPLIT_BYTES`): the minimum over the pieces
    is the minimum over all, for every group."""
    rng = np.random.RandomState(4)
    refs = rng.rand(3, 23, 12000).astype(np.float32)       # [G, D, P]: 3 pieces per group
    query = rng.rand(1, 23).astype(np.float32)
    assert 12000 > 2 * (gate_lib.SPLIT_BYTES // (24 * 4))
    pieces = jax.jit(gate_lib.batch_query_distances)(refs, query)
    whole = np.sqrt(((refs - query[0][None, :, None]) ** 2).sum(1).min(-1))[None]
    np.testing.assert_allclose(pieces, whole, rtol=1e-6)
    refs[1, :, 11999] = query[0]  # the nearest in the last piece: distance exactly 0
    assert float(jax.jit(gate_lib.batch_query_distances)(refs, query)[0, 1]) == 0.0


_READY_SCRIPT = """
import sys
import jax, jax.numpy as jnp
from card_jax.deck import run as deck_run
if sys.argv[1] == "sync":
    deck_run.use_synchronous_dispatch()
f = jax.jit(lambda x: jax.lax.fori_loop(0, 20, lambda i, y: jnp.tanh(y @ x), x))
x = jax.block_until_ready(jnp.ones((1000, 1000)) * 1e-3)
jax.block_until_ready(f(x))
print(f(x).is_ready())
"""


@pytest.mark.parametrize("mode, ready", [("sync", "True"), ("async", "False")])
def test_deck_jobs_dispatch_synchronously(mode, ready):
    """After `use_synchronous_dispatch` a call returns with its result computed (it ran on
    the calling thread); JAX's default returns at once, a ~100 ms computation still running."""
    out = subprocess.run([sys.executable, "-c", _READY_SCRIPT, mode], cwd=REPO, env=cli_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == ready


def test_nearest_is_exact_for_queries_beside_representatives():
    """Queries 1e-6 from a representative, in a cluster of 40 points within 1e-5 of each
    other: float32 rounding of an expanded-form distance (~1e-8 in d^2) cannot separate them,
    the differences can. 200 queries span several chunks of `nearest` (padding included)."""
    rng = np.random.RandomState(3)
    centre = rng.rand(23)
    refs = np.concatenate([centre + 1e-5 * rng.standard_normal((40, 23)), rng.rand(4960, 23)])
    refs = (refs / np.linalg.norm(refs, axis=-1, keepdims=True)).astype(np.float32)
    picks = rng.choice(40, 200)
    queries = (refs[picks] + 1e-6 * rng.standard_normal((200, 23))).astype(np.float32)
    assert 200 > spectral.DIRECT_ELEMENTS // (5000 * 23) > 1  # the chunked path runs
    distance, index = jax.jit(spectral.nearest)(jnp.asarray(refs), jnp.asarray(queries))
    exact = np.linalg.norm(refs.astype(np.float64)[None] - queries.astype(np.float64)[:, None],
                           axis=-1)
    np.testing.assert_array_equal(np.asarray(index), exact.argmin(-1))
    np.testing.assert_allclose(np.asarray(distance), exact.min(-1), rtol=1e-3, atol=1e-8)

def test_representatives_are_saved_and_reused_while_settings_match(tmp_path):
    images = (np.random.RandomState(3).rand(50, 16, 16, 3) * 255).astype(np.uint8)
    calls = []

    def train_images():
        calls.append(1)
        return images

    options = spectral.SpectrumOptions()
    wanted = gate_lib.settings(["none", "gaussian"], 80, 0, False, options, {"name": "x"})
    first = gate_lib.load_or_build(tmp_path, wanted, train_images)
    assert first["gaussian"].shape == (80, 12) and len(calls) == 1  # 80 > 50: with replacement
    again = gate_lib.load_or_build(tmp_path, wanted, train_images)
    assert len(calls) == 1
    np.testing.assert_array_equal(again["gaussian"], first["gaussian"])
    noisy = gate_lib.settings(["none", "gaussian"], 80, 0, True, options, {"name": "x"})
    rebuilt = gate_lib.load_or_build(tmp_path, noisy, train_images)
    assert len(calls) == 2
    np.testing.assert_array_equal(rebuilt["none"], first["none"])  # same key per group name
    assert not np.array_equal(rebuilt["gaussian"], first["gaussian"])
    meta = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert meta["settings"]["gaussian_always_noisy"] is True and meta["feature_dim"] == 12


def test_representatives_can_be_padded_after_augmentation_like_the_c_cells():
    from card_jax.data import sources

    images = (np.random.RandomState(4).rand(5, 15, 13, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(
        np.asarray(gate_lib.pad_centred(jnp.asarray(images), 18)),
        sources.pad_images(images, 18))
    key = gate_lib.group_key(0, "none")
    late = gate_lib.representative_features(key, images, 5, "none", pad_to=18)
    early = gate_lib.representative_features(key, sources.pad_images(images, 18), 5, "none")
    np.testing.assert_allclose(late, early, atol=1e-6)  # no augmentation: same images


# ---------------------------------------------------------------------------------------------
# Deck inference over stacked members


@pytest.fixture(scope="module")
def random_members():
    """(graphdef, params [4, ...], batch_stats [4, ...]) of 4 fresh smoke Conv-2s, numpy."""
    config = smoke_config()
    data = train.load_data(config.data)
    graphdefs = []

    def init(key):
        g, p, bs = state_lib.split_model(train.build_model(config, data, key))
        graphdefs.append(g)
        return p, bs

    params, stats = jax.jit(jax.vmap(init))(jax.random.split(jax.random.key(0), 4))
    return graphdefs[0], jax.device_get(params), jax.device_get(stats), data


def test_sharded_deck_equals_single_device(random_members):
    graphdef, params, stats, data = random_members
    assert jax.device_count() == 4
    images = data.test_images[:64]
    sharded = predict.DeckFn(graphdef, 4)
    assert sharded.mesh is not None and sharded.mesh.size == 4
    placed = sharded.place_members((params, stats))
    assert len(jax.tree.leaves(placed[0])[0].sharding.device_set) == 4
    mean, probs = sharded(*placed, sharded.place_batch(images))
    assert len(probs.sharding.device_set) == 4
    single = predict.DeckFn(graphdef, 4, "map", mesh=None)
    mean1, probs1 = single(params, stats, images)
    np.testing.assert_allclose(np.asarray(probs), np.asarray(probs1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(mean), np.asarray(mean1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(mean1), np.asarray(probs1).mean(0), atol=1e-6)
    vmapped = predict.DeckFn(graphdef, 4, "vmap", mesh=None)(params, stats, images)[0]
    np.testing.assert_allclose(np.asarray(vmapped), np.asarray(mean1), atol=1e-5)


def _two_group_deck(random_members, per_example: bool):
    """(deck factory, clean [32], noisy [32]): 4 random members, augmix = {0, 2} gated to
    clean images, gaussian = {1, 3} to noisy ones."""
    graphdef, params, stats, data = random_members
    config = config_util.load_config_file(DECK)
    config.deck.per_example = per_example
    clean = data.test_images[:32]
    noisy = np.clip(clean.astype(np.int32) + np.random.RandomState(0).normal(
        0, 40, clean.shape), 0, 255).astype(np.uint8)
    # Each group's representatives: its images' own features and their mean, so that the
    # gate's answer is exact (distance 0) both per batch and per image.
    feats = [np.asarray(spectral.spectral_feature(x)) for x in (clean, noisy)]
    refs = np.stack([np.concatenate([f, f.mean(0, keepdims=True)]) for f in feats])
    fake = [None] * 4  # Deck only counts its members

    def make():
        return deck_run.Deck(config, fake, {"augmix": [0, 2], "gaussian": [1, 3]}, refs,
                             graphdef, params, stats)

    return make, clean, noisy


@pytest.mark.parametrize("per_example", [False, True])
def test_adaptive_deck_runs_only_the_chosen_group(random_members, per_example):
    make, clean, noisy = _two_group_deck(random_members, per_example)
    deck = make()
    valid = np.ones(32, bool)
    if not per_example:
        probs, choice = deck.adaptive(noisy, valid)
        assert choice.tolist() == [1]
        member = np.asarray(deck.agnostic(noisy)[1])  # [4, B, classes]
        np.testing.assert_allclose(probs, member[[1, 3]].mean(0), atol=1e-6)
        assert deck.forward_batches.tolist() == [0, 1, 0, 1]
        deck.adaptive(clean, valid)
        assert deck.forward_batches.tolist() == [1, 1, 1, 1]
    else:
        # Half clean, half noisy images: each gets its own group's mean softmax.
        mixed = np.concatenate([clean[:16], noisy[16:]])
        probs, choice = deck.adaptive(mixed, valid)
        assert choice.tolist() == [0] * 16 + [1] * 16
        member = np.asarray(deck.agnostic(mixed)[1])
        expected = np.where((choice == 0)[:, None], member[[0, 2]].mean(0),
                            member[[1, 3]].mean(0))
        np.testing.assert_allclose(probs, expected, atol=1e-6)
        assert deck.forward_batches.tolist() == [1, 1, 1, 1]  # both groups, once each


@pytest.mark.parametrize("per_example", [False, True])
def test_adaptive_from_known_member_softmaxes_equals_adaptive(random_members, per_example):
    """The evaluation's shortcut: the gated group's mean of softmaxes already computed."""
    make, clean, noisy = _two_group_deck(random_members, per_example)
    ran, reused = make(), make()
    valid = np.ones(32, bool)
    for x in (noisy, clean, np.concatenate([clean[:16], noisy[16:]])):
        probs, choice = ran.adaptive(x, valid)
        members = np.asarray(ran.agnostic(x)[1])
        probs_reused, choice_reused = reused.adaptive_from(members, x, valid)
        np.testing.assert_array_equal(choice_reused, choice)
        # Equal up to float rounding: the members ran in another program (batch, K).
        np.testing.assert_allclose(probs_reused, probs, rtol=0, atol=1e-6)
    assert reused.forward_batches.tolist() == ran.forward_batches.tolist()


# ---------------------------------------------------------------------------------------------
# The deck command end to end


def _write_corruptions(folder: pathlib.Path, images: np.ndarray, labels: np.ndarray):
    """A "-C" folder: the noise corruptions add Gaussian noise growing with severity, the
    others darken the image (spectrally like the clean set); all 19 files."""
    folder.mkdir()
    rng = np.random.RandomState(0)
    x = images.astype(np.float32) / 255
    for name in corruption_sets.ALL_CORRUPTIONS:
        cells = []
        for s in corruption_sets.SEVERITIES:
            if "noise" in name:
                cell = np.clip(x + rng.normal(0, 0.04 * (s + 1), x.shape), 0, 1)
            else:
                cell = x * (1 - 0.1 * s) + 0.05 * s
            cells.append(np.round(cell * 255).astype(np.uint8))
        np.save(folder / f"{name}.npy", np.concatenate(cells))
    np.save(folder / "labels.npy", np.concatenate([labels] * 5).astype(np.uint8))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished smoke runs (R = 2 each, GMP 80%): AugMix and Gaussian, and a "-C" set."""
    root = tmp_path_factory.mktemp("deck")
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)  # tiny runs: compile time rules
    try:
        for augment in ("augmix", "gaussian"):
            config = smoke_config(data__augment=augment, method__name="gmp",
                                  method__sparsity=0.8, train__progress="none")
            run.train_and_evaluate(config, root / augment)
    finally:
        jax.config.update("jax_disable_most_optimizations", old)
    data = train.load_data(smoke_config().data)
    _write_corruptions(root / "C", data.test_images, data.test_labels)
    return root


def _deck_args(root: pathlib.Path, workdir: pathlib.Path, *extra: str) -> list[str]:
    return [f"--config={DECK}:smoke", f"--config.deck.members={root}/augmix,{root}/gaussian",
            f"--config.eval.corruption_dir={root}/C", "--config.eval.corruption_examples=100",
            "--config.eval.extra_corruptions=true", f"--workdir={workdir}", *extra]


@pytest.fixture(scope="module")
def deck_cli(runs):
    workdir = runs / "deck"
    out = run_cli(*_deck_args(runs, workdir))
    assert out.returncode == 0, out.stderr[-4000:]
    return workdir, out


def test_deck_results_have_the_schema(runs, deck_cli):
    workdir, _ = deck_cli
    results = json.loads((workdir / "results.json").read_text())
    assert set(results) == SCHEMA
    assert results["kind"] == "deck" and results["n_members"] == 4
    assert results["groups"] == ["augmix", "gaussian"]
    assert [(m["group"], m["realization"]) for m in results["members"]] == [
        ("augmix", 0), ("augmix", 1), ("gaussian", 0), ("gaussian", 1)]
    assert results["method"] == "gmp" and results["sparsity"] == 0.8
    assert results["model"] == "conv2" and results["dataset"] == "synthetic"
    for block in [results["agnostic"], results["adaptive"], *results["members_alone"]]:
        assert BLOCK <= set(block)
        assert np.array(block["corruption_table"]).shape == (15, 5)
        assert np.array(block["extra_corruption_table"]).shape == (4, 5)
        assert block["corruption_acc"] == pytest.approx(np.mean(block["corruption_table"]))
        assert 0 <= block["clean_acc"] <= 1 and 0 <= block["ece_clean"] <= 1
    assert set(results["adaptive"]) == BLOCK | {"gate_histogram"}
    assert len(results["members_alone"]) == 4
    # Members alone reproduce each run's own clean accuracy (same weights, same test set).
    for m, alone in zip(results["members"], results["members_alone"]):
        own = json.loads((pathlib.Path(m["workdir"]) / "results.json").read_text())
        assert alone["clean_acc"] == pytest.approx(own["clean_acc"][m["realization"]])
    mem = [json.loads((runs / g / "results.json").read_text()) for g in ("augmix", "gaussian")]
    assert results["memory_mb"] == pytest.approx(sum(sum(r["memory_mb"]) for r in mem))
    assert results["packed_bytes"] == sum(sum(r["packed_bytes"]) for r in mem)
    times = results["inference_time_s"]
    assert set(times) == {"agnostic", "adaptive", "gate", "images"}
    assert times["images"] > 0 and all(times[k] > 0 for k in ("agnostic", "adaptive", "gate"))
    assert results["gate"] == {"representatives": 200, "gate_batch": 50, "per_example": False,
                               "nn": "brute", "spectrum": {"grayscale": "mean",
                                                           "spectrum": "power",
                                                           "reciprocal": True, "eps": 1e-12}}
    assert (workdir / "gate" / "gate.json").exists()
    assert np.load(workdir / "gate" / "gaussian.npy").shape == (200, 12)  # 16x16: 12 bins


def test_adaptive_deck_evaluates_only_the_chosen_members(deck_cli):
    workdir, out = deck_cli
    results = json.loads((workdir / "results.json").read_text())
    histogram = results["adaptive"]["gate_histogram"]
    assert set(histogram) == {"clean", *corruption_sets.ALL_CORRUPTIONS}
    # 256 clean images in batches of 50 -> 6 batches; 100 per corruption cell -> 2 x 5.
    assert sum(histogram["clean"].values()) == 6
    assert all(sum(h.values()) == 10 for k, h in histogram.items() if k != "clean")
    # The spectral gate sends added noise to the Gaussian cards, darkening to AugMix.
    assert histogram["gaussian_noise"]["gaussian"] >= 8
    assert histogram["brightness"]["augmix"] >= 8
    # Timing-independent evidence: each member ran on exactly its group's gated batches.
    line = next(s for s in out.stderr.splitlines() if "gate batches served per member" in s)
    counts = json.loads(line.split("evaluation ")[-1])
    assert "synchronous dispatch" in out.stderr  # card_jax.main set it for the deck job
    per_group = {g: sum(h[g] for h in histogram.values()) for g in ("augmix", "gaussian")}
    assert counts == [per_group["augmix"]] * 2 + [per_group["gaussian"]] * 2


def test_rerun_of_a_finished_deck_does_nothing(runs, deck_cli):
    workdir, _ = deck_cli
    before = (workdir / "results.json").stat().st_mtime_ns
    out = run_cli(*_deck_args(runs, workdir))
    assert out.returncode == 0, out.stderr[-4000:]
    assert "nothing to do" in out.stderr
    assert (workdir / "results.json").stat().st_mtime_ns == before


def test_mismatched_member_exits_2_naming_the_mismatch(runs, tmp_path):
    # A member that differs only in model width (JSON files suffice: refused before loading).
    odd = tmp_path / "wider"
    odd.mkdir()
    config = json.loads((runs / "gaussian" / "config.json").read_text())
    config["model"]["kw"]["width"] = 0.25
    (odd / "config.json").write_text(json.dumps(config))
    shutil.copy(runs / "gaussian" / "results.json", odd / "results.json")
    out = run_cli(f"--config={DECK}", f"--config.deck.members={runs}/augmix,{odd}",
                  f"--workdir={tmp_path / 'deck'}")
    assert out.returncode == 2
    assert "differ in model" in out.stderr and "0.25" in out.stderr and str(odd) in out.stderr
    assert not (tmp_path / "deck").exists()


def _precheck_error(*argv: str) -> str:
    from card_jax import main

    with pytest.raises(config_util.ConfigError) as e:
        main.precheck(list(argv))
    return str(e.value)


def test_invalid_decks_are_refused_with_clear_messages(runs, tmp_path):
    base = [f"--config={DECK}", f"--workdir={tmp_path}"]
    members = f"--config.deck.members={runs}/augmix,{runs}/gaussian"
    assert "same number of members" in _precheck_error(
        *base, f"--config.deck.members={runs}/augmix,{runs}/gaussian:1")
    assert "not a gate group" in _precheck_error(*base, members,
                                                 "--config.deck.groups=augmix,none")
    assert "unknown key 'represntatives'" in _precheck_error(
        *base, members, "--config.deck.represntatives=10")
    assert "deck.nn" in _precheck_error(*base, members, "--config.deck.nn=annoy")
    assert "2 realization" in _precheck_error(*base, f"--config.deck.members={runs}/augmix:7")
    assert "matches no card_jax workdir" in _precheck_error(
        *base, f"--config.deck.members={runs}/nothing*")
    # Globs and DIR:r select members in order.
    found = members_lib.describe(f"{runs}/gauss*,{runs}/augmix:1")
    assert [m.label for m in found] == [f"{runs}/gaussian:0", f"{runs}/gaussian:1",
                                        f"{runs}/augmix:1"]


# ---------------------------------------------------------------------------------------------
# Benchmark (quick mode)


def test_benchmark_quick_emits_the_ratios():
    out = subprocess.run([sys.executable, "benchmarks/deck.py", "--quick",
                          "--model=conv2", "--width=0.125", "--image_size=16", "--channels=3"],
                         cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    doc = json.loads(out.stdout)
    assert doc["benchmark"] == "deck" and doc["quick"] is True
    assert set(doc["per_batch_s"]) == {"gate_brute_s", "gate_kdtree_s", "member_s",
                                       "agnostic_s", "adaptive_s"}
    assert all(v > 0 for v in doc["per_batch_s"].values())
    for key in ("gate_over_member_inference", "adaptive_over_agnostic_throughput"):
        assert doc[key]["value"] > 0 and doc[key]["paired_median"] > 0
    assert doc["gate_over_member_inference"]["target"] == 0.05
    assert doc["settings"]["representatives"] == 1000 and doc["settings"]["gate_batch"] == 100
