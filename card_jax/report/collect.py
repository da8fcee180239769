"""Finds finished card_jax runs and CARD-Decks under folders and parses them (numpy only).

Reads, for every folder holding a `results.json` (outside `levels/`, `checkpoints/`,
`heatmaps/`, `report/`, `tensorboard/`):
  * a training run: `results.json` (per-realization lists written by `card_jax.run`),
    `config.json` (the resolved config) and, if present, `heatmaps/heatmap.json` plus the
    `.npy` it names (`card_jax.heatmaps`, `[R, E, H, W]` error rates);
  * a deck: `results.json` with `"kind": "deck"` (one float per metric, per deck mode).
Writes nothing; prints one warning line on stderr per file it has to skip.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
from typing import Any, Iterable, Iterator

import numpy as np

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
HEATMAP_META = pathlib.Path("heatmaps") / "heatmap.json"  # card_jax.heatmaps.META_FILE
# Inside these a results.json is a per-level snapshot or an artefact, never a run of its own.
# Folders never searched for runs. `level0` holds a paper sweep's level-0 sources
# (launch/grids.py LEVEL0_FOLDER): dense runs with the LTH recipe, not the dense baseline.
SKIP_DIRS = frozenset({"levels", "checkpoints", "heatmaps", "report", "tensorboard", "level0"})
METHOD_ORDER = ("dense", "ft", "gmp", "lth", "lrr", "ep", "bp")
AUGMENT_ORDER = ("none", "augmix", "gaussian")
# Per-realization lists of results.json that the report aggregates (mean ± std, min, max).
RUN_METRICS = ("clean_acc", "corruption_acc", "ece_clean", "ece_corrupted", "memory_mb",
               "packed_bytes", "wall_time_s", "sparsity_global", "num_params")
DECK_MODE_METRICS = ("clean_acc", "corruption_acc", "ece_clean", "ece_corrupted")


class BadResults(ValueError):
    """A results folder that cannot be reported; the message says why."""


def summarize(values: Iterable[float]) -> dict[str, float | int]:
    """Mean, sample std (ddof=1; 0 for a single value), n, min and max of `values`."""
    x = np.asarray(list(values), dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("summarize() needs at least one value")
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
            "n": int(x.size), "min": float(x.min()), "max": float(x.max())}


def model_label(model: str, kw: dict) -> str:
    """'conv4 (width=0.25)'; just the name without keyword arguments."""
    if not kw:
        return model
    args = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in sorted(kw.items()))
    return f"{model} ({args})"


def method_label(method: str, scope: str = "global") -> str:
    """'Dense', 'LRR', 'EP (layerwise)' — the paper's names; global scope is the default."""
    if method == "dense":
        return "Dense"
    return method.upper() + (" (layerwise)" if scope == "layerwise" else "")


@dataclasses.dataclass
class Heatmap:
    """Fourier error heat maps of one run: `errors` `[R, E, H, W]` in [0, 1], centred spectrum."""
    eps: tuple[float, ...]
    errors: np.ndarray
    path: str

    @property
    def mean(self) -> np.ndarray:
        """`[E, H, W]` error rate averaged over realizations."""
        return self.errors.mean(axis=0)


@dataclasses.dataclass
class Run:
    """One training run (one CARD config, R realizations); lists are per realization."""
    path: str
    dataset: str
    model: str
    model_kw: dict
    method: str
    scope: str
    sparsity: float  # the configured target (0 for dense); measured values are in metrics
    augment: str
    binary: bool
    metrics: dict[str, list[float]]
    corruption_names: list[str] = dataclasses.field(default_factory=list)
    corruption_table: np.ndarray | None = None  # [R, corruptions, severities]
    extra_names: list[str] = dataclasses.field(default_factory=list)
    extra_table: np.ndarray | None = None
    heatmap: Heatmap | None = None

    @property
    def n(self) -> int:
        return len(self.metrics["clean_acc"])

    @property
    def width(self):
        return self.model_kw.get("width")

    @property
    def group(self) -> tuple[str, str, str]:
        """(dataset, model, kw) — runs sharing it are compared with the same dense baseline."""
        return (self.dataset, self.model, json.dumps(self.model_kw, sort_keys=True))

    @property
    def is_dense(self) -> bool:
        return self.method == "dense"

    @property
    def is_baseline(self) -> bool:
        """A dense run without augmentation: the reference of Figure 1 and the differences."""
        return self.is_dense and self.augment == "none"

    @property
    def label(self) -> str:
        text = f"{model_label(self.model, self.model_kw)} {method_label(self.method, self.scope)}"
        if not self.is_dense:
            text += f" {100 * self.sparsity:g}%"
        if self.augment != "none":
            text += f" +{self.augment}"
        return text

    def stat(self, name: str) -> dict | None:
        """`summarize` of one metric over realizations, or None if the run lacks it."""
        values = self.metrics.get(name)
        return summarize(values) if values else None

    def per_corruption(self) -> dict[str, float]:
        """Mean accuracy per corruption over severities and realizations (benchmark + extras)."""
        out = {}
        for names, table in ((self.corruption_names, self.corruption_table),
                             (self.extra_names, self.extra_table)):
            if table is not None:
                out.update(zip(names, table.mean(axis=(0, 2)).tolist()))
        return out

    def sort_key(self):
        return (self.dataset, self.model, self.group[2], rank(AUGMENT_ORDER, self.augment),
                rank(METHOD_ORDER, self.method), self.scope, self.sparsity, self.path)


