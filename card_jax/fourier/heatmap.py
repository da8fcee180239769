"""Fourier error heat maps (Yin et al. 2019; Winning Hand Section 2.3 / Figure 2; SPEC §6).

Entry (i, j) of the heat map is the error rate (1 - accuracy) of a model on the test images
perturbed by `clip(x + eps * r_c * U_ij, 0, 1)`: U_ij is the unit-norm real Fourier basis
image of `card_jax.fourier.basis`, r_c an independent random sign per image and channel, and
x the [0, 1] image *before* the model's own normalisation.

Execution plan (one compilation for everything):
  * `predict` is traced once with `jax.make_jaxpr`; the arrays it closes over (the parameters
    of all R realizations) come out as jaxpr constants and are passed to the compiled chunk
    function as *arguments*, so they are not baked into the executable as literals.
  * The compiled chunk function takes the basis images, eps values, the device-resident uint8
    test set and the chunk offsets as array arguments, so one executable serves every
    frequency chunk, every image chunk (the ragged last one is masked) and every eps.
  * A host loop dispatches chunks asynchronously; counts accumulate on device, and the host
    reads them back once at the end. Inside a chunk there is no host round-trip.
  * Each Hermitian pair is evaluated once (K = h*w/2 + 2 for even sizes) and written to both
    grid positions. The chunk's `freq_chunk * len(eps) * batch_size` perturbed images go
    through `predict` as ONE batch (no while loop: XLA:CPU runs convolutions much slower
    inside loops, see `card_jax.realizations`), which also bounds peak memory.

Random signs are a pure function of (key, frequency index, image index): independent of the
chunk sizes, shared by all eps values and all realizations (common random numbers, as in
Yin's code where a fixed numpy seed replays the same signs for every run), so differences
between eps values and between models are not blurred by sign noise.
"""

from __future__ import annotations

import math
import os
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from card_jax.data import pipeline
from card_jax.fourier import basis as basis_lib


def perturb_with_signs(
    images01: jax.Array, basis_image: jax.Array, eps: jax.Array, signs: jax.Array
) -> jax.Array:
    """`clip(x + eps * r_c * U, 0, 1)` for float images `[B, H, W, C]` in [0, 1].

    Args:
      basis_image: `[H, W]`, shared by all channels.
      signs: `[B, C]` of +-1.
    """
    delta = eps * signs[:, None, None, :] * basis_image[None, :, :, None]
    return jnp.clip(images01 + delta, 0.0, 1.0)


def perturb(
    images01: jax.Array, basis_image: jax.Array, eps: float | jax.Array, key: jax.Array
) -> jax.Array:
    """Yin's perturbation with an independent random sign per image and channel.

    Args:
      images01: float32 `[B, H, W, C]` in [0, 1] (before normalisation).
      basis_image: `[H, W]` unit-norm basis image.
      eps: L2 norm of each channel's perturbation.
    Returns float32 `[B, H, W, C]` clipped to [0, 1].
    """
    b, _, _, c = images01.shape
    signs = jax.random.rademacher(key, (b, c), dtype=images01.dtype)
    return perturb_with_signs(images01, basis_image, eps, signs)


def _signs(key: jax.Array, freq_ids: jax.Array, image_ids: jax.Array, channels: int):
    """+-1 float32 `[F, B, C]`, a pure function of (key, frequency, image)."""

    def one(f, n):
        k = jax.random.fold_in(jax.random.fold_in(key, f), n)
        return jax.random.rademacher(k, (channels,), dtype=jnp.float32)

    return jax.vmap(lambda f: jax.vmap(lambda n: one(f, n))(image_ids))(freq_ids)


