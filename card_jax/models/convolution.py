"""A drop-in ``conv_general_dilated`` for ``nnx.Conv`` that is fast on XLA:CPU.

Every model passes :func:`conv_general_dilated` to ``nnx.Conv``. Where the default backend
is an accelerator it is plain ``lax.conv_general_dilated``, differentiated by JAX (cuDNN's
forward, backward-data and backward-filter convolutions on GPU): on an H200 the full-width
Conv-4 training step took 1.18 ms that way against 1.47 ms through this module's custom VJP,
whose input gradient is a forward convolution of the flipped kernel (benchmarks/README.md,
section 17). Inside the custom VJP the CPU choices below sit behind
``lax.platform_dependent``, so that a program traced on CPU still lowers for another
platform with XLA's convolutions there. On CPU, three passes of a 2-D convolution of ``x``
``[B, H, W, C]`` with an HWIO kernel ``[kh, kw, C, O]`` into ``[B, Ho, Wo, O]`` become
im2col matrix products taken a few images at a time:

* the weight gradient (the largest single cost of a full-width training step):

      dW[i, j, c, o] = sum_{b, y, x} x_pad[b, s*y + i, s*x + j, c] * g[b, y, x, o]

  for each chunk of ``k`` images the patch matrix ``[k * Ho * Wo, kh * kw * C]`` is built
  in cache and multiplied with the chunk's cotangent ``[k * Ho * Wo, O]``, accumulated in
  float32 under a ``lax.scan``, from ``C >= IM2COL_WEIGHT_GRAD_MIN_CHANNELS`` channels;
* the forward pass, when ``C`` is in ``IM2COL_FORWARD_CHANNELS`` and the stride is 1:
  ``patches @ W`` per chunk under ``lax.map``;
* the input gradient of a stride-1 convolution, which is the forward operation applied to
  the cotangent with the flipped, in/out-swapped kernel (same channel rule, on ``O``).
  Strided input gradients stay XLA's transposed convolutions.

Where the vertical stride is 1 and the images are large enough
(`ROW_TAPS_FORWARD_MIN_PIXELS`, `ROW_TAPS_WEIGHT_GRAD_MIN_PIXELS`), the forward pass and the
weight gradient take **row taps** instead of the full patch matrix: only the ``kw`` taps
along the width are copied side by side (``width_taps``, a third of the patches of a 3x3
kernel), and the ``kh`` taps along the height become row offsets of that matrix, applied on
the product's side (:func:`conv_row_taps`, :func:`weight_grad_row_taps`).

The forward pass of a convolution over at most ``TAP_SUM_MAX_CHANNELS`` input channels (a
first layer on grey images) is instead a fused sum of shifted, scaled input copies
(:func:`conv_tap_sum`).

The channel rules come from per-layer measurements (`IM2COL_FORWARD_CHANNELS`,
`TAP_SUM_MAX_CHANNELS`); a convolution that none of them takes is plain
``lax.conv_general_dilated``.

Why (benchmarks/README.md, issue 7): jaxlib 0.10's XLA:CPU hands these convolutions to
YNNPACK by default; on the 2-core AVX-512 EPYC, batch 128, a 32x32 64->64 layer took 137 ms
forward and 250-275 ms for its weight gradient (70 and 35-40 GFLOP/s) where a matrix
product of the same FLOPs reaches 150-200 GFLOP/s. Building the whole patch matrix at once
does not help: it is 302 MB for that layer and writing it is bound by memory bandwidth
(slower than XLA). In 2-image chunks it stays in cache: forward 93-110 ms, weight gradient
127 ms; the Conv-4 training step went from 0.34 to 0.56 of the matmul peak.

**Only against YNNPACK's convolutions.** XLA's own (Eigen) convolutions, which
`card_jax.xla_flags` selects on x86-64 (`--xla_cpu_experimental_ynn_fusion_type=
-individual_convolution`), beat every im2col and row-tap pass measured on a 2-core Xeon
(AVX-512, AMX): 32x32 64->64 forward 49 ms against 79, weight gradient 89 against 110; the
Conv-4 training step 0.50 s against 0.64 (benchmarks/README.md, section 16). So the im2col
passes apply only while XLA's YNNPACK convolutions are in use (`im2col_enabled`:
`xla_flags.ynn_convolutions_disabled()` is false, e.g. on other architectures or with
`CARD_JAX_XLA_FLAGS=0`), or inside :func:`cpu_im2col`. The tap sum of grey first layers
is kept either way (1 -> 16 channels at 32x32: 0.6 ms against Eigen's 3.3).

Results equal XLA's up to float32 summation order (tests compare forward and both
gradients for strides 1 and 2, 1x1/3x3 kernels, SAME/VALID/explicit padding, odd batch
sizes, float32 and bfloat16, under vmap). Other arguments (dilations, grouped convolutions,
other layouts, ``preferred_element_type``) go to ``lax.conv_general_dilated`` unchanged.
The fast path is reverse-mode only (a ``jax.custom_vjp``); nothing in card_jax takes
forward-mode derivatives through a network.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from card_jax import xla_flags

# Patch-matrix bytes per chunk of images: a chunk's patches must stay in the CPU's caches
# (the 2-core machine: 1 MB L2 per core, 32 MB shared L3). Per layer at batch 128, 2-image
# chunks (1.1-4.5 MB) were the fastest or within noise of it in every Conv-4/Conv-8 layer;
# 8-16 images were 1.2-1.6x slower in the 64- and 128-channel layers; the whole batch at
# once (302 MB for 32x32x64) 2x slower: writing it is bound by memory bandwidth.
CHUNK_BYTES = 5 << 19  # 2.5 MB

# Which passes go through im2col on CPU, by channel count (`im2col_passes`). Measured on
# the 2-core machine at batch 128, im2col time / XLA time, 2 threads (1 thread):
#
#   layer              forward      input grad   weight grad
#   32x32  16 ->  16   2.35 (1.07)  1.41 (1.08)  0.98 (2.09)
#   16x16  32 ->  32   0.92 (1.50)  0.91 (1.49)  0.75 (1.30)
#   32x32  32 ->  32   0.71 (0.96)  0.84 (0.94)  0.86 (0.92)
#   32x32  64 ->  64   0.57 (1.13)  0.58 (1.12)  0.48 (0.77)
#   16x16  64 -> 128   0.72 (1.16)  0.70 (1.17)  0.25 (0.44)
#   16x16 128 -> 128   1.10 (1.12)  0.96 (1.16)  0.36 (0.58)
#    8x8  128 -> 256   1.13 (1.05)  1.13 (1.03)  0.71 (0.64)
#    8x8  256 -> 256   1.13 (1.08)  1.00 (1.08)  0.99 (0.69)
#
# The weight gradient wins from 64 input channels in both settings; the forward pass (and
# the stride-1 input gradient, the same operation on the cotangent) only for 33-64 channels
# (its input's) and only with both threads. Narrower layers (the quarter-width models, every
# first layer) keep XLA in all three passes: `conv_general_dilated` then is exactly
# `lax.conv_general_dilated`, the same program as before this module.
IM2COL_WEIGHT_GRAD_MIN_CHANNELS = 64
IM2COL_FORWARD_CHANNELS = range(33, 65)
MIN_CHUNK_IMAGES = 2

# Row taps (`conv_row_taps`, `weight_grad_row_taps`): where a pass takes im2col and the
# vertical stride is 1, only the kw taps along the width are copied side by side
# ([k * Hp * Wo, kw * C], a third of the full patch matrix for 3x3 kernels), and the kh taps
# along the height are row offsets, applied on the product's side: one product per chunk.
# Per layer alone (batch 128, benchmarks/README.md section 14) the forward pass gains only
# on large images: 32x32 64->64 fell from 104-127 to 85-92 ms, while 16x16 64->128 rose from
# 40-42 to 48-57 ms (more wasted rows straddling images). The weight gradient gains from
# 16x16: with row taps on 8x8 and 4x4 layers too, the Conv-8 step was 0.989 of im2col's time
# instead of 0.954. Below these output pixels per image, im2col.
ROW_TAPS_FORWARD_MIN_PIXELS = 1024
ROW_TAPS_WEIGHT_GRAD_MIN_PIXELS = 256

# The forward pass of a convolution with at most this many input channels (a network's
# first layer on grey images) is a sum of kh * kw * C shifted, scaled copies of the input
# (`conv_tap_sum`), one fused elementwise loop. XLA:CPU runs these convolutions far below the
# machine's speed (a 1 -> 16 channel 3x3 layer on 32x32 images at 5 GFLOP/s). Measured at
# 32x32, tap sum / XLA time of the forward alone, 1 thread (2 threads): 1 -> 16 channels 0.07
# (0.09) at batch 128, 0.36 (0.54) at batch 1000; 1 -> 64 0.85 (0.62); 3 -> 16 0.24 (0.26);
# 3 -> 64 0.97 (0.54). RGB layers are nevertheless left to XLA: inside a ResNet training step
# XLA fuses the 27-term sum into each consumer of the layer's output (BatchNorm's statistics,
# their gradients) and recomputes it there, and the ResNet-50 smoke run took 45-48 s instead of
# 34-39. Its gradients stay XLA's (the weight gradient of such a layer is cheap; the input
# gradient of a first layer is not even computed in training).
TAP_SUM_MAX_CHANNELS = 1

# Flax's dimension numbers for a 2-D NHWC input and an HWIO kernel (what `nnx.Conv` passes).
_NHWC_HWIO = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                      out_spec=(0, 3, 1, 2))


_xla_only_depth = 0  # > 0 inside `xla_convolutions()`
_im2col_depth = 0  # > 0 inside `cpu_im2col()`
_xla_forward_depth = 0  # > 0 inside `xla_forward_convolutions()`


@contextlib.contextmanager
def xla_convolutions() -> Iterator[None]:
    """Within it, :func:`conv_general_dilated` traces to plain ``lax.conv_general_dilated``.

    What every convolution was before this module: benchmarks build one step inside it and
    time it against the default in the same process. It acts at TRACE time, so the step must
    be traced (first called, or lowered) inside the block.
    """
    global _xla_only_depth
    _xla_only_depth += 1
    try:
        yield
    finally:
        _xla_only_depth -= 1


@contextlib.contextmanager
def cpu_im2col() -> Iterator[None]:
    """Within it, the channel rules take passes to im2col whatever XLA's convolutions are
    (`im2col_enabled`); for the tests of those passes and benchmarks comparing them. Acts at
    TRACE time, like `xla_convolutions`."""
    global _im2col_depth
    _im2col_depth += 1
    try:
        yield
    finally:
        _im2col_depth -= 1


def im2col_enabled() -> bool:
    """Whether the im2col passes may replace XLA's: they were measured faster only than
    YNNPACK's convolutions, so not once `XLA_FLAGS` turned those off (module doc)."""
    return _im2col_depth > 0 or not xla_flags.ynn_convolutions_disabled()


