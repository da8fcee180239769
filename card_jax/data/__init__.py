"""Datasets (host-memory numpy arrays) for card_jax.

`card_jax.data.load(name, data_dir, pad_to=..., synthetic=...)` returns a `Dataset`; see
`card_jax.data.sources` for the sources and where each one looks for its files. Importing this
package is cheap: it imports neither JAX nor tensorflow_datasets.
"""

from __future__ import annotations

from card_jax.data.sources import (
    SOURCES,
    Dataset,
    DatasetNotFoundError,
    describe_expected_files,
    load,
)

__all__ = [
    "SOURCES",
    "Dataset",
    "DatasetNotFoundError",
    "describe_expected_files",
    "load",
]
