"""Command line: write a "-C" corrupted test set in exactly the CIFAR-10-C layout.

    python -m card_jax.corrupt --dataset=fashion_mnist --out=DIR [--data_dir=]
        [--corruptions=all|benchmark|a,b] [--severities=1,2,3,4,5] [--examples=-1] [--seed=0]
        [--progress=auto|bar|log|none] [--batch_size=512]

Corrupts the TEST split of a `card_jax.data.sources` dataset with the 19 corruptions of
Hendrycks & Dietterich (2019) at the CIFAR-10-C constants of `hendrycks/robustness`
`make_cifar_c.py` (see `card_jax.data.corruptions`), and writes

* `<corruption>.npy`: uint8 `(S n, H, W, C)`, the S requested severities stacked in order;
* `labels.npy`: uint8 (int32 beyond 256 classes) `(S n,)`, the test labels repeated S times;
* `info.json`: dataset, image shape, seed, severities, constants version.

With the default 5 severities that is the CIFAR-10-C layout, readable by
`card_jax.data.corruption_sets.iterate`. Every file is written to a temporary name and renamed
when complete, so a file that exists is complete: an interrupted run is resumed by running the
same command again (complete files are skipped). An `--out` holding a set made with other
settings is refused rather than mixed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from card_jax.data import corruption_sets

log = logging.getLogger("card_jax")

EXIT_BAD_INPUT = 2
# info.json keys that must match for a resumed run to reuse existing files.
_IDENTITY_KEYS = ("dataset", "split", "n_examples", "image_shape", "seed", "severities",
                  "constants_version")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m card_jax.corrupt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True,
                   help="card_jax.data source: fashion_mnist, cifar10, cifar100, tfds:<name>, "
                        "synthetic")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data_dir", default="", help="where the dataset is ('' = its default)")
    p.add_argument("--corruptions", default="all",
                   help="'all' (19), 'benchmark' (15), 'extra' (4) or comma-separated names")
    p.add_argument("--severities", default="1,2,3,4,5", help="comma-separated, in 1..5")
    p.add_argument("--examples", type=int, default=-1,
                   help="first N test images (-1 = all); more than the split holds is an error")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", default="auto", choices=("auto", "bar", "log", "none"),
                   help="auto: a tqdm bar on a terminal, log lines otherwise")
    p.add_argument("--batch_size", type=int, default=512, help="images per compiled call")
    return p


class _Progress:
    """A tqdm bar over images (terminal) or one log line per finished cell."""

    def __init__(self, total: int, mode: str):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.total, self.done = mode, total, 0
        self._start = time.monotonic()
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm  # pylint: disable=import-outside-toplevel

            self._bar = tqdm(total=total, unit="img", dynamic_ncols=True)

    def cell(self, name: str, severity: int, count: int, seconds: float) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.set_postfix_str(f"{name} s{severity}", refresh=False)
            self._bar.update(count)
        elif self.mode == "log":
            elapsed = time.monotonic() - self._start
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            log.info("%s severity %d: %d images in %.1fs (%.0f img/s) | %d/%d done, ETA %.0fs",
                     name, severity, count, seconds, count / max(seconds, 1e-9), self.done,
                     self.total, eta)

    def skip(self, count: int) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_complete(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Files only ever appear by rename once complete, so a readable header of the right
    shape and dtype means the file is done."""
    if not path.is_file():
        return False
    try:
        existing = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return existing.shape == shape and existing.dtype == dtype


def _remove_stale_tmp(out: Path, name: str) -> None:
    """Temporary files of an interrupted run (any pid) for this output file."""
    for stale in out.glob(f".{name}.tmp-*"):
        stale.unlink(missing_ok=True)


def _check_or_write_info(out: Path, info: dict[str, Any]) -> None:
    path = out / corruption_sets.INFO_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); remove it or use another --out") from e
        diff = {k: (old.get(k), info[k]) for k in _IDENTITY_KEYS if old.get(k) != info[k]}
        if diff:
            details = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(
                f"{out} holds a corrupted set made with other settings ({details}); use "
                "another --out or the same settings"
            )
        info = {**info, "corruptions": [c for c in corruption_sets.ALL_CORRUPTIONS
                                        if c in set(old.get("corruptions", []))
                                        | set(info["corruptions"])]}
    _atomic_write_bytes(path, (json.dumps(info, indent=2) + "\n").encode())


