"""The 19 CIFAR-10-C image corruptions, re-implemented in JAX for any image size.

Source: Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions
and Perturbations" (ICLR 2019), and the generator of the released CIFAR-10-C files,
`hendrycks/robustness` `ImageNet-C/create_c/make_cifar_c.py`. The severity constants below are
that script's (the CIFAR parameterisation, NOT the ImageNet-C one that `imagecorruptions`
implements; see SPEC.md section 7). The code is our own: the reference is a per-image
numpy/OpenCV/ImageMagick loop, this is a batched, jitted JAX pipeline.

Public API:

* `corrupt(images, name, severity, seed)`: uint8 `[N, H, W, C]` (C = 1 or 3, H, W >= 28) ->
  uint8 of the same shape. Deterministic for a seed; image `i` of a call depends only on
  (seed, name, severity, i) and its own pixels, never on the batch size or on the other
  images, so `corrupt(x[:8], ...) == corrupt(x, ...)[:8]`.
* `CORRUPTIONS`: the 15 benchmark corruptions in the canonical order;
  `EXTRA_CORRUPTIONS`: the 4 "validation" ones; `ALL_CORRUPTIONS` = both (19 files).
* `SEVERITY_CONSTANTS`: the reference constants per corruption (severity 1..5), in the units
  of a 32x32 image. `CONSTANTS_VERSION` names this table and the size-scaling rules below.

Image size. The reference only handles 32x32. Constants that are lengths in pixels are
multiplied by `r = max(1, sqrt(H * W) / 32)` (`scale_factor`), so 32x32 reproduces the
reference exactly and a 64x64 image gets twice the blur radii. Smaller images (down to 28x28,
e.g. Fashion-MNIST) keep the 32x32 constants unscaled: shrinking pixel-scale kernels breaks
them (a radius-1 disk scaled by 0.875 loses its four neighbours and defocus severity 4 becomes
the identity), while 28 vs 32 pixels is a small change of scale. Scaled: Gaussian sigmas
(gaussian/glass blur, spatter, elastic), the defocus disk radius and its anti-aliasing sigma
(and that blur's kernel half-width `max(1, round(r))`), the glass-blur shuffle distance
(`max(1, round(r))`), motion-blur radius and sigma (also for snow), the snow-flake zoom, the
elastic constants (which the reference already writes as multiples of the image size 32), and
the frost texture resize factor (0.2 * r). Scale-free, so never scaled: noise levels, contrast,
brightness, saturation, JPEG quality, the zoom-blur factors and the pixelate factor (both
relative to the image size). Fog draws its plasma fractal on the smallest power-of-two map
covering the image (32 for 32x32, as in the reference) and crops it.

Rounding. The reference casts its float results with `np.uint8`, which truncates; so do we
(with a 1e-3 guard so that float32 round-off of an exact integer does not lose a level).
ImageMagick's motion blur also truncates to 8 bits (checked against ImageMagick 6.9 Q16:
our motion blur matches `convert -motion-blur` to within 1 level on < 0.5% of pixels).
Pixelate and JPEG round exactly as Pillow does.

Deviations from the reference (the reference needs ImageMagick, OpenCV and scikit-image,
none of which this package uses):

* motion_blur / snow: ImageMagick's `MotionBlurImage` re-implemented from its definition: a
  one-sided line kernel of width `2 * ceil(radius) + 1` with half-Gaussian weights
  `exp(-i^2 / (2 sigma^2))` (normalised), taps at `(ceil(i cos a - 0.5), ceil(i sin a - 0.5))`,
  edge pixels repeated outside the image. No Wand needed.
* glass_blur: the reference swaps pixels one at a time, bottom-right to top-left, so a pixel
  can be carried several steps. The swaps never look at pixel values, so we compose them into
  a permutation of pixel indices (a `lax.scan` over the same visiting order, batched over
  images) and apply it with one gather: the same random process, vectorised over the batch.
* impulse_noise: each value (channel) is replaced with probability `amount`, half by 0, half
  by 255 (scikit-image >= 0.19 semantics), not the 2018 scikit-image "exact count with
  replacement" variant.
* spatter: OpenCV's Canny (L1 gradient, 3x3 Sobel, thresholds 50/150, 8-connected
  hysteresis), 5x5 chamfer distance transform (weights 1, 1.4, 2.1969 in 16-bit fixed point),
  `equalizeHist`, `filter2D` and `blur` re-implemented in JAX; the liquid layer is clipped to
  [0, 1] before its uint8 cast (numpy would wrap values above 1).
* frost: textures from the `corrupt-tta` package data (the reference's frost1-5 images; frost6
  is never drawn, as in the reference's `randint(5)`; `imagecorruptions`' copy is used if that
  is what is installed). cv2's bilinear resize is reproduced
  (for r = 1 it is exactly the subsampling `[2::5, 2::5]`).
* elastic_transform: OpenCV's `warpAffine` (bilinear, BORDER_REFLECT_101) is computed with
  `jax.scipy.ndimage.map_coordinates(mode="mirror")` in full float precision (OpenCV quantises
  coordinates to 1/32 pixel).
* shot/gaussian/... noise use JAX's generators, so values differ from numpy draws: the
  released CIFAR-10-C files cannot be reproduced bit for bit by any re-implementation.

Randomness: `jax.random.key(seed)` (threefry, its non-partitionable variant pinned so that the
bits never depend on the global `jax_threefry_partitionable` setting), folded with the
corruption's index in `ALL_CORRUPTIONS`, the severity and the image index. Host code uses no
randomness (JPEG is deterministic; frost textures are chosen and cropped in JAX).

Grayscale (C = 1): corruptions that need colour (brightness, saturate, snow, frost, spatter)
replicate the channel to RGB, corrupt, and return the channel mean; the others run on the
single channel directly (the reference would produce three equal channels for a grey input,
whose mean is the same thing). JPEG encodes grayscale images as 8-bit grayscale JPEGs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import io
import math
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ALL_CORRUPTIONS",
    "CONSTANTS_VERSION",
    "CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "SEVERITY_CONSTANTS",
    "corrupt",
    "frost_texture_dir",
    "scale_factor",
]

# The names live in corruption_sets (which must not import JAX). The 15 benchmark corruptions
# are in the canonical CIFAR-10-C order; never reorder: an index here seeds its random stream.
from card_jax.data.corruption_sets import (  # noqa: E402
    ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS)

#: Bump when the constants, the scaling rules or the random streams change: files written
#: with another version are not interchangeable.
CONSTANTS_VERSION = "make_cifar_c.py/card_jax-1"

REFERENCE_SIZE = 32  # the image size the reference constants are written for
MIN_SIZE = 28

# Severity constants of make_cifar_c.py, severities 1..5, in 32x32 pixel units.
SEVERITY_CONSTANTS: Mapping[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),        # sigma on [0, 1]
    "shot_noise": (500, 250, 100, 75, 50),                   # Poisson photons per unit
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),         # s&p amount
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # radius, alias
    "glass_blur": (                                           # sigma, max_delta, iterations
        (0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),  # radius, sigma
    "zoom_blur": tuple(                                       # zoom factors (np.arange quirk:
        tuple(float(z) for z in np.arange(1, end, 0.01))       # 1.06 itself is included)
        for end in (1.06, 1.11, 1.16, 1.21, 1.26)),
    "snow": (                 # loc, scale, zoom, threshold, blur radius, blur sigma, blend
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # image, frost weight
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # strength, wibble decay
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),               # added to HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),                 # factor around the channel mean
    "elastic_transform": (    # alpha, sigma, affine jitter, each times the image size (32)
        (0.0, 0.0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),
        (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),               # down-sampling factor
    "jpeg_compression": (80, 65, 58, 50, 40),                # JPEG quality
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),           # multiplicative sigma
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),                # sigma
    "spatter": (              # loc, scale, sigma, threshold, intensity (or mud sigma), mud?
        (0.62, 0.1, 0.7, 0.7, 0.5, 0),
        (0.65, 0.1, 0.8, 0.7, 0.5, 0),
        (0.65, 0.3, 1, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.69, 0.6, 1),
        (0.65, 0.1, 0.5, 0.68, 0.6, 1)),
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),  # S * a + b
}

_TRUNC_GUARD = 1e-3  # see "Rounding" above
# Pinned, whatever the global setting, because it changes the random bits (reproducibility)
# and because the non-partitionable threefry compiles ~4x faster on CPU, which matters here:
# 19 corruptions x 2 image shapes of compiles in the tests.
_THREEFRY_PARTITIONABLE = False
_DEFAULT_BATCH = 512  # images per compiled call; larger gains little on CPU


def scale_factor(height: int, width: int) -> float:
    """`r = max(1, sqrt(H * W) / 32)`: how much larger than the reference's 32x32 an image is
    (never below 1; see the module docstring)."""
    return max(1.0, math.sqrt(height * width) / REFERENCE_SIZE)


# ============================================================================================
# Host-side construction of the linear operators (numpy, cached per size and severity)
# ============================================================================================


def _fold(index: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Maps integer indices (possibly outside [0, n)) into the array, by boundary `mode`.

    Modes use scipy.ndimage names: `nearest` (edge repeated; OpenCV BORDER_REPLICATE),
    `reflect` (half-sample symmetric "dcb|abcd|cba"), `mirror` (whole-sample symmetric
    "dcb|abcd|cba" without repeating the edge; OpenCV BORDER_REFLECT_101, OpenCV's default).
    """
    index = np.asarray(index)
    if mode == "nearest" or n == 1:
        return np.clip(index, 0, n - 1)
    if mode == "reflect":
        index = np.mod(index, 2 * n)
        return np.where(index >= n, 2 * n - 1 - index, index)
    if mode == "mirror":
        index = np.mod(index, 2 * n - 2)
        return np.where(index >= n, 2 * n - 2 - index, index)
    raise ValueError(f"unknown boundary mode {mode!r}")


