"""Train-time robustness augmentations in JAX: Gaussian noise and AugMix (SPEC §8).

Both run inside the compiled train step on device, per image with per-image keys, on float
images `[B, H, W, C]` in [0, 1] *before* the model's normalisation.

* Gaussian (SPEC §8(b), Kireev et al. 2021, reference [27] of the Winning Hand): with
  probability p per image, `clip(x + N(0, sigma^2), 0, 1)`; sigma = 0.1 is a standard deviation.
* AugMix (SPEC §8(a), Hendrycks et al. 2020, `google-research/augmix`): K = 3 chains of 1-3
  random ops at severity 3, Dirichlet chain weights, Beta skip-connection weight. The ops are
  re-implemented to reproduce PIL's uint8 semantics (lookup tables on the 0..255 levels;
  affine warps with PIL's pixel-centre convention, bilinear weights, edge clamping, black
  outside, truncation back to uint8). Mixing happens on [0, 1] floats: normalisation is affine
  and the mixing weights are convex, so mixing before normalising equals the reference's
  mixing after it.

Vectorisation: under `vmap` a data-dependent op choice would evaluate all nine ops. The
one-image definition (`_chain_step`) builds ONE per-channel lookup table (the four colour ops;
identity for a geometric op) and ONE affine matrix (the five geometric ops; identity for a
colour op) for the chosen op and applies both. The batched `augmix` computes the same values
step by step over all B * K chains, each piece only for the chains that drew it: the
image-dependent tables and the warps in pages of chains (`_paged_rows`), posterize and
solarize as arithmetic on every chain's levels.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from card_jax.data import threefry

# ---------------------------------------------------------------------------------------------
# Gaussian noise (SPEC §8(b))


def gaussian_noise(key: jax.Array, x01: jax.Array, sigma: float = 0.1, p: float = 0.5):
    """Per image with probability p: `clip(x + sigma * N(0, 1), 0, 1)`. `[B, H, W, C]`."""
    apply_key, noise_key = jax.random.split(key)
    apply = jax.random.bernoulli(apply_key, p, (x01.shape[0], 1, 1, 1))
    noisy = jnp.clip(x01 + sigma * jax.random.normal(noise_key, x01.shape, x01.dtype), 0.0, 1.0)
    return jnp.where(apply, noisy, x01)


# ---------------------------------------------------------------------------------------------
# AugMix operations on one uint8-valued image [H, W, C] (int32 levels 0..255).
#
# Colour ops are per-channel lookup tables `[C, 256]`; geometric ops are PIL affine matrices
# (a, b, c, d, e, f): output pixel (x, y) samples the input at (a x' + b y' + c, d x' + e y' + f)
# with x' = x + 0.5, y' = y + 0.5 (PIL's continuous coordinates, pixel centres at +0.5).

OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize",
       "shear_x", "shear_y", "translate_x", "translate_y")
_LEVELS = jnp.arange(256, dtype=jnp.int32)
_IDENTITY_MATRIX = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _histograms(images: jax.Array) -> jax.Array:
    """int32 `[N, C, 256]` per-channel counts of int images `[N, H, W, C]` (levels 0..255).

    One scatter-add over a flat `[N * C * 256]` array: 93-106 us for a page of 16 RGB 32x32
    images, against 201-244 us for a `bincount` per channel under `vmap`, whose batched
    scatter handles every update with a multi-dimensional index (benchmarks/README, section 19).
    """
    n, _, _, channels = images.shape
    bins = (jnp.arange(n)[:, None, None, None] * channels + jnp.arange(channels)) * 256
    flat = (bins + images.astype(jnp.int32)).reshape(-1)
    counts = jnp.zeros(n * channels * 256, jnp.int32).at[flat].add(1, mode="promise_in_bounds")
    return counts.reshape(n, channels, 256)


def _apply_lut(image: jax.Array, lut: jax.Array) -> jax.Array:
    """`out[..., c] = lut[c, image[..., c]]` for int `[H, W, C]` and `[C, 256]`."""
    channels = image.shape[-1]
    return lut[jnp.arange(channels), image]


def _floor_div(num: jax.Array, den: jax.Array, bound: int) -> jax.Array:
    """`num // den` for int32 0 <= num <= bound and den >= 1, without integer division.

    x86 has no vector integer division: XLA:CPU divides element by element (~25 cycles each),
    which made most of the colour tables' cost. XLA's float32 division is vectorised but not
    correctly rounded (its floor was one below the true quotient for 6 197 of the 16.6 M pairs
    num <= 65 025, den <= 255), so the float estimate is corrected by one either way from
    exact integer products. Below 2**20 the estimate is within one of the quotient; a larger
    `bound` (a static upper limit of `num`) takes the integer division.
    """
    if bound >= 2**20:
        return num // den
    q = jnp.floor(num.astype(jnp.float32) / den.astype(jnp.float32)).astype(jnp.int32)
    q = q - (q * den > num).astype(jnp.int32)
    return q + ((q + 1) * den <= num).astype(jnp.int32)


@functools.cache
def _autocontrast_undershoots() -> np.ndarray:
    """Sorted int32 codes lo * 65536 + hi * 256 + i where PIL's autocontrast table is one
    level below the exact floor((i - lo) * 255 / (hi - lo)), for lo <= i <= hi.

    PIL evaluates int(i * scale + offset) in doubles with scale = 255 / (hi - lo) and
    offset = -lo * scale; where the exact value is an integer, rounding can land just below it
    (e.g. lo = 0, hi = 25 maps 25 to 254). The exact value is otherwise at least 1/255 from an
    integer, so these are the only differences: 12 094 of the 2.8 M (lo, hi, i) triples. They
    are enumerated here once with the same double arithmetic so the device table matches
    Pillow bit for bit.
    """
    codes = []
    for lo in range(255):
        hi = np.arange(lo + 1, 256)[:, None]
        ix = np.arange(lo, 256)[None, :]
        scale = 255.0 / (hi - lo)
        pil = np.trunc(ix * scale + (-lo * scale))
        exact = (ix - lo) * 255 // (hi - lo)
        hit = (pil < exact) & (ix <= hi)
        his, ixs = np.nonzero(hit)
        codes.append(lo * 65536 + (his + lo + 1) * 256 + (ixs + lo))
    return np.sort(np.concatenate(codes)).astype(np.int32)


@functools.cache
def _undershoots_by_pair() -> tuple[np.ndarray, np.ndarray]:
    """`_autocontrast_undershoots` indexed by the pair (lo, hi): int32 `[65536]` whose entry
    lo * 256 + hi packs the pair's first row in the levels (`row << 5`) with its number of
    undershooting levels (0 to 17, the low 5 bits), and those levels `[N]` (pair-major).

    A channel's undershoots are then one gather by its (lo, hi) and at most 17 levels. A
    dense table instead of a binary search over the 5 958 pairs that hold one: the search
    was a 13-iteration loop of small kernels per page of images.
    """
    codes = _autocontrast_undershoots()
    pairs, starts, counts = np.unique(codes >> 8, return_index=True, return_counts=True)
    table = np.zeros(65536, np.int32)
    table[pairs] = (starts << 5) | counts
    return table, (codes & 255).astype(np.int32)


def autocontrast_lut(image: jax.Array) -> jax.Array:
    """PIL ImageOps.autocontrast (cutoff 0): stretch each channel's [lo, hi] to [0, 255].

    The exact floor (i - lo) * 255 // (hi - lo) in integers, minus one where Pillow's double
    arithmetic undershoots (see `_autocontrast_undershoots`), so the table equals Pillow's.
    A constant channel (hi == lo) maps to itself.
    """
    flat = image.reshape(-1, image.shape[-1])
    lo = flat.min(0)[:, None].astype(jnp.int32)  # uint8 images: lo * 256 + hi needs int32
    hi = flat.max(0)[:, None].astype(jnp.int32)
    span = jnp.maximum(hi - lo, 1)
    stretched = jnp.clip(_floor_div(jnp.maximum(_LEVELS[None] - lo, 0) * 255, span, 255 * 255),
                         0, 255)
    table, levels = _undershoots_by_pair()
    most = int((table & 31).max())
    packed = jnp.asarray(table)[lo * 256 + hi]                  # [C, 1]
    offsets = jnp.arange(most)[None]                            # [1, most]
    rows = jnp.minimum((packed >> 5) + offsets, len(levels) - 1)
    # The levels to lower by one; 256 (dropped) past the pair's count.
    candidates = jnp.where(offsets < (packed & 31), jnp.asarray(levels)[rows], 256)
    channel = jnp.arange(lo.shape[0])[:, None]
    stretched = stretched.at[channel, candidates].add(-1, mode="drop")
    return jnp.where(hi > lo, stretched, _LEVELS[None])


def equalize_lut(image: jax.Array) -> jax.Array:
    """PIL ImageOps.equalize per channel (Pillow >= 10, the project's pin): `[C, 256]` table
    of an int image `[H, W, C]`.

    step = (pixels - count of the brightest level present) // 255; lut[i] = (step // 2 +
    #pixels below level i) // step, clipped to 255 (PIL clips the table when applying it).
    Identity when at most one level is present or step == 0 (fewer than ~256 pixels).
    """
    return _equalize_from_histogram(_histograms(image[None])[0], image.shape[0] * image.shape[1])


def equalize_luts(images: jax.Array) -> jax.Array:
    """`equalize_lut` of each image `[N, H, W, C]` -> `[N, C, 256]`, with one histogram pass."""
    pixels = images.shape[1] * images.shape[2]
    return jax.vmap(lambda h: _equalize_from_histogram(h, pixels))(_histograms(images))


def _equalize_from_histogram(hist: jax.Array, pixels: int) -> jax.Array:
    """`equalize_lut`'s table from the image's per-channel histogram `[C, 256]` of `pixels`
    pixels per channel."""
    total = hist.sum(-1, keepdims=True)
    brightest = jnp.max(jnp.where(hist > 0, _LEVELS[None], -1), axis=-1, keepdims=True)
    top_count = jnp.take_along_axis(hist, brightest, axis=-1)
    step = (total - top_count) // 255
    below = jnp.cumsum(hist, axis=-1) - hist  # pixels strictly below each level
    # step // 2 + below <= pixels / 510 + pixels
    lut = jnp.minimum(_floor_div(step // 2 + below, jnp.maximum(step, 1), 2 * pixels), 255)
    keep = (jnp.sum(hist > 0, -1, keepdims=True) <= 1) | (step == 0)
    return jnp.where(keep, _LEVELS[None], lut)


def _posterized(levels: jax.Array, bits: jax.Array) -> jax.Array:
    """PIL ImageOps.posterize of int levels: keep the top `bits` bits of each (same dtype)."""
    mask = 256 - jnp.left_shift(1, 8 - bits)  # == ~(2**(8 - bits) - 1) & 0xFF
    return jnp.bitwise_and(levels, mask).astype(levels.dtype)


def _solarized(levels: jax.Array, threshold: jax.Array) -> jax.Array:
    """PIL ImageOps.solarize of int levels: invert every level >= threshold (same dtype)."""
    return jnp.where(levels < threshold, levels, 255 - levels)


def posterize_lut(bits: jax.Array, channels: int) -> jax.Array:
    """PIL ImageOps.posterize as a table `[C, 256]`."""
    return jnp.broadcast_to(_posterized(_LEVELS, bits), (channels, 256))


def solarize_lut(threshold: jax.Array, channels: int) -> jax.Array:
    """PIL ImageOps.solarize as a table `[C, 256]`."""
    return jnp.broadcast_to(_solarized(_LEVELS, threshold), (channels, 256))


def rotate_matrix(degrees: jax.Array, height: int, width: int) -> jax.Array:
    """PIL Image.rotate(degrees) about the centre (w/2, h/2); positive = counter-clockwise."""
    theta = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    cx, cy = width / 2.0, height / 2.0
    return jnp.stack([cos, -sin, cx - cos * cx + sin * cy,
                      sin, cos, cy - sin * cx - cos * cy])


def _matrix(a=1.0, b=0.0, c=0.0, d=0.0, e=1.0, f=0.0) -> jax.Array:
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in (a, b, c, d, e, f)])


def affine(image: jax.Array, matrix: jax.Array, *, along_x: bool = True,
           along_y: bool = True) -> jax.Array:
    """PIL Image.transform(AFFINE, matrix, BILINEAR) of an int image `[H, W, C]`.

    Source points outside [0, W) x [0, H) give 0 (PIL's default fill); inside, bilinear
    interpolation between pixel centres with edge clamping, then truncation to an integer
    level as PIL's `(UINT8) v` does. The identity matrix reproduces the image exactly.

    `along_x=False` (`along_y=False`) skips the interpolation along x (y): exact for matrices
    whose source x (y) is the output pixel's own column (row) shifted by a whole number, as
    for shear_y (shear_x) and integer translations, where that weight is exactly 0.
    """
    height, width, _ = image.shape
    a, b, c, d, e, f = (matrix[i] for i in range(6))
    ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) + 0.5,
                          jnp.arange(width, dtype=jnp.float32) + 0.5, indexing="ij")
    src_x = a * xs + b * ys + c
    src_y = d * xs + e * ys + f
    inside = (src_x >= 0) & (src_x < width) & (src_y >= 0) & (src_y < height)
    src_x = src_x - 0.5
    src_y = src_y - 0.5
    x0 = jnp.floor(src_x)
    y0 = jnp.floor(src_y)
    dx = (src_x - x0)[..., None]
    dy = (src_y - y0)[..., None]
    x0 = x0.astype(jnp.int32)
    y0 = y0.astype(jnp.int32)
    xa, xb = jnp.clip(x0, 0, width - 1), jnp.clip(x0 + 1, 0, width - 1)
    ya, yb = jnp.clip(y0, 0, height - 1), jnp.clip(y0 + 1, 0, height - 1)
    pixels = image.reshape(height * width, -1)

    def tap(y, x):  # one flat index per pixel: ~10% faster gathers than v[y, x] here
        return pixels[y * width + x].astype(jnp.float32)

    # Same operation order as PIL's BILINEAR macro: along x on both rows, then along y.
    def row(y):
        left = tap(y, xa)
        return left + (tap(y, xb) - left) * dx if along_x else left

    top = row(ya)
    out = top + (row(yb) - top) * dy if along_y else top
    return jnp.where(inside[..., None], jnp.floor(out), 0.0).astype(jnp.int32)


# Public single-op helpers (uint8-valued `[H, W, C]` in, same dtype out); AugMix itself uses
# one table and one matrix per chain step (`_chain_step`), built from the same pieces.

def _as_levels(image):
    return jnp.asarray(image).astype(jnp.int32)


def autocontrast(image):
    levels = _as_levels(image)
    return _apply_lut(levels, autocontrast_lut(levels)).astype(jnp.asarray(image).dtype)


def equalize(image):
    levels = _as_levels(image)
    return _apply_lut(levels, equalize_lut(levels)).astype(jnp.asarray(image).dtype)


def posterize(image, bits):
    levels = _as_levels(image)
    lut = posterize_lut(jnp.asarray(bits, jnp.int32), levels.shape[-1])
    return _apply_lut(levels, lut).astype(jnp.asarray(image).dtype)


def solarize(image, threshold):
    levels = _as_levels(image)
    lut = solarize_lut(jnp.asarray(threshold, jnp.int32), levels.shape[-1])
    return _apply_lut(levels, lut).astype(jnp.asarray(image).dtype)


def rotate(image, degrees):
    levels = _as_levels(image)
    matrix = rotate_matrix(degrees, levels.shape[0], levels.shape[1])
    return affine(levels, matrix).astype(jnp.asarray(image).dtype)


def shear_x(image, shear):
    return affine(_as_levels(image), _matrix(b=shear)).astype(jnp.asarray(image).dtype)


def shear_y(image, shear):
    return affine(_as_levels(image), _matrix(d=shear)).astype(jnp.asarray(image).dtype)


def translate_x(image, pixels):
    return affine(_as_levels(image), _matrix(c=pixels)).astype(jnp.asarray(image).dtype)


def translate_y(image, pixels):
    return affine(_as_levels(image), _matrix(f=pixels)).astype(jnp.asarray(image).dtype)


# ---------------------------------------------------------------------------------------------
# AugMix (SPEC §8(a))


def _int_param(level, maxval):
    """augmix `int_parameter`: int(level * maxval / 10) (levels are positive: floor)."""
    return jnp.floor(level * maxval / 10.0).astype(jnp.int32)


def _float_param(level, maxval):
    return level * maxval / 10.0


# OPS order -> affine matrix slot of `_step_matrix` (0 = identity, for the colour ops).
_MATRIX_SLOT = np.asarray([0, 0, 0, 1, 0, 2, 3, 4, 5], np.int32)


def _step_params(key: jax.Array, severity: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One chain step's draws: op index into `OPS`, level U(0.1, severity), sign +-1."""
    op_key, level_key, sign_key = jax.random.split(key, 3)
    op = jax.random.randint(op_key, (), 0, len(OPS))
    # augmix `sample_level`: U(0.1, severity), drawn anew by every op call.
    level = jax.random.uniform(level_key, (), jnp.float32, 0.1, severity)
    sign = jnp.where(jax.random.bernoulli(sign_key), -1.0, 1.0)
    return op, level, sign


def _colour_params(level) -> tuple[jax.Array, jax.Array]:
    """augmix's posterize bits and solarize threshold at `level`."""
    return 4 - _int_param(level, 4), 256 - _int_param(level, 256)


def _fixed_lut(op, level, channels: int) -> jax.Array:
    """`[C, 256]` table of the image-independent colour ops (posterize, solarize; identity
    for every other op)."""
    bits, threshold = _colour_params(level)
    identity = jnp.broadcast_to(_LEVELS, (channels, 256))
    return jnp.where(op == 2, posterize_lut(bits, channels),
                     jnp.where(op == 4, solarize_lut(threshold, channels), identity))


def _image_lut(op, image) -> jax.Array:
    """`[C, 256]` table of autocontrast (op 0) or equalize (op 1) for `image` `[H, W, C]`."""
    return jnp.where(op == 0, autocontrast_lut(image), equalize_lut(image))


def _step_matrix(op, level, sign, height: int, width: int) -> jax.Array:
    """The geometric op's PIL affine matrix `[6]` (identity for colour ops)."""
    shear = sign * _float_param(level, 0.3)
    matrices = jnp.stack([
        _matrix(*_IDENTITY_MATRIX),
        rotate_matrix(sign * _int_param(level, 30).astype(jnp.float32), height, width),
        _matrix(b=shear),
        _matrix(d=shear),
        # augmix translates by up to IMAGE_SIZE / 3; per axis here, equal on square images.
        _matrix(c=sign * _int_param(level, width / 3.0).astype(jnp.float32)),
        _matrix(f=sign * _int_param(level, height / 3.0).astype(jnp.float32)),
    ])
    return matrices[jnp.asarray(_MATRIX_SLOT)[op]]


def _chain_step(key: jax.Array, image: jax.Array, severity: float) -> jax.Array:
    """One uniformly chosen op of `OPS` at a freshly sampled level, on int `[H, W, C]`.

    The one-image definition of a chain step, with every table and the warp computed whatever
    the op; `augmix` computes the same values batched, each piece only for the chains that
    drew it (tests compare the two).
    """
    height, width, channels = image.shape
    op, level, sign = _step_params(key, severity)
    is_histogram_op = (op == 0) | (op == 1)
    lut = jnp.where(is_histogram_op, _image_lut(op, image), _fixed_lut(op, level, channels))
    coloured = _apply_lut(image, lut)
    warped = affine(image, _step_matrix(op, level, sign, height, width))
    return jnp.where(jnp.asarray(_MATRIX_SLOT)[op] > 0, warped, coloured)


def _mix_draws(key, width: int, alpha: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per image: chain weights `[K]` ~ Dirichlet(alpha), skip weight m ~ Beta(alpha, alpha),
    and the key of its chains."""
    weight_key, mix_key, chain_key = jax.random.split(key, 3)
    if alpha == 1.0:
        # Same distributions, far cheaper to compile than the gamma rejection samplers:
        # Dirichlet(1, ..., 1) = normalised Exp(1) draws, Beta(1, 1) = U(0, 1).
        draws = jax.random.exponential(weight_key, (width,), jnp.float32)
        weights = draws / jnp.sum(draws)
        m = jax.random.uniform(mix_key, (), jnp.float32)
    else:
        weights = jax.random.dirichlet(weight_key, jnp.full((width,), alpha, jnp.float32))
        m = jax.random.beta(mix_key, alpha, alpha)
    return weights, m, chain_key


def _chain_draws(chain_key, depth: int, max_depth: int, severity: float):
    """One chain's depth and its steps' draws: d `[]`, op / level / sign `[max_depth]`."""
    depth_key, step_key = jax.random.split(chain_key)
    # depth = -1: randint{1, 2, 3} per chain, as np.random.randint(1, 4).
    d = jnp.int32(depth) if depth > 0 else jax.random.randint(depth_key, (), 1, 4)
    steps = jax.vmap(lambda s: _step_params(jax.random.fold_in(step_key, s), severity))(
        jnp.arange(max_depth))
    return d, *steps


def _batch_draws(key, batch: int, width: int, depth: int, severity: float, alpha: float):
    """Every random draw of `augmix` for `batch` images: (weights `[B, K]`, m `[B]`) and,
    per chain (N = B * K, image-major), (d `[N]`, op / level / sign `[N, S]`).

    The draws of `_augmix_reference_one` per image, on `threefry.same_stream(key)`: JAX's
    threefry values without its loop on CPU (benchmarks/README.md, section 24)."""
    max_depth = depth if depth > 0 else 3
    keys = jax.random.split(threefry.same_stream(key), batch)
    weights, m, chain_keys = jax.vmap(lambda k: _mix_draws(k, width, alpha))(keys)
    chain_keys = jax.vmap(lambda k: jax.random.split(k, width))(chain_keys).reshape(-1)
    chains = jax.vmap(lambda k: _chain_draws(k, depth, max_depth, severity))(chain_keys)
    return (weights, m), chains


def _augmix_reference_one(key, x01, width: int, depth: int, severity: float, alpha: float):
    """AugMix of one float image `[H, W, C]` in [0, 1], step by step (the definition).

    `augmix` computes exactly these values for a whole batch at a time; it is kept as the
    readable statement of the algorithm and as the tests' reference.
    """
    weights, m, chain_key = _mix_draws(key, width, alpha)
    levels = jnp.round(x01 * 255.0).astype(jnp.int32)  # back onto PIL's uint8 grid
    max_depth = depth if depth > 0 else 3

    def chain(k):
        depth_key, step_key = jax.random.split(k)
        d = depth if depth > 0 else jax.random.randint(depth_key, (), 1, 4)
        image = levels
        for s in range(max_depth):
            stepped = _chain_step(jax.random.fold_in(step_key, s), image, severity)
            image = jnp.where(s < d, stepped, image)
        return image.astype(jnp.float32) * (1.0 / 255.0)

    chains = jax.vmap(chain)(jax.random.split(chain_key, width))  # [K, H, W, C]
    return _mix(x01, chains, weights, m)


# Chains handled per iteration by the compacted passes of an AugMix step (below). Of the
# B * K chains of a batch, each step draws a histogram op for 2/9 of them and a warp for 5/9
# (of those still active): at B = 128, K = 3 about 85 and 213 at the first step. Measured
# per 128 RGB images (ms): pages (16, 32) 11.0-12.4, (8, 16) 11.2, (32, 64) 14.6,
# (32, 128) 16.0; computing every piece for all 9 steps (the earlier layout) 53. Splitting
# the table pass (autocontrast, equalize) and the warp pass (rotate, shear_x, shear_y,
# translations) by what each op computes: 16.0-18.9 -> 11.0-13.1 (2 threads, same process,
# same output); pages (16, 32), (8, 32), (16, 16) within 0.6 of each other. With uint8 chain
# images and one warp pass per kind, each kind draws ~43, 28 and 14 chains at the three
# steps, so a page of 32 ran half empty: warp pages of 32 / 24 / 16 / 12 / 8 took 9.6-9.8 /
# 9.2 / 8.7-8.8 / 8.8 / 8.5 ms (section 18 of benchmarks/README.md), one pass for the three
# bilinear kinds 10.0 (32) and 9.7 (16). After the later changes (section 21), warp pages
# of 8 against 16: 6.32 against 6.44 ms (paired 0.983 over 30 interleaved rounds).
HISTOGRAM_PAGE = 16
WARP_PAGE = 8


def _paged_rows(rows: tuple[jax.Array, jax.Array, jax.Array], target: jax.Array,
                fn: Callable, page: int, *operands: jax.Array) -> jax.Array:
    """`target[r] = fn(operand[r], ...)` for the `count` rows r = `order[start:start + count]`,
    `page` rows at a time.

    The pages run under a `while_loop` that stops after the last one, so the work follows
    `count` instead of `len(target)`; the last page's unused slots point past the end (row N)
    and are dropped.

    Args:
      rows: (order, start, count): int32 `[M]` row indices, increasing from `start` on, with
        M >= start + count + page - 1 (`_grouped_rows` pads its order with N for this);
        int32 scalars.
      target: `[N, ...]`, the array updated.
      fn: maps `page` rows of each operand (`[page, ...]`) to `page` rows of `target` (cast
        to its dtype).
      operands: `[N, ...]` each.
    """
    order, start, count = rows
    n = target.shape[0]
    within = jnp.arange(page)

    def body(carry):
        done, target = carry
        rows = jnp.where(done + within < count,
                         jax.lax.dynamic_slice(order, (start + done,), (page,)), n)
        values = fn(*(o[jnp.minimum(rows, n - 1)] for o in operands)).astype(target.dtype)
        return done + page, target.at[rows].set(values, mode="drop", unique_indices=True,
                                                 indices_are_sorted=True)

    _, target = jax.lax.while_loop(lambda carry: carry[0] < count, body, (0, target))
    return target


def _grouped_rows(groups: jax.Array, num_groups: int, pad: int):
    """Row indices grouped by `groups` (int32 `[N]`, values 0 .. num_groups - 1): order
    int32 `[N + pad]` (each group's rows in increasing order, the groups one after another,
    then `pad` entries N), each group's first position in it `[G]` and its size `[G]`.

    A counting sort: one pass for all groups where `jnp.nonzero` per group took a
    cumulative sum and a scatter each.
    """
    n = groups.shape[0]
    member = (groups[:, None] == jnp.arange(num_groups)).astype(jnp.int32)  # [N, G]
    count = jnp.sum(member, axis=0)
    start = jnp.cumsum(count) - count
    rank = jnp.sum(jnp.cumsum(member, axis=0) * member, axis=1) - 1  # within its group
    order = jnp.full(n + pad, n, jnp.int32).at[start[groups] + rank].set(
        jnp.arange(n, dtype=jnp.int32), unique_indices=True)
    return order, start, count


# The paged passes of a chain step, by `OPS` index: autocontrast, equalize, then the warps
# (rotate, shear_x, shear_y, both translations). Posterize and solarize need none
# (`_posterize_solarize`: arithmetic on every chain's levels), nor do inactive chains.
_PASSES = ("autocontrast", "equalize", "rotate", "shear_x", "shear_y", "translate")
_NO_PASS = len(_PASSES)
_PASS_OF_OP = np.asarray([0, 1, _NO_PASS, 2, _NO_PASS, 3, 4, 5, 5], np.int32)


def _step_groups(active: jax.Array, op: jax.Array):
    """`_grouped_rows` of the chains by the pass of their op (`_PASSES`; the rest in a last
    group): active bool `[N]`, op int `[N]`."""
    passes = jnp.where(active, jnp.asarray(_PASS_OF_OP)[op], _NO_PASS)
    return _grouped_rows(passes, _NO_PASS + 1, max(HISTOGRAM_PAGE, WARP_PAGE))


def _batched_chain_step(images, active, op, level, sign, groups):
    """One step of N chains at once: `[N, H, W, C]` uint8 images, per-chain draws `[N]`.

    Exactly `_chain_step` on every active chain (inactive ones are returned unchanged), but
    each chain only gets the work of the op it drew. The chains are grouped by op
    (`groups`: `_step_groups(active, op)`, which `augmix` computes for every step at once)
    and each group that
    needs more than arithmetic runs in pages (`_paged_rows`): an image-dependent table
    (autocontrast, equalize: histograms) is built only for the chains that drew one, a warp
    only for the geometric ops. Posterize and solarize are arithmetic on the levels of the
    whole batch, one pass (paging them measured 1% slower).

    The images are uint8 (PIL's levels): every op reads them as they are and `_paged_rows`
    casts its results back. Every pass reads the step's input `images` (reading the array
    the passes before it updated gives the same values, but took 5.27 against 4.73 ms per
    128 RGB images).
    """
    n, height, width, channels = images.shape
    order, start, count = groups

    def paged(target, name, fn, page, *operands):
        i = _PASSES.index(name)
        return _paged_rows((order, start[i], count[i]), target, fn, page, images, *operands)

    out = _posterize_solarize(images, active, op, level)
    # One pass per image-dependent table, each table applied to its own page: autocontrast
    # needs only each channel's range, equalize a histogram.
    out = paged(out, "autocontrast", jax.vmap(autocontrast), HISTOGRAM_PAGE)
    out = paged(out, "equalize", lambda page: jax.vmap(_apply_lut)(page, equalize_luts(page)),
                HISTOGRAM_PAGE)
    matrices = jax.vmap(lambda o, lv, sg: _step_matrix(o, lv, sg, height, width))(op, level, sign)
    for name, along_x, along_y in (("rotate", True, True), ("shear_x", True, False),
                                   ("shear_y", False, True)):
        warp = jax.vmap(functools.partial(affine, along_x=along_x, along_y=along_y))
        out = paged(out, name, warp, WARP_PAGE, matrices)
    return paged(out, "translate", jax.vmap(_translate), WARP_PAGE, matrices)


def _posterize_solarize(images, active, op, level):
    """uint8 `[N, H, W, C]` with posterize (op 2) or solarize (op 4) applied to the active
    chains that drew it, as arithmetic on the levels: `_fixed_lut`'s values, in one pass
    without a table (the image-dependent tables are applied page by page). One choice per
    chain between its input and its op's result: 1.5-2.7% faster AugMix than choosing
    between the two results and the input (section 24)."""
    chosen = (active & ((op == 2) | (op == 4)))[:, None, None, None]
    return jnp.where(chosen, jax.vmap(_colour_arithmetic)(images, op, level), images)


def _colour_arithmetic(image: jax.Array, op: jax.Array, level: jax.Array) -> jax.Array:
    """Posterize (op 2) or else solarize at `level` of one uint8 image `[H, W, C]`."""
    bits, threshold = _colour_params(level)
    return jnp.where(op == 2, _posterized(image, bits), _solarized(image, threshold))


def _translate(image: jax.Array, matrix: jax.Array) -> jax.Array:
    """`affine(image, matrix)` for an integer translation matrix (a = e = 1, b = d = 0;
    c, f whole numbers): each output pixel is its source pixel (x + c, y + f), or PIL's
    black fill where that lies outside the image.

    The same values as the warp: the source point of each output pixel is a pixel centre,
    so its bilinear weights are 0 and 1. One gather of whole pixels at edge-clamped indices,
    then the fill: AugMix of 128 RGB 32x32 images took 6.84 -> 6.42 ms (20 interleaved
    rounds, the same values) against a slice of the zero-padded image, a `dynamic_slice` that
    `vmap` turns into a gather with a padding pass in front of it.
    """
    height, width, _ = image.shape
    shift = matrix[jnp.asarray([5, 2])].astype(jnp.int32)  # (f, c): whole numbers
    ys = jnp.arange(height)[:, None] + shift[0]                  # [H, 1]
    xs = jnp.arange(width)[None, :] + shift[1]                   # [1, W]
    inside = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
    pixels = image[jnp.clip(ys, 0, height - 1), jnp.clip(xs, 0, width - 1)]
    return jnp.where(inside[..., None], pixels, jnp.zeros((), image.dtype))


def augmix(
    key: jax.Array,
    x01: jax.Array,
    *,
    width: int = 3,
    depth: int = -1,
    severity: float = 3.0,
    alpha: float = 1.0,
) -> jax.Array:
    """AugMix of a batch of float images `[B, H, W, C]` in [0, 1] (any H, W; C = 1 or 3).

    Args:
      width: number of chains K (Dirichlet(alpha, ..., alpha) weights).
      depth: ops per chain; -1 draws it from {1, 2, 3} per chain.
      severity: upper end of the level distribution U(0.1, severity).
      alpha: Dirichlet and Beta(alpha, alpha) concentration.
    Returns float32 `[B, H, W, C]`: `(1 - m) x + m sum_k w_k chain_k(x)`.

    The values are those of `_augmix_reference_one` per image (same keys, same draws, same
    ops; up to float contraction in the warps' coordinates, which XLA may compile differently
    in the two programs); the work is laid out over all B * K chains at once, step by step,
    so that each step computes a histogram or a warp only for the chains that need one
    (`_paged_rows`) and nothing for the chains whose depth is already reached. The draws
    hash a threefry key with the hash written out straight (`threefry.same_stream`, the same
    values as JAX's; benchmarks/README.md, section 24).
    """
    x01 = x01.astype(jnp.float32)
    b, h, w, c = x01.shape
    max_depth = depth if depth > 0 else 3
    (weights, m), (d, op, level, sign) = _batch_draws(key, b, width, depth, severity, alpha)
    levels = jnp.round(x01 * 255.0).astype(jnp.uint8)  # back onto PIL's uint8 grid
    chains = jnp.broadcast_to(levels[:, None], (b, width, h, w, c)).reshape(b * width, h, w, c)

    active = jnp.arange(max_depth)[:, None] < d  # [S, N]
    op, level, sign = op.T, level.T, sign.T         # [S, N]
    groups = jax.vmap(_step_groups)(active, op)      # every step's passes at once

    def body(images, step):
        return _batched_chain_step(*((images,) + step)), None

    chains, _ = jax.lax.scan(body, chains, (active, op, level, sign, groups))
    chains = chains.astype(jnp.float32).reshape(b, width, h, w, c) * (1.0 / 255.0)
    if c == 3:
        return _mix_batch(x01, chains, weights, m)
    return jax.vmap(_mix)(x01, chains, weights, m)


def _mix(x01, chains, weights, m):
    """`(1 - m) x + m sum_k w_k chain_k` for one image `[H, W, C]`, chains `[K, H, W, C]`."""
    return _blend(x01, jnp.tensordot(weights, chains, axes=1), m)


def _blend(x01, mix, m):
    """`(1 - m) x + m mix`, clipped to [0, 1]: AugMix's skip connection (any shape, `m`
    broadcast against it)."""
    # Convex in exact arithmetic; the clip only removes float rounding past 0 or 1.
    return jnp.clip((1.0 - m) * x01 + m * mix, 0.0, 1.0)


def _mix_batch(x01, chains, weights, m):
    """`_mix` of every image: x01 `[B, H, W, C]`, chains `[B, K, H, W, C]`, weights `[B, K]`,
    m `[B]`; the same values, as one elementwise pass.

    The per-image `tensordot` ran as B small matrix products, and with the chains' conversion
    and the final mix as separate passes it took 0.66-0.74 ms per 128 RGB 32x32 images,
    against 0.23-0.30 here. XLA:CPU's dot sums w_k chain_k as a chain of fused multiply-adds
    in k order, and the sum below, written term by term in that order, compiles to the same
    ones. Which product of `(1 - m) x + m mix` LLVM fuses into an add depends on the
    compiled loop, though. For RGB images both programs fuse the same one on the AVX-512 Xeon
    of benchmarks/README section 21: equal bit for bit, and so were the training states of the
    AugMix step (`tests/test_augment.py` allows a few ulps: other CPUs may fuse otherwise). For
    single-channel images they do not (1 ulp apart in ~22% of the pixels), so `augmix` mixes
    those per image as before (0.23 ms per 128 28x28 images). In the JSD step, whose two
    AugMix views XLA fuses with their concatenation, the old program fused the other product:
    there the mixed views, and the states trained on them, differ in their last bits.
    """
    weights = weights[:, :, None, None, None]
    mix = weights[:, 0] * chains[:, 0]
    for k in range(1, chains.shape[1]):
        mix = weights[:, k] * chains[:, k] + mix
    return _blend(x01, mix, m[:, None, None, None])


# ---------------------------------------------------------------------------------------------
# AugMix's Jensen-Shannon consistency loss (SPEC §8(a))

JSD_WEIGHT = 12.0
"""AugMix's weight of the JSD term: loss = CE(clean) + JSD_WEIGHT * jsd_loss(...)."""


def jsd_loss(logits_clean: jax.Array, logits_aug1: jax.Array, logits_aug2: jax.Array):
    """Jensen-Shannon consistency of three views `[B, classes]` -> scalar (unweighted).

    M = clamp(mean of the three softmaxes, 1e-7, 1); returns the mean over the three views of
    PyTorch's `kl_div(log M, p, reduction='batchmean')` = sum p (log p - log M) / B. The caller
    multiplies by `JSD_WEIGHT` (12 in AugMix) and adds the clean cross-entropy.
    """
    probs = [jax.nn.softmax(z.astype(jnp.float32), axis=-1)
             for z in (logits_clean, logits_aug1, logits_aug2)]
    log_m = jnp.log(jnp.clip((probs[0] + probs[1] + probs[2]) / 3.0, 1e-7, 1.0))
    batch = logits_clean.shape[0]
    # xlogy: a probability that underflows to 0 contributes 0, as in PyTorch's kl_div.
    kls = [jnp.sum(jax.scipy.special.xlogy(p, p) - p * log_m) / batch for p in probs]
    return (kls[0] + kls[1] + kls[2]) / 3.0


# ---------------------------------------------------------------------------------------------
# Registry: uniform `(key, x01 [B, H, W, C]) -> x01` with the paper's defaults.


def no_augmentation(key: jax.Array, x01: jax.Array) -> jax.Array:
    del key
    return x01


AUGMENTATIONS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "none": no_augmentation,
    "gaussian": gaussian_noise,
    "augmix": augmix,
}
