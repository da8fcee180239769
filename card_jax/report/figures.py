"""The report's PNG figures (matplotlib Agg canvas, no pyplot, so no GUI backend or global
figure state is ever touched). Each function takes the data computed by `series.py`, writes
one PNG atomically and returns its path.

  figure1   paper Figure 1: accuracy / corruption accuracy relative to dense vs sparsity
  figure2   paper Figure 2: Fourier error heat maps (and their differences to dense)
  figure4   paper Figure 4: clean vs corruption accuracy, circle area = memory
"""

from __future__ import annotations

import math
import pathlib
import textwrap
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from card_jax.report import collect, files, series

METHOD_COLORS = {"dense": "0.35", "ft": "C0", "gmp": "C1", "lth": "C2", "lrr": "C3",
                 "ep": "C4", "bp": "C5"}
METHOD_MARKERS = {"dense": "o", "ft": "o", "gmp": "s", "lth": "^", "lrr": "v", "ep": "D",
                  "bp": "P"}
KIND_MARKERS = {series.DENSE: "s", series.CARD: "o", series.DECK_AGNOSTIC: "D",
                series.DECK_ADAPTIVE: "^"}
KIND_LABELS = {series.DENSE: "dense baseline", series.CARD: "single CARD",
               series.DECK_AGNOSTIC: "deck, agnostic", series.DECK_ADAPTIVE: "deck, adaptive"}
DODGE = 0.35  # sparsity points (%) between methods drawn at the same sparsity
FIGURE1 = "figure1_relative_accuracy.png"
FIGURE2 = "figure2_heatmaps.png"
FIGURE2_DIFF = "figure2_heatmap_differences.png"
FIGURE4 = "figure4_clean_vs_corruption.png"
MAX_AREA = 900.0  # points^2 of the largest memory in Figure 4
MIN_AREA = 12.0   # so that a kB-sized binary CARD stays visible next to a 100 MB dense model


def _color(method: str) -> str:
    # Methods outside the paper's list (future additions) still get a stable colour.
    return METHOD_COLORS.get(method, f"C{6 + sum(map(ord, method)) % 4}")


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure1(panels: Sequence[dict], path: pathlib.Path) -> pathlib.Path:
    """Paper Figure 1 from `series.figure1_series` panels: one column per model, top row
    clean accuracy, bottom row corruption accuracy, both minus the dense mean (pp), one line
    per method with min/max error bars and a zero line."""
    fig = _new_figure(max(4.2 * len(panels) + 0.6, 8.0), 7.6)
    axes = fig.subplots(2, len(panels), squeeze=False, sharex="col")
    handles = {}
    for col, panel in enumerate(panels):
        for row, key in enumerate(("clean", "corruption")):
            ax = axes[row, col]
            ax.axhline(0.0, color="black", linewidth=0.8)
            drawn = False
            count = len(panel["series"])
            ticks = sorted({100 * sp for s in panel["series"] for sp in s["sparsity"]})
            gap = min((b - a for a, b in zip(ticks, ticks[1:])), default=5.0)
            step = min(DODGE, 0.5 * gap / count)
            for i, s in enumerate(panel["series"]):
                # Methods share sparsities: shift each line a little so error bars stay
                # readable (the plotted data, series.figure1_series, is unshifted).
                shift = step * (i - (count - 1) / 2)
                points = [(100 * sp + shift, v) for sp, v in zip(s["sparsity"], s[key])
                          if v is not None]
                if not points:
                    continue
                x = [p[0] for p in points]
                y = np.array([p[1]["mean"] for p in points])
                err = np.array([[p[1]["mean"] - p[1]["min"] for p in points],
                                [p[1]["max"] - p[1]["mean"] for p in points]])
                layerwise = s["scope"] == "layerwise"
                line = ax.errorbar(
                    x, y, yerr=err, color=_color(s["method"]),
                    marker=METHOD_MARKERS.get(s["method"], "o"),
                    fillstyle="none" if layerwise else "full",
                    linestyle="--" if layerwise else "-", capsize=3, linewidth=1.4)
                handles.setdefault(s["label"], line)
                drawn = True
            if row == 0:
                base = panel["baseline"]
                text = f"dense {100 * base['clean_acc']['mean']:.2f}%"
                if base["corruption_acc"]:
                    text += f", corrupted {100 * base['corruption_acc']['mean']:.2f}%"
                ax.set_title(f"{panel['title']}\n{text}", fontsize=9)
            if not drawn:
                ax.text(0.5, 0.5, "no corruption results" if key == "corruption" else "no data",
                        transform=ax.transAxes, ha="center", va="center", color="0.4")
            ax.grid(alpha=0.3)
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            if row == 1:
                ax.set_xlabel("sparsity (%)")
            if col == 0:
                ax.set_ylabel("accuracy − dense (pp)" if key == "clean"
                              else "corruption accuracy − dense (pp)")
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncols=min(len(handles), 2 * max(len(panels), 2)), fontsize=8)
    fig.suptitle("Accuracy relative to the dense baseline\n(error bars: min/max realization; "
                 "methods offset slightly along x)", fontsize=10)
    return files.save_figure(fig, path)