@contextlib.contextmanager
def xla_forward_convolutions() -> Iterator[None]:
    """Within it, forward convolutions are XLA's where im2col would take them; the tap sum of
    first layers stays (acts at TRACE time, like `xla_convolutions`).

    For inference (`steps.inference_logits`): there XLA's forward convolution on slices of
    at most 128 images is as fast as im2col, while the im2col loops of a sliced pass kept
    ~0.8 GB of temporary buffers live (881 vs 80 MB for the full-width Conv-4 eval step at
    batch 1000) that XLA:CPU maps afresh, with page faults, on every call: that step ran at
    0.46 of the matmul peak with im2col and at 0.78 without (benchmarks/README.md, section
    13). Training keeps the im2col forward (its activations are saved for the backward pass
    anyway).
    """
    global _xla_forward_depth
    _xla_forward_depth += 1
    try:
        yield
    finally:
        _xla_forward_depth -= 1


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """``lax.conv_general_dilated`` with the signature `nnx.Conv` calls; see the module doc.

    The fast path takes 2-D convolutions of ``lhs`` ``[B, H, W, C]`` with an HWIO kernel
    ``[kh, kw, C, O]`` (Flax's layout), any strides and padding, no dilation, one group;
    it returns ``[B, Ho, Wo, O]`` exactly as XLA's forward convolution does.
    """
    plain = functools.partial(
        lax.conv_general_dilated, lhs, rhs, window_strides, padding,
        lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type, **kwargs)
    if (_xla_only_depth or jax.default_backend() != "cpu"
            or lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1
            or batch_group_count != 1 or preferred_element_type is not None
            or any(v is not None for v in kwargs.values())
            or not _all_ones(lhs_dilation) or not _all_ones(rhs_dilation)
            or not _is_nhwc_hwio(dimension_numbers, lhs.shape, rhs.shape)):
        return plain()
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if any(p < 0 for pair in pads for p in pair) or not (
            any(im2col_passes(lhs.shape[-1], rhs.shape[-1], strides))
            or uses_tap_sum(lhs.shape[-1])):
        return plain()
    return conv2d(lhs, rhs, strides, pads, precision, _xla_forward_depth > 0)


