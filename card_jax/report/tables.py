"""CSV and markdown tables of the collected runs and decks (numpy only).

  runs_table        one row per run: mean ± std (n) of accuracy, corruption accuracy, ECE,
                    memory, packed size, wall time (the numbers behind Figure 1 / Section 3.3)
  corruption_table  mean accuracy per corruption over severities (SPEC §12(b) comparison)
  decks_table       CARD-Decks: agnostic vs adaptive accuracy, memory, timing, gate choices
Each returns (csv_text, markdown_text, records): `records` are the CSV rows as dicts. Nothing
is written here; `document.py` writes the files.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Iterable, Sequence

from card_jax.report import collect

# (results.json key, markdown header, scale, format) of the aggregated per-run columns.
RUN_COLUMNS = (
    ("clean_acc", "clean acc (%)", 100.0, ".2f"),
    ("corruption_acc", "corruption acc (%)", 100.0, ".2f"),
    ("ece_clean", "ECE clean (%)", 100.0, ".2f"),
    ("ece_corrupted", "ECE corrupted (%)", 100.0, ".2f"),
    ("memory_mb", "memory (MB)", 1.0, ".4g"),
    ("packed_bytes", "packed (kB)", 1e-3, ".4g"),
    ("wall_time_s", "wall time (s)", 1.0, ".4g"),
)
STAT_FIELDS = ("mean", "std", "min", "max")
EMPTY = "—"


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.10g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def csv_text(columns: Sequence[str], records: Iterable[dict]) -> str:
    """CSV with a header row; missing values are empty cells, floats keep 10 digits."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for record in records:
        writer.writerow([_csv_value(record.get(c)) for c in columns])
    return out.getvalue()


def _md_cell(value: Any) -> str:
    # A '|' inside a cell would split it; newlines would end the row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                   right: Iterable[int] = ()) -> str:
    """GitHub markdown table; the columns whose indices are in `right` are right-aligned."""
    right = set(right)
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
             "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_stat(stat: dict | None, scale: float = 1.0, spec: str = ".2f",
                with_n: bool = True) -> str:
    """'91.00 ± 1.41 (n=2)' from a `collect.summarize` dict (scaled), or '—' if missing."""
    if stat is None:
        return EMPTY
    text = f"{scale * stat['mean']:{spec}} ± {scale * stat['std']:{spec}}"
    return f"{text} (n={stat['n']})" if with_n else text


def _number(value: float | None, scale: float = 1.0, spec: str = ".2f") -> str:
    return EMPTY if value is None else f"{scale * value:{spec}}"


def _sparsity_text(sparsity: float) -> str:
    return f"{100 * sparsity:g}%"


RUN_ID_COLUMNS = ("dataset", "model", "width", "model_kw", "method", "scope", "sparsity",
                  "augment", "binary", "n")
RUN_CSV_COLUMNS = (RUN_ID_COLUMNS
                   + tuple(f"{key}_{f}" for key, *_ in RUN_COLUMNS for f in STAT_FIELDS)
                   + ("sparsity_global_mean", "num_params_mean", "label", "path"))


def run_record(run: collect.Run) -> dict[str, Any]:
    """One CSV row (flat dict) of a run; aggregated metrics as `<key>_<mean|std|min|max>`."""
    record = {"dataset": run.dataset, "model": run.model, "width": run.width,
              "model_kw": run.model_kw or None, "method": run.method, "scope": run.scope,
              "sparsity": run.sparsity, "augment": run.augment, "binary": run.binary,
              "n": run.n, "label": run.label, "path": run.path}
    for key in [c[0] for c in RUN_COLUMNS] + ["sparsity_global", "num_params"]:
        stat = run.stat(key)
        for field in STAT_FIELDS:
            record[f"{key}_{field}"] = None if stat is None else stat[field]
    return record


def runs_table(runs: Sequence[collect.Run]) -> tuple[str, str, list[dict]]:
    """runs.csv / runs.md: one row per run, cells 'mean ± std (n=R)'."""
    records = [run_record(r) for r in runs]
    headers = ["dataset", "model", "method", "sparsity", "augment"] + [
        h for _, h, _, _ in RUN_COLUMNS] + ["path"]
    rows = [[r.dataset, collect.model_label(r.model, r.model_kw),
             collect.method_label(r.method, r.scope),
             EMPTY if r.is_dense else _sparsity_text(r.sparsity), r.augment]
            + [format_stat(r.stat(key), scale, spec) for key, _, scale, spec in RUN_COLUMNS]
            + [r.path] for r in runs]
    numeric = range(5, len(headers) - 1)
    return csv_text(RUN_CSV_COLUMNS, records), markdown_table(headers, rows, numeric), records


def _corruption_names(tables: Iterable[dict[str, float]]) -> list[str]:
    names: list[str] = []
    for table in tables:
        names += [n for n in table if n not in names]
    return names


