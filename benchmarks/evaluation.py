"""Evaluation throughput: batched Conv-4 inference vs the matmul peak, "-C" sets vs clean.

Usage:
  python benchmarks/evaluation.py [--quick] [--width=1.0] [--c-width=0.5] [--c-images=500]

`--quick` (CI smoke, ~25 s on 2 CPU cores): width 0.25 for both sections, 40 images per
corruption cell, 2 inference rounds and 1 "-C" round.

Prints ONE JSON document to stdout (logs go to stderr).

1. `inference`: the production eval step (`train.CompiledSteps.eval`, one realization,
   eval batch 1000 as in configs/common.py, BatchNorm-free Conv-4 on synthetic 32x32x3
   images) on one batch of 1000 device-resident uint8 images, and the bare forward pass
   (`steps.forward`, float input) at the same batch, in float32 and in bfloat16
   (`train.compute_dtype`). FLOPs are counted by `card_jax.flops` (convolutions and matmuls
   only, 2 per multiply-add) on the very functions timed. Timed round-robin with the fp32
   matmul peak of this process (`common.make_matmul_peak`, best sample).
     eval_fraction_of_peak   achieved GFLOP/s of the eval step / the peak; target >= 0.70.

2. `corruption_eval`: `evaluate.corruption_metrics` over a "-C" folder written to a temporary
   directory in the CIFAR-10-C layout (15 corruptions x 5 severities of `--c-images` images,
   copies of the clean test images, so accuracies must match: `accuracy_match`) against
   `train.evaluation_sums` over the same 75 n images already on device, with the same
   compiled eval step and eval batch (`--c-batch`, default min(1000, n)).
     corruption_over_clean   images/s of the "-C" evaluation / images/s of clean
                             evaluation of as many images; target >= 0.9. It prices reading
                             each cell from disk (memory-mapped .npy), the host->device copy
                             and one host sync per cell.
   The model of this section defaults to width 0.5 (`--c-width`) so that a round of 2 x 75
   cells stays under a minute on 2 cores; a narrower model is the harder case for the ratio
   (less compute to hide the per-cell costs behind).
"""

from __future__ import annotations

import argparse
import logging
import math
import pathlib
import sys
import tempfile
import time
from typing import Any

