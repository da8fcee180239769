"""Tests of card_jax.data.sources on tiny files written in the exact on-disk formats."""

from __future__ import annotations

import dataclasses
import gzip
import pickle
import re
import struct
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from card_jax import data
from card_jax.data import sources

FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
CIFAR10_FILES = (
    "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
    "test_batch", "batches.meta",
)
CIFAR100_FILES = ("train", "test", "meta")
REAL_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------------
# Writers of the real formats
# ------------------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0x0000 08 <rank>, big-endian uint32 dims, data."""
    magic = 0x0800 | array.ndim
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(directory: Path, gz: bool = True) -> dict[str, np.ndarray]:
    """Three 28x28 training images and two test images with a few known pixels."""
    train_images = np.zeros((3, 28, 28), np.uint8)
    train_images[0, 0, 0] = 255     # top-left corner
    train_images[1, 27, 27] = 7     # bottom-right corner
    train_images[2, 5, 9] = 200     # row 5, column 9
    train_labels = np.array([3, 0, 9], np.uint8)
    test_images = np.full((2, 28, 28), 11, np.uint8)
    test_labels = np.array([1, 2], np.uint8)
    arrays = {
        "train-images-idx3-ubyte": train_images,
        "train-labels-idx1-ubyte": train_labels,
        "t10k-images-idx3-ubyte": test_images,
        "t10k-labels-idx1-ubyte": test_labels,
    }
    directory.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        raw = _idx_bytes(array)
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)
    return arrays


def _py2_pickle(obj) -> bytes:
    """Pickles `obj` like Python 2's cPickle (protocol 2) wrote the real CIFAR files.

    Byte strings become BINSTRING opcodes (bytes again under `encoding="bytes"`) and arrays
    are rebuilt through `numpy.core.multiarray._reconstruct`, as numpy 1.x wrote them.
    """
    out = bytearray(b"\x80\x02")

    def emit(x) -> None:
        if isinstance(x, bool):
            out.extend(b"\x88" if x else b"\x89")
        elif x is None:
            out.extend(b"N")
        elif isinstance(x, int):
            out.extend(b"K" + bytes([x]) if 0 <= x < 256 else b"J" + struct.pack("<i", x))
        elif isinstance(x, bytes):
            size = bytes([len(x)]) if len(x) < 256 else None
            out.extend((b"U" + size if size else b"T" + struct.pack("<I", len(x))) + x)
        elif isinstance(x, tuple):
            out.extend(b"(")
            for item in x:
                emit(item)
            out.extend(b"t")
        elif isinstance(x, list):
            out.extend(b"](")
            for item in x:
                emit(item)
            out.extend(b"e")
        elif isinstance(x, dict):
            out.extend(b"}(")
            for key, value in x.items():
                emit(key)
                emit(value)
            out.extend(b"u")
        elif isinstance(x, np.ndarray):
            assert x.dtype == np.uint8
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            emit((0,))
            emit(b"b")
            out.extend(b"\x87R")  # TUPLE3, REDUCE: an empty array ...
            out.extend(b"(")      # ... then BUILD with (version, shape, dtype, fortran, data)
            emit(1)
            emit(tuple(x.shape))
            out.extend(b"cnumpy\ndtype\n")
            emit((b"u1", 0, 1))
            out.extend(b"R")
            emit((3, b"|", None, None, None, -1, -1, 0))
            out.extend(b"b")
            emit(False)
            emit(x.tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(x))

    emit(obj)
    out.extend(b".")
    return bytes(out)


def _cifar_rows(first_value: int) -> np.ndarray:
    """Two CIFAR rows [2, 3072] (channel-major CHW) that are zero but for one known pixel.

    Image 0 has `first_value` at channel 1 (green), row 3, column 5: flat index
    1 * 1024 + 3 * 32 + 5 = 1125. Image 1 has `first_value + 1` at channel 2, row 31, col 0.
    """
    rows = np.zeros((2, 3072), np.uint8)
    rows[0, 1 * 1024 + 3 * 32 + 5] = first_value
    rows[1, 2 * 1024 + 31 * 32 + 0] = first_value + 1
    return rows


