"""The spectral signature that gates a CARD-Deck (paper §3.2, SPEC §1(c)-(d)).

F(X) is the 1-D radially averaged power spectrum of an image, taken element-wise reciprocal and
L2-normalised. The paper fixes neither the grayscale conversion, the spectrum nor the radial
binning; the defaults here are SPEC §1(d)'s and every choice is an option (`SpectrumOptions`):

  grayscale  "mean" (channel mean, default) | "luminance" (0.299 R + 0.587 G + 0.114 B; the
             mean for one channel) | "per_channel" (one spectrum per channel, concatenated)
  spectrum   "power" (|FFT|^2, default) | "log_magnitude" (20 log10(1 + |FFT|): the "+1" keeps
             it >= 0 so that the reciprocal stays defined, unlike Durall et al.'s log|FFT|)
  reciprocal True (default): 1 / (radial_mean + eps), which up-weights the small
             high-frequency power where AugMix and Gaussian noise differ most
  eps        1e-12

Radial bins: in the fftshift-ed spectrum frequency 0 sits at (H // 2, W // 2) and pixel
(y, x) goes to bin floor(sqrt((y - H//2)^2 + (x - W//2)^2)). A 32x32 image has radii 0..22,
i.e. 23 bins; a 16x16 image 12 bins. (Computed from `rfft2`, the same values at half the
FFT cost: see `_half_spectrum_averaging`.)

Everything here is pure and jittable; the bin layout is a trace-time numpy constant.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

GRAYSCALE = ("mean", "luminance", "per_channel")
SPECTRA = ("power", "log_magnitude")
_LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")
DIRECT_ELEMENTS = 1 << 22  # Q*P*D differences per chunk of `nearest` (16 MB of float32)


@dataclasses.dataclass(frozen=True)
class SpectrumOptions:
    """How F(X) is computed (hashable: it is a static argument of the jitted functions)."""

    grayscale: str = "mean"
    spectrum: str = "power"
    reciprocal: bool = True
    eps: float = 1e-12

    def __post_init__(self):
        if self.grayscale not in GRAYSCALE:
            raise ValueError(f"deck.spectrum.grayscale must be one of {GRAYSCALE}, "
                             f"got {self.grayscale!r}")
        if self.spectrum not in SPECTRA:
            raise ValueError(f"deck.spectrum.spectrum must be one of {SPECTRA}, "
                             f"got {self.spectrum!r}")
        if not self.eps > 0:
            raise ValueError(f"deck.spectrum.eps must be > 0, got {self.eps!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@functools.cache
def radial_bins(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(bin index int32 `[H, W]` of the fftshift-ed spectrum, pixel count per bin `[bins]`).

    Pixel (y, x) of the shifted spectrum is frequency (y - H//2, x - W//2) and goes to bin
    floor(sqrt((y - H//2)^2 + (x - W//2)^2)).
    """
    dy = np.arange(height) - height // 2
    dx = np.arange(width) - width // 2
    radius = np.floor(np.sqrt(dy[:, None] ** 2 + dx[None, :] ** 2)).astype(np.int32)
    counts = np.bincount(radius.ravel())
    # Every radius 0..max occurs (the grid is dense), so no bin is empty.
    assert (counts > 0).all()
    return radius, counts


@functools.cache
def _half_spectrum_averaging(height: int, width: int) -> np.ndarray:
    """float32 `[H * (W//2 + 1), bins]`: the radial mean as a matrix on the `rfft2` output.

    A real image's spectrum is Hermitian, |X[u, v]| = |X[-u, -v]|, so `rfft2` (columns
    v = 0..W//2) holds every value of the full spectrum; each full-grid frequency adds
    1 / count(bin) at the half-grid entry that carries its value. Identical to averaging the
    fftshift-ed `fft2` per bin, at about half the FFT cost.
    """
    radius, counts = radial_bins(height, width)
    half = width // 2 + 1
    matrix = np.zeros((height * half, len(counts)), np.float64)
    for u in range(height):
        for v in range(width):
            # Unshifted index u is frequency ((u + H//2) mod H) - H//2: its shifted position is
            # (u + H//2) mod H (fftshift rolls by H//2, numpy's convention for odd sizes too).
            b = radius[(u + height // 2) % height, (v + width // 2) % width]
            hu, hv = (u, v) if v < half else ((-u) % height, (-v) % width)
            matrix[hu * half + hv, b] += 1.0 / counts[b]
    return matrix.astype(np.float32)


def num_bins(height: int, width: int, channels: int = 1,
             options: SpectrumOptions = SpectrumOptions()) -> int:
    """Length of the feature of an `[H, W, C]` image: bins, times C for per_channel."""
    bins = len(radial_bins(height, width)[1])
    return bins * channels if options.grayscale == "per_channel" else bins


def _planes(images: jax.Array, grayscale: str) -> jax.Array:
    """`[N, H, W, C]` -> the 2-D planes whose spectra are taken: `[N, P, H, W]`."""
    channels = images.shape[-1]
    if grayscale == "per_channel":
        return jnp.moveaxis(images, -1, 1)
    if grayscale == "luminance" and channels == 3:
        weights = jnp.asarray(_LUMINANCE, images.dtype)
        return jnp.tensordot(images, weights, axes=([-1], [0]))[:, None]
    if grayscale == "luminance" and channels != 1:
        raise ValueError(f"grayscale='luminance' needs 1 or 3 channels, got {channels}")
    return images.mean(-1)[:, None]


def radial_spectrum(images: jax.Array, options: SpectrumOptions = SpectrumOptions()
                    ) -> jax.Array:
    """Radially averaged spectrum `[N, bins]` (`[N, C * bins]` for per_channel).

    Args:
      images: float `[N, H, W, C]` pixels in [0, 1] (before the model's normalisation); uint8
        is scaled by 1/255 first.
    Returns the mean of |FFT|^2 (or 20 log10(1 + |FFT|)) over the pixels of each integer
    radius, float32. No reciprocal, no normalisation (see `spectral_feature`).
    """
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) * (1.0 / 255.0)
    images = images.astype(jnp.float32)
    n, height, width, _ = images.shape
    planes = _planes(images, options.grayscale)                       # [N, P, H, W]
    spectrum = jnp.fft.rfft2(planes)                                  # [N, P, H, W//2+1]
    if options.spectrum == "power":  # re^2 + im^2: |z|^2 without a square root
        values = spectrum.real ** 2 + spectrum.imag ** 2
    else:
        values = 20.0 * jnp.log10(1.0 + jnp.abs(spectrum))
    # Averaging per bin is one matmul with a constant matrix: a single dense op instead of
    # a scatter (segment_sum), exact for these sizes.
    averaging = jnp.asarray(_half_spectrum_averaging(height, width))
    radial = values.reshape(n, planes.shape[1], -1) @ averaging
    return radial.reshape(n, -1)                                      # [N, P * bins]


def spectral_feature(images: jax.Array, options: SpectrumOptions = SpectrumOptions()
                     ) -> jax.Array:
    """f^(X) = F(X) / ||F(X)||_2 for each image: `[N, bins]` float32 (paper §3.2).

    F(X) = 1 / (radial_spectrum(X) + eps) with `options.reciprocal` (default), else the
    radial spectrum itself. `images` as in `radial_spectrum`: `[N, H, W, C]` in [0, 1].
    """
    radial = radial_spectrum(images, options)
    feature = 1.0 / (radial + options.eps) if options.reciprocal else radial
    norm = jnp.linalg.norm(feature, axis=-1, keepdims=True)
    return feature / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)