def im2col_passes(in_channels: int, out_channels: int,
                  strides: tuple[int, int]) -> tuple[bool, bool, bool]:
    """Whether the (forward, input gradient, weight gradient) of a convolution use im2col on
    CPU (see the table above `IM2COL_WEIGHT_GRAD_MIN_CHANNELS`); none while
    `im2col_enabled()` is false."""
    if not im2col_enabled():
        return (False, False, False)
    unit = tuple(strides) == (1, 1)
    return (unit and in_channels in IM2COL_FORWARD_CHANNELS,
            unit and out_channels in IM2COL_FORWARD_CHANNELS,
            in_channels >= IM2COL_WEIGHT_GRAD_MIN_CHANNELS)


def uses_tap_sum(in_channels: int) -> bool:
    """Whether a forward pass over `in_channels` is `conv_tap_sum` on CPU (any stride)."""
    return in_channels <= TAP_SUM_MAX_CHANNELS


def _all_ones(dilation: Sequence[int] | None) -> bool:
    return dilation is None or all(int(d) == 1 for d in dilation)


def _is_nhwc_hwio(dimension_numbers: Any, lhs_shape, rhs_shape) -> bool:
    if dimension_numbers is None:
        return False  # lax's default is NCHW / OIHW
    dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
    return dn == _NHWC_HWIO


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv2d(x: jax.Array, w: jax.Array, strides: tuple[int, int],
           pads: tuple[tuple[int, int], tuple[int, int]], precision: Any = None,
           xla_forward: bool = False) -> jax.Array:
    """2-D convolution ``[B, H, W, C] * [kh, kw, C, O] -> [B, Ho, Wo, O]`` (NHWC, HWIO).

    Args:
      strides: ``(sy, sx)``.
      pads: explicit ``((top, bottom), (left, right))`` zero padding.
      xla_forward: XLA's forward convolution (and input gradient) even where im2col would
        take it (`xla_forward_convolutions`). An argument rather than a global read at
        trace time, so that the choice is part of the call JAX traces and caches.
    """
    return _forward(x, w, strides, pads, precision, xla_forward)