def _write_cifar10(folder: Path) -> None:
    """cifar-10-batches-py with 2 images per batch; batch k (1..5) has labels [k - 1, k]."""
    folder.mkdir(parents=True)
    for k in range(1, 6):
        batch = {
            b"batch_label": b"training batch %d of 5" % k,
            b"labels": [k - 1, k],
            b"data": _cifar_rows(10 * k),
            b"filenames": [b"a_%d.png" % k, b"b_%d.png" % k],
        }
        (folder / f"data_batch_{k}").write_bytes(_py2_pickle(batch))
    test = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [9, 8],
        b"data": _cifar_rows(100),
        b"filenames": [b"t0.png", b"t1.png"],
    }
    (folder / "test_batch").write_bytes(_py2_pickle(test))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
             b"dog", b"frog", b"horse", b"ship", b"truck"]
    meta = {b"num_cases_per_batch": 2, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(_py2_pickle(meta))


def _write_cifar100(folder: Path) -> None:
    """cifar-100-python pickled by Python 3 at protocol 2 (bytes go through _codecs.encode)."""
    folder.mkdir(parents=True)
    for split, fine, value in (("train", [99, 0], 50), ("test", [42, 7], 60)):
        batch = {
            b"filenames": [b"x.png", b"y.png"],
            b"batch_label": split.encode(),
            b"fine_labels": fine,
            b"coarse_labels": [19, 0],
            b"data": _cifar_rows(value),
        }
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {
        b"fine_label_names": [b"class_%d" % i for i in range(100)],
        b"coarse_label_names": [b"super_%d" % i for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))


def _tar_gz(folder: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


# ------------------------------------------------------------------------------------------
# Fashion-MNIST
# ------------------------------------------------------------------------------------------


def test_fashion_mnist_gzipped_idx_exact_values(tmp_path):
    arrays = _write_fashion(tmp_path)
    ds = data.load("fashion_mnist", str(tmp_path))
    assert ds.name == "fashion_mnist" and ds.num_classes == 10
    assert ds.train_images.shape == (3, 28, 28, 1) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (2, 28, 28, 1)
    np.testing.assert_array_equal(ds.train_images[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_images[..., 0], arrays["t10k-images-idx3-ubyte"])
    assert ds.train_images[0, 0, 0, 0] == 255
    assert ds.train_images[1, 27, 27, 0] == 7
    assert ds.train_images[2, 5, 9, 0] == 200
    assert ds.train_labels.dtype == np.int32
    assert ds.train_labels.tolist() == [3, 0, 9]
    assert ds.test_labels.tolist() == [1, 2]
    assert ds.mean == (0.2860,) and ds.std == (0.3530,)
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"


def test_fashion_mnist_pad_to_32_is_centred(tmp_path):
    arrays = _write_fashion(tmp_path)
    ds = data.load("fashion_mnist", str(tmp_path), pad_to=32)
    assert ds.train_images.shape == (3, 32, 32, 1)
    assert ds.test_images.shape == (2, 32, 32, 1)
    # 28 -> 32 adds 2 zero pixels on each side.
    np.testing.assert_array_equal(
        ds.train_images[:, 2:30, 2:30, 0], arrays["train-images-idx3-ubyte"]
    )
    assert ds.train_images[0, 2, 2, 0] == 255
    assert ds.train_images[1, 29, 29, 0] == 7
    assert ds.train_images[2, 7, 11, 0] == 200
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not ds.test_images[:, border].any()  # test images are 11 inside, 0 on the border
    assert (ds.test_images[:, 2:30, 2:30] == 11).all()
    # The constants describe the original pixels, padding does not change them.
    assert ds.mean == (0.2860,) and ds.std == (0.3530,)


def test_fashion_mnist_uncompressed_files_in_subfolder(tmp_path):
    arrays = _write_fashion(tmp_path / "fashion-mnist", gz=False)
    ds = data.load("fashion_mnist", str(tmp_path))  # the parent of fashion-mnist/
    np.testing.assert_array_equal(ds.train_images[..., 0], arrays["train-images-idx3-ubyte"])
    assert ds.test_labels.tolist() == [1, 2]


def test_pad_to_smaller_than_image_is_an_error(tmp_path):
    _write_fashion(tmp_path)
    with pytest.raises(ValueError, match="pad_to=16"):
        data.load("fashion_mnist", str(tmp_path), pad_to=16)
    same = data.load("fashion_mnist", str(tmp_path), pad_to=28)
    assert same.train_images.shape == (3, 28, 28, 1)


def _corrupt_bad_magic(path: Path) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[3] = 0x01  # 2051 -> 2049, the labels magic
    path.write_bytes(gzip.compress(bytes(raw)))


def _corrupt_truncated_data(path: Path) -> None:
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))


def _corrupt_truncated_gzip(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _corrupt_not_gzip(path: Path) -> None:
    path.write_bytes(b"<html>404 Not Found</html>")


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_corrupt_bad_magic, "magic number 2049"),
        (_corrupt_truncated_data, "truncated"),
        (_corrupt_truncated_gzip, "gzip"),
        (_corrupt_not_gzip, "gzip"),
    ],
)
def test_corrupt_idx_names_the_file(tmp_path, corrupt, message):
    _write_fashion(tmp_path)
    corrupt(tmp_path / "train-images-idx3-ubyte.gz")
    with pytest.raises(ValueError, match=message) as info:
        data.load("fashion_mnist", str(tmp_path))
    assert "train-images-idx3-ubyte.gz" in str(info.value)


