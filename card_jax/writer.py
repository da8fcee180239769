"""Metric writers: JSON lines (read by card_jax.report) plus TensorBoard event files.

Method names follow CLU's MetricWriter (`write_scalars`, `flush`, `close`) without depending on
TensorFlow. Per-realization values are stored as lists, never averaged at write time.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Sequence

METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no NaN/inf; keep the information as a string
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class MetricWriter:
    """Appends `{"step", "split", "name", "value"}` records to `workdir/metrics.jsonl`.

    Values are floats or lists of R floats (one per realization). With `tensorboard=True`, each
    realization's scalar also goes to TensorBoard as `split/name/r{i}`.
    """

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True, level: int = 0):
        self._path = pathlib.Path(workdir) / METRICS_FILE
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._path, "a", encoding="utf-8")
        self.level = level  # the level written into each record; the level loop sets it
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: optional at read time

            self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def write_scalars(self, step: int, scalars: dict[str, Any], split: str = "train") -> None:
        for name, value in scalars.items():
            value = _plain(value)
            record = {"step": int(step), "level": self.level, "split": split, "name": name,
                      "value": value}
            self._file.write(json.dumps(record) + "\n")
            if self._tb is not None:
                values: Sequence = value if isinstance(value, list) else [value]
                for r, v in enumerate(values):
                    if isinstance(v, (int, float)):
                        self._tb.add_scalar(f"{split}/{name}/r{r}", v, int(step))

    def truncate_after(self, step: int, level: int) -> None:
        """Drops this file's records after (level, step); see the module function."""
        self._file.close()
        truncate_after(self._path.parent, step, level)
        self._file = open(self._path, "a", encoding="utf-8")

    def flush(self) -> None:
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def truncate_after(workdir: str | os.PathLike, step: int, level: int = 0) -> None:
    """Drops records of `level` after `step`, and of later levels (written by a run killed
    after its last checkpoint). A resumed run repeats those steps, so keeping the old lines
    would duplicate them.
    """
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            record_level = record.get("level", 0)
            if record_level < level or (record_level == level and record["step"] <= step):
                kept.append(line)
        except (ValueError, KeyError):
            continue  # a line cut short by the kill
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    path = pathlib.Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
