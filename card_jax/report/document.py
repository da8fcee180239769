"""Writes a report folder from a `collect.Collection`: tables, figures, report.md, report.json.

Every file is written atomically (`files.py`); links in report.md are relative, so the folder
can be copied elsewhere and still renders.
"""

from __future__ import annotations

import datetime
import json
import math
import pathlib
from typing import Any

import card_jax
from card_jax.report import collect, files, series, tables

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
# Outputs that exist only when there is something to show; removed when a rerun has none, so a
# copied folder never mixes a fresh report.md with a stale figure from an older report.
OPTIONAL_OUTPUTS = ("decks.csv", "decks.md", "corruptions.csv", "corruptions.md",
                    "figure1_relative_accuracy.png", "figure2_heatmaps.png",
                    "figure2_heatmap_differences.png", "figure4_clean_vs_corruption.png")

CAPTIONS = {
    "figure1": "**Figure 1** (paper §2.2). Top-1 accuracy (top row) and mean accuracy over the "
               "15 x 5 corruption cells (bottom row) minus the mean of the dense baseline of the "
               "same dataset and model, in percentage points, against sparsity. Runs trained "
               "without augmentation only; error bars span the worst and best realization.",
    "figure2": "**Figure 2** (paper §2.3). Test error under a Fourier-basis perturbation of "
               "norm eps at each frequency (Yin et al.), mean over realizations; the centre of "
               "each map is the lowest frequency. Colour scale shared within each column.",
    "figure2_diff": "**Figure 2, differences.** Error of each run minus that of its dense "
                    "baseline (same dataset, model, eps and image size), in percentage points; "
                    "blue = fewer errors than dense.",
    "figure4": "**Figure 4** (paper §3.3). Clean vs corruption accuracy (means over "
               "realizations); circle area proportional to memory in MB (small models drawn at "
               "a minimum size). Squares: dense baselines, circles: single CARDs, diamonds / "
               "triangles: CARD-Decks, domain-agnostic / domain-adaptive.",
}


