"""Tests of the CIFAR-10-C corruptions, the "-C" folder readers and the corrupt CLI.

Kept fast (one compile per corruption and image shape: every call uses 8 images or fewer, so
all share the same batch bucket). References: Hendrycks & Dietterich 2019;
hendrycks/robustness make_cifar_c.py (constants); Pillow (JPEG, pixelate).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from card_jax import corrupt as corrupt_cli
from card_jax.data import DatasetNotFoundError
from card_jax.data import corruption_sets as cs
from card_jax.data import corruptions as C

# Corruptions that draw random numbers (the others are deterministic functions of the image).
RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow",
          "frost", "fog", "elastic_transform", "speckle_noise", "spatter"}

try:
    C.frost_texture_dir()
    HAVE_FROST = True
except FileNotFoundError:
    HAVE_FROST = False
needs_frost = pytest.mark.skipif(not HAVE_FROST, reason="pip install corrupt-tta (frost images)")


def smooth_images(n: int, h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    """Natural-ish uint8 images: a tilted gradient, a few flat rectangles, mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    images = []
    for _ in range(n):
        img = 60 + 100 * (rng.uniform() * xx + rng.uniform() * yy)
        img = np.repeat(img[..., None], c, -1) + rng.uniform(-30, 30, (1, 1, c))
        for _ in range(3):
            y0, x0 = rng.integers(0, h - 8, 2)
            hh, ww = rng.integers(4, 12, 2)
            img[y0:y0 + hh, x0:x0 + ww] = rng.uniform(0, 255, c)
        images.append(img + rng.normal(0, 4, img.shape))
    return np.clip(np.stack(images), 0, 255).astype(np.uint8)


GREY28 = smooth_images(8, 28, 28, 1, seed=1)
RGB32 = smooth_images(8, 32, 32, 3, seed=2)


def params(names):
    return [pytest.param(n, marks=needs_frost) if n == "frost" else n for n in names]