def d_ss(reference_features: jax.Array, batch_features: jax.Array,
         valid: jax.Array | None = None) -> jax.Array:
    """The paper's spectral distance of a test batch to one augmentation's representatives.

    d_ss = min_i || f^(S_i) - q ||_2 with q = mean_j f^(Y_j), the mean of the batch's
    normalised features (not re-normalised), i.e. the distance from q to its nearest
    representative.

    Args:
      reference_features: `[P, D]` features of the P representatives of one augmentation.
      batch_features: `[M, D]` features of the test batch.
      valid: optional bool `[M]`; padded rows (False) do not count in the mean.
    Returns a float32 scalar.
    """
    q = batch_mean(batch_features, valid)
    return nearest_distance(reference_features, q[None])[0]


def batch_mean(batch_features: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """q = mean of the (valid) rows of `[M, D]` -> `[D]`."""
    if valid is None:
        return batch_features.mean(0)
    weight = valid.astype(batch_features.dtype)
    return (batch_features * weight[:, None]).sum(0) / jnp.maximum(weight.sum(), 1.0)


def nearest(reference_features: jax.Array, queries: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact nearest representative of each query, by brute force on device.

    Args:
      reference_features: `[P, D]`.
      queries: `[Q, D]`.
    Returns (distance float32 `[Q]`, index int32 `[Q]`).

    Every ||r - q|| is computed from the differences, in chunks of queries of at most
    DIRECT_ELEMENTS differences each (`lax.map`: bounded memory, one compiled body). The
    expanded form ||r||^2 - 2 r.q + ||q||^2 as one matmul is ~2x faster here but not exact: its
    float32 rounding (~1e-8 in d^2 for unit features) exceeds the gaps between near neighbours
    when a query lies within ~1e-4 of several representatives, and an error of e in d^2 is
    sqrt(e) in d near 0: a shortlist taken from it missed the true neighbour of a
    per-example query by 6e-6 against the KD-tree's answer (tests/test_deck.py).
    """
    num_refs, dim = reference_features.shape
    chunk = max(1, DIRECT_ELEMENTS // (num_refs * dim))
    num_queries = queries.shape[0]
    if num_queries <= chunk:  # the paper's batch gating: Q = 1
        return _nearest_direct(reference_features, queries)
    num_chunks = -(-num_queries // chunk)
    padded = jnp.pad(queries, ((0, num_chunks * chunk - num_queries), (0, 0)))
    distances, index = jax.lax.map(functools.partial(_nearest_direct, reference_features),
                                   padded.reshape(num_chunks, chunk, dim))
    return distances.reshape(-1)[:num_queries], index.reshape(-1)[:num_queries]


def _nearest_direct(reference_features: jax.Array, queries: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """`nearest` for one chunk: all `[Q, P, D]` differences at once."""
    diffs = reference_features[None, :, :] - queries[:, None, :]            # [Q, P, D]
    distances = jnp.sqrt(jnp.sum(diffs * diffs, -1))                        # [Q, P]
    index = jnp.argmin(distances, axis=-1)
    return jnp.take_along_axis(distances, index[:, None], -1)[:, 0], index.astype(jnp.int32)


def nearest_distance(reference_features: jax.Array, queries: jax.Array) -> jax.Array:
    """`[Q]` distance of each query `[Q, D]` to its nearest row of `[P, D]`."""
    return nearest(reference_features, queries)[0]