def _correlation_matrix(n: int, offsets: np.ndarray, weights: np.ndarray, mode: str) -> np.ndarray:
    """`[n, n]` matrix M with `(M @ v)[i] = sum_k weights[k] * v[fold(i + offsets[k])]`.

    A 1-D filter with any boundary rule becomes one small matmul, so separable filters on a
    `[H, W]` image are `M_h @ X @ M_w.T` and never need padding logic inside jit.
    """
    matrix = np.zeros((n, n), np.float64)
    rows = np.arange(n)
    for offset, weight in zip(offsets, weights):
        np.add.at(matrix, (rows, _fold(rows + offset, n, mode)), weight)
    return matrix


def _gaussian_matrix(n: int, sigma: float, mode: str, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage.gaussian_filter1d (used by skimage.filters.gaussian) as an `[n, n]` matrix.

    Same kernel: radius `int(truncate * sigma + 0.5)`, weights `exp(-x^2 / (2 sigma^2))`
    normalised; sigma ~ 0 is the identity, as in scipy.
    """
    radius = int(truncate * sigma + 0.5) if sigma > 1e-15 else 0
    if radius == 0:
        return np.eye(n)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    return _correlation_matrix(n, offsets, weights / weights.sum(), mode)


def _clipped_zoom_matrix(n: int, zoom: float, source: int | None = None) -> np.ndarray:
    """The reference's `clipped_zoom` along one axis as a `[n, source]` linear map.

    Crops the central `ch = ceil(n / zoom)` samples, zooms them with scipy's order-1 spline
    (`scipy.ndimage.zoom`: output size `round(ch * zoom)`, corners aligned), and keeps the
    central `n` outputs. With `source=None` the input has length `n` (crop, as in zoom blur);
    with `source=ch` the input is exactly the `ch` cropped samples (snow draws its noise at
    that size directly, which also lets it "zoom" by less than 1 on small images).
    """
    ch = int(np.ceil(n / zoom))
    top = (n - ch) // 2 if source is None else 0
    width = n if source is None else source
    out_size = int(round(ch * zoom))
    trim = (out_size - n) // 2
    matrix = np.zeros((n, width), np.float64)
    for i in range(n):
        o = trim + i
        coord = o * (ch - 1) / (out_size - 1) if out_size > 1 else 0.0
        lo = min(int(np.floor(coord)), ch - 1)
        frac = coord - lo
        matrix[i, top + lo] += 1.0 - frac
        if frac > 0:
            matrix[i, top + min(lo + 1, ch - 1)] += frac
    return matrix


def _pil_box_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's BOX resampling along one axis as an `[out_size, in_size]` matrix.

    Pillow samples its filter at input pixel centres (it does not integrate areas): output
    `o` averages the inputs whose centres fall in `((o + .5) s - s'/2, (o + .5) s + s'/2]`,
    `s = in/out`, `s' = max(s, 1)`; up-sampling (s < 1) therefore picks one input pixel.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    matrix = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        for i in range(lo, hi):
            u = (i - center + 0.5) / filterscale
            if -0.5 < u <= 0.5:
                matrix[o, i] = 1.0
        total = matrix[o].sum()
        if total:
            matrix[o] /= total
    return matrix


def _pad_rows(matrix: np.ndarray, rows: int) -> np.ndarray:
    """Zero rows appended up to `rows` (keeps array shapes independent of the severity)."""
    return np.pad(matrix, ((0, rows - matrix.shape[0]), (0, 0)))


def _pad_cols(matrix: np.ndarray, cols: int) -> np.ndarray:
    return np.pad(matrix, ((0, 0), (0, cols - matrix.shape[1])))


def _cv2_gaussian_taps(ksize: int, sigma: float) -> np.ndarray:
    """cv2.getGaussianKernel(ksize, sigma) for sigma > 0."""
    x = np.arange(ksize) - (ksize - 1) / 2
    taps = np.exp(-(x**2) / (2 * sigma**2))
    return taps / taps.sum()


def _defocus_kernel(radius: float, alias_blur: float, half_taps: int) -> np.ndarray:
    """The reference's anti-aliased disk: a normalised binary disk, Gaussian-blurred.

    Built on a grid with a margin, so the (separable, `2 * half_taps + 1`-tap) blur never
    touches the grid border, then trimmed to its non-zero support. Returned as `[K, K]`.
    """
    half = int(max(8, math.ceil(radius))) + half_taps
    grid = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    taps = _cv2_gaussian_taps(2 * half_taps + 1, alias_blur)
    size = len(grid)
    blur = _correlation_matrix(size, np.arange(-half_taps, half_taps + 1), taps, "mirror")
    kernel = blur @ disk @ blur.T
    nonzero = np.nonzero(kernel.sum(axis=1) > 0)[0]
    extent = int(max(abs(nonzero[0] - half), abs(nonzero[-1] - half)))
    return kernel[half - extent:half + extent + 1, half - extent:half + extent + 1]


def _center_pad(kernel: np.ndarray, size: int) -> np.ndarray:
    pad = (size - kernel.shape[0]) // 2
    return np.pad(kernel, pad)


def _motion_taps(radius: float, sigma: float, max_width: int) -> np.ndarray:
    """ImageMagick MotionBlurImage weights: width `2 ceil(radius) + 1`, half-Gaussian, summing
    to 1; zero-padded to `max_width` (the zero taps contribute nothing)."""
    width = int(2 * math.ceil(radius) + 1)
    i = np.arange(width)
    taps = np.exp(-(i**2) / (2 * sigma**2))
    return np.pad(taps / taps.sum(), (0, max_width - width))


def _motion_width(radius: float) -> int:
    return int(2 * math.ceil(radius) + 1)


# --------------------------------------------------------------------------------------------
# Frost textures
# --------------------------------------------------------------------------------------------

_FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
_FROST_PACKAGES = (
    # (importable package, folder of the frost images inside it). corrupt-tta is maintained
    # and installs on NumPy 2; imagecorruptions ships the same files if it happens to be there.
    ("corrupt_tta", ("assets", "frost")),
    ("imagecorruptions", ("frost",)),
)


def frost_texture_dir() -> Path:
    """The folder holding frost1.png ... frost5.jpg (package data of `corrupt-tta`).

    Located with `importlib.util.find_spec`, which finds the installed package WITHOUT
    importing it: importing corrupt_tta would import OpenCV, which this package does not need.

    Raises:
      FileNotFoundError naming `pip install corrupt-tta` when no package provides the images.
    """
    for package, parts in _FROST_PACKAGES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        for location in (spec.submodule_search_locations or []) if spec else []:
            folder = Path(location).joinpath(*parts)
            if all((folder / f).is_file() for f in _FROST_FILES):
                return folder
    raise FileNotFoundError(
        "the frost corruption needs the frost texture images (frost1.png ... frost5.jpg of "
        "Hendrycks & Dietterich), shipped as package data of corrupt-tta. Install them with "
        "`pip install corrupt-tta` (`pip install --no-deps corrupt-tta` is enough: only the "
        "image files are used)."
    )


def _cv2_bilinear_resize(image: np.ndarray, factor: float) -> np.ndarray:
    """cv2.resize(image, (0, 0), fx=factor, fy=factor) with INTER_LINEAR, float64 result.

    Half-pixel-centre mapping `src = (dst + .5) / factor - .5`, output size
    `round(size * factor)`, edges replicated; no anti-aliasing, exactly like OpenCV.
    """
    out = image.astype(np.float64)
    for axis in (0, 1):
        n = image.shape[axis]
        m = int(round(n * factor))
        src = np.clip((np.arange(m) + 0.5) / factor - 0.5, 0, n - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        frac = (src - lo).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
        out = np.take(out, lo, axis=axis) * (1 - frac) + np.take(out, hi, axis=axis) * frac
    return out


@functools.lru_cache(maxsize=8)
def _frost_textures(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(`[5, Th, Tw, 3]` float32 textures on 0..255, zero-padded; `[5, 2]` int32 true sizes)."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    folder = frost_texture_dir()
    factor = 0.2 * scale_factor(height, width)
    textures = []
    for name in _FROST_FILES:
        with Image.open(folder / name) as im:
            rgb = np.asarray(im.convert("RGB"))  # drops PNG alpha, as cv2.imread does
        texture = _cv2_bilinear_resize(rgb, factor)
        if texture.shape[0] <= height or texture.shape[1] <= width:
            raise ValueError(
                f"frost texture {name} resized to {texture.shape[:2]} is not larger than the "
                f"{height}x{width} images; use images of similar aspect ratio"
            )
        textures.append(texture)
    th = max(t.shape[0] for t in textures)
    tw = max(t.shape[1] for t in textures)
    stack = np.zeros((len(textures), th, tw, 3), np.float32)
    for i, t in enumerate(textures):
        stack[i, : t.shape[0], : t.shape[1]] = t
    sizes = np.array([t.shape[:2] for t in textures], np.int32)
    return stack, sizes


# ============================================================================================
# JAX building blocks (single image; batched with vmap)
# ============================================================================================


def _materialise(x: jax.Array) -> jax.Array:
    """Computes `x` once. Without this barrier XLA fuses the (elementwise) random-number
    generator into every consumer of a slice of its output, compiling threefry many times over
    (seconds per corruption on CPU)."""
    return jax.lax.optimization_barrier(x)


def _separable(x: jax.Array, mh: jax.Array, mw: jax.Array) -> jax.Array:
    """`[H, W, C]` -> `[H', W', C]`: rows mixed by `mh [H', H]`, columns by `mw [W', W]`."""
    return jnp.einsum("ij,jkc,lk->ilc", mh, x, mw, precision=jax.lax.Precision.HIGHEST)


def _separable2d(x: jax.Array, mh: jax.Array, mw: jax.Array) -> jax.Array:
    """As `_separable` for a single-channel `[H, W]` image."""
    return jnp.einsum("ij,jk,lk->il", mh, x, mw, precision=jax.lax.Precision.HIGHEST)


def _gather_pad(x: jax.Array, pad: int, mode: str) -> jax.Array:
    """Pads the two leading (spatial) axes by `pad` with the boundary rule `mode`."""
    h, w = x.shape[:2]
    rows = _fold(np.arange(-pad, h + pad), h, mode)
    cols = _fold(np.arange(-pad, w + pad), w, mode)
    return x[rows][:, cols]


def _correlate2d(x: jax.Array, kernel: jax.Array, mode: str) -> jax.Array:
    """cv2.filter2D-style correlation of `[H, W]` or `[H, W, C]` with a square `[K, K]` kernel.

    Written as a sum of shifted copies: K is small (<= 7 at 32x32) and this batches under vmap
    without the layout shuffles a depthwise convolution would need.
    """
    k = kernel.shape[0]
    pad = k // 2
    padded = _gather_pad(x, pad, mode)
    h, w = x.shape[:2]
    out = jnp.zeros(x.shape, jnp.float32)
    for dy in range(k):
        for dx in range(k):
            out = out + kernel[dy, dx] * padded[dy:dy + h, dx:dx + w]
    return out


def _box3(x: jax.Array) -> jax.Array:
    """cv2.blur(x, (3, 3)): 3x3 mean with BORDER_REFLECT_101."""
    return _correlate2d(x, jnp.full((3, 3), 1.0 / 9.0, jnp.float32), "mirror")


def _motion_blur(x: jax.Array, taps: jax.Array, angle_deg: jax.Array) -> jax.Array:
    """ImageMagick MotionBlurImage of `[H, W]` or `[H, W, C]` (see module docstring)."""
    h, w = x.shape[:2]
    theta = jnp.deg2rad(angle_deg)
    i = jnp.arange(taps.shape[0], dtype=jnp.float32)
    off_x = jnp.ceil(i * jnp.cos(theta) - 0.5).astype(jnp.int32)
    off_y = jnp.ceil(i * jnp.sin(theta) - 0.5).astype(jnp.int32)
    rows = jnp.clip(jnp.arange(h)[:, None] + off_y[None, :], 0, h - 1)  # [H, K]
    cols = jnp.clip(jnp.arange(w)[:, None] + off_x[None, :], 0, w - 1)  # [W, K]
    samples = x[rows[:, None, :], cols[None, :, :]]  # [H, W, K, ...]
    return jnp.tensordot(jnp.moveaxis(samples, 2, -1), taps, axes=1)


def _rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    """skimage.color.rgb2hsv on `[..., 3]` in [0, 1] (hue in [0, 1), ties prefer b, then g)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    safe = jnp.where(delta > 0, delta, 1.0)
    s = jnp.where(delta > 0, delta / jnp.where(v > 0, v, 1.0), 0.0)
    hue = jnp.where(b == v, 4.0 + (r - g) / safe,
                    jnp.where(g == v, 2.0 + (b - r) / safe, (g - b) / safe))
    hue = jnp.where(delta > 0, jnp.mod(hue / 6.0, 1.0), 0.0)
    return jnp.stack([hue, s, v], axis=-1)


def _hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """skimage.color.hsv2rgb on `[..., 3]`."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    hi = jnp.floor(h * 6.0)
    f = h * 6.0 - hi
    p = v * (1.0 - s)
    q = v * (1.0 - f * s)
    t = v * (1.0 - (1.0 - f) * s)
    sector = jnp.mod(hi, 6).astype(jnp.int32)
    choices = jnp.stack([
        jnp.stack([v, t, p], -1), jnp.stack([q, v, p], -1), jnp.stack([p, v, t], -1),
        jnp.stack([p, q, v], -1), jnp.stack([t, p, v], -1), jnp.stack([v, p, q], -1),
    ], axis=0)
    return jnp.take_along_axis(choices, sector[None, ..., None], axis=0)[0]


def _plasma_fractal(key: jax.Array, mapsize: int, decay: jax.Array) -> jax.Array:
    """Diamond-square height map `[mapsize, mapsize]` in [0, 1], as the reference's
    `plasma_fractal` (including its `wibble * U(-wibble, wibble)` perturbation, whose scale
    is wibble squared, and toroidal wrap-around). `mapsize` is a power of two.

    The reference fills strided views of one array; here the grid filled so far (every
    `step`-th point, `cells x cells`) is refined to `2 cells x 2 cells` by interleaving the new
    square centres and edge midpoints: the same values, without scatters (which compile
    slowly). Every perturbation comes from one draw, for the same reason.
    """
    octaves = int(math.log2(mapsize))
    total = sum(3 * 4**i for i in range(octaves))
    noise = _materialise(jax.random.uniform(key, (total,), jnp.float32, -1.0, 1.0))
    grid = jnp.zeros((1, 1), jnp.float32)
    wibble = jnp.float32(100.0)
    used = 0
    for _ in range(octaves):
        cells = grid.shape[0]
        draws = noise[used:used + 3 * cells * cells].reshape(3, cells, cells)
        used += 3 * cells * cells
        perturb = wibble * (wibble * draws)  # the reference's wibble * U(-wibble, wibble)
        # Square step: each centre is the mean of its 4 corners (+ noise).
        square = grid + jnp.roll(grid, -1, axis=0)
        square = square + jnp.roll(square, -1, axis=1)
        centres = square / 4.0 + perturb[0]
        # Diamond step. Midpoints of horizontal edges: centres above/below, corners left/right.
        edge_h = (centres + jnp.roll(centres, 1, axis=0) + grid + jnp.roll(grid, -1, axis=1)) / 4.0
        edge_h = edge_h + perturb[1]
        # Midpoints of vertical edges: centres left/right, corners above/below.
        edge_v = (centres + jnp.roll(centres, 1, axis=1) + grid + jnp.roll(grid, -1, axis=0)) / 4.0
        edge_v = edge_v + perturb[2]
        # new[2i + a, 2j + b] = (grid, edge_h; edge_v, centres)[a][b][i, j]
        top = jnp.stack([grid, edge_h], axis=-1)
        bottom = jnp.stack([edge_v, centres], axis=-1)
        grid = jnp.stack([top, bottom], axis=1).reshape(2 * cells, 2 * cells)
        wibble = wibble / decay
    grid = grid - grid.min()
    return grid / grid.max()


# --------------------------------------------------------------------------------------------
# OpenCV pieces of spatter (single-channel [H, W] images)
# --------------------------------------------------------------------------------------------

_CANNY_LOW, _CANNY_HIGH = 50, 150
_TAN22_Q15 = 13573  # tan(22.5 deg) in Q15 fixed point, as OpenCV's Canny
# cv2.distanceTransform(DIST_L2, 5): chamfer weights 1, 1.4, 2.1969 in 16-bit fixed point.
_CHAMFER = (65536, 91750, 143976)
_CHAMFER_ONE = 65536
_DIST_TRUNC = 20.0  # cv2.threshold(dist, 20, 20, THRESH_TRUNC); not size-scaled (ImageNet-C
#                     uses the same 20 at 224x224)
_EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], np.float32)


def _neighbours(x: jax.Array, fill: Any) -> Callable[[int, int], jax.Array]:
    """Returns `shift(dy, dx)` giving `x[i + dy, j + dx]` with `fill` outside (|d| <= 2)."""
    h, w = x.shape
    padded = jnp.pad(x, 2, constant_values=fill)
    return lambda dy, dx: padded[2 + dy:2 + dy + h, 2 + dx:2 + dx + w]


def _canny(image: jax.Array) -> jax.Array:
    """cv2.Canny(uint8 image, 50, 150) (aperture 3, L1 gradient) -> bool edges `[H, W]`."""
    img = _gather_pad(image.astype(jnp.int32), 1, "nearest")  # Sobel uses BORDER_REPLICATE
    h, w = image.shape
    s = lambda dy, dx: img[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]  # noqa: E731
    dx = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
    dy = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
    mag = jnp.abs(dx) + jnp.abs(dy)
    nb = _neighbours(mag, 0)  # OpenCV pads the magnitude buffer with zeros
    ax = jnp.abs(dx)
    ay = jnp.abs(dy) << 15
    tg22 = ax * _TAN22_Q15
    tg67 = tg22 + (ax << 16)
    same_sign = jnp.bitwise_xor(dx, dy) >= 0
    # Non-maximum suppression along the quantised gradient direction; the asymmetric > / >=
    # is OpenCV's tie-break.
    horizontal = (mag > nb(0, -1)) & (mag >= nb(0, 1))
    vertical = (mag > nb(-1, 0)) & (mag >= nb(1, 0))
    diagonal = jnp.where(same_sign, (mag > nb(-1, -1)) & (mag > nb(1, 1)),
                         (mag > nb(-1, 1)) & (mag > nb(1, -1)))
    local_max = jnp.where(ay < tg22, horizontal, jnp.where(ay > tg67, vertical, diagonal))
    weak = local_max & (mag > _CANNY_LOW)
    strong = weak & (mag > _CANNY_HIGH)

    def grow(state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        edges, _ = state
        nbe = _neighbours(edges, False)
        dilated = functools.reduce(
            jnp.logical_or, [nbe(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)])
        new = edges | (weak & dilated)
        return new, jnp.any(new != edges)

    edges, _ = jax.lax.while_loop(lambda st: st[1], grow, (strong, jnp.array(True)))
    return edges


def _chamfer_distance(edges: jax.Array) -> jax.Array:
    """cv2.distanceTransform(255 - edges, DIST_L2, 5), truncated at 20, in 16-bit fixed point.

    Shortest paths under the 5x5 chamfer metric, by relaxation: every path shorter than the
    truncation has at most 21 moves (each move costs >= 1), so 21 rounds are exact below it.
    Outside the image counts as "no edge", as in OpenCV. Returns int32 `[H, W]`: distance
    times 65536 (OpenCV's own fixed point, so every later step can be exact).
    """
    inf = jnp.int32(1 << 28)
    a, b, c = _CHAMFER
    moves = [(0, 1, a), (0, -1, a), (1, 0, a), (-1, 0, a),
             (1, 1, b), (1, -1, b), (-1, 1, b), (-1, -1, b)]
    moves += [(sy * 1, sx * 2, c) for sy in (1, -1) for sx in (1, -1)]
    moves += [(sy * 2, sx * 1, c) for sy in (1, -1) for sx in (1, -1)]

    def relax(_: int, d: jax.Array) -> jax.Array:
        nb = _neighbours(d, inf)
        best = functools.reduce(jnp.minimum, [nb(dy, dx) + cost for dy, dx, cost in moves])
        return jnp.minimum(d, best)

    d = jax.lax.fori_loop(0, int(_DIST_TRUNC) + 1, relax, jnp.where(edges, 0, inf))
    return jnp.minimum(d, int(_DIST_TRUNC * _CHAMFER_ONE))


def _box3_floor_fixed(d: jax.Array) -> jax.Array:
    """`cv2.blur(distance, (3, 3)).astype(np.uint8)` for fixed-point distances `d`.

    OpenCV sums the float32 distances (exact: multiples of 2^-16 below 180) in double and
    scales by 1/9; for these values that floors to exactly `floor(sum / 9)`, computed here in
    integers (a float32 mean would misplace values that are exact integers).
    """
    padded = _gather_pad(d, 1, "mirror")
    h, w = d.shape
    total = functools.reduce(
        jnp.add, [padded[i:i + h, j:j + w] for i in range(3) for j in range(3)])
    return total // (9 * _CHAMFER_ONE)


def _equalize_hist(image: jax.Array) -> jax.Array:
    """cv2.equalizeHist on integer `[H, W]` values in 0..255 (returns float values 0..255)."""
    flat = image.reshape(-1).astype(jnp.int32)
    hist = jnp.zeros(256, jnp.int32).at[flat].add(1)
    first = jnp.argmax(hist > 0)
    total = flat.shape[0]
    first_count = hist[first]
    scale = jnp.float32(255.0) / jnp.maximum(total - first_count, 1).astype(jnp.float32)
    cum = jnp.cumsum(hist) - first_count  # OpenCV's running sum starts after the first bin
    lut = jnp.clip(jnp.round(cum.astype(jnp.float32) * scale), 0, 255)
    lut = jnp.where(jnp.arange(256) <= first, 0.0, lut)
    out = lut[flat].reshape(image.shape)
    # A constant image is returned unchanged by OpenCV.
    return jnp.where(first_count == total, image.astype(jnp.float32), out)


# ============================================================================================
# The corruptions: per-image functions `fn(x [H, W, C] in [0, 1], key, p, static)` and
# host-side parameter builders `params(severity, h, w) -> (static, p)`. Arrays in `p` have
# severity-independent shapes, so each corruption compiles once per image shape.
# ============================================================================================


def _f32(value: Any) -> np.ndarray:
    return np.asarray(value, np.float32)


# ---- noise ---------------------------------------------------------------------------------


def _gaussian_noise(x, key, p, static):
    return x + p["sigma"] * jax.random.normal(key, x.shape)


def _shot_noise(x, key, p, static):
    return jax.random.poisson(key, x * p["lam"], x.shape).astype(jnp.float32) / p["lam"]


def _impulse_noise(x, key, p, static):
    k_flip, k_salt = jax.random.split(key)
    flipped = jax.random.uniform(k_flip, x.shape) < p["amount"]
    salt = jax.random.bernoulli(k_salt, 0.5, x.shape).astype(jnp.float32)
    return jnp.where(flipped, salt, x)


def _speckle_noise(x, key, p, static):
    return x + x * p["sigma"] * jax.random.normal(key, x.shape)


def _scalar_params(field: str) -> Callable[[str], Callable[..., tuple]]:
    def builder(name: str) -> Callable[..., tuple]:
        def params(severity: int, h: int, w: int) -> tuple:
            return (), {field: _f32(SEVERITY_CONSTANTS[name][severity - 1])}
        return params
    return builder


# ---- blurs ---------------------------------------------------------------------------------


def _defocus_half_taps(h: int, w: int) -> int:
    return max(1, round(scale_factor(h, w)))


def _defocus_params(severity: int, h: int, w: int) -> tuple:
    r = scale_factor(h, w)
    half_taps = _defocus_half_taps(h, w)
    kernels = [_defocus_kernel(rad * r, alias * r, half_taps)
               for rad, alias in SEVERITY_CONSTANTS["defocus_blur"]]
    size = max(k.shape[0] for k in kernels)
    return (), {"kernel": _f32(_center_pad(kernels[severity - 1], size))}


def _defocus_blur(x, key, p, static):
    return _correlate2d(x, p["kernel"], "mirror")  # cv2.filter2D default border


def _gaussian_blur_params(severity: int, h: int, w: int) -> tuple:
    sigma = SEVERITY_CONSTANTS["gaussian_blur"][severity - 1] * scale_factor(h, w)
    # skimage.filters.gaussian defaults: mode="nearest", truncate=4.
    return (), {"mh": _f32(_gaussian_matrix(h, sigma, "nearest")),
                "mw": _f32(_gaussian_matrix(w, sigma, "nearest"))}


def _gaussian_blur(x, key, p, static):
    return _separable(x, p["mh"], p["mw"])


def _glass_params(severity: int, h: int, w: int) -> tuple:
    sigma, delta, iterations = SEVERITY_CONSTANTS["glass_blur"][severity - 1]
    delta = max(1, round(delta * scale_factor(h, w)))
    sigma *= scale_factor(h, w)
    max_iter = max(c[2] for c in SEVERITY_CONSTANTS["glass_blur"])
    return (delta, max_iter), {
        "mh": _f32(_gaussian_matrix(h, sigma, "nearest")),
        "mw": _f32(_gaussian_matrix(w, sigma, "nearest")),
        "active": _f32([i < iterations for i in range(max_iter)]),
    }


def _glass_blur(x, key, p, static):
    delta, max_iter = static
    h, w, c = x.shape
    # First blur, then the reference's uint8 round trip (np.uint8 truncates).
    y = jnp.floor(_separable(x, p["mh"], p["mw"]) * 255.0 + _TRUNC_GUARD) / 255.0
    # Visiting order of the reference: rows H-d .. d+1, columns W-d .. d+1, both descending.
    rows = np.arange(h - delta, delta, -1)
    cols = np.arange(w - delta, delta, -1)
    visit = (rows[:, None] * w + cols[None, :]).reshape(-1).astype(np.int32)
    n_visit = visit.shape[0]
    # np.random.randint(-d, d, size=2) -> (dx, dy), each in [-d, d - 1].
    offsets = jax.random.randint(key, (max_iter, n_visit, 2), -delta, delta)
    offsets = offsets * p["active"].astype(jnp.int32)[:, None, None]  # inactive: swap in place
    partner = visit[None, :] + offsets[..., 1] * w + offsets[..., 0]
    steps = (jnp.tile(visit, max_iter), partner.reshape(-1))

    def swap(perm: jax.Array, step: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        a, b = step
        pa, pb = perm[a], perm[b]
        return perm.at[a].set(pb).at[b].set(pa), None

    # perm[q] = which source pixel ends up at position q.
    perm, _ = jax.lax.scan(swap, jnp.arange(h * w, dtype=jnp.int32), steps)
    shuffled = y.reshape(h * w, c)[perm].reshape(h, w, c)
    return _separable(shuffled, p["mh"], p["mw"])


def _motion_params(severity: int, h: int, w: int) -> tuple:
    r = scale_factor(h, w)
    width = max(_motion_width(rad * r) for rad, _ in SEVERITY_CONSTANTS["motion_blur"])
    radius, sigma = SEVERITY_CONSTANTS["motion_blur"][severity - 1]
    return (), {"taps": _f32(_motion_taps(radius * r, sigma * r, width))}


def _motion_blur_op(x, key, p, static):
    angle = jax.random.uniform(key, (), jnp.float32, -45.0, 45.0)
    return _motion_blur(x, p["taps"], angle)


def _zoom_params(severity: int, h: int, w: int) -> tuple:
    table = SEVERITY_CONSTANTS["zoom_blur"]
    zooms = table[severity - 1]
    count = max(len(z) for z in table)
    mh = np.stack([_clipped_zoom_matrix(h, z) for z in zooms]
                  + [np.eye(h)] * (count - len(zooms)))
    mw = np.stack([_clipped_zoom_matrix(w, z) for z in zooms]
                  + [np.eye(w)] * (count - len(zooms)))
    # (x + sum_z zoom_z(x)) / (len + 1); padding entries get weight 0.
    weights = np.array([1.0] * len(zooms) + [0.0] * (count - len(zooms))) / (len(zooms) + 1)
    return (), {"mh": _f32(mh), "mw": _f32(mw), "weights": _f32(weights),
                "self": _f32(1.0 / (len(zooms) + 1))}


def _zoom_blur(x, key, p, static):
    zoomed = jnp.einsum("zij,jkc,zlk->zilc", p["mh"], x, p["mw"],
                        precision=jax.lax.Precision.HIGHEST)
    return p["self"] * x + jnp.tensordot(p["weights"], zoomed, axes=1)


# ---- weather -------------------------------------------------------------------------------


def _snow_params(severity: int, h: int, w: int) -> tuple:
    r = scale_factor(h, w)
    table = SEVERITY_CONSTANTS["snow"]
    loc, scale, zoom, threshold, radius, sigma, blend = table[severity - 1]
    # Flakes are drawn on a grid `zoom * r` times coarser than the image and zoomed up.
    grid_h = max(int(np.ceil(h / (c[2] * r))) for c in table)
    grid_w = max(int(np.ceil(w / (c[2] * r))) for c in table)
    zh = _clipped_zoom_matrix(h, zoom * r, source=int(np.ceil(h / (zoom * r))))
    zw = _clipped_zoom_matrix(w, zoom * r, source=int(np.ceil(w / (zoom * r))))
    width = max(_motion_width(c[4] * r) for c in table)
    return (grid_h, grid_w), {
        "zh": _f32(_pad_cols(zh, grid_h)), "zw": _f32(_pad_cols(zw, grid_w)),
        "loc": _f32(loc), "scale": _f32(scale), "threshold": _f32(threshold),
        "taps": _f32(_motion_taps(radius * r, sigma * r, width)), "blend": _f32(blend),
    }


def _snow(x, key, p, static):
    grid_h, grid_w = static
    k_noise, k_angle = jax.random.split(key)
    layer = p["loc"] + p["scale"] * jax.random.normal(k_noise, (grid_h, grid_w))
    layer = _separable2d(layer, p["zh"], p["zw"])
    layer = jnp.where(layer < p["threshold"], 0.0, layer)
    layer = jnp.floor(jnp.clip(layer, 0.0, 1.0) * 255.0)  # to an 8-bit image, truncating
    angle = jax.random.uniform(k_angle, (), jnp.float32, -135.0, -45.0)
    # Back through an 8-bit PNG: ImageMagick truncates.
    layer = jnp.floor(_motion_blur(layer, p["taps"], angle) + _TRUNC_GUARD) / 255.0
    layer = layer[..., None]
    gray = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]
    x = p["blend"] * x + (1.0 - p["blend"]) * jnp.maximum(x, gray * 1.5 + 0.5)
    return x + layer + jnp.rot90(layer, k=2, axes=(0, 1))


def _frost_params(severity: int, h: int, w: int) -> tuple:
    textures, sizes = _frost_textures(h, w)
    image_weight, frost_weight = SEVERITY_CONSTANTS["frost"][severity - 1]
    return (), {"textures": textures, "sizes": sizes,
                "a": _f32(image_weight), "b": _f32(frost_weight)}


def _frost(x, key, p, static):
    h, w, _ = x.shape
    k_idx, k_row, k_col = jax.random.split(key, 3)
    index = jax.random.randint(k_idx, (), 0, p["textures"].shape[0])
    size = p["sizes"][index]
    top = jax.random.randint(k_row, (), 0, size[0] - h)  # numpy randint: high exclusive
    left = jax.random.randint(k_col, (), 0, size[1] - w)
    crop = jax.lax.dynamic_slice(p["textures"][index], (top, left, 0), (h, w, 3))
    return (p["a"] * x * 255.0 + p["b"] * crop) / 255.0


def _fog_params(severity: int, h: int, w: int) -> tuple:
    strength, decay = SEVERITY_CONSTANTS["fog"][severity - 1]
    mapsize = 1 << max(1, (max(h, w) - 1).bit_length())
    return (mapsize,), {"strength": _f32(strength), "decay": _f32(decay)}


def _fog(x, key, p, static):
    (mapsize,) = static
    h, w, _ = x.shape
    max_val = x.max()
    plasma = _plasma_fractal(key, mapsize, p["decay"])[:h, :w, None]
    return (x + p["strength"] * plasma) * max_val / (max_val + p["strength"])


def _brightness(x, key, p, static):
    hsv = _rgb_to_hsv(x)
    hsv = hsv.at[..., 2].set(jnp.clip(hsv[..., 2] + p["shift"], 0.0, 1.0))
    return _hsv_to_rgb(hsv)


def _saturate_params(severity: int, h: int, w: int) -> tuple:
    mult, add = SEVERITY_CONSTANTS["saturate"][severity - 1]
    return (), {"mult": _f32(mult), "add": _f32(add)}


def _saturate(x, key, p, static):
    hsv = _rgb_to_hsv(x)
    hsv = hsv.at[..., 1].set(jnp.clip(hsv[..., 1] * p["mult"] + p["add"], 0.0, 1.0))
    return _hsv_to_rgb(hsv)


# ---- digital -------------------------------------------------------------------------------


def _contrast(x, key, p, static):
    means = x.mean(axis=(0, 1), keepdims=True)  # per channel, as the reference
    return (x - means) * p["factor"] + means


def _elastic_params(severity: int, h: int, w: int) -> tuple:
    size = scale_factor(h, w) * REFERENCE_SIZE  # the reference's IMSIZE
    alpha, sigma, jitter = (v * size for v in SEVERITY_CONSTANTS["elastic_transform"][severity - 1])
    # skimage gaussian(..., mode="reflect", truncate=3) of the random displacement fields.
    return (), {"alpha": _f32(alpha), "jitter": _f32(jitter),
                "mh": _f32(_gaussian_matrix(h, sigma, "reflect", 3.0)),
                "mw": _f32(_gaussian_matrix(w, sigma, "reflect", 3.0))}


def _solve3(a: jax.Array, b: jax.Array) -> jax.Array:
    """Solves `a @ x = b` for a 3x3 `a` by the adjugate (jnp.linalg.solve's LU compiles
    slowly, and the three points of a random affine are never collinear in practice)."""
    cof = jnp.stack([jnp.cross(a[:, 1], a[:, 2]), jnp.cross(a[:, 2], a[:, 0]),
                     jnp.cross(a[:, 0], a[:, 1])])  # rows: cofactors of the columns of a
    return (cof @ b) / jnp.dot(a[:, 0], cof[0])


def _elastic_transform(x, key, p, static):
    from jax.scipy.ndimage import map_coordinates  # pylint: disable=import-outside-toplevel

    h, w, c = x.shape
    # All uniforms in one draw (compiles faster): 6 affine jitters, then two [H, W] fields.
    draws = jax.random.uniform(key, (6 + 2 * h * w,), jnp.float32, -1.0, 1.0)
    # Random affine: three points (x, y) around the centre, each moved by U(-jitter, jitter).
    cx, cy, half = w // 2, h // 2, min(h, w) // 3
    src_pts = jnp.array([[cx + half, cy + half], [cx + half, cy - half],
                         [cx - half, cy - half]], jnp.float32)
    dst_pts = src_pts + draws[:6].reshape(3, 2) * p["jitter"]
    # warpAffine(M) with M: src -> dst samples dst(q) = src(M^-1 q): solve dst -> src directly.
    inverse = _solve3(jnp.concatenate([dst_pts, jnp.ones((3, 1), jnp.float32)], axis=1),
                      src_pts)  # [3, 2]: (x, y, 1) @ inverse = source (x, y)
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                          indexing="ij")
    src_x = xx * inverse[0, 0] + yy * inverse[1, 0] + inverse[2, 0]
    src_y = xx * inverse[0, 1] + yy * inverse[1, 1] + inverse[2, 1]

    def sample(image: jax.Array, rows: jax.Array, cols: jax.Array, mode: str) -> jax.Array:
        # One 2-D bilinear lookup per channel (4 taps); a 3-D lookup would interpolate along
        # the channel axis too and gather 8 taps.
        def one(channel: jax.Array) -> jax.Array:
            return map_coordinates(channel, [rows, cols], order=1, mode=mode)

        return jax.vmap(one, in_axes=2, out_axes=2)(image)

    warped = sample(x, src_y, src_x, "mirror")  # BORDER_REFLECT_101
    fields = draws[6:].reshape(2, h, w)
    dx = _separable2d(fields[0], p["mh"], p["mw"]) * p["alpha"]
    dy = _separable2d(fields[1], p["mh"], p["mw"]) * p["alpha"]
    return sample(warped, yy + dy, xx + dx, "reflect")


def _pixelate_params(severity: int, h: int, w: int) -> tuple:
    factor = SEVERITY_CONSTANTS["pixelate"][severity - 1]
    small_h, small_w = int(h * factor), int(w * factor)
    return (), {
        "down_h": _f32(_pad_rows(_pil_box_matrix(h, small_h), h)),
        "down_w": _f32(_pad_rows(_pil_box_matrix(w, small_w), w)),
        "up_h": _f32(_pad_cols(_pil_box_matrix(small_h, h), h)),
        "up_w": _f32(_pad_cols(_pil_box_matrix(small_w, w), w)),
    }


def _pixelate(x, key, p, static):
    v = jnp.round(x * 255.0)
    hp = jax.lax.Precision.HIGHEST
    # Pillow resizes horizontally first, then vertically, rounding (half up) to uint8 after
    # each pass; the up-sampling passes only copy pixels.
    v = jnp.floor(jnp.einsum("hwc,kw->hkc", v, p["down_w"], precision=hp) + 0.5)
    v = jnp.floor(jnp.einsum("kh,hwc->kwc", p["down_h"], v, precision=hp) + 0.5)
    v = _separable(v, p["up_h"], p["up_w"])
    return v / 255.0


# ---- extra: spatter --------------------------------------------------------------------------


def _spatter_params(severity: int, h: int, w: int) -> tuple:
    r = scale_factor(h, w)
    loc, scale, sigma, threshold, intensity, mud = SEVERITY_CONSTANTS["spatter"][severity - 1]
    p = {"loc": _f32(loc), "scale": _f32(scale), "threshold": _f32(threshold),
         "mh": _f32(_gaussian_matrix(h, sigma * r, "nearest")),
         "mw": _f32(_gaussian_matrix(w, sigma * r, "nearest"))}
    if mud:  # the 5th constant is the mud mask's blur sigma
        p["mud_h"] = _f32(_gaussian_matrix(h, intensity * r, "nearest"))
        p["mud_w"] = _f32(_gaussian_matrix(w, intensity * r, "nearest"))
    else:  # ... or the water layer's intensity
        p["intensity"] = _f32(intensity)
    return (bool(mud),), p


def _spatter(x, key, p, static):
    (mud,) = static
    h, w, _ = x.shape
    liquid = p["loc"] + p["scale"] * jax.random.normal(key, (h, w))
    liquid = _separable2d(liquid, p["mh"], p["mw"])
    liquid = jnp.where(liquid < p["threshold"], 0.0, liquid)
    if mud:
        mask = _separable2d((liquid > p["threshold"]).astype(jnp.float32), p["mud_h"], p["mud_w"])
        mask = jnp.where(mask < 0.8, 0.0, mask)[..., None]
        mud_colour = jnp.array([63.0, 42.0, 20.0], jnp.float32) / 255.0
        return x * (1.0 - mask) + mud_colour * mask
    # Water: edges of the liquid blobs -> distance to them -> equalised, embossed shading.
    liquid_u8 = jnp.floor(jnp.clip(liquid, 0.0, 1.0) * 255.0)
    dist = _chamfer_distance(_canny(liquid_u8.astype(jnp.int32)))
    dist = _equalize_hist(_box3_floor_fixed(dist))
    dist = jnp.clip(_correlate2d(dist, jnp.asarray(_EMBOSS), "mirror"), 0.0, 255.0)
    dist = jnp.round(_box3(dist))  # blur of a uint8 image stays uint8
    shade = liquid_u8 * dist
    top = shade.max()
    shade = jnp.where(top > 0, shade / jnp.where(top > 0, top, 1.0), 0.0) * p["intensity"]
    water = jnp.array([175.0, 238.0, 238.0], jnp.float32) / 255.0  # pale turquoise (RGB)
    return x + shade[..., None] * water


# ============================================================================================
# Registry and entry point
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class _Op:
    fn: Callable[..., jax.Array] | None   # per-image JAX function (None: host op)
    params: Callable[[int, int, int], tuple]
    rgb: bool = False                     # needs colour: grey inputs go through RGB
    rounding: str = "trunc"               # "trunc" (np.uint8 of a float) or "round"


def _fixed(field: str, name: str) -> Callable[[int, int, int], tuple]:
    return _scalar_params(field)(name)


_OPS: dict[str, _Op] = {
    "gaussian_noise": _Op(_gaussian_noise, _fixed("sigma", "gaussian_noise")),
    "shot_noise": _Op(_shot_noise, _fixed("lam", "shot_noise")),
    "impulse_noise": _Op(_impulse_noise, _fixed("amount", "impulse_noise")),
    "defocus_blur": _Op(_defocus_blur, _defocus_params),
    "glass_blur": _Op(_glass_blur, _glass_params),
    "motion_blur": _Op(_motion_blur_op, _motion_params),
    "zoom_blur": _Op(_zoom_blur, _zoom_params),
    "snow": _Op(_snow, _snow_params, rgb=True),
    "frost": _Op(_frost, _frost_params, rgb=True),
    "fog": _Op(_fog, _fog_params),
    "brightness": _Op(_brightness, _fixed("shift", "brightness"), rgb=True),
    "contrast": _Op(_contrast, _fixed("factor", "contrast")),
    "elastic_transform": _Op(_elastic_transform, _elastic_params),
    "pixelate": _Op(_pixelate, _pixelate_params, rounding="round"),
    "jpeg_compression": _Op(None, _fixed("quality", "jpeg_compression")),
    "speckle_noise": _Op(_speckle_noise, _fixed("sigma", "speckle_noise")),
    "gaussian_blur": _Op(_gaussian_blur, _gaussian_blur_params),
    "spatter": _Op(_spatter, _spatter_params, rgb=True),
    "saturate": _Op(_saturate, _saturate_params, rgb=True),
}
assert tuple(_OPS) == ALL_CORRUPTIONS


@functools.lru_cache(maxsize=256)
def _cached_params(name: str, severity: int, h: int, w: int) -> tuple:
    return _OPS[name].params(severity, h, w)


@functools.partial(jax.jit, static_argnames=("name", "static"))
def _run(images: jax.Array, base_key: jax.Array, indices: jax.Array, p: dict,
         *, name: str, static: tuple) -> jax.Array:
    """uint8 `[B, H, W, C]` -> corrupted uint8 `[B, H, W, C]`; image b uses key
    fold_in(base_key, indices[b])."""
    op = _OPS[name]
    x = images.astype(jnp.float32) / 255.0
    grey = x.shape[-1] == 1
    if op.rgb and grey:
        x = jnp.repeat(x, 3, axis=-1)
    keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(indices)
    y = jax.vmap(lambda xi, ki: op.fn(xi, ki, p, static))(x, keys)
    if op.rgb and grey:
        y = y.mean(axis=-1, keepdims=True)
    y = jnp.clip(y, 0.0, 1.0) * 255.0
    y = jnp.round(y) if op.rounding == "round" else jnp.floor(y + _TRUNC_GUARD)
    return jnp.clip(y, 0, 255).astype(jnp.uint8)


def _jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    """Pillow JPEG round trip at `quality` (Pillow's defaults otherwise, as the reference)."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    def one(image: np.ndarray) -> np.ndarray:
        # uint8 [H, W] -> mode "L", [H, W, 3] -> "RGB" (inferred; the mode argument is
        # deprecated in Pillow >= 11.3).
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=int(quality))
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out = np.asarray(decoded, np.uint8)
        return out.reshape(image.shape)

    out = np.empty_like(images)
    # Pillow's codec releases the GIL, so two threads use both cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        for i, result in enumerate(pool.map(one, images, chunksize=256)):
            out[i] = result
    return out


def _validate(images: np.ndarray, name: str, severity: int) -> None:
    if name not in _OPS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(ALL_CORRUPTIONS)}")
    if isinstance(severity, bool) or int(severity) != severity or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"images must be uint8 [N, H, W, C] with C = 1 or 3, got {images.dtype} "
            f"{images.shape}"
        )
    if min(images.shape[1:3]) < MIN_SIZE:
        raise ValueError(
            f"images must be at least {MIN_SIZE}x{MIN_SIZE}, got {images.shape[1:3]}"
        )