def _xla_conv(x, w, strides, pads, precision):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=precision)


def _forward(x, w, strides, pads, precision, xla_forward):
    """XLA's convolution, or on CPU a tap sum or im2col products where those measured faster
    (`uses_tap_sum`, the first of `im2col_passes`; the input gradient calls it on the
    cotangent)."""
    if uses_tap_sum(x.shape[-1]):
        cpu = conv_tap_sum
    elif not xla_forward and im2col_passes(x.shape[-1], w.shape[-1], strides)[0]:
        ho, wo = _output_size(x.shape[1:3], w.shape[:2], strides, pads)
        cpu = conv_row_taps if ho * wo >= ROW_TAPS_FORWARD_MIN_PIXELS else conv_im2col
    else:
        return _xla_conv(x, w, strides, pads, precision)
    return lax.platform_dependent(
        x, w,
        cpu=functools.partial(cpu, strides=strides, pads=pads, precision=precision),
        default=functools.partial(_xla_conv, strides=strides, pads=pads, precision=precision))


def _conv2d_fwd(x, w, strides, pads, precision, xla_forward):
    return _forward(x, w, strides, pads, precision, xla_forward), (x, w)


def _conv2d_bwd(strides, pads, precision, xla_forward, residuals, g):
    x, w = residuals
    kh, kw = w.shape[:2]
    # The input gradient of a stride-1 convolution is the convolution of the padded
    # cotangent with the spatially flipped, in/out-swapped kernel.
    flipped_pads = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), pads))
    if strides == (1, 1) and all(p >= 0 for pair in flipped_pads for p in pair):
        dx = _forward(g, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2), strides, flipped_pads,
                      precision, xla_forward)
    else:  # XLA's transposed convolution (lhs-dilated by the strides)
        _, input_vjp = jax.vjp(lambda x_: _xla_conv(x_, w, strides, pads, precision), x)
        (dx,) = input_vjp(g)

    def xla_weight_grad(x, g):
        _, weight_vjp = jax.vjp(lambda w_: _xla_conv(x, w_, strides, pads, precision), w)
        return weight_vjp(g)[0]

    if not im2col_passes(*w.shape[2:], strides)[2]:
        return dx, xla_weight_grad(x, g)
    ho, wo = g.shape[1:3]
    row_taps = strides[0] == 1 and ho * wo >= ROW_TAPS_WEIGHT_GRAD_MIN_PIXELS
    cpu = weight_grad_row_taps if row_taps else weight_grad_im2col
    dw = lax.platform_dependent(
        x, g,
        cpu=functools.partial(cpu, kernel_shape=w.shape, strides=strides, pads=pads,
                              precision=precision),
        default=xla_weight_grad)
    return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv_tap_sum(x: jax.Array, w: jax.Array, *, strides: tuple[int, int],
                 pads: tuple[tuple[int, int], tuple[int, int]], precision: Any = None) -> jax.Array:
    """The forward convolution of :func:`conv2d` as a sum over kernel taps and input channels.

    ``x`` ``[B, H, W, C]``, ``w`` ``[kh, kw, C, O]`` -> ``[B, Ho, Wo, O]``:

        y[b, y, x, :] = sum_{i, j, c} x_pad[b, s_y * y + i, s_x * x + j, c] * w[i, j, c, :]

    accumulated in float32 in that (i, j, c) order. Each term broadcasts a strided slice
    ``[B, Ho, Wo, 1]`` against a row ``[O]``; XLA fuses the whole sum into one loop that
    writes the output once, which is what makes it fast for few input channels. The products
    are exact float32 multiplies, so ``precision`` has nothing to select.
    """
    del precision
    kh, kw, c, _ = w.shape
    (sy, sx) = strides
    ho, wo = _output_size(x.shape[1:3], (kh, kw), strides, pads)
    x_pad = _pad(x, pads).astype(jnp.float32)
    w32 = w.astype(jnp.float32)
    total = None
    for i in range(kh):
        for j in range(kw):
            for ch in range(c):
                tap = x_pad[:, i:i + sy * (ho - 1) + 1:sy, j:j + sx * (wo - 1) + 1:sx, ch:ch + 1]
                term = tap * w32[i, j, ch]
                total = term if total is None else total + term
    return total.astype(jnp.result_type(x.dtype, w.dtype))