def heatmap(
    predict: Callable[[jax.Array], jax.Array],
    images_uint8: np.ndarray | jax.Array,
    labels: np.ndarray | jax.Array,
    eps: Sequence[float] = (3.0, 4.0, 6.0),
    *,
    key: jax.Array,
    batch_size: int = 256,
    freq_chunk: int = 4,
) -> np.ndarray:
    """Fourier error heat maps of R realizations at several eps, one compilation in all.

    Args:
      predict: pure jittable `x float32 [B, H, W, C] in [0, 1] -> logits [R, B, classes]`
        (a `[B, classes]` output is read as R = 1). Close over the parameters; they are
        hoisted out as arguments (see the module docstring).
      images_uint8: `[N, H, W, C]` uint8 test images.
      labels: `[N]` integer labels.
      eps: perturbation L2 norms (per channel, [0, 1] pixel scale).
      key: randomness of the signs.
      batch_size: clean images per chunk.
      freq_chunk: frequencies per chunk; `predict` sees batches of
        `freq_chunk * len(eps) * batch_size` images, which bounds peak memory.

    Returns:
      float32 `[R, len(eps), H, W]` error rates in [0, 1]; centre = lowest frequency.
    """
    # device_put, not jnp.asarray: the latter compiles a tiny staging program per array.
    images = jax.device_put(images_uint8)
    if images.dtype != jnp.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    labels = jax.device_put(np.asarray(labels, dtype=np.int32))
    eps_arr = np.asarray(eps, dtype=np.float32).reshape(-1)
    num_eps = eps_arr.shape[0]
    batch_size = min(batch_size, n)

    reps = basis_lib.distinct_frequencies(h, w)
    twins = basis_lib.twin_positions(h, w)
    bases = basis_lib.all_bases(h, w)
    k = bases.shape[0]
    freq_chunk = min(freq_chunk, k)
    k_pad = math.ceil(k / freq_chunk) * freq_chunk
    # Padded frequencies are zero perturbations; their counts are dropped at the end.
    bases = np.concatenate([bases, np.zeros((k_pad - k, h, w), np.float32)])

    model_batch = freq_chunk * num_eps * batch_size
    closed = jax.make_jaxpr(predict)(jax.ShapeDtypeStruct((model_batch, h, w, c), jnp.float32))
    out_shape = closed.out_avals[0].shape
    if len(closed.out_avals) != 1 or len(out_shape) not in (2, 3) or out_shape[-2] != model_batch:
        raise ValueError(f"predict must return logits [R, B, classes], got {closed.out_avals}")
    num_real = out_shape[0] if len(out_shape) == 3 else 1

    def chunk(acc, consts, bases_all, eps_values, images, labels, f_start, i_start, key):
        fb = jax.lax.dynamic_slice_in_dim(bases_all, f_start, freq_chunk)  # [F, H, W]
        positions = i_start + jnp.arange(batch_size)
        valid = positions < n
        safe = jnp.where(valid, positions, 0)
        x = pipeline.to_float(images[safe])  # [B, H, W, C]
        y = labels[safe]
        signs = _signs(key, f_start + jnp.arange(freq_chunk), positions, c)  # [F, B, C]
        # [F, E, B, H, W, C]: every (frequency, eps) copy of the chunk in one model batch.
        delta = (eps_values[None, :, None, None, None, None]
                 * signs[:, None, :, None, None, :]
                 * fb[:, None, None, :, :, None])
        xp = jnp.clip(x[None, None] + delta, 0.0, 1.0).reshape(model_batch, h, w, c)
        (logits,) = jax.core.eval_jaxpr(closed.jaxpr, consts, xp)
        logits = logits.reshape(num_real, freq_chunk, num_eps, batch_size, -1)
        wrong = (jnp.argmax(logits, -1) != y) & valid  # [R, F, E, B]
        counts = jnp.sum(wrong, axis=-1, dtype=jnp.int32).transpose(0, 2, 1)  # [R, E, F]
        old = jax.lax.dynamic_slice_in_dim(acc, f_start, freq_chunk, axis=2)
        return jax.lax.dynamic_update_slice_in_dim(acc, old + counts, f_start, axis=2)

    step = jax.jit(chunk)
    acc = np.zeros((num_real, num_eps, k_pad), np.int32)
    consts = list(closed.consts)
    bases_dev = jax.device_put(bases)
    eps_dev = jax.device_put(eps_arr)
    # Python ints would be weakly typed and could retrace; int32 arrays keep one signature.
    for f_start in range(0, k_pad, freq_chunk):
        for i_start in range(0, n, batch_size):
            acc = step(acc, consts, bases_dev, eps_dev, images, labels,
                       np.int32(f_start), np.int32(i_start), key)
    per_pair = np.asarray(acc)[:, :, :k].astype(np.float32) / n  # the only host read-back

    grid = np.zeros((num_real, num_eps, h, w), np.float32)
    grid[:, :, reps[:, 0], reps[:, 1]] = per_pair
    grid[:, :, twins[:, 0], twins[:, 1]] = per_pair
    return grid


