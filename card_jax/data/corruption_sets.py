"""Readers for corrupted test sets: released "-C" folders and TFDS `cifar10_corrupted`.

Layout of a "-C" folder (CIFAR-10-C and CIFAR-100-C, Hendrycks & Dietterich 2019, as written by
`hendrycks/robustness` `make_cifar_c.py`; also what `python -m card_jax.corrupt` writes):

* `<corruption>.npy`: uint8 `(5 n, H, W, C)`, severities 1..5 stacked in order, each block the
  `n` test images in their original order (CIFAR: n = 10000, 32x32x3);
* `labels.npy`: integer `(5 n,)`, the `n` test labels repeated 5 times.

A folder written by `card_jax.corrupt` with a subset of severities also has an `info.json`
whose `"severities"` lists the blocks actually stored (in order); without it, 1..5 is assumed.

Memory stays bounded: files are opened with `np.load(mmap_mode="r")` and one cell
(corruption, severity) is copied out at a time. `n_examples` takes the FIRST `n_examples`
images of each cell (asking for more than a cell holds is an error, never a silent cap).
Note that RobustBench instead takes the first `ceil(n / 15)` per corruption when
`n_examples < 10000`; the two agree only for full cells.

Downloads (not possible from this package; no code here touches the network): CIFAR-10-C
https://zenodo.org/record/2535967, CIFAR-100-C https://zenodo.org/record/3555552.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from card_jax.data.sources import DatasetNotFoundError

__all__ = [
    "ALL_CORRUPTIONS",
    "CORRUPTIONS",
    "CorruptionSet",
    "EXTRA_CORRUPTIONS",
    "INFO_FILE",
    "LABELS_FILE",
    "SEVERITIES",
    "TFDS_NAME",
    "iterate",
    "iterate_tfds",
    "load_cell",
    "load_tfds",
    "open_folder",
    "read_info",
    "resolve_corruptions",
    "resolve_severities",
    "tfds_config_name",
]

# The canonical names (card_jax.data.corruptions imports them from here: reading files must
# not import JAX). Never reorder: a corruption's index seeds its random stream.
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS = CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES = (1, 2, 3, 4, 5)
LABELS_FILE = "labels.npy"
INFO_FILE = "info.json"
TFDS_NAME = "cifar10_corrupted"

_DOWNLOAD_HINT = (
    "Released sets (download on a machine with network access and copy the extracted folder "
    "here): CIFAR-10-C https://zenodo.org/record/2535967 (CIFAR-10-C.tar), CIFAR-100-C "
    "https://zenodo.org/record/3555552 (CIFAR-100-C.tar). Or generate one from a local test "
    "set: python -m card_jax.corrupt --dataset=NAME --out=DIR."
)


def resolve_corruptions(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Corruption names from `"all"` (19), `"benchmark"` (the 15), `"extra"` (4), a
    comma-separated string or a sequence of names. Unknown names are an error."""
    if isinstance(spec, str):
        groups = {"all": ALL_CORRUPTIONS, "benchmark": CORRUPTIONS, "extra": EXTRA_CORRUPTIONS}
        if spec in groups:
            return groups[spec]
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    names = tuple(spec)
    unknown = [n for n in names if n not in ALL_CORRUPTIONS]
    if unknown or not names:
        raise ValueError(
            f"unknown corruption(s) {unknown or names}; use 'all', 'benchmark', 'extra' or "
            f"names from: {', '.join(ALL_CORRUPTIONS)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"corruptions listed twice: {names}")
    return names


def resolve_severities(spec: str | int | Sequence[int]) -> tuple[int, ...]:
    """Severities from `"all"` (1..5), an int, a comma-separated string or a sequence."""
    if isinstance(spec, str):
        if spec == "all":
            return SEVERITIES
        try:
            spec = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"severities must be 'all' or integers 1..5, got {spec!r}") from None
    if isinstance(spec, (int, np.integer)):
        spec = [int(spec)]
    severities = tuple(int(s) for s in spec)
    if not severities or any(s not in SEVERITIES for s in severities):
        raise ValueError(f"severities must lie in 1..5, got {severities}")
    if len(set(severities)) != len(severities):
        raise ValueError(f"severities listed twice: {severities}")
    return severities


