"""Image classification datasets, loaded whole into host memory as numpy arrays.

Every source returns a `Dataset` with uint8 images `[N, H, W, C]` and int32 labels `[N]`,
plus the per-channel normalisation constants of the training pixels. Nothing is ever
downloaded at run time: each source reads files that are already on this machine, and a
missing source raises `DatasetNotFoundError` (before any large file is opened) with the exact
file names that were expected, the directory searched and how to obtain the files.

Sources (the `name` argument of `load`):

* `fashion_mnist`: the gzipped (or plain) IDX files shipped by the Debian package
  `dataset-fashion-mnist` in `/usr/share/datasets/fashion-mnist/`.
* `cifar10`, `cifar100`: the "python version" archives of the CIFAR datasets, either
  extracted (`cifar-10-batches-py/`, `cifar-100-python/`) or as the original `.tar.gz`.
  Default location: `$CARD_JAX_DATA`, else `~/.cache/card_jax/datasets`.
* `tfds:<name>`: a TensorFlow Datasets dataset that was already prepared (in array_record
  format) in `data_dir`, read through `tfds.data_source(..., download=False)`.
* `synthetic`: deterministic, easily learnable class-prototype images for tests and smoke runs.

The returned arrays are read-only: a `Dataset` is shared by everything that trains on it, and
an accidental in-place edit would silently change every later epoch.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import io
import math
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Dataset",
    "DatasetNotFoundError",
    "SOURCES",
    "describe_expected_files",
    "load",
]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification dataset held in host memory.

    Attributes:
      name: the source name it was loaded from (e.g. `"cifar10"`, `"tfds:mnist"`).
      train_images: uint8 `[N, H, W, C]`.
      train_labels: int32 `[N]`, values in `[0, num_classes)`.
      test_images: uint8 `[M, H, W, C]`, same `H, W, C` as the training images.
      test_labels: int32 `[M]`.
      num_classes: number of classes.
      mean: per-channel mean `[C]` of the training pixels on the [0, 1] scale. These describe
        the original (unpadded) pixels, so zero padding added by `load(pad_to=...)` does not
        change them.
      std: per-channel standard deviation `[C]` on the [0, 1] scale.
      class_names: human-readable class names `[num_classes]`, or `()` when unknown.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A cheap backstop: the loaders validate with file names first, this catches bugs in
        # new loaders (and hand-built datasets) before they reach a compiled training step.
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != np.uint8 or images.ndim != 4:
                raise ValueError(
                    f"{self.name}: {split}_images must be uint8 [N, H, W, C], "
                    f"got {images.dtype} {images.shape}"
                )
            if labels.dtype != np.int32 or labels.ndim != 1:
                raise ValueError(
                    f"{self.name}: {split}_labels must be int32 [N], "
                    f"got {labels.dtype} {labels.shape}"
                )
            if len(images) != len(labels):
                raise ValueError(
                    f"{self.name}: {len(images)} {split} images but {len(labels)} labels"
                )
            _check_label_range(labels, self.num_classes, f"{self.name} ({split})")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"{self.name}: train images {self.train_images.shape[1:]} and test images "
                f"{self.test_images.shape[1:]} differ in shape"
            )
        channels = self.train_images.shape[-1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"{self.name}: mean/std need one entry per channel ({channels}), "
                f"got {self.mean} / {self.std}"
            )
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """`(H, W, C)` of every image."""
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset source are not on this machine.

    The message lists every expected file, the directory searched and how to get the files.
    It subclasses `FileNotFoundError`, so callers that already handle missing files keep working.
    """