def test_fashion_mnist_label_out_of_range_names_the_file(tmp_path):
    _write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx_bytes(np.array([1, 10], np.uint8)))
    )
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz.*\[0, 10\)"):
        data.load("fashion_mnist", str(tmp_path))


def test_fashion_mnist_count_mismatch_names_both_files(tmp_path):
    _write_fashion(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx_bytes(np.array([1, 2], np.uint8)))
    )
    with pytest.raises(ValueError, match="3 images.*2 labels") as info:
        data.load("fashion_mnist", str(tmp_path))
    assert "train-images-idx3-ubyte.gz" in str(info.value)
    assert "train-labels-idx1-ubyte.gz" in str(info.value)


# ------------------------------------------------------------------------------------------
# Missing sources
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected_files",
    [
        ("fashion_mnist", FASHION_FILES),
        ("cifar10", CIFAR10_FILES + ("cifar-10-batches-py", "cifar-10-python.tar.gz")),
        ("cifar100", CIFAR100_FILES + ("cifar-100-python", "cifar-100-python.tar.gz")),
    ],
)
def test_missing_source_raises_fast_with_every_file_name(tmp_path, name, expected_files):
    start = time.perf_counter()
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load(name, str(tmp_path))
    assert time.perf_counter() - start < 1.0
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    for file_name in expected_files:
        assert file_name in message
    assert str(tmp_path) in message
    assert "--config.data.dir" in message
    assert message.startswith(f"Dataset '{name}' not found")
    assert data.describe_expected_files(name, str(tmp_path)) in message


def test_missing_fashion_mnist_says_how_to_install():
    text = data.describe_expected_files("fashion_mnist", "")
    assert "apt-get install dataset-fashion-mnist" in text
    assert "/usr/share/datasets/fashion-mnist/" in text


def test_missing_cifar_names_the_download_url(tmp_path):
    text = data.describe_expected_files("cifar100", str(tmp_path))
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in text


def test_cifar_default_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CARD_JAX_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(data.DatasetNotFoundError, match="elsewhere"):
        data.load("cifar10")
    _write_cifar10(tmp_path / "elsewhere" / "cifar-10-batches-py")
    assert data.load("cifar10").train_labels.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]


