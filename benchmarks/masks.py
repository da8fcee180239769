"""Cost of mask selection: EP/BP training steps against the dense step of the same model.

Usage:
  python benchmarks/masks.py [--quick] [--models=conv4,conv8] [--width=1.0] [--rounds=N]

`--quick` (CI smoke, ~25 s on 2 CPU cores): Conv-4 at width 0.25; dense, EP global and BP
layerwise; 2 rounds.

Prints ONE JSON document to stdout (logs go to stderr). For every model (default Conv-4 and
Conv-8 at full width; synthetic 32x32x3, batch 128, one realization, 80% sparsity) it builds
the production step (`train.CompiledSteps`) for dense training and for edge-popup and biprop
with global and layerwise masks, and times them round-robin (`common.interleave`), the state
threaded through the steps as in training. EP/BP recompute their mask (an exact top-k of the
|scores|, `card_jax.pruning.masks`) in every forward pass; dense has no mask.

  step_ms                  median ms per production step
  selection_ms             `method.apply(params, method_state)` alone, jitted (mask + the
                           effective weights); timed in the same rounds
  <method>_<scope>_over_dense
                           images/s of that step over images/s of the dense step (= dense
                           step time / its step time); target >= 0.85. `paired_median`: the
                           median of per-round ratios.

Top-k selection never sorts: it finds the k-th largest key by 32 rounds of bit-wise bisection
(one fused compare-and-count pass each, all layers of a layerwise mask in the same pass) and
resolves ties at the threshold from per-block tie counts. The tie rule (lower flat index
first) is documented in `card_jax/pruning/masks.py` and checked against a stable sort in
tests/test_masks.py and tests/test_benchmarks_speed.py.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time
from typing import Any

_REPO = pathlib.Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    # Run as a script, Python puts benchmarks/ first on sys.path, where profile.py would shadow
    # the standard library's `profile`; the repo root takes its place (card_jax importable).
    sys.path[0] = str(_REPO)

from benchmarks import common  # noqa: E402
from benchmarks import profile as profile_bench  # noqa: E402

log = logging.getLogger("card_jax.benchmarks.masks")

TARGET_OVER_DENSE = 0.85
VARIANTS = (("dense", "global"), ("ep", "global"), ("ep", "layerwise"), ("bp", "global"),
            ("bp", "layerwise"))
QUICK_VARIANTS = (("dense", "global"), ("ep", "global"), ("bp", "layerwise"))


def variant_name(method: str, scope: str) -> str:
    return "dense" if method == "dense" else f"{method}_{scope}"


def bench_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    pieces: dict[str, profile_bench.Piece] = {}
    for method, scope in args.variants:
        name = variant_name(method, scope)
        setup = profile_bench.build(f"{model}/{name}", profile_bench.make_config(
            model, args.width, method=method, scope=scope, sparsity=args.sparsity))
        pieces[name] = profile_bench.calibrated(
            name, profile_bench.step_runner(setup), args.min_sample_ms / 1e3, args.max_calls)
        if method != "dense":
            one = setup.one
            apply_c, _, _ = profile_bench.aot(setup.exp.method.apply, one.params,
                                              one.method_state)
            pieces[f"{name}/selection"] = profile_bench.calibrated(
                f"{name}/selection", lambda f=apply_c, o=one: f(o.params, o.method_state),
                args.min_sample_ms / 1e3, args.max_calls)
        log.info("%s %s: compiled, first step %.2fs", model, name, pieces[name].first_call_s)
    samples = common.interleave({n: p.sample for n, p in pieces.items()}, args.rounds)
    dense = samples["dense"]
    steps_out: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    for method, scope in args.variants:
        name = variant_name(method, scope)
        secs = samples[name]
        entry: dict[str, Any] = {
            "method": method, "scope": None if method == "dense" else scope,
            "step_ms": 1e3 * common.median(secs),
            "step_ms_samples": [round(1e3 * s, 3) for s in secs],
            "images_per_s": args.batch_size / common.median(secs),
        }
        if method != "dense":
            sel = samples[f"{name}/selection"]
            entry.update(selection_ms=1e3 * common.median(sel),
                         selection_ms_samples=[round(1e3 * s, 3) for s in sel],
                         selection_fraction_of_dense_step=common.median(sel)
                         / common.median(dense))
            value = common.median(dense) / common.median(secs)
            ratios[f"{name}_over_dense"] = {
                "value": value,
                "paired_median": common.median([d / s for d, s in zip(dense, secs)]),
                "target": TARGET_OVER_DENSE, "comparison": ">=",
                "met": bool(value >= TARGET_OVER_DENSE),
                "definition": f"images/s of the {method.upper()} {scope} step / images/s of "
                              "the dense step (same model, batch and rounds)",
            }
        steps_out[name] = entry
    return {"width": args.width, "steps": steps_out, "ratios": ratios}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke settings (~25 s)")
    p.add_argument("--models", default=None,
                   help="comma-separated Conv-k models (default conv4,conv8; conv4 with --quick)")
    p.add_argument("--width", type=float, default=None,
                   help="width multiplier (default 1.0; 0.25 with --quick)")
    p.add_argument("--sparsity", type=float, default=profile_bench.SPARSITY)
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved timed rounds (default 5; 2 with --quick)")
    p.add_argument("--min-sample-ms", type=float, default=None,
                   help="a sample repeats a step until it lasts this long (default 300; 30 "
                        "with --quick)")
    p.add_argument("--max-calls", type=int, default=20)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"models": "conv4" if quick else "conv4,conv8", "width": 0.25 if quick else 1.0,
                "rounds": 2 if quick else 5, "min_sample_ms": 30.0 if quick else 300.0}
    common.fill_defaults(args, defaults)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.variants = QUICK_VARIANTS if quick else VARIANTS
    args.batch_size = profile_bench.BATCH
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    common.setup_logging()
    args = parse_args(argv)
    tic = time.perf_counter()
    env = common.environment()
    models = {}
    for model in args.models:
        models[model] = bench_model(model, args)
        log.info("%s: %s", model, ", ".join(f"{k} {v['value']:.3f}"
                                            for k, v in models[model]["ratios"].items()))
    doc = {
        "benchmark": "masks",
        "quick": args.quick,
        "settings": {"batch_size": args.batch_size, "image_shape": [32, 32, 3],
                     "num_classes": 10, "realizations": 1, "width": args.width,
                     "sparsity": args.sparsity, "rounds": args.rounds,
                     "variants": [variant_name(m, s) for m, s in args.variants],
                     "statistic": "median over interleaved rounds"},
        "environment": env,
        "models": models,
        "ratios": [{"name": f"{model}/{key}", **entry}
                   for model, result in models.items() for key, entry in result["ratios"].items()],
        "wall_s": round(time.perf_counter() - tic, 1),
    }
    common.emit_json(doc)
    return doc


if __name__ == "__main__":
    from card_jax import entry

    entry.prepare()  # XLA:CPU flags and malloc tunables for this machine (card_jax/entry.py)
    main()