_REPO = pathlib.Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    # Run as a script, Python puts benchmarks/ first on sys.path, where profile.py would shadow
    # the standard library's `profile`; the repo root takes its place (card_jax importable).
    sys.path[0] = str(_REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import profile as profile_bench  # noqa: E402
from benchmarks import robustness  # noqa: E402
from benchmarks import train_step  # noqa: E402
from card_jax import evaluate, steps, train  # noqa: E402
from card_jax.data import corruption_sets, pipeline  # noqa: E402

log = logging.getLogger("card_jax.benchmarks.evaluation")

TARGET_EVAL_FRACTION_OF_PEAK = 0.70
TARGET_CORRUPTION_OVER_CLEAN = 0.9
EVAL_BATCH = 1000


def build_eval(width: float, eval_batch: int, test_size: int, dtype: str = "float32"):
    """Conv-4 experiment with one realization, `test_size` synthetic test images and the
    given eval batch; returns (setup, test images, test labels) on device."""
    config = profile_bench.make_config("conv4", width, dtype=dtype, **{
        "eval.batch_size": eval_batch, "data.synthetic.test_size": test_size})
    setup = profile_bench.build(f"conv4/{dtype}", config)
    test_x, test_y = setup.compiled.place_data(
        setup.exp.dataset.test_images, setup.exp.dataset.test_labels.astype(np.int32))
    return setup, test_x, test_y


def bench_inference(args: argparse.Namespace, peak_sample) -> dict[str, Any]:
    batch = EVAL_BATCH
    pieces: dict[str, profile_bench.Piece] = {}
    for dtype in ("float32", "bfloat16"):
        setup, test_x, test_y = build_eval(args.width, batch, batch, dtype)
        st = setup.state
        start = jnp.int32(0)
        tag = "" if dtype == "float32" else "_bf16"
        if dtype == "float32":
            eval_flops = train_step.model_step_flops(setup.exp, st, test_x, test_y, start,
                                                     step="eval")
            eval_c = setup.compiled.eval.lower(st, test_x, test_y, start).compile()
            pieces["eval_step"] = profile_bench.calibrated(
                "eval_step", lambda c=eval_c, s=st, x=test_x, y=test_y: c(s, x, y, start),
                args.min_sample_ms / 1e3, args.max_calls,
                {"flops": eval_flops, **profile_bench.xla_cost(eval_c)})
        one, exp = setup.one, setup.exp
        cast = steps.compute_dtype(dtype)

        def forward(params, batch_stats, method_state, x, exp=exp, cast=cast):
            return steps.forward(exp.graphdef, exp.method, params, batch_stats, method_state,
                                 x, train=False, dtype=cast)[0]

        x = pipeline.to_float(test_x[:batch])
        fwd_args = (one.params, one.batch_stats, one.method_state, x)
        fwd_flops = train_step.model_flops(forward, *fwd_args)
        fwd_c, cost, _ = profile_bench.aot(forward, *fwd_args)
        pieces[f"forward{tag}"] = profile_bench.calibrated(
            f"forward{tag}", lambda c=fwd_c, a=fwd_args: c(*a), args.min_sample_ms / 1e3,
            args.max_calls, {"flops": fwd_flops, **cost})
    peaks: list[float] = []
    timers = {n: p.sample for n, p in pieces.items()}
    timers["matmul_peak_gflops"] = lambda: max(peak_sample() for _ in range(2))
    samples = common.interleave(timers, args.rounds)
    peaks = samples.pop("matmul_peak_gflops")
    peak = max(peaks)
    out: dict[str, Any] = {"width": args.width, "batch": batch, "realizations": 1,
                           "matmul_peak_gflops": peak,
                           "matmul_peak_samples": [round(p, 2) for p in peaks]}
    for name, piece in pieces.items():
        secs = samples[name]
        gflops = piece.info["flops"] / common.median(secs) / 1e9
        out[name] = {
            "ms": 1e3 * common.median(secs),
            "ms_samples": [round(1e3 * s, 3) for s in secs],
            "flops": piece.info["flops"],
            "flops_per_image": piece.info["flops"] // batch,
            "xla_flops": piece.info.get("xla_flops"),
            "achieved_gflops": gflops,
            "fraction_of_peak": gflops / peak,
            "fraction_of_peak_paired": common.median(
                [piece.info["flops"] / s / 1e9 / p for s, p in zip(secs, peaks)]),
            "images_per_s": batch / common.median(secs),
        }
    value = out["eval_step"]["fraction_of_peak"]
    out["eval_fraction_of_peak"] = {
        "value": value, "paired_median": out["eval_step"]["fraction_of_peak_paired"],
        "target": TARGET_EVAL_FRACTION_OF_PEAK, "comparison": ">=",
        "met": bool(value >= TARGET_EVAL_FRACTION_OF_PEAK),
        "definition": "card_jax.flops FLOPs of one production eval step (batch 1000) / its "
                      "median seconds / the best fp32 2048^3 matmul GFLOP/s of the same rounds",
    }
    out["bf16_over_fp32_forward"] = {
        "value": common.median(samples["forward_bf16"]) / common.median(samples["forward"]),
        "paired_median": common.median([b / f for b, f in zip(samples["forward_bf16"],
                                                              samples["forward"])]),
        "definition": "forward seconds with compute dtype bfloat16 / float32 (< 1: faster)",
    }
    log.info("inference: eval step %.1f ms = %.1f GFLOP/s = %.2f of peak %.0f; forward %.2f, "
             "bf16 forward %.2f of peak", out["eval_step"]["ms"],
             out["eval_step"]["achieved_gflops"], value, peak,
             out["forward"]["fraction_of_peak"], out["forward_bf16"]["fraction_of_peak"])
    return out


def bench_corruption_eval(args: argparse.Namespace) -> dict[str, Any]:
    n, batch = args.c_images, args.c_batch
    setup, _, _ = build_eval(args.c_width, batch, n)
    compiled, state = setup.compiled, setup.state
    images = np.asarray(setup.exp.dataset.test_images[:n])
    labels = np.asarray(setup.exp.dataset.test_labels[:n], np.int32)
    cells = len(corruption_sets.CORRUPTIONS) * len(corruption_sets.SEVERITIES)
    total = cells * n
    plain_x, plain_y = compiled.place_data(np.concatenate([images] * cells),
                                           np.concatenate([labels] * cells))
    cell_x, cell_y = compiled.place_data(images, labels)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="card_jax_bench_eval_c_") as tmp:
        folder = pathlib.Path(tmp)
        robustness.write_c_folder(folder, images, labels)
        nbytes = sum(f.stat().st_size for f in folder.iterdir())
        # Compile both shapes ([n] per cell, [75 n] clean) before the clock starts.
        for x, y in ((cell_x, cell_y), (plain_x, plain_y)):
            jax.block_until_ready(compiled.eval(state, x, y, jnp.int32(0)))

        def run_c() -> float:
            seconds, results["c"] = common.timed(
                lambda: evaluate.corruption_metrics(compiled, state, str(folder), batch))
            return total / seconds

        def run_clean() -> float:
            seconds, results["clean"] = common.timed(
                lambda: train.evaluation_sums(compiled, state, plain_x, plain_y, batch))
            return total / seconds

        run_c()  # warm-up: page cache, first transfers
        samples = common.interleave({"corruption_metrics": run_c, "clean": run_clean},
                                    args.c_rounds)
    c_acc = np.asarray(results["c"]["corruption_acc"])
    clean_acc = results["clean"]["correct"] / total
    value = common.median(samples["corruption_metrics"]) / common.median(samples["clean"])
    out = {
        "width": args.c_width, "images_per_cell": n, "cells": cells, "images": total,
        "eval_batch": batch, "folder_mb": round(nbytes / 1e6, 2), "rounds": args.c_rounds,
        "corruption_metrics": robustness.rate_summary(samples["corruption_metrics"]),
        "clean": robustness.rate_summary(samples["clean"]),
        "batches_per_cell": math.ceil(n / batch),
        "corruption_over_clean": {
            "value": value,
            "paired_median": common.median([a / b for a, b in zip(
                samples["corruption_metrics"], samples["clean"])]),
            "target": TARGET_CORRUPTION_OVER_CLEAN, "comparison": ">=",
            "met": bool(value >= TARGET_CORRUPTION_OVER_CLEAN),
            "definition": "(75 n images / seconds of evaluate.corruption_metrics over the -C "
                          "folder) / (75 n images / seconds of train.evaluation_sums on the "
                          "same images on device), same compiled eval step and batch",
        },
        "accuracy_match": bool(np.allclose(c_acc, clean_acc)),
    }
    log.info("-C eval: %.0f vs clean %.0f images/s: %.3f", out["corruption_metrics"][
        "images_per_s"], out["clean"]["images_per_s"], value)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke settings (~25 s)")
    p.add_argument("--width", type=float, default=None,
                   help="Conv-4 width of the inference section (default 1.0; 0.25 quick)")
    p.add_argument("--c-width", type=float, default=None,
                   help="Conv-4 width of the -C section (default 0.5; 0.25 quick)")
    p.add_argument("--c-images", type=int, default=None,
                   help="images per (corruption, severity) cell (default 500; 40 quick)")
    p.add_argument("--c-batch", type=int, default=None,
                   help="eval batch of the -C section (default min(1000, c-images))")
    p.add_argument("--rounds", type=int, default=None,
                   help="inference rounds (default 7; 2 with --quick)")
    p.add_argument("--c-rounds", type=int, default=None,
                   help="-C rounds (default 2; 1 with --quick)")
    p.add_argument("--min-sample-ms", type=float, default=None,
                   help="a sample repeats a call until it lasts this long (default 300; 30 "
                        "with --quick)")
    p.add_argument("--max-calls", type=int, default=20)
    p.add_argument("--matmul-size", type=int, default=2048)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"width": 0.25 if quick else 1.0, "c_width": 0.25 if quick else 0.5,
                "c_images": 40 if quick else 500, "rounds": 2 if quick else 7,
                "c_rounds": 1 if quick else 2, "min_sample_ms": 30.0 if quick else 300.0}
    common.fill_defaults(args, defaults)
    if args.c_batch is None:
        args.c_batch = min(EVAL_BATCH, args.c_images)
    for name in ("c_images", "c_batch", "rounds", "c_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    common.setup_logging()
    args = parse_args(argv)
    tic = time.perf_counter()
    env = common.environment()
    peak_sample = common.make_matmul_peak(args.matmul_size)
    inference = bench_inference(args, peak_sample)
    c_eval = bench_corruption_eval(args)
    doc = {
        "benchmark": "evaluation",
        "quick": args.quick,
        "settings": {"model": "conv4", "image_shape": [32, 32, 3], "num_classes": 10,
                     "realizations": 1, "eval_batch": EVAL_BATCH,
                     "statistic": "median over interleaved rounds"},
        "environment": env,
        "inference": inference,
        "corruption_eval": c_eval,
        "ratios": [
            {"name": "inference/eval_fraction_of_peak", **inference["eval_fraction_of_peak"]},
            {"name": "inference/bf16_over_fp32_forward", **inference["bf16_over_fp32_forward"]},
            {"name": "corruption_eval/corruption_over_clean",
             **c_eval["corruption_over_clean"]},
        ],
        "wall_s": round(time.perf_counter() - tic, 1),
    }
    common.emit_json(doc)
    return doc


if __name__ == "__main__":
    from card_jax import entry

    entry.prepare()  # XLA:CPU flags and malloc tunables for this machine (card_jax/entry.py)
    main()