def _check_n_examples(n_examples: int, available: int, where: str) -> int:
    """-1 -> all; otherwise 1..available, anything else is an error (no silent cap)."""
    if n_examples == -1:
        return available
    if n_examples < 1:
        raise ValueError(f"n_examples must be -1 (all) or >= 1, got {n_examples}")
    if n_examples > available:
        raise ValueError(
            f"n_examples={n_examples} but {where} holds only {available} images per severity"
        )
    return n_examples


# --------------------------------------------------------------------------------------------
# "-C" folders
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CorruptionSet:
    """A checked "-C" folder.

    Attributes:
      folder: the directory.
      corruptions: the corruptions checked (all present, all with the same shape).
      severities: the severity of each stacked block, in file order (1..5 for released sets).
      n: images per severity block.
      image_shape: `(H, W, C)`.
    """

    folder: Path
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    n: int
    image_shape: tuple[int, int, int]

    def rows(self, severity: int) -> slice:
        """Rows of `severity` in every file of the folder."""
        if severity not in self.severities:
            raise ValueError(
                f"{self.folder} stores severities {self.severities}, not {severity}"
            )
        block = self.severities.index(severity)
        return slice(block * self.n, (block + 1) * self.n)


def _stored_severities(folder: Path) -> tuple[int, ...]:
    info_path = folder / INFO_FILE
    if not info_path.is_file():
        return SEVERITIES
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{info_path}: not valid JSON: {e}") from e
    return resolve_severities(info.get("severities", list(SEVERITIES)))


def _open_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npy file: {e}") from e


def open_folder(folder: str | Path,
                corruptions: str | Sequence[str] = CORRUPTIONS) -> CorruptionSet:
    """Checks a "-C" folder without reading its pixels (headers only, milliseconds).

    Args:
      folder: directory holding `<corruption>.npy` and `labels.npy`.
      corruptions: which corruption files must be there (see `resolve_corruptions`); by
        default the 15 benchmark ones.

    Returns:
      A `CorruptionSet`.

    Raises:
      DatasetNotFoundError: the folder or any needed file is missing (all missing files are
        listed at once).
      ValueError: a file has the wrong dtype or shape, files disagree, or the labels are not
        one block repeated per severity.
    """
    folder = Path(folder).expanduser()
    names = resolve_corruptions(corruptions)
    needed = [f"{c}.npy" for c in names] + [LABELS_FILE]
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        where = (f"{folder} has {len(needed) - len(missing)} of the {len(needed)} needed files"
                 if folder.is_dir() else f"{folder} does not exist")
        raise DatasetNotFoundError(
            f"Corrupted test set not found: {where}.\nMissing: {', '.join(missing)}\n"
            f"Expected <corruption>.npy (uint8 [5 n, H, W, C], severities 1..5 stacked) and "
            f"{LABELS_FILE} ([5 n]) in that folder.\n{_DOWNLOAD_HINT}"
        )
    severities = _stored_severities(folder)

    labels = _open_npy(folder / LABELS_FILE)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{folder / LABELS_FILE}: expected integer labels [rows], got {labels.dtype} "
            f"{labels.shape}"
        )
    rows = labels.shape[0]
    if rows == 0 or rows % len(severities):
        raise ValueError(
            f"{folder / LABELS_FILE}: {rows} labels is not a positive multiple of the "
            f"{len(severities)} severities {severities}"
        )
    n = rows // len(severities)
    blocks = np.asarray(labels).reshape(len(severities), n)
    if (blocks != blocks[:1]).any():
        raise ValueError(
            f"{folder / LABELS_FILE}: the {len(severities)} severity blocks of {n} labels "
            "differ; expected the test labels repeated once per severity"
        )

    shape = None
    for name in names:
        path = folder / f"{name}.npy"
        images = _open_npy(path)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"{path}: expected uint8 [rows, H, W, C] with C = 1 or 3, got {images.dtype} "
                f"{images.shape}"
            )
        if images.shape[0] != rows:
            raise ValueError(
                f"{path}: {images.shape[0]} images but {LABELS_FILE} has {rows} labels "
                f"({len(severities)} severities x {n})"
            )
        if shape is None:
            shape = images.shape[1:]
        elif images.shape[1:] != shape:
            raise ValueError(
                f"{path}: images are {images.shape[1:]}, {names[0]}.npy has {shape}"
            )
        del images  # drop the memory map
    return CorruptionSet(folder=folder, corruptions=names, severities=severities, n=n,
                         image_shape=tuple(int(s) for s in shape))  # type: ignore[arg-type]