def _threefry_mode() -> contextlib.AbstractContextManager:
    """Pins `jax_threefry_partitionable` (see `_THREEFRY_PARTITIONABLE`) for one call."""
    state = getattr(jax, "threefry_partitionable", None)
    return state(_THREEFRY_PARTITIONABLE) if state is not None else contextlib.nullcontext()


def _base_key(seed: int, name: str, severity: int) -> jax.Array:
    """One independent stream per (seed, corruption, severity)."""
    key = jax.random.fold_in(jax.random.key(seed), ALL_CORRUPTIONS.index(name))
    return jax.random.fold_in(key, severity)


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0, *,
            batch_size: int = _DEFAULT_BATCH) -> np.ndarray:
    """Applies one corruption at one severity to a batch of images.

    Args:
      images: uint8 `[N, H, W, C]`, C = 1 or 3, H and W >= 28 (any size; see the module
        docstring for how the 32x32 constants scale).
      name: one of `ALL_CORRUPTIONS`.
      severity: 1..5.
      seed: random seed. Image `i` gets the stream fold_in(seed, name, severity, i), so
        results do not depend on `N` or `batch_size`.
      batch_size: images per compiled call (the last chunk is zero-padded, so each
        corruption compiles once per image shape).

    Returns:
      uint8 `[N, H, W, C]` (a new array).

    Raises:
      ValueError: bad name, severity or images.
      FileNotFoundError: frost without its texture images (`pip install corrupt-tta`).
    """
    images = np.asarray(images)
    _validate(images, name, severity)
    severity = int(severity)
    n, h, w, _ = images.shape
    static, p = _cached_params(name, severity, h, w)
    if _OPS[name].fn is None:
        return _jpeg(images, int(p["quality"]))
    if n == 0:
        return images.copy()
    chunk = min(batch_size, max(8, 1 << (n - 1).bit_length()))
    base = _base_key(seed, name, severity)
    p_device = jax.tree.map(jnp.asarray, p)
    pending = []
    for start in range(0, n, chunk):
        block = images[start:start + chunk]
        if len(block) < chunk:
            block = np.concatenate([block, np.zeros((chunk - len(block), *block.shape[1:]),
                                                    np.uint8)])
        indices = jnp.arange(start, start + chunk, dtype=jnp.uint32)
        # Dispatch every chunk before reading any back, so host and device work overlap.
        with _threefry_mode():
            pending.append(_run(block, base, indices, p_device, name=name, static=static))
    out = np.empty_like(images)
    for i, result in enumerate(pending):
        start = i * chunk
        out[start:start + chunk] = np.asarray(result)[: min(chunk, n - start)]
    return out
