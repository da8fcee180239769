"""Spectral gating of a domain-adaptive CARD-Deck (paper §3.2, SPEC §1(c)-(e)).

Offline, for each augmentation group a (AugMix, Gaussian, or any name in
`card_jax.data.augment.AUGMENTATIONS`), P = 5000 training images are drawn once (seeded), the
augmentation is applied and their spectral features f^ (`card_jax.deck.spectral`) are kept:
the group's representatives `[P, D]`. At test time a batch of M = 100 images goes to the group
whose nearest representative is closest to the batch's mean feature (`spectral.d_ss`).

Two exact nearest-neighbour searches give the same answer: brute force on device (default,
`nn="brute"`: one `[G, P, D]` array, every distance computed, in chunks of queries) and
scipy's `cKDTree` on the host (`nn="kdtree"`, the paper's structure).

The pure functions (`gate_scores`, `choose`) are jittable; `representative_features` runs
the augmentation on device in chunks; `load_or_build` keeps the features on disk.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from card_jax import xla_flags
from card_jax.data import pipeline
from card_jax.deck import spectral

log = logging.getLogger("card_jax")

GATE_DIR = "gate"
GATE_FILE = "gate.json"
NN_METHODS = ("brute", "kdtree")
_CHUNK = 250  # representatives augmented per compiled call (bounded memory, one compile)
# XLA:CPU splits a loop over its thread pool once the loop reads and writes more than this
# (its parallel task assignment: one task per 256 KB accessed for memory-bound loops). The
# batch gate, ~0.3 ms of work, runs on the calling thread in a deck job
# (`deck.run.use_synchronous_dispatch`), and a piece handed to a sleeping pool thread cost it
# more than the piece took (benchmarks/README.md, section 23). So the batch gate keeps every
# loop below this size: spectra of a few images at a time (`images_per_piece`), the search over
# one group at a time (`batch_query_distances`).
SPLIT_BYTES = 2 * 256 * 1024


# ---------------------------------------------------------------------------------------------
# Representatives


def augmentation_fn(group: str, gaussian_always_noisy: bool = False) -> Callable:
    """The train-time augmentation `fn(key, x01 [B, H, W, C]) -> [B, H, W, C]` of a group.

    With `gaussian_always_noisy`, the "gaussian" group adds noise to every representative
    instead of to each with p = 0.5 as in training (SPEC §1(e): the paper does not say).
    """
    from card_jax.data import augment

    if group not in augment.AUGMENTATIONS:
        raise ValueError(f"unknown augmentation group {group!r}; valid: "
                         f"{', '.join(augment.AUGMENTATIONS)}")
    if group == "gaussian" and gaussian_always_noisy:
        return functools.partial(augment.gaussian_noise, p=1.0)
    return augment.AUGMENTATIONS[group]


def group_key(seed: int, group: str) -> jax.Array:
    """The key of a group's representatives: depends on the group's name, not its position,
    so adding or reordering groups leaves the others' samples unchanged."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(group.encode()) & 0x7FFFFFFF)


def pad_centred(x: jax.Array, size: int) -> jax.Array:
    """Zero-pads float `[B, H, W, C]` to `[B, size, size, C]` like `sources.pad_images` (the
    odd pixel after the image); `size` 0 or the image size is the identity."""
    _, height, width, _ = x.shape
    if size == 0 or (height, width) == (size, size):
        return x
    top, left = (size - height) // 2, (size - width) // 2
    return jnp.pad(x, ((0, 0), (top, size - height - top), (left, size - width - left), (0, 0)))


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _features_of_chunk(key, train_images, indices, augment_fn, options, pad_to):
    x = pipeline.to_float(train_images[indices])
    return spectral.spectral_feature(pad_centred(augment_fn(key, x), pad_to), options)


def representative_features(key: jax.Array, train_images: np.ndarray, count: int, group: str,
                            options: spectral.SpectrumOptions = spectral.SpectrumOptions(),
                            gaussian_always_noisy: bool = False, pad_to: int = 0
                            ) -> np.ndarray:
    """Features `[count, D]` float32 of `count` training images with the group's augmentation.

    Args:
      key: e.g. `group_key(seed, group)`.
      train_images: uint8 `[N, H, W, C]`: as the members trained on them (already padded),
        or unpadded with `pad_to` > 0.
      count: P. Drawn without replacement when P <= N, with replacement otherwise.
      pad_to: zero-pad AFTER the augmentation to this size (0 = no padding): the order in
        which "-C" test cells are made (corrupt, then pad), see `deck.augment_unpadded`.
    """
    n = len(train_images)
    pick_key, augment_key = jax.random.split(key)
    if count <= n:
        indices = jax.random.permutation(pick_key, n)[:count]
    else:
        log.info("deck gate: %d representatives from %d training images (with replacement)",
                 count, n)
        indices = jax.random.randint(pick_key, (count,), 0, n)
    indices = np.asarray(indices, np.int32)
    augment_fn = augmentation_fn(group, gaussian_always_noisy)
    images = jnp.asarray(train_images)
    chunks = []
    for c, start in enumerate(range(0, count, _CHUNK)):
        part = indices[start:start + _CHUNK]
        padded = np.pad(part, (0, _CHUNK - len(part)))  # fixed shape: one compilation
        out = _features_of_chunk(jax.random.fold_in(augment_key, c), images,
                                 jnp.asarray(padded), augment_fn, options, int(pad_to))
        chunks.append(np.asarray(out)[:len(part)])
    return np.concatenate(chunks).astype(np.float32)


