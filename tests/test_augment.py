"""Gaussian noise, AugMix ops and the JSD loss (SPEC §8): literal images, PIL cross-checks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageOps

from card_jax.data import augment

# One compiled AugMix per (shape, depth) for the whole module: compiling dominates CPU time.
_augmix = jax.jit(augment.augmix, static_argnames=("width", "depth", "severity", "alpha"))


def test_gaussian_noise_hits_about_p_of_the_images_with_std_sigma():
    x = jnp.full((400, 8, 8, 1), 0.5)
    out = np.asarray(augment.gaussian_noise(jax.random.key(0), x, sigma=0.1, p=0.5))
    delta = (out - 0.5).reshape(400, -1)
    noisy = np.any(delta != 0, axis=1)
    assert 0.4 < noisy.mean() < 0.6
    assert np.all(delta[~noisy] == 0)  # untouched images are exactly the input
    assert abs(delta[noisy].std() - 0.1) < 0.005  # 0.5 +- 5 sigma: clipping never bites
    ones = augment.gaussian_noise(jax.random.key(1), jnp.ones((16, 4, 4, 3)), p=1.0)
    assert float(ones.max()) == 1.0 and float(ones.min()) < 1.0  # clipped to [0, 1]


def test_lookup_table_ops_on_literal_images():
    levels = np.array([0, 37, 127, 128, 200, 255], np.uint8).reshape(1, 6, 1)
    np.testing.assert_array_equal(augment.posterize(levels, 3).ravel(),
                                  [0, 32, 96, 128, 192, 224])
    np.testing.assert_array_equal(augment.solarize(levels, 128).ravel(),
                                  [0, 37, 127, 127, 55, 0])
    # Channel 0 spans [10, 30] -> [0, 255]; channel 1 is constant -> unchanged.
    image = np.array([[[10, 7], [20, 7], [30, 7]]], np.uint8)
    np.testing.assert_array_equal(augment.autocontrast(image)[0],
                                  [[0, 7], [127, 7], [255, 7]])
    # Pillow's double arithmetic maps the top of [0, 25] to 254, not 255: reproduced.
    np.testing.assert_array_equal(augment.autocontrast(np.array([[[0], [25]]], np.uint8)).ravel(),
                                  [0, 254])


def test_autocontrast_table_equals_pillows_double_arithmetic_for_every_range():
    """All 32 640 (lo, hi) ranges at once, one per channel of a 2-pixel image, against
    Pillow's formula int(i * scale + offset) in doubles, clamped to [0, 255]."""
    lo, hi = (a.astype(np.int32) for a in np.triu_indices(256, k=1))
    image = np.stack([lo, hi])[:, None, :]  # [2, 1, C]: pixel 0 holds lo, pixel 1 hi
    got = np.asarray(jax.jit(augment.autocontrast_lut)(jnp.asarray(image)))  # [C, 256]
    scale = 255.0 / (hi - lo)[:, None]
    levels = np.arange(256)[None]
    want = np.clip(np.trunc(levels * scale + (-lo[:, None] * scale)), 0, 255)
    np.testing.assert_array_equal(got, want.astype(np.int32))


def test_equalize_hand_computed():
    # 600 pixels: 256 x 10, 256 x 20, 88 x 30. step = (600 - 88) // 255 = 2 and
    # lut[i] = (step // 2 + #pixels below i) // step: 10 -> 0, 20 -> 257 // 2, 30 -> 256 -> 255.
    values = np.array([10] * 256 + [20] * 256 + [30] * 88, np.uint8).reshape(2, 300, 1)
    out = np.asarray(augment.equalize(values))
    np.testing.assert_array_equal(np.unique(out[values == 10]), [0])
    np.testing.assert_array_equal(np.unique(out[values == 20]), [128])
    np.testing.assert_array_equal(np.unique(out[values == 30]), [255])
    tiny = np.array([[[1], [2]], [[3], [4]]], np.uint8)  # step == 0: identity, as in PIL
    np.testing.assert_array_equal(augment.equalize(tiny), tiny)