def test_corruption_lists():
    assert C.CORRUPTIONS == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
        "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
        "elastic_transform", "pixelate", "jpeg_compression")
    assert C.EXTRA_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert C.ALL_CORRUPTIONS == cs.ALL_CORRUPTIONS and C.CORRUPTIONS == cs.CORRUPTIONS
    assert set(C.SEVERITY_CONSTANTS) == set(C.ALL_CORRUPTIONS)
    assert all(len(v) == 5 for v in C.SEVERITY_CONSTANTS.values())
    # Spot checks against make_cifar_c.py (CIFAR, not ImageNet-C, constants).
    assert C.SEVERITY_CONSTANTS["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert C.SEVERITY_CONSTANTS["contrast"] == (0.75, 0.5, 0.4, 0.3, 0.15)
    assert len(C.SEVERITY_CONSTANTS["zoom_blur"][0]) == 7  # np.arange(1, 1.06, .01) has 1.06


@pytest.mark.parametrize("name", params(C.ALL_CORRUPTIONS))
def test_runs_shapes_and_determinism(name):
    # Severity 4: saturate leaves grey images unchanged at 1-3 (S = 0 times a factor).
    for images in (GREY28, RGB32):
        out = C.corrupt(images, name, 4, seed=0)
        assert out.dtype == np.uint8 and out.shape == images.shape
        assert not np.array_equal(out, images)
        np.testing.assert_array_equal(C.corrupt(images, name, 4, seed=0), out)
        other_seed = C.corrupt(images, name, 4, seed=1)
        assert (not np.array_equal(other_seed, out)) == (name in RANDOM)
    # An image's result does not depend on the rest of the batch.
    np.testing.assert_array_equal(C.corrupt(RGB32[:3], name, 4, seed=0), out[:3])


# Severity chains along which the mean change must not decrease. The reference constants are
# not monotone everywhere: glass blur's later severities blur more (which hides the shuffle),
# spatter switches from water (1-3) to mud (4-5), saturate first desaturates then
# saturates, elastic_transform trades affine jitter (falling) for elastic warp (rising), and
# frost 4 -> 5 trades image weight (.85 -> .75) for frost weight (.4 -> .45), a change whose
# sign depends on the image and the (random) texture.
CHAINS = {
    "frost": [(1, 2, 3, 4), (3, 5)],
    "glass_blur": [(2, 4), (3, 5)],  # same sigma, 1 vs 2 shuffle iterations
    "spatter": [(1, 2, 3), (4, 5)],
    "saturate": [(1, 2), (4, 5)],
    "elastic_transform": [],
}


@pytest.mark.parametrize("name", params(C.ALL_CORRUPTIONS))
def test_severity_ordering(name):
    change = {s: np.abs(C.corrupt(RGB32, name, s, 0).astype(float) - RGB32).mean()
              for s in range(1, 6)}
    for chain in CHAINS.get(name, [(1, 2, 3, 4, 5)]):
        for a, b in zip(chain, chain[1:]):
            # Non-strict with a little slack: some constants (nearly) tie, e.g. motion blur
            # (6, 2) vs (8, 2) differ only in negligible-weight taps.
            assert change[b] >= 0.97 * change[a] - 0.05, (name, change)


def test_gaussian_noise_statistics():
    grey = np.full((8, 32, 32, 3), 128, np.uint8)
    for severity, sigma in enumerate(C.SEVERITY_CONSTANTS["gaussian_noise"], start=1):
        noise = C.corrupt(grey, "gaussian_noise", severity, seed=3).astype(float) - 128
        # np.uint8 truncation (as the reference) lowers the mean by 1/2 and adds 1/12 variance.
        assert abs(noise.mean() + 0.5) < 0.35
        assert abs(noise.std() - np.sqrt((sigma * 255) ** 2 + 1 / 12)) < 0.03 * sigma * 255


def test_contrast_by_hand():
    # Checkerboard of 0 and 200: mean 100. Severity 1 (c = .75): 100 + (v - 100) * .75.
    grey = np.zeros((1, 28, 28, 1), np.uint8)
    grey[0, ::2, ::2] = grey[0, 1::2, 1::2] = 200
    out = C.corrupt(grey, "contrast", 1, 0)
    assert set(np.unique(out)) == {25, 175}
    assert out[0, 0, 0, 0] == 175 and out[0, 0, 1, 0] == 25
    out5 = C.corrupt(grey, "contrast", 5, 0)  # c = .15: 100 -/+ 15
    assert set(np.unique(out5)) == {85, 115}
    # Per-channel means: channel 1 alternates 40/60 (mean 50) -> 50 -/+ 7.5, truncated.
    rgb = np.zeros((1, 32, 32, 3), np.uint8)
    rgb[..., 0] = 200 * ((np.arange(32)[:, None] + np.arange(32)) % 2)
    rgb[..., 1] = np.where((np.arange(32)[:, None] + np.arange(32)) % 2, 60, 40)
    rgb[..., 2] = 90
    out = C.corrupt(rgb, "contrast", 1, 0)[0]
    assert tuple(out[0, 0]) == (25, 42, 90) and tuple(out[0, 1]) == (175, 57, 90)


def test_brightness_by_hand():
    pixels = np.zeros((1, 32, 32, 3), np.uint8)
    pixels[0, 0, 0] = (100, 100, 100)  # grey: V = 100/255 + .05 -> 112.75 -> 112
    pixels[0, 0, 1] = (200, 100, 50)   # V .784 -> .834: every channel * (212.75 / 200)
    pixels[0, 0, 2] = (250, 10, 10)
    out = C.corrupt(pixels, "brightness", 1, 0)[0, 0]
    assert tuple(out[0]) == (112, 112, 112)
    assert tuple(out[1]) == (212, 106, 53)  # 212.75, 106.375, 53.19
    out5 = C.corrupt(pixels, "brightness", 5, 0)[0, 0]
    assert tuple(out5[2]) == (255, 10, 10)  # V clipped at 1: * 255/250 -> 10.2
    assert tuple(out5[0]) == (176, 176, 176)  # 100 + .3 * 255 = 176.5
    grey = np.full((1, 28, 28, 1), 100, np.uint8)
    assert (C.corrupt(grey, "brightness", 1, 0) == 112).all()


def test_pixelate_by_hand_and_against_pillow():
    constant = np.full((2, 32, 32, 3), 77, np.uint8)
    for severity in range(1, 6):
        np.testing.assert_array_equal(C.corrupt(constant, "pixelate", severity, 0), constant)
    # Columns 0, 100, 0, 100, ...; severity 5 (32 -> 20 -> 32): Pillow's box filter averages
    # the input pixels whose centres fall in ((o + .5) 1.6 -/+ .8]: small[0] = mean(0, 100)
    # = 50, small[1] = column 2 alone = 0, small[2] = mean(columns 3, 4) = 50; up-sampling
    # picks small[floor((o + .5) * 20 / 32)] -> 0, 0, 1, 2 for o = 0..3.
    stripes = np.zeros((1, 32, 32, 1), np.uint8)
    stripes[..., 1::2, :] = 100
    out = C.corrupt(stripes, "pixelate", 5, 0)[0, :, :, 0]
    assert (out == out[:1]).all()  # rows untouched
    assert list(out[0, :4]) == [50, 50, 0, 50]
    for images in (RGB32, GREY28):
        for severity in range(1, 6):
            factor = C.SEVERITY_CONSTANTS["pixelate"][severity - 1]
            ours = C.corrupt(images, "pixelate", severity, 0)
            h, w = images.shape[1:3]
            for i in range(len(images)):
                pil = Image.fromarray(images[i].squeeze(-1) if images.shape[-1] == 1 else images[i])
                small = pil.resize((int(w * factor), int(h * factor)), Image.BOX)
                ref = np.asarray(small.resize((w, h), Image.BOX)).reshape(images.shape[1:])
                np.testing.assert_array_equal(ours[i], ref)


def test_jpeg_equals_pillow_round_trip():
    for images in (RGB32, GREY28):
        for severity in (1, 5):
            quality = C.SEVERITY_CONSTANTS["jpeg_compression"][severity - 1]
            ours = C.corrupt(images, "jpeg_compression", severity, 0)
            for i in range(len(images)):
                buffer = io.BytesIO()
                pil = Image.fromarray(images[i].squeeze(-1) if images.shape[-1] == 1 else images[i])
                pil.save(buffer, format="JPEG", quality=quality)
                ref = np.asarray(Image.open(buffer)).reshape(images.shape[1:])
                np.testing.assert_array_equal(ours[i], ref)


def test_input_validation():
    with pytest.raises(ValueError, match="unknown corruption"):
        C.corrupt(RGB32, "blur", 1)
    with pytest.raises(ValueError, match="severity"):
        C.corrupt(RGB32, "contrast", 6)
    with pytest.raises(ValueError, match="uint8"):
        C.corrupt(RGB32.astype(np.float32), "contrast", 1)
    with pytest.raises(ValueError, match="at least 28"):
        C.corrupt(np.zeros((1, 16, 16, 3), np.uint8), "contrast", 1)


def test_frost_without_textures_names_the_package(monkeypatch):
    monkeypatch.setattr(C, "_FROST_PACKAGES", (("no_such_package_xyz", ("frost",)),))
    with pytest.raises(FileNotFoundError, match="pip install corrupt-tta"):
        C.frost_texture_dir()


# --------------------------------------------------------------------------------------------
# "-C" folder readers
# --------------------------------------------------------------------------------------------


def write_folder(path, names=("gaussian_noise", "contrast"), n=4, shape=(32, 32, 3)):
    """A tiny folder in the exact CIFAR-10-C layout; pixel value = severity * 10 + row."""
    path.mkdir(parents=True, exist_ok=True)
    labels = np.arange(n, dtype=np.uint8) % 10
    np.save(path / "labels.npy", np.tile(labels, 5))
    for k, name in enumerate(names):
        data = np.zeros((5 * n, *shape), np.uint8)
        for s in range(5):
            for i in range(n):
                data[s * n + i] = 50 * k + (s + 1) * 10 + i
        np.save(path / f"{name}.npy", data)
    return labels


def test_iterate_folder(tmp_path):
    labels = write_folder(tmp_path)
    cells = list(cs.iterate(tmp_path, ["gaussian_noise", "contrast"], [2, 5], n_examples=3))
    assert [(c[0], c[1]) for c in cells] == [
        ("gaussian_noise", 2), ("gaussian_noise", 5), ("contrast", 2), ("contrast", 5)]
    for k, (name, severity, images, cell_labels) in enumerate(cells):
        assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
        assert cell_labels.dtype == np.int32
        np.testing.assert_array_equal(cell_labels, labels[:3])
        expected = 50 * (k // 2) + severity * 10 + np.arange(3)
        np.testing.assert_array_equal(images[:, 0, 0, 0], expected)
    cset = cs.open_folder(tmp_path, "gaussian_noise")
    assert (cset.n, cset.image_shape, cset.severities) == (4, (32, 32, 3), (1, 2, 3, 4, 5))
    assert len(list(cs.iterate(cset, "gaussian_noise"))) == 5  # n_examples=-1: all 4


def test_iterate_refuses_more_examples_than_exist(tmp_path):
    write_folder(tmp_path)
    with pytest.raises(ValueError, match="only 4 images per severity"):
        next(cs.iterate(tmp_path, ["contrast"], [1], n_examples=5))


def test_missing_files_are_listed(tmp_path):
    write_folder(tmp_path, names=("contrast",))
    with pytest.raises(DatasetNotFoundError) as err:
        cs.open_folder(tmp_path)  # the 15 benchmark corruptions
    message = str(err.value)
    assert "gaussian_noise.npy" in message and "jpeg_compression.npy" in message
    assert "contrast.npy" not in message.split("Missing:")[1].split("\n")[0]
    assert "zenodo" in message
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        cs.open_folder(tmp_path / "nowhere", ["contrast"])


def test_wrong_shapes_are_errors(tmp_path):
    write_folder(tmp_path, names=("contrast", "fog"))
    np.save(tmp_path / "fog.npy", np.zeros((19, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="19 images but labels.npy has 20"):
        cs.open_folder(tmp_path, ["contrast", "fog"])
    np.save(tmp_path / "fog.npy", np.zeros((20, 28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="contrast.npy has"):
        cs.open_folder(tmp_path, ["contrast", "fog"])
    np.save(tmp_path / "fog.npy", np.zeros((20, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="expected uint8"):
        cs.open_folder(tmp_path, ["fog"])
    np.save(tmp_path / "labels.npy", np.arange(20))
    with pytest.raises(ValueError, match="blocks of 4 labels"):
        cs.open_folder(tmp_path, ["contrast"])


def test_tfds_names():
    assert cs.tfds_config_name("gaussian_noise", 3) == "cifar10_corrupted/gaussian_noise_3"
    assert cs.tfds_config_name("glass_blur", 1) == "cifar10_corrupted/frosted_glass_blur_1"
    assert cs.tfds_config_name("elastic_transform", 5) == "cifar10_corrupted/elastic_5"
    for bare in ("cifar10_corrupted", "cifar10_corrupted/gaussian_noise"):
        with pytest.raises(ValueError, match="explicit corruption and severity"):
            cs.load_tfds(bare)
    with pytest.raises(ValueError, match="1..5"):
        next(cs.iterate_tfds(["contrast"], [0]))


def test_tfds_through_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        cells = list(cs.iterate_tfds(["glass_blur", "contrast"], [1, 5], str(tmp_path),
                                     n_examples=3))
        with pytest.raises(ValueError, match="holds only 4"):
            cs.load_tfds("cifar10_corrupted/contrast_2", str(tmp_path), n_examples=5)
    assert [(c[0], c[1]) for c in cells] == [
        ("glass_blur", 1), ("glass_blur", 5), ("contrast", 1), ("contrast", 5)]
    assert all(c[2].shape == (3, 32, 32, 3) and c[3].dtype == np.int32 for c in cells)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_writes_a_readable_benchmark(tmp_path):
    names = [n for n in C.ALL_CORRUPTIONS if HAVE_FROST or n != "frost"]
    out = tmp_path / "synthetic-C"
    args = ["--dataset=synthetic", f"--out={out}", "--examples=8", "--seed=5",
            f"--corruptions={','.join(names)}", "--progress=log"]
    assert corrupt_cli.main(args) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["n_examples"] == 8 and info["image_shape"] == [32, 32, 3]
    assert info["seed"] == 5 and info["constants_version"] == C.CONSTANTS_VERSION
    assert not list(out.glob(".*tmp*"))

    from card_jax.data import sources

    synthetic = sources.load("synthetic", pad_to=0)
    clean, clean_labels = synthetic.test_images[:8], synthetic.test_labels[:8]
    cells = list(cs.iterate(out, names, "all"))
    assert len(cells) == 5 * len(names)
    for name, severity, images, labels in cells:
        assert images.shape == (8, 32, 32, 3)
        np.testing.assert_array_equal(labels, clean_labels)
        if name in ("gaussian_noise", "pixelate") and severity == 3:
            np.testing.assert_array_equal(images, C.corrupt(clean, name, 3, seed=5))
    assert np.load(out / "labels.npy").dtype == np.uint8

    # Resumable: a second run skips every complete file; other settings are refused.
    (out / "fog.npy").unlink()
    rates = corrupt_cli.generate("synthetic", out, examples=8, seed=5, corruptions=names,
                                 progress="none")
    assert set(rates) == {"fog"}
    assert corrupt_cli.main([*args[:3], "--seed=6", *args[4:]]) == corrupt_cli.EXIT_BAD_INPUT
    assert corrupt_cli.main([*args[:2], "--examples=9999"]) == corrupt_cli.EXIT_BAD_INPUT