# A loader turns (data_dir, argument after "name:", options) into a Dataset. `data_dir` is
# already resolved ("" has been replaced by the source's default location).
Loader = Callable[[str, str, Mapping[str, Any]], Dataset]


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _check_label_range(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raises ValueError naming `where` if any label lies outside `[0, num_classes)`."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{where}: labels must lie in [0, {num_classes}), found range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of uint8 `[N, H, W, C]` on the [0, 1] scale.

    Works from a 256-bin histogram per channel, which is exact, needs no float copy of the
    whole dataset and is fast even for CIFAR-sized arrays.
    """
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[-1]):
        counts = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
        total = counts.sum()
        if total == 0:
            raise ValueError("cannot compute normalisation constants of an empty image set")
        mean = float(counts @ values / total)
        var = float(counts @ (values - mean) ** 2 / total)
        means.append(mean)
        stds.append(math.sqrt(var))
    return tuple(means), tuple(stds)


def _partial_note(directories: list[Path], files: list[str]) -> str:
    """For a not-found message: which files are missing from a directory that has some of them.

    A half-copied dataset is a common mistake, and naming the missing files points straight at
    it. Returns "" when no directory holds any of the files.
    """
    for directory in directories:
        present = [
            f for f in files
            if (directory / f).is_file() or (directory / f.removesuffix(".gz")).is_file()
        ]
        if present:
            missing = [f for f in files if f not in present]
            return f"{directory} has only some of the files; missing: {', '.join(missing)}\n"
    return ""


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def pad_images(images: np.ndarray, pad_to: int, name: str = "images") -> np.ndarray:
    """Zero-pads `[N, H, W, C]` to `[N, pad_to, pad_to, C]`, centred.

    When the total padding of an axis is odd, the extra pixel goes after the image (bottom or
    right), as `torchvision.transforms.Pad` does with symmetric padding amounts.
    """
    _, height, width, _ = images.shape
    if height > pad_to or width > pad_to:
        raise ValueError(
            f"{name}: images are {height}x{width}, larger than pad_to={pad_to}; padding never "
            "crops, so use pad_to=0 or a value >= the image size"
        )
    if height == pad_to and width == pad_to:
        return images
    top = (pad_to - height) // 2
    left = (pad_to - width) // 2
    return np.pad(
        images,
        ((0, 0), (top, pad_to - height - top), (left, pad_to - width - left), (0, 0)),
    )


def _default_cache_dir() -> str:
    """`$CARD_JAX_DATA` if set, else `~/.cache/card_jax/datasets` (read at call time)."""
    return os.environ.get("CARD_JAX_DATA") or os.path.expanduser("~/.cache/card_jax/datasets")


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)
# --------------------------------------------------------------------------------------------

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist/"
_FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist"
# (split, role) -> IDX file name without ".gz".
_FASHION_MNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
_FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Computed by `_channel_stats` on the 60000 training images of the Debian files, rounded to
# 4 decimals (they agree with the commonly quoted 0.2860 / 0.3530).
_FASHION_MNIST_MEAN = (0.2860,)
_FASHION_MNIST_STD = (0.3530,)

# IDX magic numbers: 0x0000 (zero bytes), 0x08 (unsigned byte data), then the rank.
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dimensions [N, rows, cols]
_IDX_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dimension [N]


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Reads one uint8 IDX file (gzipped when its name ends in `.gz`).

    Returns:
      A read-only uint8 array whose shape is given by the file's big-endian dimensions.

    Raises:
      ValueError naming the file if it is not valid gzip, has the wrong magic number, or its
      size does not match its header (truncated or with trailing bytes).
    """
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: not a valid gzip file (corrupt or truncated): {e}") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: only {len(raw)} bytes, too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"{path}: bad IDX magic number {magic} (expected {expected_magic}); "
            "the file is corrupt or not the expected images/labels file"
        )
    rank = magic & 0xFF
    header = 4 + 4 * rank
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: {what}: header says dims {dims} ({expected} bytes in all), "
            f"file has {len(raw)} bytes"
        )
    # frombuffer on `bytes` is a zero-copy, read-only view, which is what Dataset wants anyway.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _fashion_mnist_dirs(data_dir: str) -> list[Path]:
    """Directories searched, in order: the given one and its `fashion-mnist/` subfolder."""
    base = Path(data_dir).expanduser()
    return [base, base / "fashion-mnist"]