def test_partially_copied_source_lists_the_missing_files(tmp_path):
    _write_fashion(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(data.DatasetNotFoundError, match="missing: t10k-images-idx3-ubyte.gz"):
        data.load("fashion_mnist", str(tmp_path))
    folder = tmp_path / "c10" / "cifar-10-batches-py"
    _write_cifar10(folder)
    (folder / "data_batch_4").unlink()
    with pytest.raises(data.DatasetNotFoundError, match="missing: data_batch_4"):
        data.load("cifar10", str(tmp_path / "c10"))


# ------------------------------------------------------------------------------------------
# CIFAR
# ------------------------------------------------------------------------------------------


def _check_cifar10(ds: sources.Dataset) -> None:
    assert ds.name == "cifar10" and ds.num_classes == 10
    assert ds.train_images.shape == (10, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (2, 32, 32, 3)
    assert ds.train_labels.dtype == np.int32
    # Batches are concatenated in order 1..5.
    assert ds.train_labels.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert ds.test_labels.tolist() == [9, 8]
    # CHW row order -> HWC: the one non-zero value lands at [row, col, channel].
    for k in range(1, 6):
        first, second = ds.train_images[2 * (k - 1)], ds.train_images[2 * (k - 1) + 1]
        assert first[3, 5, 1] == 10 * k and np.count_nonzero(first) == 1
        assert second[31, 0, 2] == 10 * k + 1 and np.count_nonzero(second) == 1
    assert ds.test_images[0, 3, 5, 1] == 100
    assert ds.test_images[1, 31, 0, 2] == 101
    assert ds.class_names[0] == "airplane" and ds.class_names[9] == "truck"
    assert ds.mean == (0.491, 0.482, 0.447) and ds.std == (0.247, 0.243, 0.262)


def test_cifar10_python_batches_folder(tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    _check_cifar10(data.load("cifar10", str(tmp_path)))  # parent of the folder
    _check_cifar10(data.load("cifar10", str(tmp_path / "cifar-10-batches-py")))  # the folder


def test_cifar10_tar_gz_archive(tmp_path):
    _write_cifar10(tmp_path / "src" / "cifar-10-batches-py")
    archive_dir = tmp_path / "archives"
    archive_dir.mkdir()
    _tar_gz(tmp_path / "src" / "cifar-10-batches-py", archive_dir / "cifar-10-python.tar.gz")
    _check_cifar10(data.load("cifar10", str(archive_dir)))
    _check_cifar10(data.load("cifar10", str(archive_dir / "cifar-10-python.tar.gz")))
    assert not (archive_dir / "cifar-10-batches-py").exists()  # read in place, not extracted


def _check_cifar100(ds: sources.Dataset) -> None:
    assert ds.name == "cifar100" and ds.num_classes == 100
    assert ds.train_images.shape == (2, 32, 32, 3) and ds.test_images.shape == (2, 32, 32, 3)
    assert ds.train_labels.tolist() == [99, 0]  # fine labels, not coarse
    assert ds.test_labels.tolist() == [42, 7]
    assert ds.train_images[0, 3, 5, 1] == 50 and ds.train_images[1, 31, 0, 2] == 51
    assert ds.test_images[0, 3, 5, 1] == 60
    assert len(ds.class_names) == 100 and ds.class_names[42] == "class_42"
    assert ds.mean == (0.5071, 0.4865, 0.4409) and ds.std == (0.2673, 0.2564, 0.2762)


def test_cifar100_folder_and_archive(tmp_path):
    _write_cifar100(tmp_path / "cifar-100-python")
    _check_cifar100(data.load("cifar100", str(tmp_path)))
    archive_dir = tmp_path / "archives"
    archive_dir.mkdir()
    _tar_gz(tmp_path / "cifar-100-python", archive_dir / "cifar-100-python.tar.gz")
    _check_cifar100(data.load("cifar100", str(archive_dir)))


def test_cifar_label_out_of_range_names_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    bad = {b"labels": [0, 10], b"data": _cifar_rows(1)}
    (folder / "data_batch_3").write_bytes(_py2_pickle(bad))
    with pytest.raises(ValueError, match=r"data_batch_3.*\[0, 10\)"):
        data.load("cifar10", str(tmp_path))


def test_cifar_count_mismatch_and_truncated_pickle_name_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    (folder / "test_batch").write_bytes(_py2_pickle({b"labels": [1], b"data": _cifar_rows(1)}))
    with pytest.raises(ValueError, match="test_batch: 2 images but 1 labels"):
        data.load("cifar10", str(tmp_path))
    raw = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="data_batch_2.*corrupt or truncated"):
        data.load("cifar10", str(tmp_path))


def test_cifar_pickle_with_foreign_globals_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    # A pickle that would call os.system if it were loaded with plain pickle.load.
    (folder / "data_batch_1").write_bytes(b"\x80\x02cos\nsystem\nU\x04trueR.")
    with pytest.raises(ValueError, match="data_batch_1.*os.system"):
        data.load("cifar10", str(tmp_path))


def test_truncated_archive_names_the_archive(tmp_path):
    _write_cifar10(tmp_path / "src" / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    _tar_gz(tmp_path / "src" / "cifar-10-batches-py", archive)
    raw = archive.read_bytes()
    archive.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cifar-10-python.tar.gz"):
        data.load("cifar10", str(tmp_path))


# ------------------------------------------------------------------------------------------
# Real Debian Fashion-MNIST
# ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_FASHION_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_debian_fashion_mnist():
    start = time.perf_counter()
    ds = data.load("fashion_mnist")
    elapsed = time.perf_counter() - start
    assert elapsed < 1.5, f"loading took {elapsed:.2f} s"
    assert ds.train_images.shape == (60000, 28, 28, 1)
    assert ds.test_images.shape == (10000, 28, 28, 1)
    assert ds.train_images.dtype == np.uint8 and ds.test_images.dtype == np.uint8
    assert ds.train_labels.min() == 0 and ds.train_labels.max() == 9
    assert ds.test_labels.min() == 0 and ds.test_labels.max() == 9
    np.testing.assert_array_equal(np.bincount(ds.train_labels), [6000] * 10)
    # The hard-coded constants are the statistics of these very pixels.
    mean, std = sources._channel_stats(ds.train_images)
    assert round(mean[0], 4) == ds.mean[0] == 0.2860
    assert round(std[0], 4) == ds.std[0] == 0.3530


# ------------------------------------------------------------------------------------------
# Synthetic
# ------------------------------------------------------------------------------------------


def test_synthetic_defaults_and_determinism():
    a = data.load("synthetic")
    b = data.load("synthetic", synthetic={"seed": 0})
    assert a.train_images.shape == (512, 32, 32, 3) and a.test_images.shape == (256, 32, 32, 3)
    assert a.num_classes == 10
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    c = data.load("synthetic", synthetic={"seed": 1})
    assert not np.array_equal(a.train_images, c.train_images)
    assert set(a.train_labels.tolist()) == set(range(10))
    assert set(a.test_labels.tolist()) == set(range(10))
    mean, std = sources._channel_stats(a.train_images)
    assert a.mean == mean and a.std == std and len(a.mean) == 3
    pixels = a.train_images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(a.mean, pixels.mean(0), atol=1e-9)
    np.testing.assert_allclose(a.std, pixels.std(0), atol=1e-9)


def test_synthetic_requested_shapes():
    ds = data.load(
        "synthetic",
        synthetic=dict(train_size=30, test_size=7, image_shape=(12, 20, 1), num_classes=3, seed=5),
        pad_to=24,
    )
    assert ds.train_images.shape == (30, 24, 24, 1) and ds.test_images.shape == (7, 24, 24, 1)
    assert ds.num_classes == 3 and set(ds.train_labels.tolist()) == {0, 1, 2}
    assert np.bincount(ds.train_labels).tolist() == [10, 10, 10]
    # The experiment configs spell the shape as image_size/channels.
    cfg = data.load(
        "synthetic", synthetic=dict(train_size=20, test_size=5, image_size=16, channels=3)
    )
    assert cfg.train_images.shape == (20, 16, 16, 3)


def test_synthetic_bad_options():
    with pytest.raises(ValueError, match="unknown synthetic options"):
        data.load("synthetic", synthetic={"train_szie": 10})
    with pytest.raises(ValueError, match="every class"):
        data.load("synthetic", synthetic={"train_size": 5, "num_classes": 10})


def test_synthetic_classes_are_separable():
    options = dict(train_size=200, test_size=100, image_shape=(16, 16, 3))
    ds = data.load("synthetic", synthetic=options)
    x_train = ds.train_images.reshape(200, -1).astype(np.float64)
    centroids = np.stack([x_train[ds.train_labels == c].mean(0) for c in range(10)])

    def nearest_centroid_accuracy(images: np.ndarray) -> float:
        x = images.reshape(len(images), -1).astype(np.float64)
        distances = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
        return float((distances.argmin(1) == ds.test_labels).mean())

    assert nearest_centroid_accuracy(ds.test_images) > 0.95
    # Prototypes are left-right symmetric, so random horizontal flips keep the classes.
    assert nearest_centroid_accuracy(ds.test_images[:, :, ::-1]) > 0.95


# ------------------------------------------------------------------------------------------
# TFDS
# ------------------------------------------------------------------------------------------


def test_tfds_through_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    # USE_CODE: the pip package ships no metadata files; without them the mock builds the
    # dataset info from the builder code (mock_data works without TensorFlow for data_source).
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load("tfds:mnist", str(tmp_path), pad_to=32)
        reference = tfds.data_source(
            "mnist", split="train", data_dir=str(tmp_path), download=False
        )
        expected_images = np.stack([reference[i]["image"] for i in range(6)])
        expected_labels = np.array([reference[i]["label"] for i in range(6)])
    assert ds.name == "tfds:mnist" and ds.num_classes == 10
    assert ds.train_images.shape == (6, 32, 32, 1) and ds.test_images.shape == (6, 32, 32, 1)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train_images[:, 2:30, 2:30], expected_images)
    np.testing.assert_array_equal(ds.train_labels, expected_labels)
    mean, std = sources._channel_stats(expected_images)
    assert ds.mean == mean and ds.std == std
    assert len(ds.class_names) == 10


def test_tfds_rgb_through_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load("tfds:cifar10", str(tmp_path))
    assert ds.train_images.shape == (3, 32, 32, 3) and len(ds.mean) == 3
    assert ((ds.train_labels >= 0) & (ds.train_labels < 10)).all()


def _tiny_tfds_examples(num: int, seed: int) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), i % 3) for i in range(num)]