def _slug(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", title).strip("_") or "heatmap"


def save_heatmaps(
    err: np.ndarray,
    eps: Sequence[float],
    out_dir: str | os.PathLike,
    title: str,
    baseline_err: np.ndarray | None = None,
) -> dict[str, str]:
    """Writes the heat maps as `.npy` and a PNG grid (one panel per eps), like Figure 2.

    Args:
      err: `[R, E, H, W]` (or `[E, H, W]`) error rates in [0, 1]; the PNG shows the mean over
        R, in percent, on a colour scale shared by all panels.
      baseline_err: same layout (e.g. the dense model). Adds a second row with
        `method - baseline` in percentage points, diverging colormap centred at 0, blue =
        lower error than the baseline.
    Returns {'npy': path, 'png': path} (and 'baseline_npy' with a baseline).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    err = np.asarray(err, np.float32)
    mean = err.reshape((-1,) + err.shape[-3:]).mean(0)  # [E, H, W]
    eps = [float(e) for e in eps]
    if mean.shape[0] != len(eps):
        raise ValueError(f"err has {mean.shape[0]} eps panels but {len(eps)} eps values")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(os.fspath(out_dir), _slug(title))
    paths = {"npy": stem + ".npy", "png": stem + ".png"}
    np.save(paths["npy"], err)

    rows = [("error (%)", 100.0 * mean, "viridis", 0.0, max(100.0 * float(mean.max()), 1e-6))]
    if baseline_err is not None:
        base = np.asarray(baseline_err, np.float32)
        paths["baseline_npy"] = stem + "_baseline.npy"
        np.save(paths["baseline_npy"], base)
        base_mean = base.reshape((-1,) + base.shape[-3:]).mean(0)
        diff = 100.0 * (mean - base_mean)
        bound = max(float(np.abs(diff).max()), 1e-6)
        # RdBu_r: blue = negative = the method errs less than the baseline (paper's convention).
        rows.append(("method - baseline (pp)", diff, "RdBu_r", -bound, bound))

    h, w = mean.shape[-2:]
    # Shifted index p holds frequency p - size // 2: label axes so the centre reads 0.
    extent = (-(w // 2) - 0.5, w - w // 2 - 0.5, h - h // 2 - 0.5, -(h // 2) - 0.5)
    fig = Figure(figsize=(3.2 * len(eps) + 1.0, 3.0 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(eps), squeeze=False)
    for r, (label, maps, cmap, vmin, vmax) in enumerate(rows):
        image = None
        for e, value in enumerate(eps):
            ax = axes[r, e]
            image = ax.imshow(maps[e], cmap=cmap, vmin=vmin, vmax=vmax, extent=extent,
                              interpolation="nearest")
            ax.set_title(f"eps = {value:g}" if r == 0 else f"eps = {value:g} (diff)")
            if r == len(rows) - 1:
                ax.set_xlabel("frequency (x)")
            if e == 0:
                ax.set_ylabel("frequency (y)")
        fig.colorbar(image, ax=list(axes[r]), label=label, shrink=0.9)
    realizations = err.shape[0] if err.ndim == 4 else 1
    fig.suptitle(f"{title} (mean of {realizations})")
    fig.savefig(paths["png"], dpi=100)
    return paths