def chunk_images(batch: int, bytes_per_image: int, budget: int = CHUNK_BYTES) -> int:
    """Images per chunk: the largest divisor of `batch` within `budget` bytes, at least 2.

    One image per chunk was 1.2-1.5x slower than two in every layer measured, even where two
    images' patches exceed the budget (32x32x64: 2.25 MB per image).
    """
    fit = max(MIN_CHUNK_IMAGES, budget // max(1, bytes_per_image))
    return max(d for d in range(1, min(batch, fit) + 1) if batch % d == 0)


def image_patches(x_pad: jax.Array, kernel_hw: tuple[int, int], out_hw: tuple[int, int],
                  strides: tuple[int, int]) -> jax.Array:
    """im2col: ``[k, Hp, Wp, C] -> [k * Ho * Wo, kh * kw * C]`` (taps row-major, then C).

    Row ``(b, y, x)`` holds the ``kh x kw`` window at ``(s_y * y, s_x * x)`` of the already
    padded input, flattened like an HWIO kernel's first three axes.
    """
    (kh, kw), (ho, wo), (sy, sx) = kernel_hw, out_hw, strides
    k, c = x_pad.shape[0], x_pad.shape[-1]
    taps = [x_pad[:, i:i + sy * (ho - 1) + 1:sy, j:j + sx * (wo - 1) + 1:sx, :]
            for i in range(kh) for j in range(kw)]
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
    return patches.reshape(k * ho * wo, kh * kw * c)


def conv_im2col(x: jax.Array, w: jax.Array, *, strides: tuple[int, int],
                pads: tuple[tuple[int, int], tuple[int, int]], precision: Any = None,
                chunk_bytes: int = CHUNK_BYTES) -> jax.Array:
    """The forward convolution of :func:`conv2d` as chunked im2col matrix products.

    ``x`` ``[B, H, W, C]``, ``w`` ``[kh, kw, C, O]`` -> ``[B, Ho, Wo, O]``: for each chunk of
    images (``lax.map``), ``patches [k * Ho * Wo, kh * kw * C] @ w [kh * kw * C, O]``.
    """
    kh, kw, c, o = w.shape
    b = x.shape[0]
    ho, wo = _output_size(x.shape[1:3], (kh, kw), strides, pads)
    chunks, patches_of = _chunked_patches(x, w.shape, (ho, wo), strides, pads, chunk_bytes)
    w_matrix = w.reshape(kh * kw * c, o)

    def chunk_output(x_chunk):
        return jnp.dot(patches_of(x_chunk), w_matrix, precision=precision).reshape(
            x_chunk.shape[0], ho, wo, o)

    return lax.map(chunk_output, chunks).reshape(b, ho, wo, o)


def _chunked_patches(x, kernel_shape, out_hw, strides, pads, chunk_bytes):
    """`x` `[B, H, W, C]` split into `[B / k, k, H, W, C]` chunks (`chunk_images`), and the
    function mapping one chunk to its padded im2col patches `[k * Ho * Wo, kh * kw * C]`."""
    kh, kw, c, _ = kernel_shape
    b = x.shape[0]
    k = chunk_images(b, out_hw[0] * out_hw[1] * kh * kw * c * x.dtype.itemsize, chunk_bytes)

    def patches_of(x_chunk):
        return image_patches(_pad(x_chunk, pads), (kh, kw), out_hw, strides)

    return x.reshape(b // k, k, *x.shape[1:]), patches_of


def _output_size(in_hw, kernel_hw, strides, pads) -> tuple[int, int]:
    return tuple((n + lo + hi - k) // s + 1
                 for n, k, s, (lo, hi) in zip(in_hw, kernel_hw, strides, pads))


def _pad(x: jax.Array, pads) -> jax.Array:
    """Zero-pads the spatial axes of ``[k, H, W, C]``. Done per chunk, inside the loop, so
    that the padded copy is written to cache rather than as a whole batch to memory."""
    return jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))