def test_translations_shift_with_black_fill():
    row = np.array([[10, 20, 30, 40]], np.uint8)[..., None]  # [1, 4, 1]
    np.testing.assert_array_equal(augment.translate_x(row, 1).ravel(), [20, 30, 40, 0])
    np.testing.assert_array_equal(augment.translate_x(row, -1).ravel(), [0, 10, 20, 30])
    column = row.transpose(1, 0, 2)
    np.testing.assert_array_equal(augment.translate_y(column, 2).ravel(), [30, 40, 0, 0])
    np.testing.assert_array_equal(augment.rotate(row, 0), row)  # identity warp is exact


@pytest.mark.parametrize("matrix, along_x, along_y", [
    (dict(b=0.27), True, False),      # shear_x: every row keeps its y
    (dict(d=-0.21), False, True),     # shear_y: every column keeps its x
    (dict(c=-7.0), False, False),     # integer translations: a plain shift
    (dict(f=5.0), False, False),
])
def test_warps_without_an_axis_equal_the_full_bilinear_warp(matrix, along_x, along_y):
    image = jnp.asarray(np.random.RandomState(3).randint(0, 256, (9, 11, 3)), jnp.int32)
    m = augment._matrix(**matrix)
    np.testing.assert_array_equal(augment.affine(image, m, along_x=along_x, along_y=along_y),
                                  augment.affine(image, m))
    # The shortcut is not the identity: a rotation needs both axes.
    rotation = augment.rotate_matrix(jnp.float32(13.0), 9, 11)
    assert not np.array_equal(augment.affine(image, rotation, along_x=along_x, along_y=along_y),
                              augment.affine(image, rotation))


def test_translation_gather_equals_the_warp_for_every_shift():
    """`_translate` (whole pixels, black fill) gives the warp's values for every whole-pixel
    shift, including shifts that move the whole image out of view."""
    height, width = 9, 11
    image = np.random.RandomState(4).randint(0, 256, (height, width, 3)).astype(np.uint8)
    for shift in range(-width - 1, width + 2):
        for m in (augment._matrix(c=float(shift)), augment._matrix(f=float(shift))):
            np.testing.assert_array_equal(
                augment._translate(jnp.asarray(image), m),
                augment.affine(jnp.asarray(image, jnp.int32), m))


def test_ops_match_pillow_on_a_random_image():
    rng = np.random.RandomState(0)
    image = (rng.rand(32, 32, 3) * 150 + 40).astype(np.uint8)
    pil = Image.fromarray(image)
    exact = [
        (augment.autocontrast(image), ImageOps.autocontrast(pil)),
        (augment.equalize(image), ImageOps.equalize(pil)),
        (augment.posterize(image, 3), ImageOps.posterize(pil, 3)),
        (augment.solarize(image, 190), ImageOps.solarize(pil, 190)),
        (augment.translate_x(image, -3), pil.transform((32, 32), Image.AFFINE,
                                                        (1, 0, -3, 0, 1, 0), Image.BILINEAR)),
    ]
    for ours, ref in exact:
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    warps = [
        (augment.rotate(image, 7), pil.rotate(7, resample=Image.BILINEAR)),
        (augment.shear_x(image, 0.0837), pil.transform((32, 32), Image.AFFINE,
                                                      (1, 0.0837, 0, 0, 1, 0), Image.BILINEAR)),
        (augment.shear_y(image, -0.0513), pil.transform((32, 32), Image.AFFINE,
                                                      (1, 0, 0, -0.0513, 1, 0), Image.BILINEAR)),
    ]
    for ours, ref in warps:
        # float32 vs Pillow's doubles: where a sample point lands (numerically) on a pixel
        # centre, truncation may flip by one level. AugMix's levels are continuous, so that is
        # rare; "round" parameters (e.g. shear 0.08, whose float32 differs from the double)
        # hit it on a few % of the pixels, hence the generic values here.
        diff = np.abs(np.asarray(ours, np.int32) - np.asarray(ref, np.int32))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_augmix_is_a_convex_mix_of_chains():
    key = jax.random.key(0)
    # Black is a fixed point of all nine ops (tables keep 0, warps fill with 0), so every
    # chain returns the input and any convex mix of them must too: exactly.
    black = jnp.zeros((8, 8, 8, 3))
    np.testing.assert_array_equal(_augmix(key, black), black)
    # Grey 128 with one op per chain: tables keep a constant image (autocontrast and equalize
    # are identities on it, 128 survives posterize and lies below every solarize threshold);
    # warps keep it at 128 except within ~3 px of the border, where black comes in. So the
    # centre must equal the input and nothing may exceed 128 / 255.
    grey = jnp.full((8, 16, 16, 3), 128 / 255)
    out = np.asarray(_augmix(key, grey, depth=1))
    np.testing.assert_allclose(out[:, 5:11, 5:11], 128 / 255, atol=1e-6)
    assert out.max() <= 128 / 255 + 1e-6 and out.min() >= 0.0
    assert np.any(out < 128 / 255 - 1e-3)  # some warp did bring black in
    rng = np.random.RandomState(1)
    noise = jnp.asarray(rng.randint(0, 256, (8, 8, 8, 3)) / 255.0, jnp.float32)
    mixed = np.asarray(_augmix(key, noise))
    assert mixed.min() >= 0.0 and mixed.max() <= 1.0
    assert np.abs(mixed - np.asarray(noise)).mean() > 0.01  # it does augment