@dataclasses.dataclass
class Deck:
    """One CARD-Deck evaluation; `modes['agnostic' | 'adaptive']` hold floats, not lists."""
    path: str
    dataset: str
    model: str
    model_kw: dict
    method: str
    scope: str
    sparsity: float
    n_members: int
    modes: dict[str, dict[str, Any]]  # mode -> {metric: float, 'corruption_table': [C, S], ...}
    members_alone: list[dict[str, Any]]
    gate_histogram: dict[str, dict[str, float]]
    memory_mb: float | None
    packed_bytes: float | None
    inference_time_s: dict[str, float]

    @property
    def label(self) -> str:
        return (f"{model_label(self.model, self.model_kw)} "
                f"{method_label(self.method, self.scope)} {100 * self.sparsity:g}% "
                f"{self.n_members}-deck")

    @property
    def speedup(self) -> float | None:
        """Agnostic / adaptive inference time (the paper's 'about 2x' for n/2 forward passes;
        the deck writer's adaptive time includes the gate)."""
        t = self.inference_time_s
        if t.get("agnostic") and t.get("adaptive"):
            return t["agnostic"] / t["adaptive"]
        return None

    def per_corruption(self, mode: str) -> dict[str, float]:
        """Mean accuracy per corruption over severities (benchmark + extras) of one mode."""
        m = self.modes.get(mode, {})
        out = {}
        for prefix in ("", "extra_"):
            table = m.get(f"{prefix}corruption_table")
            if table is not None:
                out.update(zip(m[f"{prefix}corruption_names"], table.mean(axis=1).tolist()))
        return out

    def sort_key(self):
        return (self.dataset, self.model, rank(METHOD_ORDER, self.method), self.sparsity,
                self.n_members, self.path)


@dataclasses.dataclass
class Collection:
    """Everything found under the searched folders."""
    searched: list[str]
    runs: list[Run] = dataclasses.field(default_factory=list)
    decks: list[Deck] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file, reason)
    notes: list[str] = dataclasses.field(default_factory=list)


def rank(order: tuple[str, ...], value: str) -> int:
    """Position of `value` in a display order (unknown values last)."""
    return order.index(value) if value in order else len(order)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadResults(f"cannot read {path.name}: {e}") from e


def _floats(value: Any, key: str) -> list[float]:
    """A per-realization list (or a single number) as floats; 'nan' strings become NaN."""
    items = value if isinstance(value, list) else [value]
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError) as e:
        raise BadResults(f"'{key}' is not a list of numbers: {json.dumps(value)[:80]}") from e
    if not out:
        raise BadResults(f"'{key}' is empty")
    return out


def _table(value: Any, names: Any, key: str, leading: int) -> tuple[np.ndarray, list[str]]:
    """A corruption table as float array `[..., C, S]` with `leading` axes before C."""
    try:
        table = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise BadResults(f"'{key}' is not a numeric table") from e
    if table.ndim == leading + 1 and leading == 1:  # a single realization saved without R
        table = table[None]
    if table.ndim != leading + 2 or table.size == 0:
        raise BadResults(f"'{key}' has shape {table.shape}, expected {leading + 2} axes")
    names = [str(n) for n in names] if isinstance(names, list) else []
    if len(names) != table.shape[-2]:
        # Names are only labels: keep the numbers, make up names rather than drop the table.
        names = [f"corruption_{i}" for i in range(table.shape[-2])]
    return table, names