def weight_grad_im2col(x: jax.Array, g: jax.Array, *, kernel_shape: tuple[int, ...],
                       strides: tuple[int, int], pads: tuple[tuple[int, int], tuple[int, int]],
                       precision: Any = None, chunk_bytes: int = CHUNK_BYTES) -> jax.Array:
    """Weight gradient of :func:`conv2d` as chunked im2col matrix products.

    Args:
      x: the forward input ``[B, H, W, C]``.
      g: the output cotangent ``[B, Ho, Wo, O]``.
      kernel_shape: ``(kh, kw, C, O)``.
      chunk_bytes: patch-matrix bytes per chunk of images (see `CHUNK_BYTES`).

    Returns:
      ``[kh, kw, C, O]`` in ``x``'s dtype, accumulated in float32.
    """
    kh, kw, c, o = kernel_shape
    ho, wo = g.shape[1:3]
    xs, patches_of = _chunked_patches(x, kernel_shape, (ho, wo), strides, pads, chunk_bytes)
    gs = g.reshape(xs.shape[0], -1, o)  # [B / k, k * Ho * Wo, O]

    def accumulate(total, chunk):
        x_chunk, g_chunk = chunk
        return total + lax.dot_general(patches_of(x_chunk), g_chunk, (((0,), (0,)), ((), ())),
                                       precision=precision,
                                       preferred_element_type=jnp.float32), None

    total, _ = lax.scan(accumulate, jnp.zeros((kh * kw * c, o), jnp.float32), (xs, gs))
    return total.reshape(kh, kw, c, o).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Row taps: im2col along the width only (vertical stride 1)