def _prepare_tiny_tfds(data_dir: Path) -> None:
    """Prepares a real 5 + 3 example dataset `tiny_images` in array_record format.

    A uint8 Tensor feature (not Image, whose PNG encoding needs TensorFlow) lets tfds write
    the files without TensorFlow; reading goes through exactly the path real datasets take.
    """
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
            })
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples(5, 0), "test": self._generate_examples(3, 1)}

        def _generate_examples(self, num, seed):
            for i, (image, label) in enumerate(_tiny_tfds_examples(num, seed)):
                yield i, {"image": image, "label": label}

    TinyImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_real_prepared_array_record_dataset(tmp_path):
    _prepare_tiny_tfds(tmp_path)
    # The builder class is not registered: tfds reads it back from the prepared files alone,
    # as it would for a dataset prepared on another machine and copied here.
    ds = data.load("tfds:tiny_images", str(tmp_path), pad_to=10)
    assert ds.num_classes == 3 and ds.class_names == ("a", "b", "c")
    assert ds.train_images.shape == (5, 10, 10, 3) and ds.test_images.shape == (3, 10, 10, 3)
    for images, labels, (num, seed) in (
        (ds.train_images, ds.train_labels, (5, 0)),
        (ds.test_images, ds.test_labels, (3, 1)),
    ):
        # tfds shuffles records when preparing, so compare as an image -> label mapping.
        expected = {image.tobytes(): label for image, label in _tiny_tfds_examples(num, seed)}
        got = {image[1:9, 1:9].tobytes(): int(label) for image, label in zip(images, labels)}
        assert got == expected
    mean, std = sources._channel_stats(np.ascontiguousarray(ds.train_images[:, 1:9, 1:9]))
    assert ds.mean == mean and ds.std == std