def settings(groups, representatives: int, seed: int, gaussian_always_noisy: bool,
             options: spectral.SpectrumOptions, data: dict, pad_after: int = 0) -> dict:
    """What the saved representatives depend on (gate.json); `data` identifies the training
    images (dataset name, image shape, train_examples, pad_to); `pad_after` is
    `representative_features`' pad_to."""
    return {"groups": list(groups), "representatives": int(representatives), "seed": int(seed),
            "gaussian_always_noisy": bool(gaussian_always_noisy), "pad_after": int(pad_after),
            "spectrum": options.to_dict(), "data": data, "format_version": 1}


def load_or_build(directory: str | os.PathLike, wanted: dict,
                  train_images: Callable[[], np.ndarray]) -> dict[str, np.ndarray]:
    """{group: features `[P, D]`} from `directory/gate/` if saved with the same settings, else
    computed (`train_images()` is called only then) and saved: `<group>.npy` + gate.json.

    gate.json is written last (atomically), so an interrupted build is simply redone.
    """
    folder = pathlib.Path(directory) / GATE_DIR
    meta_path = folder / GATE_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        files = {g: folder / f"{g}.npy" for g in wanted["groups"]}
        if meta.get("settings") == wanted and all(f.exists() for f in files.values()):
            log.info("deck gate: reusing the representatives in %s", folder)
            return {g: np.load(f) for g, f in files.items()}
        log.info("deck gate: %s holds other settings; recomputing the representatives", folder)
    images = train_images()
    options = spectral.SpectrumOptions(**wanted["spectrum"])
    folder.mkdir(parents=True, exist_ok=True)
    features = {}
    for group in wanted["groups"]:
        features[group] = representative_features(
            group_key(wanted["seed"], group), images, wanted["representatives"], group,
            options, wanted["gaussian_always_noisy"], wanted["pad_after"])
        np.save(folder / f"{group}.npy", features[group])
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"settings": wanted,
                               "files": {g: f"{g}.npy" for g in wanted["groups"]},
                               "feature_dim": int(features[wanted["groups"][0]].shape[1])},
                              indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, meta_path)
    log.info("deck gate: %d representatives per group (%s), %d features each, saved in %s",
             wanted["representatives"], ", ".join(wanted["groups"]),
             features[wanted["groups"][0]].shape[1], folder)
    return features


# ---------------------------------------------------------------------------------------------
# Gating (pure)


def query_features(images: jax.Array, valid: jax.Array, options: spectral.SpectrumOptions,
                   per_example: bool) -> jax.Array:
    """The gate's queries: `[1, D]` batch mean of the valid rows, or `[M, D]` per example.

    Args:
      images: uint8 or float `[M, H, W, C]` (a test batch, padded to M).
      valid: bool `[M]`.

    For the batch mean the features are computed `images_per_piece` images at a time (the
    same values: every image's feature is its own), so that no loop of the batch gate is
    split across threads (`SPLIT_BYTES`).
    """
    if per_example:
        return spectral.spectral_feature(images, options)
    most = images_per_piece(images.shape, images.dtype, options)
    features = jnp.concatenate([spectral.spectral_feature(images[piece], options)
                                for piece in _pieces(images.shape[0], most)])
    return spectral.batch_mean(features, valid)[None]