def width_taps(x_pad: jax.Array, kw: int, out_width: int, stride_x: int) -> jax.Array:
    """``[k, Hp, Wp, C] -> [k * Hp * Wo, kw * C]``: row ``(b, r, x)`` holds the ``kw`` pixels
    at ``(r, s_x * x + j)``, ``j = 0 .. kw - 1``, of the padded input (taps, then C).

    Every padded row ``r`` is kept, so the kh taps along the height of output pixel
    ``(b, y, x)`` are rows ``((b * Hp + y + i) * Wo + x)``: the rows of output row 0 shifted
    by ``i * Wo``.
    """
    k, hp, _, c = x_pad.shape
    cols = [x_pad[:, :, j:j + stride_x * (out_width - 1) + 1:stride_x, :] for j in range(kw)]
    taps = cols[0] if kw == 1 else jnp.concatenate(cols, axis=-1)
    return taps.reshape(k * hp * out_width, kw * c)


def _row_tap_layout(x_shape, kernel_shape, strides, pads, chunk_bytes, itemsize):
    """(k images per chunk, padded height Hp, (Ho, Wo), n product rows per chunk).

    The k padded images of a chunk are stacked into one image of height k * Hp; its
    ``k * Hp - kh + 1`` valid output rows include ``kh - 1`` rows straddling each pair of
    neighbouring images, computed and thrown away (6% of the products at 32x32, 3x3).
    """
    kh, kw, c, _ = kernel_shape
    b, h, w, _ = x_shape
    if strides[0] != 1:
        raise ValueError(f"row taps need a vertical stride of 1, got {strides}")
    ho, wo = _output_size((h, w), (kh, kw), strides, pads)
    hp = h + pads[0][0] + pads[0][1]
    # The chunk size im2col would take: the products stream the same rows.
    k = chunk_images(b, ho * wo * kh * kw * c * itemsize, chunk_bytes)
    return k, hp, (ho, wo), (k * hp - kh + 1) * wo


