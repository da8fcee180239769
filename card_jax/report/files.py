"""Atomic file writes for the report folder: write a hidden temporary file, then rename.

A report killed half-way therefore leaves every output either complete (old or new) or absent,
never truncated. Reads nothing; writes only the path it is given (and its temporary sibling).
"""

from __future__ import annotations

import os
import pathlib


def _temporary(path: pathlib.Path) -> pathlib.Path:
    # Same folder as the target so os.replace is a rename on one file system, never a copy.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    """Writes `text` (UTF-8) to `path` atomically; returns the path."""
    path = pathlib.Path(path)
    tmp = _temporary(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> pathlib.Path:
    """Saves a matplotlib `Figure` as PNG to `path` atomically; returns the path."""
    path = pathlib.Path(path)
    tmp = _temporary(path)
    try:
        # The temporary name ends in ".tmp": the format must be given, not guessed from it.
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