def _model(value: Any) -> tuple[str, dict]:
    if isinstance(value, dict):
        return str(value.get("name", "?")), dict(value.get("kw") or {})
    return (str(value), {}) if value is not None else ("?", {})


def _dataset(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("name", "?"))
    return str(value) if value is not None else "?"


def load_heatmap(folder: pathlib.Path) -> Heatmap | None:
    """A run's `heatmaps/heatmap.json` + npy, or None if absent; BadResults if unusable."""
    meta_path = folder / HEATMAP_META
    if not meta_path.exists():
        return None
    meta = _read_json(meta_path)
    try:
        eps = tuple(float(e) for e in meta["eps"])
        npy = meta_path.parent / str(meta["npy"])
    except (KeyError, TypeError, ValueError) as e:
        raise BadResults(f"{meta_path} lacks 'eps'/'npy': {e}") from e
    try:
        errors = np.load(npy, allow_pickle=False).astype(np.float64)
    except (OSError, ValueError) as e:
        raise BadResults(f"cannot read {npy}: {e}") from e
    if errors.ndim < 3 or errors.shape[-3] != len(eps):
        raise BadResults(f"{npy} has shape {errors.shape}, expected [R, {len(eps)}, H, W]")
    return Heatmap(eps, errors.reshape((-1,) + errors.shape[-3:]), str(npy))


def parse_run(folder: pathlib.Path, display: str, results: dict) -> Run:
    """A training run from its parsed results.json and its config.json (BadResults if unusable)."""
    if "clean_acc" not in results:
        raise BadResults("no 'clean_acc' (not a finished card_jax run)")
    config_path = folder / CONFIG_FILE
    if not config_path.exists():
        raise BadResults(f"no {CONFIG_FILE} next to it (model and method are unknown)")
    config = _read_json(config_path)
    try:
        model, kw = _model(config["model"])
        method_cfg = config.get("method", {})
        method = str(method_cfg.get("name") or results["method"])
        data_cfg = config.get("data", {})
    except (KeyError, TypeError, AttributeError) as e:
        raise BadResults(f"{config_path} lacks model/method: {e}") from e
    metrics = {k: _floats(results[k], k) for k in RUN_METRICS if results.get(k) is not None}
    if method == "dense":
        sparsity = 0.0  # dense configs still carry the default method.sparsity
    elif method_cfg.get("sparsity") is not None:
        sparsity = float(method_cfg["sparsity"])
    else:
        sparsity = float(np.mean(metrics.get("sparsity_global", [math.nan])))
    run = Run(path=display, dataset=_dataset(results.get("dataset") or data_cfg.get("name")),
              model=model, model_kw=kw, method=method,
              scope=str(method_cfg.get("scope", "global")), sparsity=sparsity,
              augment=str(data_cfg.get("augment", "none") or "none"),
              binary=bool(results.get("binary", False)), metrics=metrics)
    if results.get("corruption_table") is not None:
        run.corruption_table, run.corruption_names = _table(
            results["corruption_table"], results.get("corruption_names"), "corruption_table", 1)
    if results.get("extra_corruption_table") is not None:
        run.extra_table, run.extra_names = _table(
            results["extra_corruption_table"], results.get("extra_corruption_names"),
            "extra_corruption_table", 1)
    return run


