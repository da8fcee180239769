"""card_jax.report on literal fake run folders: aggregated numbers, tables, figures, CLI.

The fake results are tiny dicts with known numbers (2 realizations each): a dense baseline,
LRR and EP at 50 % and 90 % sparsity, one deck, heat maps for dense and LRR 90 %, plus a
corrupt results.json, one without the required keys and a per-level snapshot to be ignored.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

from card_jax.report import __main__ as cli
from card_jax.report import collect, series

REPO = pathlib.Path(__file__).resolve().parents[1]
NAMES = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
         "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
         "elastic_transform", "pixelate", "jpeg_compression"]
OFFSETS = [0.007 * (c - 7) for c in range(15)]  # mean 0: the table averages to corruption_acc


def _table(corruption_acc):
    """[R][15][5]: corruption c of realization r is corruption_acc[r] + OFFSETS[c]."""
    return [[[a + o] * 5 for o in OFFSETS] for a in corruption_acc]


def _write(folder: pathlib.Path, name: str, payload) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = payload if isinstance(payload, str) else json.dumps(payload)
    (folder / name).write_text(text)


def _run(root, name, method, sparsity, clean, corruption=None, memory=0.6, heat=None):
    folder = root / name
    config = {"model": {"name": "conv4", "kw": {"width": 0.25}},
              "method": {"name": method, "sparsity": sparsity, "scope": "global"},
              "data": {"name": "fashion_mnist", "augment": "none"},
              "train": {"realizations": 2}}
    results = {"clean_acc": clean, "ece_clean": [0.02, 0.04], "memory_mb": [memory] * 2,
               "packed_bytes": [500000, 500002], "sparsity_global": [sparsity] * 2,
               "num_params": [1000, 1000], "wall_time_s": [10.0, 10.0], "method": method,
               "binary": method == "ep", "levels": [],
               "dataset": {"name": "fashion_mnist", "num_classes": 10}}
    if corruption is not None:
        results.update(corruption_acc=corruption, corruption_table=_table(corruption),
                       corruption_names=NAMES, ece_corrupted=[0.05, 0.07])
    _write(folder, "config.json", config)
    _write(folder, "results.json", results)
    if heat is not None:  # error rate per realization, constant over the maps
        (folder / "heatmaps").mkdir()
        np.save(folder / "heatmaps" / "maps.npy",
                np.stack([np.full((3, 8, 8), h, np.float32) for h in heat]))
        _write(folder / "heatmaps", "heatmap.json",
               {"eps": [3.0, 4.0, 6.0], "examples": 100, "seed": 0, "npy": "maps.npy"})
    return folder


DECK = {
    "kind": "deck", "n_members": 2, "groups": ["augmix", "gaussian"],
    # As card_jax.deck.run writes it: names only; the width comes from a member's config.json
    # (workdirs as typed on the deck's command line, here relative to the deck's parent).
    "members": [{"workdir": "missing_run", "realization": 0, "group": "augmix",
                 "method": "lrr", "sparsity": 0.9},
                {"workdir": "lrr_90", "realization": 1, "group": "gaussian", "method": "lrr",
                 "sparsity": 0.9}],
    "model": "conv4", "dataset": "fashion_mnist",
    "method": "lrr", "sparsity": 0.9,
    "agnostic": {"clean_acc": 0.93, "ece_clean": 0.01, "corruption_acc": 0.80,
                 "corruption_table": _table([0.80])[0], "corruption_names": NAMES,
                 "extra_corruption_table": [[0.5] * 5, [0.6] * 5],
                 "extra_corruption_names": ["speckle_noise", "saturate"]},
    "adaptive": {"clean_acc": 0.935, "ece_clean": 0.015, "corruption_acc": 0.82,
                 "corruption_table": _table([0.82])[0], "corruption_names": NAMES,
                 "gate_histogram": {"clean": {"augmix": 8, "gaussian": 2},
                                    "gaussian_noise": {"augmix": 0, "gaussian": 10},
                                    "fog": {"augmix": 10, "gaussian": 0}}},
    "members_alone": [{"clean_acc": 0.90, "corruption_acc": 0.76},
                      {"clean_acc": 0.92, "corruption_acc": 0.78}],
    "memory_mb": 2.4, "packed_bytes": 400000,
    "inference_time_s": {"agnostic": 2.0, "adaptive": 1.0, "gate": 0.1, "images": 1000},
}


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    _run(root, "dense", "dense", 0.8, [0.90, 0.92], [0.70, 0.72], heat=[0.2, 0.4])
    lrr = _run(root, "lrr_50", "lrr", 0.5, [0.91, 0.93], [0.72, 0.74], memory=0.3)
    _run(root, "lrr_90", "lrr", 0.9, [0.88, 0.89], [0.73, 0.75], memory=0.06,
         heat=[0.1, 0.3])
    _run(root, "nested/ep_50", "ep", 0.5, [0.85, 0.87], [0.66, 0.70], memory=0.01)
    _run(root, "nested/ep_90", "ep", 0.9, [0.80, 0.84], memory=0.002)  # no corruption eval
    _write(root / "deck", "results.json", DECK)
    _write(root / "broken", "results.json", '{"clean_acc": [0.9,')  # cut short by a kill
    _write(root / "broken", "config.json", "{}")
    _write(root / "unfinished", "results.json", {"method": "lrr"})
    _write(root / "unfinished", "config.json", {"model": {"name": "conv4"}})
    # Per-level snapshots and checkpoints must never be taken for runs.
    _write(lrr / "levels" / "level_0", "results.json", "not json")
    _write(lrr / "checkpoints" / "step_1", "results.json", "not json")
    # A paper sweep's level-0 source (dense with the LTH recipe) is no dense baseline: were it
    # collected, the Dense row and Figure 1's reference (0.91) would change.
    _run(root, "level0/conv4-dense_openlth", "dense", 0.8, [0.50, 0.52], [0.30, 0.32])
    return root


@pytest.fixture(scope="module")
def report(runs_root, tmp_path_factory):
    """Runs the CLI in-process once; returns (out_dir, report.json dict, stdout, stderr)."""
    out = tmp_path_factory.mktemp("out") / "missing_parent" / "report"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main([f"--runs={runs_root}", f"--out={out}", "--title=Fake sweep"])
    assert rc == 0, stderr.getvalue()
    summary = json.loads((out / "report.json").read_text())
    return out, summary, stdout.getvalue(), stderr.getvalue()


def _by_label(items):
    return {item["label"]: item for item in items}


def test_summarize_sample_std():
    assert collect.summarize([0.90, 0.92]) == pytest.approx(
        {"mean": 0.91, "std": 0.0141421356, "n": 2, "min": 0.90, "max": 0.92})
    assert collect.summarize([0.5])["std"] == 0.0


def test_report_json_aggregates(report):
    out, summary, stdout, _ = report
    runs = _by_label(summary["runs"])
    assert sorted(runs) == sorted([
        "conv4 (width=0.25) Dense", "conv4 (width=0.25) LRR 50%", "conv4 (width=0.25) LRR 90%",
        "conv4 (width=0.25) EP 50%", "conv4 (width=0.25) EP 90%"])
    dense = runs["conv4 (width=0.25) Dense"]
    assert dense["sparsity"] == 0.0  # not the config's unused method.sparsity
    assert dense["metrics"]["clean_acc"] == pytest.approx(
        {"mean": 0.91, "std": 0.0141421356, "n": 2, "min": 0.90, "max": 0.92})
    assert dense["metrics"]["corruption_acc"]["mean"] == pytest.approx(0.71)
    assert dense["per_corruption"]["gaussian_noise"] == pytest.approx(0.71 - 0.049)
    assert dense["heatmap"]["mean_error"] == pytest.approx([0.3, 0.3, 0.3])
    assert "corruption_acc" not in runs["conv4 (width=0.25) EP 90%"]["metrics"]
    deck = summary["decks"][0]
    assert deck["label"] == "conv4 (width=0.25) LRR 90% 2-deck"
    assert deck["adaptive_speedup"] == pytest.approx(2.0)
    assert deck["adaptive"]["corruption_acc"] == pytest.approx(0.82)
    assert deck["members_alone"]["clean_acc"]["mean"] == pytest.approx(0.91)
    assert deck["agnostic"]["per_corruption"]["saturate"] == pytest.approx(0.6)
    assert deck["model_kw"] == {"width": 0.25} and deck["scope"] == "global"
    assert set(summary["figures"]) == {"figure1", "figure2", "figure2_diff", "figure4"}
    assert stdout.splitlines()[0] == str(out / "report.md")
    assert "5 run(s), 1 deck(s), 2 skipped" in stdout


def test_figure1_series_matches_hand_computed(runs_root):
    panels, notes = series.figure1_series(collect.collect([runs_root]).runs)
    assert notes == []
    (panel,) = panels
    assert panel["baseline"]["clean_acc"]["mean"] == pytest.approx(0.91)
    lines = {s["label"]: s for s in panel["series"]}
    assert list(lines) == ["LRR", "EP"]
    lrr, ep = lines["LRR"], lines["EP"]
    assert lrr["sparsity"] == [0.5, 0.9]
    # Clean: (run - 0.91) in pp; corruption: (run - 0.71) in pp; min/max per realization.
    expected = {"LRR": ([(1.0, 0.0, 2.0), (-2.5, -3.0, -2.0)],
                        [(2.0, 1.0, 3.0), (3.0, 2.0, 4.0)]),
                "EP": ([(-5.0, -6.0, -4.0), (-9.0, -11.0, -7.0)],
                       [(-3.0, -5.0, -1.0), None])}
    for line in (lrr, ep):
        clean, corrupt = expected[line["label"]]
        got = [(p["mean"], p["min"], p["max"]) for p in line["clean"]]
        np.testing.assert_allclose(got, clean, atol=1e-9)
        for point, want in zip(line["corruption"], corrupt):
            if want is None:
                assert point is None
            else:
                np.testing.assert_allclose((point["mean"], point["min"], point["max"]), want,
                                           atol=1e-9)


def test_figure1_without_baseline_is_a_note(runs_root):
    runs = [r for r in collect.collect([runs_root]).runs if not r.is_dense]
    panels, notes = series.figure1_series(runs)
    assert panels == [] and "no dense baseline" in notes[0] and "conv4" in notes[0]


def test_heatmap_difference_to_dense(runs_root):
    diffs = series.heatmap_differences(collect.collect([runs_root]).runs)
    (diff,) = diffs
    assert diff["run"].label == "conv4 (width=0.25) LRR 90%"
    np.testing.assert_allclose(diff["diff"], -10.0, atol=1e-5)  # 0.2 - 0.3 in pp


def test_csv_and_markdown_tables(report):
    out, *_ = report
    with open(out / "runs.csv", newline="") as f:
        rows = {(r["method"], r["sparsity"]): r for r in csv.DictReader(f)}
    assert float(rows["dense", "0"]["clean_acc_mean"]) == pytest.approx(0.91)
    assert float(rows["dense", "0"]["clean_acc_std"]) == pytest.approx(0.0141421356)
    assert float(rows["lrr", "0.9"]["corruption_acc_mean"]) == pytest.approx(0.74)
    assert rows["ep", "0.9"]["corruption_acc_mean"] == ""
    assert rows["lrr", "0.5"]["n"] == "2" and rows["lrr", "0.5"]["width"] == "0.25"
    md = (out / "runs.md").read_text()
    assert ("| fashion_mnist | conv4 (width=0.25) | Dense | — | none | 91.00 ± 1.41 (n=2) "
            "| 71.00 ± 1.41 (n=2) |") in md
    assert "| LRR | 90% | none | 88.50 ± 0.71 (n=2) | 74.00 ± 1.41 (n=2) |" in md
    corruptions = (out / "corruptions.md").read_text()
    assert "gaussian_noise" in corruptions.splitlines()[0]
    assert "| conv4 (width=0.25) Dense | fashion_mnist | 2 | 66.1 |" in corruptions
    assert "| conv4 (width=0.25) LRR 90% 2-deck adaptive | fashion_mnist | 1 | 77.1 |" \
        in corruptions
    decks = (out / "decks.md").read_text()
    assert "| 93.00 | 93.50 | 80.00 | 82.00 | 91.00 / 77.00 |" in decks
    assert "2.00x" in decks
    assert "clean: augmix 8, gaussian 2; gaussian_noise: augmix 0, gaussian 10" in decks
    assert "fog" not in decks  # only clean and noise corruptions are shown
    with open(out / "decks.csv", newline="") as f:
        (deck,) = list(csv.DictReader(f))
    assert float(deck["adaptive_speedup"]) == 2.0 and deck["gate_gaussian_noise_gaussian"] == "10"


def test_report_markdown_and_figures(report):
    out, summary, *_ = report
    text = (out / "report.md").read_text()
    assert text.startswith("# Fake sweep\n")
    assert "python -m card_jax.report --runs=" in text
    for name in ("figure1_relative_accuracy.png", "figure2_heatmaps.png",
                 "figure2_heatmap_differences.png", "figure4_clean_vs_corruption.png"):
        assert f"]({name})" in text  # relative link
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 400 and height >= 300
    assert "91.00 ± 1.41 (n=2)" in text
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_corrupt_and_incomplete_results_are_skipped(report, runs_root):
    out, summary, _, stderr = report
    skipped = {pathlib.Path(s["file"]).parent.name: s["reason"] for s in summary["skipped"]}
    assert set(skipped) == {"broken", "unfinished"}
    assert "clean_acc" in skipped["unfinished"]
    assert f"warning: skipping {runs_root / 'broken' / 'results.json'}" in stderr
    assert "levels" not in stderr and "checkpoints" not in stderr
    assert "broken/results.json" in (out / "report.md").read_text()


def test_nothing_usable_exits_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    _write(empty / "bad", "results.json", "{")
    assert cli.main(["--runs", f"{empty},{tmp_path / 'absent'}", "--out",
                     str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "error: no usable results.json under" in err and str(empty) in err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--out", str(tmp_path / "r")])  # --runs missing
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line, no usage block


def test_cli_subprocess_never_imports_jax(runs_root, tmp_path):
    out = tmp_path / "report"
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['card_jax.report', '--runs', {str(runs_root)!r}, '--out', {str(out)!r}]\n"
        "try:\n"
        "    runpy.run_module('card_jax.report', run_name='__main__', alter_sys=True)\n"
        "    rc = 0\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "heavy = sorted(m for m in sys.modules\n"
        "               if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax', 'orbax'))\n"
        "print('HEAVY', heavy)\n"
        "sys.exit(rc if rc else (3 if heavy else 0))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "HEAVY []" in proc.stdout
    assert (out / "report.md").exists() and (out / "report.json").exists()


def test_rerun_removes_stale_outputs(runs_root, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["--runs", str(runs_root), "--out", str(out)]) == 0
    assert (out / "decks.md").exists()
    # Space-separated --runs; no deck and no second heat map this time.
    assert cli.main(["--runs", str(runs_root / "dense"), str(runs_root / "nested" / "ep_90"),
                     "--out", str(out)]) == 0
    capsys.readouterr()
    assert len(json.loads((out / "report.json").read_text())["runs"]) == 2
    assert not (out / "decks.md").exists()
    assert not (out / "figure2_heatmap_differences.png").exists()
    assert (out / "figure2_heatmaps.png").exists()
    assert (out / "figure1_relative_accuracy.png").exists()