def _clean_json(value: Any) -> Any:
    """NaN/inf become null: report.json must stay strict JSON for other tools."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json(v) for v in value]
    if hasattr(value, "tolist"):
        return _clean_json(value.tolist())
    return value


def run_summary(run: collect.Run) -> dict[str, Any]:
    """report.json entry of a run: identity, per-metric summaries, per-corruption means."""
    heatmap = None
    if run.heatmap is not None:
        heatmap = {"eps": list(run.heatmap.eps), "shape": list(run.heatmap.errors.shape),
                   "mean_error": run.heatmap.mean.mean(axis=(1, 2)).tolist(),
                   "npy": run.heatmap.path}
    return {"label": run.label, "path": run.path, "dataset": run.dataset, "model": run.model,
            "model_kw": run.model_kw, "width": run.width, "method": run.method,
            "scope": run.scope, "sparsity": run.sparsity, "augment": run.augment,
            "binary": run.binary, "n": run.n,
            "metrics": {k: run.stat(k) for k in collect.RUN_METRICS if k in run.metrics},
            "per_corruption": run.per_corruption(), "heatmap": heatmap}


def deck_summary(deck: collect.Deck) -> dict[str, Any]:
    """report.json entry of a deck (corruption tables reduced to per-corruption means)."""
    modes = {}
    for mode, values in deck.modes.items():
        modes[mode] = {k: v for k, v in values.items() if "corruption_table" not in k
                       and "corruption_names" not in k}
        modes[mode]["per_corruption"] = deck.per_corruption(mode)
    alone = {k: collect.summarize([m[k] for m in deck.members_alone if k in m])
             for k in collect.DECK_MODE_METRICS
             if any(k in m for m in deck.members_alone)}
    return {"label": deck.label, "path": deck.path, "dataset": deck.dataset,
            "model": deck.model, "model_kw": deck.model_kw, "method": deck.method,
            "scope": deck.scope, "sparsity": deck.sparsity, "n_members": deck.n_members,
            **modes,
            "members_alone": alone, "memory_mb": deck.memory_mb,
            "packed_bytes": deck.packed_bytes, "inference_time_s": deck.inference_time_s,
            "adaptive_speedup": deck.speedup, "gate_histogram": deck.gate_histogram}


def write_report(found: collect.Collection, out: str | pathlib.Path, title: str,
                 command: str) -> dict[str, Any]:
    """Writes runs.csv/.md, corruptions.csv/.md, decks.csv/.md, the figures, report.md and
    report.json into `out` (created with its parents). Returns the report.json dict."""
    from card_jax.report import figures  # matplotlib is only needed once there is data

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes = list(found.notes)
    written: dict[str, str] = {}

    def save(name: str, text: str) -> None:
        files.write_text(out / name, text)
        written[name] = name

    sections = []
    runs_csv, runs_md, _ = tables.runs_table(found.runs)
    if found.runs:
        save("runs.csv", runs_csv)
        save("runs.md", runs_md)
        sections.append(("Runs", "Top-1 accuracy, mean accuracy over the 15 x 5 corruption "
                         "cells and expected calibration error in %, as mean ± sample std over "
                         "realizations (n). Memory per SPEC §9; packed = bytes of the "
                         "compressed export. Data: [runs.csv](runs.csv).", runs_md))
    corr_csv, corr_md, corr_records = tables.corruption_table(found.runs, found.decks)
    if corr_records:
        save("corruptions.csv", corr_csv)
        save("corruptions.md", corr_md)
        sections.append(("Accuracy per corruption", "Mean over the 5 severities and over "
                         "realizations, in %; extra corruptions (if evaluated) are listed but "
                         "not part of the mean. Data: [corruptions.csv](corruptions.csv).",
                         corr_md))
    if found.decks:
        decks_csv, decks_md, _ = tables.decks_table(found.decks)
        save("decks.csv", decks_csv)
        save("decks.md", decks_md)
        sections.append((
            "CARD-Decks", "Domain-agnostic = mean softmax of all cards; domain-adaptive = the "
            "spectral gate picks the AugMix or the Gaussian half per batch. Accuracies in %. "
            "Speed-up = agnostic / adaptive inference time (median seconds on the same clean "
            "batches; adaptive includes the gate). Gate choices: gating decisions per group "
            "(batches, or images with per-example gating) on clean and noise-corrupted data. "
            "Data: [decks.csv](decks.csv).", decks_md))

    figures_md = []
    panels, figure1_notes = series.figure1_series(found.runs)
    notes += figure1_notes
    augmented = sum(1 for r in found.runs if not r.is_dense and r.augment != "none")
    if augmented:
        notes.append(f"Figure 1 shows runs trained without augmentation only; {augmented} "
                     "augmented compressed run(s) are in the tables (and in Figure 4 where "
                     "they have corruption results).")
    if panels:
        written["figure1"] = figures.figure1(panels, out / figures.FIGURE1).name
        figures_md.append(("Figure 1: accuracy relative to dense", "figure1"))
    elif found.runs:
        notes.append("Figure 1 not drawn: no compressed run without augmentation has a dense "
                     "baseline.")
    heat_rows = series.heatmap_rows(found.runs)
    if heat_rows:
        written["figure2"] = figures.figure2(heat_rows, out / figures.FIGURE2).name
        figures_md.append(("Figure 2: Fourier heat maps", "figure2"))
        diffs = series.heatmap_differences(found.runs)
        compared = {d["run"].path for d in diffs}
        for run in heat_rows:
            if not run.is_baseline and run.path not in compared:
                notes.append(f"Figure 2 differences: no dense baseline heat map with the same "
                             f"eps and size for {run.label} ({run.path}).")
        if diffs:
            written["figure2_diff"] = figures.figure2_differences(
                diffs, out / figures.FIGURE2_DIFF).name
            figures_md.append(("Figure 2: heat maps minus dense", "figure2_diff"))
    points = series.figure4_points(found.runs, found.decks)
    missing = [r.label for r in found.runs if "corruption_acc" not in r.metrics]
    if missing:
        notes.append(f"Figure 4 leaves out {len(missing)} run(s) without corruption results: "
                     + ", ".join(missing) + ".")
    if points:
        written["figure4"] = figures.figure4(points, out / figures.FIGURE4).name
        figures_md.append(("Figure 4: clean vs corruption accuracy", "figure4"))

    for name in OPTIONAL_OUTPUTS:
        if name not in written.values():
            (out / name).unlink(missing_ok=True)
    for path, reason in found.skipped:
        notes.append(f"Skipped `{path}`: {reason}")

    created = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    summary = _clean_json({
        "title": title, "command": command, "created": created,
        "card_jax_version": card_jax.__version__, "searched": found.searched,
        "runs": [run_summary(r) for r in found.runs],
        "decks": [deck_summary(d) for d in found.decks],
        "figure1": panels,
        "figures": {k: v for k, v in written.items() if k.startswith("figure")},
        "tables": sorted(v for k, v in written.items() if not k.startswith("figure")),
        "skipped": [{"file": p, "reason": r} for p, r in found.skipped],
        "notes": notes,
    })
    files.write_text(out / REPORT_JSON, json.dumps(summary, indent=2, sort_keys=False) + "\n")
    files.write_text(out / REPORT_MD, _markdown(summary, sections, figures_md, written))
    return summary


def _markdown(summary: dict, sections: list[tuple[str, str, str]],
              figures_md: list[tuple[str, str]], written: dict[str, str]) -> str:
    searched = ", ".join(f"`{s}`" for s in summary["searched"])
    lines = [f"# {summary['title']}", "",
             f"Made by `{summary['command']}` on {summary['created']} "
             f"(card_jax {summary['card_jax_version']}).", "",
             f"Searched {searched}: {len(summary['runs'])} run(s), {len(summary['decks'])} "
             f"deck(s), {len(summary['skipped'])} results file(s) skipped. Machine-readable "
             "numbers: [report.json](report.json).", ""]
    for heading, intro, table in sections:
        lines += [f"## {heading}", "", intro, "", table]
    for heading, key in figures_md:
        lines += [f"## {heading}", "", f"![{heading}]({written[key]})", "", CAPTIONS[key], ""]
    if summary["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in summary["notes"]] + [""]
    return "\n".join(lines)
