"""metrics.jsonl records and truncation on resume."""

from __future__ import annotations

import json

from card_jax import writer


def test_records_and_truncate(tmp_path):
    w = writer.MetricWriter(tmp_path, tensorboard=False)
    w.write_scalars(1, {"loss": [0.5, 0.25]})
    w.write_scalars(2, {"loss": [float("nan"), 0.2]})
    w.write_scalars(3, {"accuracy": 0.75}, split="test")
    w.close()
    records = writer.read_metrics(tmp_path)
    assert records[0] == {"step": 1, "level": 0, "split": "train", "name": "loss",
                          "value": [0.5, 0.25]}
    assert records[1]["value"] == ["nan", 0.2]  # JSON has no NaN: kept as a string
    with open(tmp_path / writer.METRICS_FILE, "a") as f:
        f.write('{"step": 4, "name": "lo')  # a line cut short by a kill
    writer.truncate_after(tmp_path, 2)
    assert [r["step"] for r in writer.read_metrics(tmp_path)] == [1, 2]


def test_tensorboard_event_file(tmp_path):
    w = writer.MetricWriter(tmp_path, tensorboard=True)
    w.write_scalars(1, {"loss": [0.5, 0.25]})
    w.close()
    files = list((tmp_path / "tensorboard").iterdir())
    assert files and files[0].name.startswith("events.out.tfevents")
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