def test_augmix_is_deterministic_per_key():
    x = jnp.asarray(np.random.RandomState(2).randint(0, 256, (8, 8, 8, 3)) / 255.0, jnp.float32)
    a = _augmix(jax.random.key(5), x)
    np.testing.assert_array_equal(a, _augmix(jax.random.key(5), x))
    assert not np.array_equal(a, _augmix(jax.random.key(6), x))


def test_augmix_under_jit_and_vmap_over_realizations_grey_non_square():
    x = jnp.asarray(np.random.RandomState(3).randint(0, 256, (2, 5, 7, 1)) / 255.0, jnp.float32)
    keys = jax.random.split(jax.random.key(0), 3)  # R = 3 realizations
    batched = jax.jit(jax.vmap(augment.AUGMENTATIONS["augmix"], in_axes=(0, None)))(keys, x)
    assert batched.shape == (3, 2, 5, 7, 1)
    for r in range(3):
        np.testing.assert_allclose(batched[r], _augmix(keys[r], x), atol=1e-6)
    assert not np.allclose(batched[0], batched[1])


@pytest.mark.parametrize("shape,depth,alpha", [
    ((16, 8, 8, 3), -1, 1.0),
    ((7, 5, 9, 1), -1, 1.0),  # odd batch, non-square, grey
    ((6, 6, 6, 3), 2, 0.5),  # fixed depth, Dirichlet/Beta samplers
])
def test_batched_augmix_equals_the_per_image_definition(shape, depth, alpha):
    """`augmix` (paged over the batch's chains) == `_augmix_reference_one` per image.

    Same draws and ops; the two are different XLA programs, which may contract the bilinear
    warp's multiply-adds differently, so a truncated pixel level can differ by one in rare
    pixels of one chain, and a later op of that chain can widen the gap (autocontrast
    stretches a narrow range, solarize flips a level at its threshold). Seen: 1 of 315 values,
    by 2e-5 after mixing, and with flat-indexed taps 1 of 315 by 0.048 (12 levels times the
    chain's weight). Anything else, a wrong draw or op, changes most of an image.
    """
    x = jnp.asarray(np.random.RandomState(4).randint(0, 256, shape) / 255.0, jnp.float32)
    key = jax.random.key(9)
    one = functools.partial(augment._augmix_reference_one, width=3, depth=depth,
                            severity=3.0, alpha=alpha)
    want = jax.jit(jax.vmap(one))(jax.random.split(key, shape[0]), x)
    got = np.asarray(_augmix(key, x, depth=depth, alpha=alpha))
    diff = np.abs(got - np.asarray(want))
    assert (diff > 0).mean() < 0.01
    assert diff.reshape(shape[0], -1).mean(-1).max() < 2e-3  # no image differs as a whole