def _extent(h: int, w: int) -> tuple[float, float, float, float]:
    # Centred spectrum: index p holds frequency p - size // 2, so the middle reads 0.
    return (-(w // 2) - 0.5, w - w // 2 - 0.5, h - h // 2 - 0.5, -(h // 2) - 0.5)


def _heatmap_grid(rows: Sequence[tuple[str, tuple, np.ndarray]], path: pathlib.Path,
                  cmap: str, symmetric: bool, colorbar_label: str,
                  title: str) -> pathlib.Path:
    """Grid of maps: rows (label, eps, [E, H, W] values), one column per distinct eps,
    colour scale shared down each column (symmetric about 0 if `symmetric`)."""
    eps_all = sorted({e for _, eps, _ in rows for e in eps})
    fig = _new_figure(2.5 * len(eps_all) + 1.8, 2.5 * len(rows) + 1.2)
    axes = fig.subplots(len(rows), len(eps_all), squeeze=False)
    for c, e in enumerate(eps_all):
        cells = [(r, maps[eps.index(e)]) for r, (_, eps, maps) in enumerate(rows) if e in eps]
        finite = [np.abs(m[np.isfinite(m)]) for _, m in cells]
        top = max([float(f.max()) for f in finite if f.size] + [1e-6])
        vmin, vmax = (-top, top) if symmetric else (0.0, top)
        image = None
        for r in range(len(rows)):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(textwrap.fill(rows[r][0], 26), fontsize=7)
            if r == 0:
                ax.set_title(f"eps = {e:g}")
        for r, values in cells:
            image = axes[r, c].imshow(values, cmap=cmap, vmin=vmin, vmax=vmax,
                                      extent=_extent(*values.shape), interpolation="nearest")
        for r in set(range(len(rows))) - {r for r, _ in cells}:
            axes[r, c].text(0.5, 0.5, "n/a", ha="center", va="center",
                            transform=axes[r, c].transAxes, color="0.4")
        if image is not None:
            fig.colorbar(image, ax=list(axes[:, c]), location="bottom", shrink=0.85,
                         label=colorbar_label)
    fig.suptitle(title, fontsize=10)
    return files.save_figure(fig, path)


def figure2(runs: Sequence[collect.Run], path: pathlib.Path) -> pathlib.Path:
    """Paper Figure 2: mean error (%) under Fourier perturbations of every run with heat maps
    (`series.heatmap_rows` order), one column per eps; centre = lowest frequency."""
    rows = [(r.label, r.heatmap.eps, 100.0 * r.heatmap.mean) for r in runs]
    return _heatmap_grid(rows, path, "viridis", False, "error (%)",
                         "Fourier heat maps: test error under perturbation, mean of realizations")


def figure2_differences(diffs: Sequence[dict], path: pathlib.Path) -> pathlib.Path:
    """Paper Figure 2 (differences): run minus dense baseline error (pp), from
    `series.heatmap_differences`; blue = fewer errors than dense."""
    rows = [(f"{d['run'].label} vs dense", d["eps"], d["diff"]) for d in diffs]
    return _heatmap_grid(rows, path, "RdBu_r", True, "error − dense error (pp)",
                         "Fourier heat maps relative to the dense baseline (blue = more robust)")


def _area(memory: float | None, largest: float) -> float:
    if memory is None or not largest or math.isnan(memory):
        return MIN_AREA
    return max(MIN_AREA, MAX_AREA * memory / largest)


def _nice(value: float) -> float:
    """`value` rounded to one significant digit (legend sizes)."""
    exponent = math.floor(math.log10(value))
    return round(value / 10 ** exponent) * 10 ** exponent


def figure4(points: Sequence[dict], path: pathlib.Path) -> pathlib.Path:
    """Paper Figure 4 from `series.figure4_points`: one panel per dataset, clean accuracy (x)
    vs corruption accuracy (y), circle area proportional to memory (MB, with a floor so tiny
    models stay visible), colour = method, marker = dense / CARD / deck mode; decks labelled."""
    datasets = sorted({p["dataset"] for p in points})
    memories = [p["memory_mb"] for p in points if p["memory_mb"] is not None
                and not math.isnan(p["memory_mb"])]
    largest = max(memories) if memories else 0.0
    fig = _new_figure(5.6 * len(datasets) + 2.4, 5.2)
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets):
        mine = [p for p in points if p["dataset"] == dataset]
        middle = (min(p["clean"] for p in mine) + max(p["clean"] for p in mine)) / 2
        for p in mine:
            ax.scatter([p["clean"]], [p["corruption"]], s=_area(p["memory_mb"], largest),
                       color=_color(p["method"]), marker=KIND_MARKERS[p["kind"]], alpha=0.6,
                       edgecolors="black", linewidths=0.6)
            if "annotation" in p:
                # Text points inwards, so it stays inside the axes instead of shrinking them.
                right = p["clean"] > middle
                ax.annotate(p["annotation"], (p["clean"], p["corruption"]),
                            xytext=(-8 if right else 8, 6), textcoords="offset points",
                            ha="right" if right else "left", fontsize=7)
        ax.set_title(dataset)
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel("corruption accuracy (%)")
        ax.grid(alpha=0.3)
        ax.margins(0.12)
    handles = [Line2D([], [], linestyle="", marker="o", markersize=8, color=_color(m),
                      label=collect.method_label(m)) for m in sorted(
        {p["method"] for p in points}, key=lambda m: collect.rank(collect.METHOD_ORDER, m))]
    handles += [Line2D([], [], linestyle="", marker=KIND_MARKERS[k], markersize=8,
                       markerfacecolor="white", markeredgecolor="black", label=KIND_LABELS[k])
                for k in KIND_MARKERS if any(p["kind"] == k for p in points)]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    if largest:
        sizes = [Line2D([], [], linestyle="", marker="o", markerfacecolor="none",
                        markeredgecolor="0.3", markersize=math.sqrt(_area(size, largest)),
                        label=f"{size:g} MB")
                 for size in sorted({_nice(largest * f) for f in (1.0, 0.1, 0.01)},
                                    reverse=True)]
        # Big circles need room: wide spacing keeps them from covering each other's labels.
        fig.legend(handles=sizes, loc="outside right lower", fontsize=8, labelspacing=2.4,
                   borderpad=1.4, handletextpad=1.6, title="memory")
    fig.suptitle("Clean vs corruption accuracy (area = memory)")
    return files.save_figure(fig, path)