def _pieces(count: int, most: int) -> list[slice]:
    """`count` items in the fewest pieces of at most `most` items, of equal size but the last
    (100 images at most 80 a piece: two of 50, not 80 + 20)."""
    number = -(-count // max(1, most))
    step = -(-count // number)
    return [slice(start, start + step) for start in range(0, count, step)]


def images_per_piece(shape: tuple[int, ...], dtype, options: spectral.SpectrumOptions) -> int:
    """How many images of `shape` `[M, H, W, C]` keep each of the spectrum's two widest loops
    under `SPLIT_BYTES`: the conversion (pixels in, float planes out) and the power spectrum
    (the complex `rfft2` in, float out)."""
    _, height, width, channels = shape
    planes = channels if options.grayscale == "per_channel" else 1
    conversion = height * width * (channels * np.dtype(dtype).itemsize + planes * 4)
    power = planes * height * (width // 2 + 1) * (8 + 4)
    return max(1, (SPLIT_BYTES - 1) // max(conversion, power))


def brute_force_distances(references: jax.Array, queries: jax.Array) -> jax.Array:
    """`[Q, G]` distance of each query `[Q, D]` to the nearest representative of each group
    (`references` `[G, P, D]`), exact, on device."""
    return jax.vmap(spectral.nearest_distance, in_axes=(0, None), out_axes=1)(references,
                                                                               queries)


def batch_query_distances(references_dpt: jax.Array, query: jax.Array) -> jax.Array:
    """`[1, G]` exact distance of one query `[1, D]` (a batch mean: the paper's gating) to the
    nearest representative of each group, from representatives stored as `[G, D, P]`.

    The same values as `brute_force_distances` on `[G, P, D]`; with P innermost, the sum over
    D adds D vectors of length P (vectorised) instead of reducing P rows of length D = 23:
    221 vs 327 us per call for 2 x 5,000 representatives (benchmarks/README.md, section 13).
    One group, and at most `SPLIT_BYTES` of its representatives, at a time: no loop is split
    across threads (the minimum over the pieces is exact).
    """
    groups, dim, count = references_dpt.shape
    most = (SPLIT_BYTES - 1) // ((dim + 1) * 4)  # a piece reads [D, n] and writes [n] floats
    nearest = []
    for group in range(groups):
        minima = [jnp.sum((references_dpt[group, :, piece] - query[0][:, None]) ** 2,
                          axis=0).min() for piece in _pieces(count, most)]
        nearest.append(functools.reduce(jnp.minimum, minima))
    return jnp.sqrt(jnp.stack(nearest))[None]


def choose(distances: jax.Array) -> jax.Array:
    """a* = argmin over groups (the last axis); ties go to the first group."""
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def gate_scores(references: jax.Array, images: jax.Array, valid: jax.Array,
                options: spectral.SpectrumOptions, per_example: bool
                ) -> tuple[jax.Array, jax.Array]:
    """(choice int32 `[Q]`, distances `[Q, G]`) of one test batch, brute force on device.

    Q = 1 for batch gating (the paper's), Q = M with `per_example`.
    """
    distances = brute_force_distances(references,
                                      query_features(images, valid, options, per_example))
    return choose(distances), distances


class KDTreeSearch:
    """One scipy `cKDTree` per group over its representatives (float64, exact search)."""

    def __init__(self, references: np.ndarray):
        from scipy.spatial import cKDTree

        self.trees = [cKDTree(np.asarray(r, np.float64)) for r in references]

    def distances(self, queries: np.ndarray) -> np.ndarray:
        """`[Q, G]` nearest-representative distance of each query `[Q, D]` in each group."""
        queries = np.asarray(queries, np.float64)
        return np.stack([tree.query(queries, k=1)[0] for tree in self.trees], axis=-1)


class Gate:
    """The deck's gate: `gate(images uint8 [M, H, W, C], valid bool [M]) -> (choice [Q],
    distances [Q, G])` as numpy, with the configured nearest-neighbour search.

    Args:
      references: `[G, P, D]` representatives, groups in deck order.
      nn: "brute" (one jitted call on device) or "kdtree" (features on device, search on the
        host with `KDTreeSearch`).
    """

    def __init__(self, references: np.ndarray, options: spectral.SpectrumOptions,
                 per_example: bool = False, nn: str = "brute"):
        if nn not in NN_METHODS:
            raise ValueError(f"deck.nn must be one of {NN_METHODS}, got {nn!r}")
        self.nn, self.options, self.per_example = nn, options, per_example
        # Batch gating is ~0.3 ms of work per batch of 100: on CPU it compiles to run on one
        # thread (`xla_flags.single_thread_options`), since every hand-off to XLA's other
        # threads cost more than it saved there (benchmarks/README, sections 19 and 23: single-
        # thread Eigen, no YNNPACK fusions, and no loop over `SPLIT_BYTES`). Per-example
        # search (M queries, M x P x D differences) keeps the thread pool.
        compiler_options = {} if per_example else xla_flags.single_thread_options()
        if nn == "brute":
            if per_example:
                self.references = jnp.asarray(references, jnp.float32)
                search = brute_force_distances
            else:  # one query per batch: the representatives stored as [G, D, P]
                self.references = jnp.asarray(np.asarray(references).transpose(0, 2, 1),
                                              jnp.float32)
                search = batch_query_distances
            # Only the distances come back, and the choice (`choose`'s argmin, first group on
            # ties) is taken from them on the host: one device->host copy per batch instead
            # of two, ~5% of a gate call that takes ~0.8 ms (benchmarks/README.md, section 13).
            self._distances = jax.jit(lambda references, images, valid: search(
                references, query_features(images, valid, options, per_example)),
                compiler_options=compiler_options)
        else:
            self.search = KDTreeSearch(references)
            self._query = jax.jit(functools.partial(query_features, options=options,
                                                    per_example=per_example),
                                  compiler_options=compiler_options)

    def __call__(self, images, valid) -> tuple[np.ndarray, np.ndarray]:
        if self.nn == "brute":
            distances = np.asarray(self._distances(self.references, images, valid))
        else:
            distances = self.search.distances(np.asarray(self._query(images, valid)))
        return np.argmin(distances, axis=-1).astype(np.int32), distances