@pytest.mark.parametrize("shape,chains", [((64, 32, 32, 3), 3), ((5, 28, 28, 3), 3),
                                          ((6, 8, 8, 3), 2), ((6, 8, 8, 3), 5)])
def test_batched_mix_equals_the_per_image_tensordot(shape, chains):
    """On RGB images (the only ones `augmix` gives it), `_mix_batch` (one elementwise pass)
    == `vmap(_mix)` (a dot per image), to rounding.

    On the AVX-512 Xeon of benchmarks/README section 21 the two are equal bit for bit (the
    elementwise sum compiles to the dot's fused multiply-adds, in the dot's order), but which
    products LLVM fuses depends on the compiled loop, so other CPUs may round differently:
    every term is >= 0, so a few ulps bound that, while a wrong weight or a missing chain
    moves values by far more."""
    rng = np.random.RandomState(7)
    b = shape[0]
    x01 = jnp.asarray(rng.randint(0, 256, shape) / 255.0, jnp.float32)
    levels = jnp.asarray(rng.randint(0, 256, (b, chains) + shape[1:]), jnp.uint8)
    draws = rng.exponential(size=(b, chains)).astype(np.float32)
    weights = jnp.asarray(draws / draws.sum(1, keepdims=True))
    m = jnp.asarray(rng.rand(b).astype(np.float32))

    def as_float(levels):  # as `augmix` converts its chains
        return levels.astype(jnp.float32) * (1.0 / 255.0)

    per_image = jax.jit(lambda x, c, w, m: jax.vmap(augment._mix)(x, as_float(c), w, m))
    batched = jax.jit(lambda x, c, w, m: augment._mix_batch(x, as_float(c), w, m))
    want = np.asarray(per_image(x01, levels, weights, m))
    np.testing.assert_array_max_ulp(np.asarray(batched(x01, levels, weights, m)), want,
                                    maxulp=4)


def test_grouped_rows_lists_each_groups_rows_in_order():
    order, start, count = augment._grouped_rows(jnp.array([2, 0, 2, 1, 0, 3]), 4, pad=2)
    np.testing.assert_array_equal(order, [1, 4, 3, 0, 2, 5, 6, 6])
    np.testing.assert_array_equal(start, [0, 2, 3, 5])
    np.testing.assert_array_equal(count, [2, 1, 2, 1])
    # An empty group starts where the next one does and lists nothing.
    order, start, count = augment._grouped_rows(jnp.array([2, 2, 0]), 3, pad=1)
    np.testing.assert_array_equal(order, [2, 0, 1, 3])
    np.testing.assert_array_equal(start, [0, 1, 1])
    np.testing.assert_array_equal(count, [1, 0, 2])


@pytest.mark.parametrize("page", [1, 2, 3, 8])
def test_paged_rows_touch_exactly_one_groups_rows(page):
    groups = jnp.array([1, 0, 1, 1, 2, 1, 1])  # group 1: rows 0, 2, 3, 5, 6
    order, start, count = augment._grouped_rows(groups, 3, pad=page)
    target = jnp.zeros((7, 2), jnp.int32)
    rows = jnp.arange(7)

    def fn(r):
        return jnp.stack([r * 10, r + 1], -1)

    out = augment._paged_rows((order, start[1], count[1]), target, fn, page, rows)
    np.testing.assert_array_equal(out, [[0, 1], [0, 0], [20, 3], [30, 4], [0, 0], [50, 6],
                                        [60, 7]])
    # Group 0 sits before it in `order`, group 2 after it: each touches only its own row.
    first = augment._paged_rows((order, start[0], count[0]), target, fn, page, rows)
    np.testing.assert_array_equal(first, [[0, 0], [10, 2], [0, 0], [0, 0], [0, 0], [0, 0],
                                          [0, 0]])
    last = augment._paged_rows((order, start[2], count[2]), target, fn, page, rows)
    np.testing.assert_array_equal(last, [[0, 0], [0, 0], [0, 0], [0, 0], [40, 5], [0, 0],
                                         [0, 0]])
    none = augment._paged_rows((order, 7, 0), target, fn, page, rows)
    np.testing.assert_array_equal(none, target)