def corruption_table(runs: Sequence[collect.Run], decks: Sequence[collect.Deck] = ()
                     ) -> tuple[str, str, list[dict]]:
    """corruptions.csv / .md: accuracy per corruption, averaged over severities and
    realizations, for every run (and deck mode) that has a corruption table. The "mean" column
    is over the 15 benchmark corruptions only (= corruption_acc), extras excluded."""
    entries = []  # (label, dataset, n, per-corruption dict, benchmark names, path)
    for run in runs:
        if run.corruption_table is not None:
            entries.append((run.label, run.dataset, run.n, run.per_corruption(),
                            run.corruption_names, run.path))
    for deck in decks:
        for mode in ("agnostic", "adaptive"):
            per = deck.per_corruption(mode)
            if per:
                entries.append((f"{deck.label} {mode}", deck.dataset, 1, per,
                                deck.modes[mode]["corruption_names"], deck.path))
    names = _corruption_names(e[3] for e in entries)
    records = []
    for label, dataset, n, per, benchmark, path in entries:
        record = {"label": label, "dataset": dataset, "n": n, "path": path}
        record.update({name: per.get(name) for name in names})
        record["mean"] = sum(per[b] for b in benchmark) / len(benchmark)
        records.append(record)
    columns = ["label", "dataset", "n"] + names + ["mean", "path"]
    rows = [[r["label"], r["dataset"], r["n"]]
            + [_number(r[name], 100.0, ".1f") for name in names] + [_number(r["mean"], 100.0)]
            + [r["path"]] for r in records]
    markdown = markdown_table(["run", "dataset", "n"] + names + ["mean (15)", "path"], rows,
                              range(2, len(names) + 4))
    return csv_text(columns, records), markdown, records


def _gate_keys(decks: Sequence[collect.Deck]) -> list[str]:
    """Histogram rows shown: clean and the noise corruptions, where the gate matters most."""
    keys: list[str] = []
    for deck in decks:
        keys += [k for k in deck.gate_histogram if k not in keys
                 and (k == "clean" or "noise" in k)]
    return sorted(keys, key=lambda k: k != "clean")


def _gate_text(histogram: dict[str, dict[str, float]], keys: Sequence[str]) -> str:
    parts = []
    for key in keys:
        if key in histogram:
            counts = ", ".join(f"{g} {c:g}" for g, c in sorted(histogram[key].items()))
            parts.append(f"{key}: {counts}")
    return "; ".join(parts) or EMPTY


def deck_record(deck: collect.Deck, gate_keys: Sequence[str] = ()) -> dict[str, Any]:
    """One CSV row of a deck; gate counts as `gate_<corruption>_<group>`."""
    record = {"dataset": deck.dataset, "model": deck.model, "model_kw": deck.model_kw or None,
              "method": deck.method, "scope": deck.scope, "sparsity": deck.sparsity,
              "n_members": deck.n_members,
              "label": deck.label, "path": deck.path, "memory_mb": deck.memory_mb,
              "packed_bytes": deck.packed_bytes, "adaptive_speedup": deck.speedup}
    for mode in ("agnostic", "adaptive"):
        for key in collect.DECK_MODE_METRICS:
            record[f"{mode}_{key}"] = deck.modes.get(mode, {}).get(key)
    for key in ("clean_acc", "corruption_acc"):
        values = [m[key] for m in deck.members_alone if key in m]
        record[f"members_alone_{key}_mean"] = sum(values) / len(values) if values else None
    for key in ("agnostic", "adaptive", "gate"):
        record[f"time_{key}"] = deck.inference_time_s.get(key)
    record["timed_images"] = deck.inference_time_s.get("images")
    for key in gate_keys:
        for group, count in deck.gate_histogram.get(key, {}).items():
            record[f"gate_{key}_{group}"] = count
    return record


def decks_table(decks: Sequence[collect.Deck]) -> tuple[str, str, list[dict]]:
    """decks.csv / decks.md: agnostic vs adaptive accuracy, memory, packed size, inference
    time, adaptive speed-up and the gate histogram on clean and noise inputs (Section 3.3)."""
    gate_keys = _gate_keys(decks)
    records = [deck_record(d, gate_keys) for d in decks]
    gate_columns: list[str] = []
    for record in records:
        gate_columns += [k for k in record if k.startswith("gate_") and k not in gate_columns]
    columns = ["dataset", "model", "model_kw", "method", "scope", "sparsity", "n_members"] + [
        f"{mode}_{key}" for mode in ("agnostic", "adaptive")
        for key in collect.DECK_MODE_METRICS] + [
        "members_alone_clean_acc_mean", "members_alone_corruption_acc_mean", "memory_mb",
        "packed_bytes", "time_agnostic", "time_adaptive", "time_gate", "timed_images",
        "adaptive_speedup"] + gate_columns + ["label", "path"]
    headers = ["deck", "dataset", "clean agnostic (%)", "clean adaptive (%)",
               "corruption agnostic (%)", "corruption adaptive (%)",
               "cards alone: clean / corruption (%)", "memory (MB)", "packed (kB)",
               "time agnostic (s)", "time adaptive (s)", "adaptive speed-up",
               "gate choices (clean, noise)"]
    rows = []
    for deck, r in zip(decks, records):
        alone = (f"{_number(r['members_alone_clean_acc_mean'], 100.0)} / "
                 f"{_number(r['members_alone_corruption_acc_mean'], 100.0)}"
                 if deck.members_alone else EMPTY)
        rows.append([deck.label, deck.dataset, _number(r["agnostic_clean_acc"], 100.0),
                     _number(r["adaptive_clean_acc"], 100.0),
                     _number(r["agnostic_corruption_acc"], 100.0),
                     _number(r["adaptive_corruption_acc"], 100.0), alone,
                     _number(deck.memory_mb, 1.0, ".4g"),
                     _number(deck.packed_bytes, 1e-3, ".4g"),
                     _number(r["time_agnostic"], 1.0, ".3g"),
                     _number(r["time_adaptive"], 1.0, ".3g"),
                     EMPTY if deck.speedup is None else f"{deck.speedup:.2f}x",
                     _gate_text(deck.gate_histogram, gate_keys)])
    markdown = markdown_table(headers, rows, range(2, len(headers) - 1))
    return csv_text(columns, records), markdown, records