def _deck_mode(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadResults(f"'{key}' is not an object")
    mode = {k: float(np.mean(_floats(value[k], f"{key}.{k}")))
            for k in DECK_MODE_METRICS if value.get(k) is not None}
    for prefix in ("", "extra_"):
        if value.get(f"{prefix}corruption_table") is not None:
            mode[f"{prefix}corruption_table"], mode[f"{prefix}corruption_names"] = _table(
                value[f"{prefix}corruption_table"], value.get(f"{prefix}corruption_names"),
                f"{key}.{prefix}corruption_table", 0)
    return mode


def _member_config(deck_folder: pathlib.Path, members: list) -> dict:
    """config.json of the first member run that can be found, else {}.

    The deck's results.json names the model but not its keyword arguments or the pruning
    scope; the members' own configs have both. Their workdirs are stored as given on the
    deck's command line, so they are tried as-is and relative to the deck folder."""
    for member in members:
        if not isinstance(member, dict) or not member.get("workdir"):
            continue
        workdir = pathlib.Path(str(member["workdir"]))
        for candidate in (workdir, deck_folder / workdir, deck_folder.parent / workdir):
            try:
                config = json.loads((candidate / CONFIG_FILE).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(config, dict):
                return config
    return {}


def parse_deck(folder: pathlib.Path, display: str, results: dict) -> Deck:
    """A CARD-Deck from its parsed results.json (`card_jax.deck.run`; optional keys may be
    missing), completed with model kw and scope from a member's config.json when reachable.
    BadResults unless at least one mode has a clean accuracy."""
    modes = {m: _deck_mode(results[m], m) for m in ("agnostic", "adaptive")
             if results.get(m) is not None}
    if not any("clean_acc" in m for m in modes.values()):
        raise BadResults("deck without 'agnostic'/'adaptive' clean_acc")
    adaptive = results.get("adaptive") if isinstance(results.get("adaptive"), dict) else {}
    gate = adaptive.get("gate_histogram") or {}
    members = results.get("members") if isinstance(results.get("members"), list) else []
    model, kw = _model(results.get("model"))
    member_config = _member_config(folder, members)
    if not kw and isinstance(member_config.get("model"), dict):
        kw = dict(member_config["model"].get("kw") or {})
    alone = [_deck_mode(m, "members_alone") for m in results.get("members_alone") or []
             if isinstance(m, dict)]
    times = results.get("inference_time_s") if isinstance(
        results.get("inference_time_s"), dict) else {}
    return Deck(
        path=display, dataset=_dataset(results.get("dataset")), model=model, model_kw=kw,
        method=str(results.get("method", "?")),
        scope=str((member_config.get("method") or {}).get("scope", "global")),
        sparsity=float(results.get("sparsity") or 0.0),
        n_members=int(results.get("n_members") or len(members)),
        modes=modes, members_alone=alone,
        gate_histogram={str(k): {str(g): float(c) for g, c in v.items()}
                        for k, v in gate.items() if isinstance(v, dict)},
        memory_mb=None if results.get("memory_mb") is None else float(np.mean(
            _floats(results["memory_mb"], "memory_mb"))),
        packed_bytes=None if results.get("packed_bytes") is None else float(np.mean(
            _floats(results["packed_bytes"], "packed_bytes"))),
        inference_time_s={str(k): float(v) for k, v in times.items()
                          if isinstance(v, (int, float))})


def find_result_folders(root: pathlib.Path) -> Iterator[pathlib.Path]:
    """Folders under `root` (itself included) holding a results.json, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        if RESULTS_FILE in filenames:
            yield pathlib.Path(dirpath)


def collect(roots: Iterable[str | os.PathLike]) -> Collection:
    """Parses every run and deck under `roots`; unusable ones are warned about and skipped."""
    roots = [pathlib.Path(r) for r in roots]
    found = Collection(searched=[str(r) for r in roots])
    seen = set()
    for root in roots:
        if root.is_file() and root.name == RESULTS_FILE:
            root = root.parent
        if not root.is_dir():
            found.skipped.append((str(root), "no such folder"))
            _warn(f"{root}: no such folder")
            continue
        for folder in find_result_folders(root):
            real = os.path.realpath(folder)
            if real in seen:  # overlapping --runs folders: report each run once
                continue
            seen.add(real)
            results_path = folder / RESULTS_FILE
            try:
                results = _read_json(results_path)
                if not isinstance(results, dict):
                    raise BadResults("top level is not a JSON object")
                if results.get("kind") == "deck":
                    found.decks.append(parse_deck(folder, str(folder), results))
                    continue
                run = parse_run(folder, str(folder), results)
            except (BadResults, TypeError, ValueError, KeyError, AttributeError) as e:
                # Anything malformed in one file costs that run only, never the report.
                reason = str(e) if isinstance(e, BadResults) else f"malformed content ({e!r})"
                found.skipped.append((str(results_path), reason))
                _warn(f"skipping {results_path}: {reason}")
                continue
            try:
                run.heatmap = load_heatmap(folder)
            except BadResults as e:
                # The run's numbers are fine; only Figure 2 loses a row.
                found.notes.append(f"heat maps of {folder} ignored: {e}")
                _warn(f"ignoring heat maps of {folder}: {e}")
            found.runs.append(run)
    found.runs.sort(key=Run.sort_key)
    found.decks.sort(key=Deck.sort_key)
    return found