def test_registry_has_a_uniform_signature():
    x = jnp.full((4, 6, 6, 3), 0.5)
    key = jax.random.key(0)
    assert set(augment.AUGMENTATIONS) == {"none", "gaussian", "augmix"}
    np.testing.assert_array_equal(augment.AUGMENTATIONS["none"](key, x), x)
    assert augment.AUGMENTATIONS["gaussian"](key, x).shape == x.shape


def test_jsd_is_zero_for_identical_views_and_positive_otherwise():
    logits = jnp.array([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    assert abs(float(augment.jsd_loss(logits, logits, logits))) < 1e-6
    other = logits[:, ::-1]
    value = float(augment.jsd_loss(logits, other, logits))
    assert value > 0.01
    # Against the definition: mean over views of sum p log(p / M) / B.
    p = [jax.nn.softmax(z) for z in (logits, other, logits)]
    m = np.clip(sum(np.asarray(q) for q in p) / 3, 1e-7, 1)
    expected = np.mean([np.sum(np.asarray(q) * np.log(np.asarray(q) / m)) / 2 for q in p])
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    assert augment.JSD_WEIGHT == 12.0



@pytest.mark.parametrize("augment, jsd", [("augmix", False), ("augmix", True),
                                          ("gaussian", False)])
def test_training_with_augmentation(augment, jsd, tmp_path, fast_compile):
    from card_jax import run
    from tests.helpers import smoke_config

    config = smoke_config(train__steps=4, data__augment=augment, data__jsd=jsd)
    results = run.train_and_evaluate(config, tmp_path)
    assert len(results["clean_acc"]) == 2
    assert all(np.isfinite(results["clean_acc"]))


def test_jsd_without_augmentation_is_refused(tmp_path):
    from card_jax import run
    from tests.helpers import smoke_config

    with pytest.raises(ValueError, match="data.jsd"):
        run.train_and_evaluate(smoke_config(train__steps=2, data__jsd=True), tmp_path)


def _jsd_steps(monkeypatch, micro_batches, **overrides):
    """Params and metrics after 3 JSD training steps of the smoke config (R = 2), with
    `steps.jsd_micro_batches` replaced by `micro_batches`."""
    from card_jax import steps, train
    from tests.helpers import smoke_config

    monkeypatch.setattr(steps, "jsd_micro_batches", micro_batches)
    exp = train.build_experiment(smoke_config(data__augment="augmix", data__jsd=True,
                                              **overrides))
    compiled = train.CompiledSteps(exp, exp.levels[0].lr_fn)
    state = compiled.place_state(exp.state)
    images, labels = compiled.place_data(exp.dataset.train_images,
                                         exp.dataset.train_labels.astype(np.int32))
    for _ in range(3):
        state, metrics = compiled.train(state, images, labels)
    return jax.device_get((state.params, metrics))


def test_jsd_micro_batches_give_the_one_batch_step(monkeypatch, fast_compile):
    """Without BatchNorm a JSD step runs in micro-batches of examples (their three views
    together): the same loss, accuracy and updates as one batch of all 3B views."""
    from card_jax import steps

    assert [steps.jsd_micro_batches(b) for b in (128, 32, 100, 7, 2, 11)] == [4, 4, 4, 7, 1, 1]
    params_one, metrics_one = _jsd_steps(monkeypatch, lambda batch: 1)
    params_micro, metrics_micro = _jsd_steps(monkeypatch, lambda batch: 4)
    for key in ("loss", "accuracy"):
        np.testing.assert_allclose(metrics_micro[key], metrics_one[key], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 params_micro, params_one)
    differs = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)),
                                           params_micro, params_one))
    assert any(differs)  # micro-batches did run (float32 sums in another order)


def test_jsd_with_batchnorm_keeps_one_batch(monkeypatch, fast_compile):
    """BatchNorm's statistics are taken over all three views, so they stay one batch."""
    def refuse(batch):
        raise AssertionError("a BatchNorm model must not be split into micro-batches")

    params, metrics = _jsd_steps(monkeypatch, refuse, model__name="resnet18",
                                 model__kw={"width": 4})
    assert np.isfinite(metrics["loss"]).all()
