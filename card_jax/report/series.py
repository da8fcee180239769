"""The numbers behind the report's figures, as plain data (numpy only, no plotting).

Kept apart from `figures.py` so tests and other tools can check exactly what is drawn:
  figure1_series       paper Figure 1: accuracy relative to the dense baseline vs sparsity
  heatmap_rows         paper Figure 2: which runs' Fourier heat maps are shown, in what order
  heatmap_differences  paper Figure 2 (bottom): run minus dense baseline, in percentage points
  figure4_points       paper Figure 4: clean vs corruption accuracy, sized by memory
All read `collect.Run` / `collect.Deck` objects and write nothing.
"""

from __future__ import annotations

import collections
from typing import Iterable

import numpy as np

from card_jax.report import collect

# Point kinds of Figure 4 (marker styles in figures.py).
DENSE, CARD, DECK_AGNOSTIC, DECK_ADAPTIVE = "dense", "card", "deck agnostic", "deck adaptive"


def _pooled(runs: Iterable[collect.Run], metric: str) -> list[float]:
    """All realizations of `metric` over `runs` (runs lacking it contribute nothing)."""
    return [v for r in runs for v in r.metrics.get(metric, [])]


def _relative(values: list[float], reference: float | None) -> dict | None:
    """Mean, min and max of `values - reference` in percentage points (None if unavailable)."""
    if not values or reference is None:
        return None
    x = 100.0 * (np.asarray(values, np.float64) - reference)
    return {"mean": float(x.mean()), "min": float(x.min()), "max": float(x.max()),
            "n": int(x.size)}


def figure1_series(runs: Iterable[collect.Run]) -> tuple[list[dict], list[str]]:
    """Per (dataset, model, kw) panel: each method's accuracy minus the dense mean, vs sparsity.

    Reproduces the data of the paper's Figure 1 (Section 2.2): only runs trained without
    augmentation; the reference is the mean over all realizations of the dense runs (augment
    "none") of the same dataset, model and model keywords. Runs sharing method, scope and
    sparsity are pooled. Values are in percentage points; "min"/"max" (the error bars) are the
    extreme realizations minus the same dense mean.

    Returns (panels, notes). Each panel:
      {"dataset", "model", "model_kw", "title",
       "baseline": {"paths", "clean_acc": summary, "corruption_acc": summary | None},
       "series": [{"method", "scope", "label", "sparsity": [s, ...],
                   "clean": [{"mean", "min", "max", "n"}, ...],
                   "corruption": [{...} | None, ...]}]}
    `notes` name every model left out for want of a dense baseline.
    """
    runs = list(runs)
    baselines = collections.defaultdict(list)
    compressed = collections.defaultdict(lambda: collections.defaultdict(
        lambda: collections.defaultdict(list)))
    for run in runs:
        if run.is_baseline:
            baselines[run.group].append(run)
        elif not run.is_dense and run.augment == "none":
            compressed[run.group][run.method, run.scope][run.sparsity].append(run)
    panels, notes = [], []
    for group in sorted(compressed):
        dataset, model, _ = group
        by_method = compressed[group]
        example = next(iter(next(iter(by_method.values())).values()))[0]
        title = f"{collect.model_label(model, example.model_kw)} on {dataset}"
        if group not in baselines:
            notes.append(f"Figure 1: no dense baseline (augment none) for {title}; its "
                         f"{sum(len(v) for v in by_method.values())} compressed configuration(s) "
                         "are not plotted.")
            continue
        base = baselines[group]
        clean_ref = collect.summarize(_pooled(base, "clean_acc"))
        corr_values = _pooled(base, "corruption_acc")
        corr_ref = collect.summarize(corr_values) if corr_values else None
        series = []
        for method, scope in sorted(by_method, key=lambda k: (
                collect.rank(collect.METHOD_ORDER, k[0]), k[1])):
            points = by_method[method, scope]
            sparsities = sorted(points)
            series.append({
                "method": method, "scope": scope,
                "label": collect.method_label(method, scope),
                "sparsity": sparsities,
                "clean": [_relative(_pooled(points[s], "clean_acc"), clean_ref["mean"])
                          for s in sparsities],
                "corruption": [_relative(_pooled(points[s], "corruption_acc"),
                                         corr_ref and corr_ref["mean"]) for s in sparsities],
            })
        panels.append({"dataset": dataset, "model": model, "model_kw": example.model_kw,
                       "title": title,
                       "baseline": {"paths": [r.path for r in base], "clean_acc": clean_ref,
                                    "corruption_acc": corr_ref},
                       "series": series})
    return panels, notes