def conv_row_taps(x: jax.Array, w: jax.Array, *, strides: tuple[int, int],
                  pads: tuple[tuple[int, int], tuple[int, int]], precision: Any = None,
                  chunk_bytes: int = CHUNK_BYTES) -> jax.Array:
    """The forward convolution of :func:`conv2d` for a vertical stride of 1, as row taps.

    ``x`` ``[B, H, W, C]``, ``w`` ``[kh, kw, C, O]`` -> ``[B, Ho, Wo, O]``: per chunk of k
    images (``lax.map``), with ``T = width_taps(x_pad)`` ``[k * Hp * Wo, kw * C]``, one
    product with the kh kernel rows side by side, then shifted sums of its column blocks:

        Z = T @ [w[0] | ... | w[kh - 1]]          (w[i] reshaped to [kw * C, O])
        out[r] = sum_i Z[r + i * Wo, i * O : (i + 1) * O]

    The shifts are taken on the product (one fused sum over an output-sized array) rather
    than on ``T``, whose shifted row ranges XLA would otherwise copy for each product.
    Each image keeps its ``Ho`` output rows.
    """
    kh, kw, c, o = w.shape
    b = x.shape[0]
    k, hp, (ho, wo), n = _row_tap_layout(x.shape, w.shape, strides, pads, chunk_bytes,
                                         x.dtype.itemsize)
    w_side_by_side = w.reshape(kh, kw * c, o).transpose(1, 0, 2).reshape(kw * c, kh * o)
    dtype = jnp.result_type(x.dtype, w.dtype)

    def chunk_output(x_chunk):
        taps = width_taps(_pad(x_chunk, pads), kw, wo, strides[1])
        z = lax.dot(taps, w_side_by_side, precision=precision,
                    preferred_element_type=jnp.float32)                    # [k Hp Wo, kh O]
        total = sum(z[i * wo:i * wo + n, i * o:(i + 1) * o] for i in range(kh))
        rows = jnp.pad(total, ((0, k * hp * wo - n), (0, 0))).reshape(k, hp, wo, o)
        return rows[:, :ho].astype(dtype)

    return lax.map(chunk_output, x.reshape(b // k, k, *x.shape[1:])).reshape(b, ho, wo, o)


def weight_grad_row_taps(x: jax.Array, g: jax.Array, *, kernel_shape: tuple[int, ...],
                         strides: tuple[int, int],
                         pads: tuple[tuple[int, int], tuple[int, int]], precision: Any = None,
                         chunk_bytes: int = CHUNK_BYTES) -> jax.Array:
    """Weight gradient of :func:`conv2d` for a vertical stride of 1, as row taps.

    Per chunk (``lax.scan``), with ``T`` as in :func:`conv_row_taps` and ``G`` the chunk's
    cotangent ``[k, Ho, Wo, O]`` laid out on the ``k * Hp`` stacked rows (zeros on the rows
    that straddle two images), ``dW[i] = sum_r G[r]^T T[r + i * Wo]``. The shift again goes
    to the smaller operand: ``G_i`` is ``G`` moved down by ``i * Wo`` rows, and one product

        [G_0 | ... | G_{kh-1}]^T @ T               ([kh * O, kw * C])

    gives every kernel row.

    Returns ``[kh, kw, C, O]`` in ``x``'s dtype, accumulated in float32.
    """
    kh, kw, c, o = kernel_shape
    b = x.shape[0]
    k, hp, (ho, wo), n = _row_tap_layout(x.shape, kernel_shape, strides, pads, chunk_bytes,
                                         x.dtype.itemsize)
    rows = k * hp * wo

    def accumulate(total, chunk):
        x_chunk, g_chunk = chunk
        taps = width_taps(_pad(x_chunk, pads), kw, wo, strides[1])           # [rows, kw C]
        g_rows = jnp.pad(g_chunk, ((0, 0), (0, hp - ho), (0, 0), (0, 0)))
        g_rows = g_rows.reshape(rows, o)[:n]                                 # [n, O]
        shifted = jnp.concatenate([jnp.pad(g_rows, ((i * wo, rows - n - i * wo), (0, 0)))
                                   for i in range(kh)], axis=1)              # [rows, kh O]
        return total + lax.dot_general(shifted, taps, (((0,), (0,)), ((), ())),
                                       precision=precision,
                                       preferred_element_type=jnp.float32), None

    total, _ = lax.scan(accumulate, jnp.zeros((kh * o, kw * c), jnp.float32),
                        (x.reshape(b // k, k, *x.shape[1:]), g.reshape(b // k, k, ho, wo, o)))
    return total.reshape(kh, o, kw, c).transpose(0, 2, 3, 1).astype(x.dtype)