def _find_fashion_mnist(data_dir: str) -> dict[tuple[str, str], Path]:
    """Locates the four IDX files (plain preferred, it needs no decompression)."""
    for directory in _fashion_mnist_dirs(data_dir):
        found = {}
        for key, stem in _FASHION_MNIST_FILES.items():
            for candidate in (directory / stem, directory / f"{stem}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(_FASHION_MNIST_FILES):
            return found
    raise DatasetNotFoundError(
        "Dataset 'fashion_mnist' not found.\n"
        + _partial_note(
            _fashion_mnist_dirs(data_dir), [f"{s}.gz" for s in _FASHION_MNIST_FILES.values()]
        )
        + describe_expected_files("fashion_mnist", data_dir)
    )


def _load_fashion_mnist(data_dir: str, arg: str, options: Mapping[str, Any]) -> Dataset:
    del arg, options
    paths = _find_fashion_mnist(data_dir)
    arrays = {}
    for split in ("train", "test"):
        images_path, labels_path = paths[(split, "images")], paths[(split, "labels")]
        images = _read_idx(images_path, _IDX_IMAGES_MAGIC)
        labels = _read_idx(labels_path, _IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise ValueError(
                f"{images_path} has {len(images)} images but {labels_path} has "
                f"{len(labels)} labels"
            )
        _check_label_range(labels, len(_FASHION_MNIST_CLASSES), str(labels_path))
        arrays[f"{split}_images"] = images[..., None]  # [N, 28, 28] -> [N, 28, 28, 1]
        arrays[f"{split}_labels"] = _read_only(labels.astype(np.int32))
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise ValueError(
            f"{paths[('train', 'images')]} and {paths[('test', 'images')]} hold images of "
            f"different sizes: {arrays['train_images'].shape[1:3]} vs "
            f"{arrays['test_images'].shape[1:3]}"
        )
    return Dataset(
        name="fashion_mnist",
        num_classes=len(_FASHION_MNIST_CLASSES),
        mean=_FASHION_MNIST_MEAN,
        std=_FASHION_MNIST_STD,
        class_names=_FASHION_MNIST_CLASSES,
        **arrays,
    )


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 ("python version")
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _CifarSpec:
    folder: str                      # directory name inside the archive
    archive: str                     # the .tar.gz file name
    url: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes                 # key of the labels in each batch dict
    names_key: bytes                 # key of the class names in the meta dict
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, self.test_file, self.meta_file)


_CIFAR = {
    "cifar10": _CifarSpec(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_file="test_batch",
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
        mean=(0.491, 0.482, 0.447),
        std=(0.247, 0.243, 0.262),
    ),
    "cifar100": _CifarSpec(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        train_files=("train",),
        test_file="test",
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}

# The CIFAR pickles only ever contain dicts, lists, ints, byte strings and numpy arrays. An
# allow-list keeps a tampered file from running arbitrary code through pickle's globals.
_reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's array unpickling helper
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy 1.x (Python 2)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy 2.x
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes at pickle protocol < 3
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Resolving to our own objects also avoids importing the deprecated `numpy.core`
        # alias, which warns under numpy 2.
        try:
            return _CIFAR_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"unexpected global {module}.{name} in a CIFAR pickle"
            ) from None


def _unpickle_cifar(data: bytes, where: str) -> dict:
    """Unpickles one CIFAR file; `encoding="bytes"` as the files were written by Python 2."""
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # pickle raises many types on corrupt input; all mean "corrupt"
        raise ValueError(f"{where}: not a valid CIFAR pickle (corrupt or truncated): {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _cifar_batch(obj: dict, spec: _CifarSpec, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One unpickled batch dict -> (uint8 `[N, 32, 32, 3]`, int32 `[N]`)."""
    for key in (b"data", spec.label_key):
        if key not in obj:
            raise ValueError(f"{where}: missing key {key!r} (has {sorted(obj)})")
    data = np.asarray(obj[b"data"])
    labels = np.asarray(obj[spec.label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{where}: b'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}"
        )
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(
            f"{where}: labels must be a list of integers, got {labels.dtype} {labels.shape}"
        )
    if len(labels) != len(data):
        raise ValueError(f"{where}: {len(data)} images but {len(labels)} labels")
    labels = labels.astype(np.int32)
    _check_label_range(labels, spec.num_classes, where)
    # Rows are stored channel-major (1024 red, 1024 green, 1024 blue values, each row-major):
    # [N, 3072] -> [N, C=3, H=32, W=32] -> [N, H, W, C].
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def _cifar_candidates(spec: _CifarSpec, data_dir: str) -> list[Path]:
    base = Path(data_dir).expanduser()
    return [base, base / spec.folder]


def _find_cifar(name: str, data_dir: str) -> tuple[str, Path]:
    """Returns ("folder", dir) or ("archive", file) without reading anything big."""
    spec = _CIFAR[name]
    base = Path(data_dir).expanduser()
    # data_dir is the extracted folder itself, or its parent.
    for folder in _cifar_candidates(spec, data_dir):
        if all((folder / f).is_file() for f in spec.files):
            return "folder", folder
    for archive in (base / spec.archive, base):
        if archive.is_file() and archive.name.endswith((".tar.gz", ".tgz")):
            return "archive", archive
    raise DatasetNotFoundError(
        f"Dataset {name!r} not found.\n"
        + _partial_note(_cifar_candidates(spec, data_dir), list(spec.files))
        + describe_expected_files(name, data_dir)
    )


def _read_cifar_archive(archive: Path, spec: _CifarSpec) -> dict[str, bytes]:
    """Reads the members of `spec.files` straight out of the .tar.gz, in one sequential pass."""
    wanted = {f"{spec.folder}/{f}": f for f in spec.files}
    contents: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for member in tar:
                file_name = wanted.get(member.name.removeprefix("./"))
                if file_name is None or not member.isfile():
                    continue
                contents[file_name] = tar.extractfile(member).read()
                if len(contents) == len(wanted):
                    break  # the rest of the archive (readme.html) is not needed
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ValueError(
            f"{archive}: not a readable .tar.gz archive (corrupt or truncated): {e}"
        ) from e
    missing = [m for m, f in wanted.items() if f not in contents]
    if missing:
        raise ValueError(f"{archive}: archive lacks the members {missing}")
    return contents


def _load_cifar(name: str, data_dir: str) -> Dataset:
    spec = _CIFAR[name]
    kind, location = _find_cifar(name, data_dir)
    if kind == "folder":
        contents = {f: (location / f).read_bytes() for f in spec.files}
        where = {f: str(location / f) for f in spec.files}
    else:
        contents = _read_cifar_archive(location, spec)
        where = {f: f"{location}:{spec.folder}/{f}" for f in spec.files}

    splits = {}
    for split, files in (("train", spec.train_files), ("test", (spec.test_file,))):
        batches = [
            _cifar_batch(_unpickle_cifar(contents.pop(f), where[f]), spec, where[f]) for f in files
        ]
        # concatenate also makes the HWC images contiguous (the transpose above is a view).
        splits[f"{split}_images"] = _read_only(np.concatenate([b[0] for b in batches]))
        splits[f"{split}_labels"] = _read_only(np.concatenate([b[1] for b in batches]))

    meta_where = where[spec.meta_file]
    meta = _unpickle_cifar(contents.pop(spec.meta_file), meta_where)
    names = meta.get(spec.names_key)
    if not isinstance(names, list) or len(names) != spec.num_classes:
        raise ValueError(
            f"{meta_where}: expected {spec.num_classes} class names under {spec.names_key!r}"
        )
    class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return Dataset(
        name=name,
        num_classes=spec.num_classes,
        mean=spec.mean,
        std=spec.std,
        class_names=class_names,
        **splits,
    )


def _load_cifar10(data_dir: str, arg: str, options: Mapping[str, Any]) -> Dataset:
    del arg, options
    return _load_cifar("cifar10", data_dir)


def _load_cifar100(data_dir: str, arg: str, options: Mapping[str, Any]) -> Dataset:
    del arg, options
    return _load_cifar("cifar100", data_dir)


# --------------------------------------------------------------------------------------------
# TensorFlow Datasets (already prepared, read without TensorFlow)
# --------------------------------------------------------------------------------------------


def _tfds_default_dir() -> str:
    # Mirrors tfds.core.constants.get_default_data_dir without importing tfds.
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError(
            "the 'tfds:<name>' data sources need tensorflow-datasets: "
            "pip install 'card_jax[tfds]'"
        ) from e
    return tfds


def _tfds_split(tfds: Any, tfds_name: str, split: str, data_dir: str) -> Any:
    """`tfds.data_source` for one split; a dataset that is not prepared -> DatasetNotFoundError."""
    not_found = DatasetNotFoundError(
        f"Dataset 'tfds:{tfds_name}' not found.\n"
        + describe_expected_files(f"tfds:{tfds_name}", data_dir)
    )
    try:
        return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        # Neither a registered builder nor prepared files of that name.
        raise not_found from e
    except (NotImplementedError, AssertionError, OSError, ValueError, KeyError) as e:
        # tfds reports an unprepared dataset in several ways (e.g. "Random access data source
        # for file format TFRECORD is not supported", since the unprepared default format is
        # tfrecord). Ask the builder directly so that real errors in prepared data surface as is.
        try:
            prepared = tfds.builder(tfds_name, data_dir=data_dir).is_prepared()
        except Exception:  # the builder itself cannot be made: treat as not there
            prepared = False
        if not prepared:
            raise not_found from e
        raise ValueError(
            f"tfds:{tfds_name} is prepared in {data_dir} but its {split!r} split cannot be read "
            f"as a random-access data source ({e}). It must have 'train' and 'test' splits in "
            f"array_record format: tfds build {tfds_name} --data_dir={data_dir} "
            "--file_format=array_record"
        ) from e


def _tfds_arrays(source: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads every record of a tfds data source into (uint8 `[N, H, W, C]`, int32 `[N]`)."""
    num = len(source)
    if num == 0:
        raise ValueError(f"{where}: the split is empty")
    images = labels = None
    for i in range(num):
        record = source[i]
        if not isinstance(record, Mapping) or "image" not in record or "label" not in record:
            keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
            raise ValueError(f"{where}: records need 'image' and 'label' features, got {keys}")
        image = np.asarray(record["image"])
        if image.ndim == 2:  # some grayscale datasets omit the channel axis
            image = image[..., None]
        if images is None:
            if image.dtype != np.uint8 or image.ndim != 3:
                raise ValueError(
                    f"{where}: images must be uint8 [H, W, C], got {image.dtype} {image.shape}"
                )
            images = np.empty((num, *image.shape), np.uint8)
            labels = np.empty((num,), np.int64)
        if image.shape != images.shape[1:]:
            raise ValueError(
                f"{where}: record {i} has image shape {image.shape}, record 0 has "
                f"{images.shape[1:]}; only datasets with fixed-size images are supported"
            )
        images[i] = image
        labels[i] = int(record["label"])
    return images, labels


def _load_tfds(data_dir: str, tfds_name: str, options: Mapping[str, Any]) -> Dataset:
    del options
    tfds = _import_tfds()
    split_sources = {
        split: _tfds_split(tfds, tfds_name, split, data_dir) for split in ("train", "test")
    }
    arrays = {}
    for split, source in split_sources.items():
        images, labels = _tfds_arrays(source, f"tfds:{tfds_name} ({split}, {data_dir})")
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels

    label_feature = None
    features = getattr(split_sources["train"].dataset_info, "features", None)
    if features is not None and "label" in features:
        label_feature = features["label"]
    num_classes = getattr(label_feature, "num_classes", None)
    class_names: tuple[str, ...] = tuple(getattr(label_feature, "names", None) or ())
    if not num_classes:  # not a ClassLabel: infer from the data
        num_classes = int(max(arrays["train_labels"].max(), arrays["test_labels"].max())) + 1
        class_names = ()
    for split in ("train", "test"):
        labels = arrays[f"{split}_labels"]
        _check_label_range(labels, num_classes, f"tfds:{tfds_name} ({split}, {data_dir})")
        arrays[f"{split}_labels"] = _read_only(labels.astype(np.int32))
        _read_only(arrays[f"{split}_images"])
    mean, std = _channel_stats(arrays["train_images"])
    return Dataset(
        name=f"tfds:{tfds_name}",
        num_classes=int(num_classes),
        mean=mean,
        std=std,
        class_names=class_names,
        **arrays,
    )


# --------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------

_SYNTHETIC_DEFAULTS: dict[str, Any] = dict(
    train_size=512, test_size=256, image_shape=(32, 32, 3), num_classes=10, seed=0
)
# Amplitudes (0-255 pixel scale) chosen so that classes are far apart relative to the noise:
# a small CNN separates them within a few dozen SGD steps, yet images are not constant.
_SYNTHETIC_COARSE_GRID = 4   # prototype = coarse 4x4 colour layout (survives pooling) ...
_SYNTHETIC_FINE_AMPLITUDE = 24.0  # ... plus a little per-pixel texture
_SYNTHETIC_NOISE_STD = 20.0


def _synthetic_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Merges user options into the defaults.

    Accepts `image_shape=(H, W, C)` or, as in the experiment configs, `image_size=S` (and
    optionally `channels=C`) meaning `(S, S, C)`.
    """
    opts = dict(options)
    unknown = set(opts) - set(_SYNTHETIC_DEFAULTS) - {"image_size", "channels"}
    if unknown:
        raise ValueError(
            f"unknown synthetic options {sorted(unknown)}; valid: "
            f"{sorted(set(_SYNTHETIC_DEFAULTS) | {'image_size', 'channels'})}"
        )
    size, channels = opts.pop("image_size", None), opts.pop("channels", None)
    merged = {**_SYNTHETIC_DEFAULTS, **opts}
    if size is not None or channels is not None:
        if "image_shape" in opts:
            raise ValueError("give either synthetic image_shape or image_size/channels, not both")
        default_h, default_w, default_c = _SYNTHETIC_DEFAULTS["image_shape"]
        merged["image_shape"] = (
            int(size) if size is not None else default_h,
            int(size) if size is not None else default_w,
            int(channels) if channels is not None else default_c,
        )
    shape = tuple(int(s) for s in merged["image_shape"])
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            f"synthetic image_shape must be (H, W, C) > 0, got {merged['image_shape']}"
        )
    merged["image_shape"] = shape
    for key in ("train_size", "test_size", "num_classes", "seed"):
        merged[key] = int(merged[key])
    if merged["num_classes"] < 2 or merged["test_size"] < 1:
        raise ValueError(f"synthetic needs num_classes >= 2 and test_size >= 1, got {merged}")
    if merged["train_size"] < merged["num_classes"]:
        raise ValueError(
            f"synthetic train_size ({merged['train_size']}) must be >= num_classes "
            f"({merged['num_classes']}) so that every class is present"
        )
    return merged


def _load_synthetic(data_dir: str, arg: str, options: Mapping[str, Any]) -> Dataset:
    """Class-prototype images: image = clip(prototype[label] + noise), all from one seed."""
    del data_dir, arg
    opts = _synthetic_options(options)
    height, width, channels = opts["image_shape"]
    num_classes = opts["num_classes"]
    rng = np.random.default_rng(opts["seed"])

    # Coarse layout upsampled by nearest neighbour (works for any H, W, not just multiples).
    grid = _SYNTHETIC_COARSE_GRID
    coarse = rng.uniform(32.0, 224.0, size=(num_classes, grid, grid, channels))
    rows = np.arange(height) * grid // height
    cols = np.arange(width) * grid // width
    prototypes = coarse[:, rows][:, :, cols]
    prototypes += rng.normal(0.0, _SYNTHETIC_FINE_AMPLITUDE, size=prototypes.shape)
    # Left-right symmetric prototypes: the standard random horizontal flip then leaves the
    # class pattern unchanged, so augmented smoke runs learn as fast as unaugmented ones.
    prototypes = (prototypes + prototypes[:, :, ::-1]) / 2

    def make(size: int) -> tuple[np.ndarray, np.ndarray]:
        # Balanced labels (every class present once size >= num_classes), in random order.
        labels = rng.permutation(np.arange(size) % num_classes).astype(np.int32)
        noise = rng.normal(0.0, _SYNTHETIC_NOISE_STD, size=(size, height, width, channels))
        images = np.clip(np.rint(prototypes[labels] + noise), 0, 255).astype(np.uint8)
        return _read_only(images), _read_only(labels)

    train_images, train_labels = make(opts["train_size"])
    test_images, test_labels = make(opts["test_size"])
    mean, std = _channel_stats(train_images)
    return Dataset(
        name="synthetic",
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=num_classes,
        mean=mean,
        std=std,
        class_names=tuple(f"class_{i}" for i in range(num_classes)),
    )


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

#: Source name -> loader. `tfds` is addressed as `tfds:<name>`; each loader is called as
#: `loader(data_dir, arg, options)` with the resolved data_dir and the text after the colon.
SOURCES: dict[str, Loader] = {
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "tfds": _load_tfds,
    "synthetic": _load_synthetic,
}


def _parse_name(name: str) -> tuple[str, str]:
    """`"tfds:mnist"` -> `("tfds", "mnist")`, `"cifar10"` -> `("cifar10", "")`."""
    source, _, arg = name.partition(":")
    if source not in SOURCES:
        raise ValueError(
            f"unknown data source {name!r}; known: {sorted(SOURCES)} (use 'tfds:<name>' for TFDS)"
        )
    if source == "tfds" and not arg:
        raise ValueError(
            "the tfds source needs a dataset name: 'tfds:<name>', e.g. 'tfds:cifar10'"
        )
    if source != "tfds" and arg:
        raise ValueError(f"data source {source!r} takes no ':<argument>', got {name!r}")
    return source, arg


def _resolve_dir(source: str, data_dir: str) -> str:
    """Replaces `""` with the source's default location."""
    if data_dir:
        return os.path.expanduser(data_dir)
    if source == "fashion_mnist":
        return FASHION_MNIST_DEFAULT_DIR
    if source in _CIFAR:
        return _default_cache_dir()
    if source == "tfds":
        return _tfds_default_dir()
    return ""


def describe_expected_files(name: str, data_dir: str = "") -> str:
    """Human-readable list of the files source `name` needs, where it looks and how to get them.

    Args:
      name: a source name accepted by `load` (e.g. `"cifar10"`, `"tfds:mnist"`).
      data_dir: as passed to `load`; `""` means the source's default location.
    """
    source, arg = _parse_name(name)
    directory = _resolve_dir(source, data_dir)
    if source == "fashion_mnist":
        searched = " and ".join(str(d) for d in _fashion_mnist_dirs(directory))
        files = "\n".join(f"  {stem}.gz" for stem in _FASHION_MNIST_FILES.values())
        return (
            f"Expected these 4 Fashion-MNIST IDX files (or the same names without .gz, "
            f"uncompressed):\n{files}\n"
            f"Searched: {searched}\n"
            "Get them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs "
            f"them in {FASHION_MNIST_DEFAULT_DIR}), or download them on a machine with network "
            f"access from {_FASHION_MNIST_URL} (data/fashion), copy them to a directory here "
            "and pass it with --config.data.dir=DIR."
        )
    if source in _CIFAR:
        spec = _CIFAR[source]
        base = Path(directory)
        files = "\n".join(f"  {spec.folder}/{f}" for f in spec.files)
        return (
            f"Expected either the extracted folder {spec.folder}/ with the files\n{files}\n"
            f"or the archive {spec.archive} (read directly, no need to extract).\n"
            f"Searched: {base} (as the folder itself), {base / spec.folder} and "
            f"{base / spec.archive}\n"
            f"Get the archive on a machine with network access from {spec.url}, copy it to "
            f"{_default_cache_dir()} (the default; $CARD_JAX_DATA overrides it) or any "
            "directory and pass that with --config.data.dir=DIR."
        )
    if source == "tfds":
        return (
            f"Expected the TFDS dataset {arg!r} prepared in array_record format under "
            f"{directory}/{arg}/ (a version folder with dataset_info.json and the "
            f"{arg}-train.array_record* / {arg}-test.array_record* files).\n"
            f"Searched: {directory}\n"
            "Prepare it on a machine with network access with "
            f"`tfds build {arg} --data_dir=DIR --file_format=array_record`, copy DIR/{arg} "
            f"into {directory} (or pass the copied DIR with --config.data.dir=DIR)."
        )
    return "The synthetic source is generated in memory from its options; it needs no files."


def load(
    name: str,
    data_dir: str = "",
    *,
    pad_to: int = 0,
    synthetic: Mapping[str, Any] | None = None,
) -> Dataset:
    """Loads a dataset into host memory.

    Args:
      name: `fashion_mnist`, `cifar10`, `cifar100`, `tfds:<name>` or `synthetic`.
      data_dir: where the source's files are; `""` means its default location
        (`/usr/share/datasets/fashion-mnist/` for Fashion-MNIST, `$CARD_JAX_DATA` or
        `~/.cache/card_jax/datasets` for CIFAR, `$TFDS_DATA_DIR` or `~/tensorflow_datasets`
        for TFDS). Ignored by `synthetic`.
      pad_to: if > 0, zero-pad (centred) images smaller than `pad_to x pad_to` to that size,
        e.g. Fashion-MNIST `[N, 28, 28, 1]` -> `[N, 32, 32, 1]` with 2 pixels on each side.
        Larger images are an error (padding never crops).
      synthetic: options of the synthetic source (`train_size`, `test_size`, `image_shape` or
        `image_size`/`channels`, `num_classes`, `seed`); ignored by the other sources so that
        one config can carry them for every source.

    Returns:
      A `Dataset` with read-only arrays.

    Raises:
      DatasetNotFoundError: the source's files are not on this machine (raised before any
        large file is read).
      ValueError: unknown source, corrupt or inconsistent files, or bad options.
    """
    source, arg = _parse_name(name)
    if pad_to < 0:
        raise ValueError(f"pad_to must be >= 0, got {pad_to}")
    options: Mapping[str, Any] = {}
    if synthetic is not None and source == "synthetic":
        options = synthetic
    dataset = SOURCES[source](_resolve_dir(source, data_dir), arg, options)
    if pad_to:
        dataset = dataclasses.replace(
            dataset,
            train_images=_read_only(pad_images(dataset.train_images, pad_to, name)),
            test_images=_read_only(pad_images(dataset.test_images, pad_to, name)),
        )
    return dataset


def check_available(name: str, data_dir: str = "") -> None:
    """Raises DatasetNotFoundError if source `name` is missing, reading no data (milliseconds).

    The command line calls this before importing JAX, so a missing dataset is reported at once.
    TFDS datasets are checked when loaded (that needs the tfds package).
    """
    source, _ = _parse_name(name)
    directory = _resolve_dir(source, data_dir)
    if source == "fashion_mnist":
        _find_fashion_mnist(directory)
    elif source in _CIFAR:
        _find_cifar(source, directory)