def test_tfds_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=re.escape("pip install 'card_jax[tfds]'")):
        data.load("tfds:mnist", str(tmp_path))


@pytest.mark.parametrize("tfds_name", ["mnist", "no_such_dataset_anywhere"])
def test_tfds_missing_dataset(tmp_path, tfds_name):
    pytest.importorskip("tensorflow_datasets")
    start = time.perf_counter()
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load(f"tfds:{tfds_name}", str(tmp_path))
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert str(tmp_path) in message
    assert f"tfds build {tfds_name} --data_dir=" in message
    assert not any(tmp_path.iterdir())  # nothing was downloaded or created


# ------------------------------------------------------------------------------------------
# API
# ------------------------------------------------------------------------------------------


def test_sources_registry_and_bad_names():
    assert set(data.SOURCES) == {"fashion_mnist", "cifar10", "cifar100", "tfds", "synthetic"}
    with pytest.raises(ValueError, match="unknown data source"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="tfds:<name>"):
        data.load("tfds")
    with pytest.raises(ValueError, match="takes no"):
        data.load("cifar10:extra")
    with pytest.raises(ValueError, match="pad_to"):
        data.load("synthetic", pad_to=-1)


def test_arrays_are_read_only_and_dataset_is_frozen(tmp_path):
    _write_fashion(tmp_path)
    ds = data.load("fashion_mnist", str(tmp_path), pad_to=32)
    for array in (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels):
        assert not array.flags.writeable
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.num_classes = 3  # type: ignore[misc]
    batch = ds.train_images[np.array([0, 2])]  # fancy indexing gives an ordinary copy
    batch[0] = 0