def heatmap_rows(runs: Iterable[collect.Run]) -> list[collect.Run]:
    """Runs with heat maps, dense baselines first, then dense augmented runs, then the rest."""
    with_maps = [r for r in runs if r.heatmap is not None]
    return sorted(with_maps, key=lambda r: (not r.is_baseline, not r.is_dense, r.sort_key()))


def heatmap_differences(runs: Iterable[collect.Run]) -> list[dict]:
    """Heat map of each run minus its dense baseline's, in percentage points.

    The baseline is every dense, non-augmented run of the same dataset/model/kw whose heat maps
    have the same eps and image size (their realizations pooled). Runs without such a baseline
    are left out. Returns [{"run": Run, "baselines": [paths], "eps": tuple,
    "diff": [E, H, W] array}], in `heatmap_rows` order.
    """
    rows = heatmap_rows(runs)
    out = []
    for run in rows:
        if run.is_baseline:
            continue
        shape = run.heatmap.errors.shape[1:]
        base = [b for b in rows if b.is_baseline and b.group == run.group
                and b.heatmap.eps == run.heatmap.eps and b.heatmap.errors.shape[1:] == shape]
        if not base:
            continue
        base_mean = np.concatenate([b.heatmap.errors for b in base]).mean(axis=0)
        out.append({"run": run, "baselines": [b.path for b in base], "eps": run.heatmap.eps,
                    "diff": 100.0 * (run.heatmap.mean - base_mean)})
    return out


def figure4_points(runs: Iterable[collect.Run], decks: Iterable[collect.Deck]) -> list[dict]:
    """Clean vs corruption accuracy (%, means over realizations) and memory of every run and
    deck that has both accuracies (paper Figure 4). A deck gives two points (agnostic and
    adaptive) with the memory of the whole deck, since both keep every card stored.

    Returns [{"label", "dataset", "kind", "method", "clean", "corruption", "memory_mb"}]
    (decks also carry a short "annotation" for the plot).
    """
    points = []
    for run in runs:
        clean, corr = run.stat("clean_acc"), run.stat("corruption_acc")
        if clean is None or corr is None:
            continue
        memory = run.stat("memory_mb")
        points.append({"label": run.label, "dataset": run.dataset,
                       "kind": DENSE if run.is_dense else CARD, "method": run.method,
                       "clean": 100 * clean["mean"], "corruption": 100 * corr["mean"],
                       "memory_mb": memory and memory["mean"]})
    for deck in decks:
        for mode, kind in (("agnostic", DECK_AGNOSTIC), ("adaptive", DECK_ADAPTIVE)):
            m = deck.modes.get(mode, {})
            if "clean_acc" in m and "corruption_acc" in m:
                points.append({"label": f"{deck.label} {mode}", "dataset": deck.dataset,
                               "annotation": (f"{collect.method_label(deck.method)} "
                                              f"{100 * deck.sparsity:g}% {deck.n_members}-deck "
                                              f"{mode}"),
                               "kind": kind, "method": deck.method,
                               "clean": 100 * m["clean_acc"],
                               "corruption": 100 * m["corruption_acc"],
                               "memory_mb": deck.memory_mb})
    return points