def generate(dataset: str, out: str | Path, data_dir: str = "",
             corruptions: str | Sequence[str] = "all",
             severities: str | Sequence[int] = "1,2,3,4,5", examples: int = -1,
             seed: int = 0, progress: str = "auto",
             batch_size: int = 512, synthetic: dict | None = None) -> dict[str, float]:
    """Writes the corrupted test set (see the module docstring).

    Returns:
      Images per second for each corruption written in this run (skipped ones are absent).
    """
    names = corruption_sets.resolve_corruptions(corruptions)
    sevs = corruption_sets.resolve_severities(severities)
    if list(sevs) != sorted(sevs):
        raise ValueError(f"--severities must be increasing (the file layout), got {sevs}")
    from card_jax.data import sources  # pylint: disable=import-outside-toplevel

    sources.check_available(dataset, data_dir)  # fails fast, before JAX is imported
    from card_jax.data import corruptions as corr  # pylint: disable=import-outside-toplevel

    if "frost" in names:
        corr.frost_texture_dir()  # a missing package fails now, not after hours of work
    ds = sources.load(dataset, data_dir, pad_to=0, synthetic=synthetic)
    images, labels = ds.test_images, ds.test_labels
    if examples != -1:
        if examples < 1 or examples > len(images):
            raise ValueError(
                f"--examples={examples}: the {dataset} test split has {len(images)} images "
                "(use -1 for all)"
            )
        images, labels = images[:examples], labels[:examples]
    n = len(images)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "dataset": dataset,
        "split": "test",
        "n_examples": n,
        "image_shape": list(images.shape[1:]),
        "num_classes": ds.num_classes,
        "seed": seed,
        "severities": list(sevs),
        "corruptions": list(names),
        "constants_version": corr.CONSTANTS_VERSION,
        "layout": "<corruption>.npy uint8 [len(severities) * n_examples, H, W, C], severity "
                  "blocks stacked in order; labels.npy the test labels repeated per severity",
        "source": "Hendrycks & Dietterich 2019; hendrycks/robustness make_cifar_c.py "
                  "constants; card_jax.data.corruptions",
    }
    _check_or_write_info(out, info)

    label_dtype = np.dtype(np.uint8) if ds.num_classes <= 256 else np.dtype(np.int32)
    all_labels = np.tile(labels.astype(label_dtype), len(sevs))
    labels_path = out / corruption_sets.LABELS_FILE
    if not (_is_complete(labels_path, all_labels.shape, label_dtype)
            and np.array_equal(np.load(labels_path), all_labels)):
        _atomic_save_npy(labels_path, all_labels)

    shape = (len(sevs) * n, *images.shape[1:])
    bar = _Progress(len(names) * len(sevs) * n, progress)
    rates: dict[str, float] = {}
    try:
        for name in names:
            path = out / f"{name}.npy"
            if _is_complete(path, shape, np.dtype(np.uint8)):
                log.info("%s: complete, skipped", path)
                bar.skip(len(sevs) * n)
                continue
            _remove_stale_tmp(out, path.name)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            # A memory-mapped .npy: one severity block in memory at a time, whatever n.
            target = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            spent = 0.0
            for block, s in enumerate(sevs):
                start = time.monotonic()
                target[block * n:(block + 1) * n] = corr.corrupt(
                    images, name, s, seed, batch_size=batch_size)
                seconds = time.monotonic() - start
                spent += seconds
                bar.cell(name, s, n, seconds)
            target.flush()
            del target
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            rates[name] = len(sevs) * n / max(spent, 1e-9)
    finally:
        bar.close()
    for name, rate in rates.items():
        log.info("%-18s %8.0f images/s (including compilation)", name, rate)
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from card_jax.data.sources import (  # pylint: disable=import-outside-toplevel
        DatasetNotFoundError,
    )

    try:
        start = time.monotonic()
        generate(args.dataset, args.out, args.data_dir, args.corruptions, args.severities,
                 args.examples, args.seed, args.progress, args.batch_size)
    except (DatasetNotFoundError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    log.info("done in %.0fs: %s", time.monotonic() - start, args.out)
    return 0


if __name__ == "__main__":
    from card_jax import entry

    entry.prepare()  # XLA:CPU flags and malloc tunables for this machine (card_jax/entry.py)
    sys.exit(main())