def test_dataset_validates_its_fields():
    images = np.zeros((2, 4, 4, 1), np.uint8)
    labels = np.array([0, 1], np.int32)
    ok = dict(name="x", train_images=images, train_labels=labels, test_images=images,
              test_labels=labels, num_classes=2, mean=(0.5,), std=(0.25,))
    sources.Dataset(**ok)
    with pytest.raises(ValueError, match="labels must lie"):
        sources.Dataset(**{**ok, "num_classes": 1})
    with pytest.raises(ValueError, match="one entry per channel"):
        sources.Dataset(**{**ok, "mean": (0.5, 0.5, 0.5)})
    with pytest.raises(ValueError, match="int32"):
        sources.Dataset(**{**ok, "train_labels": labels.astype(np.int64)})
    with pytest.raises(ValueError, match="2 train images but 1 labels"):
        sources.Dataset(**{**ok, "train_labels": labels[:1]})


def test_importing_data_is_light():
    import subprocess

    code = (
        "import sys, card_jax.data; "
        "print('jax' in sys.modules, 'tensorflow_datasets' in sys.modules)"
    )
    repo_root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root
    )
    assert out.stdout.split() == ["False", "False"]


def test_describe_expected_files_for_every_source(tmp_path):
    for name in ("fashion_mnist", "cifar10", "cifar100", "tfds:mnist", "synthetic"):
        assert data.describe_expected_files(name, str(tmp_path))
    assert "no files" in data.describe_expected_files("synthetic", "")
