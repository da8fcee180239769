"""Runs every benchmark and prints ONE JSON document with every ratio against its target.

Usage:
  python benchmarks/run_all.py [--quick] [--only=a,b] [--skip=a,b] [--timeout=S]
      [--pass NAME='--flag=value ...'] [--no-documents] [--compile-cache=auto|none|DIR]
      [--out=PATH [--resume [--rerun=a,b]]]

Each benchmark (train_step, robustness, profile, masks, pipeline, evaluation, and deck when
benchmarks/deck.py exists) runs as its own subprocess (`python benchmarks/<name>.py [--quick]`,
one after another so that they do not compete for the cores), and its one JSON document is
parsed. The output lists:

  runs      per benchmark: command, return code, wall seconds, and the stderr tail on failure
  ratios    every ratio the benchmarks report: value, paired median (when given), target,
            comparison ('>=' or '<' or '<='), met (recomputed here from value and target), and
            the definition; ratios without a target are informative (target null, met null)
  summary   how many targets are met, the names of those that are not, failed benchmarks
  environment, and (unless --no-documents) every benchmark's full document

A full run takes close to an hour on 2 CPU cores. With `--out=PATH` the document, as it
stands, is rewritten to PATH (atomically) after every benchmark, so an interrupted run keeps
what it measured; `--resume` then reads PATH and runs only the benchmarks it does not hold
a successful document for (same `--quick` setting required), plus those named by `--rerun`
(their earlier documents are replaced). The resumed document lists, per run, when it was
measured (`finished_at`).

Compilation dominates the quick runs (the benchmarks build several experiments of the same
model, and several benchmarks compile the same steps), so by default the benchmarks share a
JAX persistent compilation cache in a fresh temporary directory (`--compile-cache`). It only
skips recompiling identical XLA programs; timed calls run the same executables either way
(first-call times then exclude most compilation).

Exit status: 0 when every benchmark ran (whatever the targets say: timings on a shared
machine are not pass/fail), 1 when one failed or printed no JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

_REPO = pathlib.Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    # Run as a script, Python puts benchmarks/ first on sys.path, where profile.py would shadow
    # the standard library's `profile`; the repo root takes its place (card_jax importable).
    sys.path[0] = str(_REPO)

from benchmarks import common  # noqa: E402

BENCHMARKS = ("train_step", "robustness", "profile", "masks", "pipeline", "evaluation", "deck")
OPTIONAL = frozenset({"deck"})  # run only if its script exists (written separately)


def _entry(name: str, src: dict[str, Any], *, target: float | None = None,
           comparison: str | None = None, definition: str | None = None) -> dict[str, Any]:
    """A ratio in the common form; target/comparison default to what `src` says."""
    target = src.get("target", target)
    comparison = src.get("comparison", comparison) if target is not None else None
    if target is not None and comparison is None:
        comparison = ">="
    return {"name": name, "value": src.get("value"), "paired_median": src.get("paired_median"),
            "target": target, "comparison": comparison, "met": None,
            "definition": src.get("definition", definition)}


def _train_step(doc: dict) -> list[dict]:
    out = []
    for model, res in doc.get("models", {}).items():
        for key in ("r4_over_r1", "r8_over_r1", "r4_vmap_over_r1", "r4_seed_speed_over_r1",
                    "r1_fraction_of_peak"):
            if key in res:
                out.append(_entry(f"{model}/{key}", res[key]))
    return out


def _robustness(doc: dict) -> list[dict]:
    out = []
    heat = doc.get("heatmap", {})
    for key in ("heatmap_over_plain", "heatmap_over_plain_incl_compile"):
        if key in heat:
            out.append(_entry(f"heatmap/{key}", heat[key]))
    c_eval = doc.get("corruption_eval", {})
    if "corruption_eval_over_plain" in c_eval:
        out.append(_entry("corruption_eval/corruption_eval_over_plain",
                          c_eval["corruption_eval_over_plain"]))
    return out


def _deck(doc: dict) -> list[dict]:
    out = []
    if "gate_over_member_inference" in doc:
        out.append(_entry("gate_over_member_inference", doc["gate_over_member_inference"],
                          comparison="<"))
    if "adaptive_over_agnostic_throughput" in doc:
        out.append(_entry("adaptive_over_agnostic_throughput",
                          doc["adaptive_over_agnostic_throughput"]))
    return out


def _profile(doc: dict) -> list[dict]:
    out = []
    for name, cfg in doc.get("configs", {}).items():
        pieces = cfg["pieces"]
        step = pieces["full_step"]
        if "fraction_of_peak" in step:
            out.append(_entry(f"{name}/step_fraction_of_peak", {
                "value": step["fraction_of_peak"],
                "definition": "production step GFLOP/s (card_jax.flops) / fp32 matmul peak"}))
        for piece in ("backward", "mask_selection", "augmix"):
            out.append(_entry(f"{name}/{piece}_fraction_of_step", {
                "value": pieces[piece]["fraction_of_step"],
                "paired_median": pieces[piece]["fraction_of_step_paired"],
                "definition": f"{piece} ms / full production step ms"}))
    for model, res in doc.get("precision", {}).items():
        out.append(_entry(f"precision/{model}/bf16_over_fp32", res["bf16_over_fp32"]))
    return out


def _listed(doc: dict) -> list[dict]:
    """Benchmarks that already list their ratios in the common form (masks, pipeline, ...)."""
    return [_entry(r["name"], r) for r in doc.get("ratios", [])]


EXTRACTORS: dict[str, Callable[[dict], list[dict]]] = {
    "train_step": _train_step, "robustness": _robustness, "deck": _deck, "profile": _profile,
    "masks": _listed, "pipeline": _listed, "evaluation": _listed,
}


def judge(entry: dict[str, Any]) -> dict[str, Any]:
    """Fills `met` from value, target and comparison (None when there is no target)."""
    value, target, comparison = entry["value"], entry["target"], entry["comparison"]
    if target is None or value is None:
        return entry
    ops = {">=": value >= target, ">": value > target, "<=": value <= target,
           "<": value < target}
    if comparison not in ops:
        raise ValueError(f"unknown comparison {comparison!r} in {entry['name']}")
    entry["met"] = bool(ops[comparison])
    return entry


def run_one(name: str, args: argparse.Namespace,
            cache_dir: str | None) -> tuple[dict[str, Any], dict | None]:
    """Runs benchmarks/<name>.py; returns (run record, its JSON document or None)."""
    cmd = [sys.executable, str(_REPO / "benchmarks" / f"{name}.py")]
    if args.quick:
        cmd.append("--quick")
    cmd += args.passthrough.get(name, [])
    env = dict(os.environ)
    env["PYTHONPATH"] = str(_REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    common.log.info("run_all: %s", " ".join(shlex.quote(c) for c in cmd))
    tic = time.perf_counter()
    record: dict[str, Any] = {"command": cmd[1:], "returncode": None, "wall_s": None,
                              "ok": False}
    try:
        proc = subprocess.run(cmd, cwd=_REPO, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
        record.update(wall_s=round(time.perf_counter() - tic, 1), error=f"timeout: {e}")
        return record, None
    record.update(returncode=proc.returncode, wall_s=round(time.perf_counter() - tic, 1))
    doc = None
    if proc.returncode == 0:
        try:
            doc = json.loads(proc.stdout)
        except json.JSONDecodeError as e:
            record["error"] = f"stdout is not one JSON document: {e}"
    else:
        record["error"] = f"exit status {proc.returncode}"
    if doc is None:
        record["stderr_tail"] = proc.stderr[-3000:]
    record["ok"] = doc is not None
    common.log.info("run_all: %s %s in %.1fs", name, "ok" if record["ok"] else "FAILED",
                    record["wall_s"])
    return record, doc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    p.add_argument("--only", default="", help=f"comma-separated subset of {BENCHMARKS}")
    p.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per benchmark (default: none; 900 with --quick)")
    p.add_argument("--pass", dest="passthrough_raw", action="append", default=[],
                   metavar="NAME=ARGS",
                   help="extra arguments for one benchmark, e.g. --pass 'masks=--rounds=3'")
    p.add_argument("--no-documents", action="store_true",
                   help="leave the benchmarks' full documents out of the output")
    p.add_argument("--compile-cache", default="auto",
                   help="JAX persistent compilation cache shared by the benchmarks: 'auto' (a "
                        "fresh temporary directory, removed afterwards), 'none', or a path")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="also write the document to PATH after every benchmark (atomically)")
    p.add_argument("--resume", action="store_true",
                   help="with --out: keep the successful benchmarks already in PATH and run "
                        "only the others")
    p.add_argument("--rerun", default="",
                   help="with --resume: comma-separated benchmarks to run again even if PATH "
                        "holds their documents")
    args = p.parse_args(argv)
    if args.resume and not args.out:
        p.error("--resume needs --out=PATH (the document to resume)")
    args.rerun_names = {n.strip() for n in args.rerun.split(",") if n.strip()}
    if args.rerun_names and not args.resume:
        p.error("--rerun goes with --resume")
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    unknown = (set(names) | skip | args.rerun_names) - set(BENCHMARKS)
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; known: {BENCHMARKS}")
    args.names = [n for n in names if n not in skip]
    args.passthrough = {}
    for raw in args.passthrough_raw:
        name, sep, rest = raw.partition("=")
        if not sep or name not in BENCHMARKS:
            p.error(f"--pass takes NAME=ARGS with NAME in {BENCHMARKS}, got {raw!r}")
        args.passthrough.setdefault(name, []).extend(shlex.split(rest))
    if args.timeout is None and args.quick:
        args.timeout = 900.0
    return args


def load_previous(path: pathlib.Path, quick: bool) -> tuple[dict, dict]:
    """The successful runs and their documents from an earlier `--out` file (for --resume).

    Raises SystemExit with the reason when the file is unreadable or was written with a
    different --quick setting (mixing the two would mix incomparable numbers).
    """
    if not path.exists():
        return {}, {}
    try:
        prev = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"run_all: --resume: {path} is not a JSON document ({e}); move it "
                         "away or run without --resume") from e
    if prev.get("benchmark") != "run_all" or "documents" not in prev:
        raise SystemExit(f"run_all: --resume: {path} is not a run_all document with documents "
                         "(was it written with --no-documents?)")
    if bool(prev.get("quick")) != quick:
        raise SystemExit(f"run_all: --resume: {path} was written with quick={prev.get('quick')}"
                         f", this run has quick={quick}; use another --out")
    runs = {n: r for n, r in prev.get("runs", {}).items()
            if r.get("ok") and n in prev["documents"]}
    return runs, {n: prev["documents"][n] for n in runs}


def build_document(args: argparse.Namespace, runs: dict[str, Any], documents: dict[str, Any],
                   wall_s: float) -> dict[str, Any]:
    """The one output document from the runs so far (ratios re-extracted and re-judged)."""
    ratios: list[dict[str, Any]] = []
    for name in BENCHMARKS:
        if name in documents:
            for entry in EXTRACTORS[name](documents[name]):
                ratios.append(judge({"benchmark": name, **entry}))
    targeted = [r for r in ratios if r["target"] is not None]
    failed = [n for n, r in runs.items() if r.get("ok") is False]
    pending = [n for n in args.names if n not in runs]
    out: dict[str, Any] = {
        "benchmark": "run_all",
        "quick": args.quick,
        "environment": common.environment(),
        "compile_cache": args.compile_cache,
        "runs": runs,
        "ratios": ratios,
        "summary": {
            "targets": len(targeted),
            "met": sum(bool(r["met"]) for r in targeted),
            "unmet": [f"{r['benchmark']}/{r['name']}" for r in targeted if not r["met"]],
            "informative": len(ratios) - len(targeted),
            "failed_benchmarks": failed,
            "pending_benchmarks": pending,
        },
        "wall_s": round(wall_s, 1),
    }
    if not args.no_documents or args.out:
        out["documents"] = documents
    return out


def write_atomically(path: pathlib.Path, doc: dict[str, Any]) -> None:
    """Writes `doc` as JSON to path via a temporary file + rename (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    args = parse_args(argv)
    tic = time.perf_counter()
    out_path = pathlib.Path(args.out) if args.out else None
    runs: dict[str, Any] = {}
    documents: dict[str, Any] = {}
    if args.resume:
        runs, documents = load_previous(out_path, args.quick)
        runs = {n: r for n, r in runs.items() if n in args.names and n not in args.rerun_names}
        documents = {n: d for n, d in documents.items() if n in runs}
        common.log.info("run_all: resuming; kept %s from %s", sorted(runs) or "nothing",
                        out_path)
    with contextlib.ExitStack() as stack:
        cache_dir = None
        if args.compile_cache == "auto":
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="card_jax_xla_"))
        elif args.compile_cache != "none":
            cache_dir = args.compile_cache
        for name in args.names:
            if name in runs:
                continue
            if name in OPTIONAL and not (_REPO / "benchmarks" / f"{name}.py").exists():
                runs[name] = {"skipped": "script not present"}
                continue
            runs[name], doc = run_one(name, args, cache_dir)
            runs[name]["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            if doc is not None:
                documents[name] = doc
            if out_path is not None:
                write_atomically(out_path, build_document(args, runs, documents,
                                                          time.perf_counter() - tic))
    out = build_document(args, runs, documents, time.perf_counter() - tic)
    if out_path is not None:
        write_atomically(out_path, out)
    if args.no_documents:
        out.pop("documents", None)
    common.emit_json(out)
    return 1 if out["summary"]["failed_benchmarks"] else 0


if __name__ == "__main__":
    from card_jax import entry

    entry.prepare()  # XLA:CPU flags and malloc tunables for this machine (card_jax/entry.py)
    sys.exit(main())