def load_cell(cset: CorruptionSet, corruption: str, severity: int,
              n_examples: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """One (corruption, severity) cell of a checked folder.

    Returns:
      (uint8 `[n, H, W, C]`, int32 `[n]`), in-memory copies of the first `n` rows of the
      severity block (`n = n_examples`, or all when -1).
    """
    if corruption not in cset.corruptions:
        raise ValueError(f"{corruption!r} was not among the checked corruptions {cset.corruptions}")
    n = _check_n_examples(n_examples, cset.n, str(cset.folder))
    rows = cset.rows(severity)
    rows = slice(rows.start, rows.start + n)
    images = _open_npy(cset.folder / f"{corruption}.npy")
    labels = _open_npy(cset.folder / LABELS_FILE)
    return np.array(images[rows]), np.asarray(labels[rows]).astype(np.int32)


def iterate(folder: str | Path | CorruptionSet,
            corruptions: str | Sequence[str] = CORRUPTIONS,
            severities: str | Sequence[int] = SEVERITIES,
            n_examples: int = -1) -> Iterator[tuple[str, int, np.ndarray, np.ndarray]]:
    """Yields `(corruption, severity, images, labels)` one cell at a time.

    The whole folder is checked first (so a missing file fails before any evaluation), then
    each cell is read from a memory map and copied: at most one cell is in memory at a time.

    Args:
      folder: a "-C" folder (or a `CorruptionSet` from `open_folder`).
      corruptions: see `resolve_corruptions`; default the 15 benchmark corruptions.
      severities: see `resolve_severities`; default 1..5.
      n_examples: first `n_examples` images of each cell, or -1 for all. More than a cell
        holds is a ValueError.

    Yields:
      `(name, severity, uint8 [n, H, W, C], int32 [n])`.
    """
    names = resolve_corruptions(corruptions)
    sevs = resolve_severities(severities)
    cset = folder if isinstance(folder, CorruptionSet) else open_folder(folder, names)
    missing = [c for c in names if c not in cset.corruptions]
    if missing:
        raise ValueError(f"{missing} were not checked in {cset.folder}")
    for s in sevs:
        cset.rows(s)  # every severity must be stored: fail before the first cell
    _check_n_examples(n_examples, cset.n, str(cset.folder))
    for name in names:
        for s in sevs:
            images, labels = load_cell(cset, name, s, n_examples)
            yield name, s, images, labels


# --------------------------------------------------------------------------------------------
# TFDS cifar10_corrupted (one config per corruption and severity; 10000 test images each)
# --------------------------------------------------------------------------------------------

_CONFIG_RE = re.compile(r"^(?P<corruption>[a-z_]+)_(?P<severity>[1-5])$")
# TFDS spells two corruptions differently from the released files.
_TFDS_SPELLING = {"elastic_transform": "elastic", "glass_blur": "frosted_glass_blur"}
_FROM_TFDS = {v: k for k, v in _TFDS_SPELLING.items()}


def tfds_config_name(corruption: str, severity: int, dataset: str = TFDS_NAME) -> str:
    """`("gaussian_noise", 3)` -> `"cifar10_corrupted/gaussian_noise_3"` (and
    `glass_blur` -> `frosted_glass_blur_*`, `elastic_transform` -> `elastic_*`, TFDS's names)."""
    resolve_corruptions([corruption])
    resolve_severities([severity])
    return f"{dataset}/{_TFDS_SPELLING.get(corruption, corruption)}_{int(severity)}"


def _parse_tfds_name(name: str) -> tuple[str, str, int]:
    dataset, _, config = name.partition("/")
    match = _CONFIG_RE.match(config.split(":")[0]) if config else None
    if not match:
        raise ValueError(
            f"{name!r}: a corrupted TFDS dataset needs an explicit corruption and severity, "
            f"e.g. '{dataset or TFDS_NAME}/gaussian_noise_3' (config '<corruption>_<1..5>'); "
            "a bare name would silently load TFDS's default config (brightness_1). Use "
            "iterate_tfds(corruptions='all', severities='all') for the whole benchmark."
        )
    corruption, severity = match["corruption"], int(match["severity"])
    corruption = _FROM_TFDS.get(corruption, corruption)
    resolve_corruptions([corruption])
    return dataset, corruption, severity


def load_tfds(name: str, data_dir: str = "", n_examples: int = -1,
              split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """One prepared TFDS config, e.g. `"cifar10_corrupted/gaussian_noise_3"` (TFDS spelling:
    `frosted_glass_blur_*`, `elastic_*`; our names `glass_blur_*`, `elastic_transform_*` are
    accepted and translated).

    Reads through `tfds.data_source(..., download=False)` (array_record format): nothing is
    downloaded or generated.

    Returns:
      (uint8 `[n, H, W, C]`, int32 `[n]`).

    Raises:
      ValueError: a bare dataset name (no `/<corruption>_<severity>`), unknown corruption,
        or `n_examples` larger than the split.
      DatasetNotFoundError: the config is not prepared in `data_dir`.
    """
    dataset, corruption, severity = _parse_tfds_name(name)  # before importing tfds
    name = tfds_config_name(corruption, severity, dataset)
    from card_jax.data import sources  # pylint: disable=import-outside-toplevel

    tfds = sources._import_tfds()  # pylint: disable=protected-access
    directory = data_dir or sources._tfds_default_dir()  # pylint: disable=protected-access
    source = sources._tfds_split(tfds, name, split, directory)  # pylint: disable=protected-access
    where = f"tfds:{name} ({split}, {directory})"
    n = _check_n_examples(n_examples, len(source), where)
    images = labels = None
    for i in range(n):
        record = source[i]
        image = np.asarray(record["image"])
        if images is None:
            if image.dtype != np.uint8 or image.ndim != 3:
                raise ValueError(f"{where}: images must be uint8 [H, W, C], got "
                                 f"{image.dtype} {image.shape}")
            images = np.empty((n, *image.shape), np.uint8)
            labels = np.empty((n,), np.int32)
        images[i] = image
        labels[i] = int(record["label"])
    return images, labels


def iterate_tfds(corruptions: str | Sequence[str], severities: str | Sequence[int],
                 data_dir: str = "", n_examples: int = -1, dataset: str = TFDS_NAME,
                 ) -> Iterator[tuple[str, int, np.ndarray, np.ndarray]]:
    """As `iterate`, from TFDS configs `<dataset>/<corruption>_<severity>`.

    `corruptions` and `severities` have no default: pass names or `"all"` explicitly.
    """
    names = resolve_corruptions(corruptions)
    sevs = resolve_severities(severities)
    for name in names:
        for s in sevs:
            images, labels = load_tfds(tfds_config_name(name, s, dataset), data_dir, n_examples)
            yield name, s, images, labels


def read_info(folder: str | Path) -> dict[str, Any]:
    """The `info.json` of a folder written by `card_jax.corrupt` ({} when absent)."""
    path = Path(folder) / INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
