"""Throughput of the robustness tooling: corruption generation, Fourier heat maps, "-C" eval.

Usage:
  python benchmarks/robustness.py [--quick] [--width=1.0] [--corruptions=all|a,b,...]
      [--severities=all|3] [--heatmap-images=16] [--c-images=200] ...

`--quick` (CI smoke, < 40 s on 2 CPU cores): 64 images and 4 corruptions at severity 3, a
Conv-4 of width 0.25, a 4-image heat map and a 40-image "-C" set, one timed round each.

Prints ONE JSON document to stdout (logs go to stderr). Three sections:

1. `corruption_generation`: images/s of `card_jax.data.corruptions.corrupt` for every
   corruption (all 19 by default) on uint8 batches of 28x28x1 and 32x32x3 synthetic images
   (class-prototype images, not noise: JPEG and spatter's edge detection run at a content-
   dependent speed). A sample corrupts the batch at every listed severity (all 5 by default,
   which is what writing a "-C" set costs; several severities have their own compiled
   program), repeated until it lasts `--min-sample-s`, so that millisecond calls are not
   pure timer noise. First calls (compiles) are reported separately and never timed. All
   (shape, corruption) variants are timed round-robin, `common.interleave`.

2. `heatmap`: `card_jax.fourier.heatmap.heatmap` against plain batched evaluation with the
   SAME predict function (R = 2 realizations of a Conv-4 from `train.build_experiment` on a
   synthetic 32x32x3 config, built as `card_jax.heatmaps.run_heatmap` builds it), the same
   model batch (`freq_chunk * len(eps) * min(batch_size, N)`, the batch the heat map feeds
   `predict`) and the same number of `predict` calls (one per heat-map chunk). Plain
   evaluation hoists the parameters out as arguments exactly like the heat map does (so
   neither executable has them baked in as literals) and counts errors on device.
   Compilation is excluded from both: plain evaluation is compiled before timing; the heat
   map jits its chunk function afresh inside every call, so each call compiles (twice: the
   first chunk gets a host accumulator, later ones a device one) and the compile seconds
   of a timed call, read from `jax.monitoring` events (tracing, lowering and XLA compile),
   are subtracted from it. A warm-up call runs first; `*_incl_compile` keeps the raw time.
   Target: `heatmap_over_plain >= 0.8` (images/s of the heat map, counting the `N * E * K`
   perturbed images its map is made of, over images/s of plain evaluation).

3. `corruption_eval`: `card_jax.evaluate.corruption_metrics` over a "-C" folder written to
   a temporary directory in the exact CIFAR-10-C layout (`<corruption>.npy` uint8
   `[5 n, H, W, C]` for the 15 benchmark corruptions, `labels.npy` uint8 `[5 n]`) against
   `train.evaluation_sums` over the same 75 n clean images already on device, with the same
   compiled eval step and eval batch. Cell pixels are copies of the clean test images:
   evaluation cost does not depend on pixel values, and the copies make both paths report
   the same accuracy, which is checked (`accuracy_match`). The ratio is informative: it
   prices streaming the set cell by cell (file reads, host-to-device copies, one host sync
   and one partly masked last batch per cell).

Ratios come as the ratio of medians (`value`) and as the median of per-round ratios
(`paired_median`), which cancels slow drifts in machine load.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import pathlib
import sys
import tempfile
import time
from typing import Any, Callable

_REPO = pathlib.Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    # Run as a script, Python puts benchmarks/ first on sys.path, where profile.py would shadow
    # the standard library's `profile`; the repo root takes its place (card_jax importable).
    sys.path[0] = str(_REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import train_step  # noqa: E402
from card_jax import config_util, evaluate, steps, train  # noqa: E402
from card_jax import state as state_lib  # noqa: E402
from card_jax.data import corruption_sets, corruptions, pipeline, sources  # noqa: E402
from card_jax.fourier import basis as basis_lib  # noqa: E402
from card_jax.fourier import heatmap as heatmap_lib  # noqa: E402

log = logging.getLogger("card_jax.benchmarks.robustness")

TARGET_HEATMAP_OVER_PLAIN = 0.8
REALIZATIONS = 2
CORRUPTION_SHAPES = ((28, 28, 1), (32, 32, 3))
# --quick covers each kind of code path once: a vmapped elementwise op, a lax.scan
# (glass blur's pixel swaps), the host-side Pillow JPEG codec and a trivial op whose time is
# nearly all dispatch overhead.
QUICK_CORRUPTIONS = ("gaussian_noise", "glass_blur", "jpeg_compression", "contrast")
# What a heat-map call is given by `card_jax.heatmaps` (the library defaults), so the
# benchmark follows them if they change.
_HEATMAP_DEFAULTS = {name: p.default for name, p in
                     inspect.signature(heatmap_lib.heatmap).parameters.items()
                     if p.default is not inspect.Parameter.empty}
# Disjoint phases of a compilation (tracing, lowering, XLA); summed, never nested, so their
# total is the compile time of a call. An aggregate event, if a JAX version adds one, must
# not be listed here or it would be counted twice.
_COMPILE_EVENTS = frozenset({
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
})
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class CompileClock:
    """Seconds JAX spent compiling, from `jax.monitoring` duration events.

    Listeners cannot be removed, so main() creates one clock for the process; callers read
    `seconds` / `compiles` before and after the code they time.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.compiles = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs: Any) -> None:
        del kwargs
        if event in _COMPILE_EVENTS:
            self.seconds += duration
            self.compiles += event == _BACKEND_COMPILE

    def timed(self, fn: Callable[[], Any]) -> tuple[float, float, int]:
        """(wall seconds of `fn()` incl. its device work, compile seconds, XLA compiles)."""
        seconds0, compiles0 = self.seconds, self.compiles
        wall, _ = common.timed(fn)
        return wall, self.seconds - seconds0, self.compiles - compiles0


def ratio_entry(num: list[float], den: list[float], definition: str,
                target: float | None = None) -> dict[str, Any]:
    """`median(num) / median(den)` and the median of the per-round ratios (both rates)."""
    return common.median_ratio(num, den, definition, target)


def rate_summary(rates: list[float]) -> dict[str, Any]:
    return {"images_per_s": common.median(rates), "images_per_s_max": max(rates),
            "images_per_s_samples": [round(r, 1) for r in rates]}


# ------------------------------------------------------------------------------------------
# 1. Corruption generation
# ------------------------------------------------------------------------------------------


def synthetic_images(shape: tuple[int, int, int], count: int, seed: int = 0) -> np.ndarray:
    """`count` uint8 synthetic test images of `shape` (prototype + noise, as in the tests)."""
    ds = sources.load("synthetic", synthetic=dict(
        train_size=10, test_size=count, image_shape=shape, num_classes=10, seed=seed))
    return np.asarray(ds.test_images)


def bench_corruptions(args: argparse.Namespace) -> dict[str, Any]:
    severities = args.severities
    timers: dict[str, Callable[[], float]] = {}
    meta: dict[str, dict[str, Any]] = {}
    for shape in CORRUPTION_SHAPES:
        images = synthetic_images(shape, args.corruption_images)
        shape_key = "x".join(map(str, shape))
        for name in args.corruptions:
            def corrupt_all(images=images, name=name) -> None:
                for severity in severities:
                    corruptions.corrupt(images, name, severity, seed=0)

            first_s, _ = common.timed(corrupt_all)  # compiles: one program per static setting
            warm_s, _ = common.timed(corrupt_all)
            # Enough calls per sample to last min_sample_s: a 1 ms call timed once is noise.
            calls = int(min(args.max_calls, max(1, math.ceil(args.min_sample_s / warm_s))))
            per_sample = calls * len(severities) * len(images)

            def sample(fn=corrupt_all, calls=calls, per_sample=per_sample) -> float:
                seconds, _ = common.timed(lambda: [fn() for _ in range(calls)])
                return per_sample / seconds

            key = f"{shape_key}/{name}"
            timers[key] = sample
            meta[key] = {"first_call_s": round(first_s, 4), "calls_per_sample": calls}
            log.info("corrupt %s: first call %.2fs, warm %.4fs, %d call(s) per sample", key,
                     first_s, warm_s, calls)
    samples = common.interleave(timers, args.corruption_reps)

    shapes: dict[str, Any] = {}
    for shape in CORRUPTION_SHAPES:
        shape_key = "x".join(map(str, shape))
        per_corruption = {}
        for name in args.corruptions:
            key = f"{shape_key}/{name}"
            per_corruption[name] = {**rate_summary(samples[key]), **meta[key]}
        # Throughput of writing every listed corruption once: total images / total time.
        total_s = sum(1.0 / v["images_per_s"] for v in per_corruption.values())
        shapes[shape_key] = {
            "image_shape": list(shape),
            "corruptions": per_corruption,
            "all_listed_images_per_s": len(per_corruption) / total_s,
            "slowest": min(per_corruption, key=lambda n: per_corruption[n]["images_per_s"]),
        }
    return {
        "images_per_call": args.corruption_images,
        "severities": list(severities),
        "corruption_names": list(args.corruptions),
        "reps": args.corruption_reps,
        "definition": "images corrupted per second at each listed severity (warm, median "
                      "over rounds); all_listed_images_per_s = images per second of applying "
                      "every listed corruption in turn (harmonic combination)",
        "shapes": shapes,
    }


# ------------------------------------------------------------------------------------------
# The model shared by sections 2 and 3
# ------------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace):
    """Conv-4 with R = 2 realizations from `train.build_experiment`, its compiled steps, its
    device state and a heat-map `predict` built as `card_jax.heatmaps.run_heatmap` does."""
    # train_step's CIFAR-shaped synthetic config, so both benchmarks measure the same model.
    config = train_step.make_config("conv4", args.width, REALIZATIONS, "auto", batch_size=128,
                                    train_size=512)
    overrides = {
        "eval.batch_size": args.eval_batch,
        "data.synthetic.test_size": max(256, args.heatmap_images, args.c_images),
    }
    config_util.set_values(config, overrides)
    exp = train.build_experiment(config)
    compiled = train.CompiledSteps(exp, exp.levels[0].lr_fn)
    state = compiled.place_state(exp.state)
    trees = (state.params, state.batch_stats, state.method_state)

    def predict(x: jax.Array) -> jax.Array:
        """float32 [B, H, W, C] in [0, 1] -> logits [R, B, classes]."""
        logits = [steps.forward(exp.graphdef, exp.method,
                                *(state_lib.index(t, r) for t in trees), x, train=False)[0]
                  for r in range(REALIZATIONS)]
        return jnp.stack(logits)

    log.info("conv4 width %g, R=%d, strategy %s, eval batch %d", args.width, REALIZATIONS,
             compiled.strategy, args.eval_batch)
    return exp, compiled, state, predict


# ------------------------------------------------------------------------------------------
# 2. Heat map vs plain evaluation
# ------------------------------------------------------------------------------------------


def make_plain_eval(predict: Callable, model_batch: int, image_shape: tuple[int, ...]):
    """`run(acc, images, labels, start) -> acc + errors per realization` over
    `images[start:start + model_batch]`, jitted once.

    The parameters are hoisted out of `predict` as arguments the way the heat map does it
    (`make_jaxpr` consts), so both executables see them the same way.
    """
    closed = jax.make_jaxpr(predict)(
        jax.ShapeDtypeStruct((model_batch, *image_shape), jnp.float32))
    consts = list(closed.consts)

    def run(acc, consts, images, labels, start):
        x = pipeline.to_float(jax.lax.dynamic_slice_in_dim(images, start, model_batch))
        y = jax.lax.dynamic_slice_in_dim(labels, start, model_batch)
        (logits,) = jax.core.eval_jaxpr(closed.jaxpr, consts, x)
        wrong = jnp.argmax(logits.reshape(acc.shape[0], model_batch, -1), -1) != y
        return acc + jnp.sum(wrong, axis=-1, dtype=jnp.int32)

    step = jax.jit(run)
    return lambda acc, images, labels, start: step(acc, consts, images, labels, start)


def bench_heatmap(args: argparse.Namespace, exp, predict: Callable,
                  clock: CompileClock) -> dict[str, Any]:
    n = args.heatmap_images
    eps = tuple(args.eps)
    images = np.asarray(exp.dataset.test_images[:n])
    labels = np.asarray(exp.dataset.test_labels[:n], np.int32)
    h, w, c = images.shape[1:]
    key = jax.random.key(0)
    batch = min(args.heatmap_batch, n)
    num_freq = len(basis_lib.distinct_frequencies(h, w))
    freq_chunk = min(args.freq_chunk, num_freq)
    padded_freq = math.ceil(num_freq / freq_chunk) * freq_chunk
    model_batch = freq_chunk * len(eps) * batch
    calls = (padded_freq // freq_chunk) * math.ceil(n / batch)  # heat-map chunks = predict calls
    map_images = n * len(eps) * num_freq  # the perturbed images the map is made of

    def run_heatmap() -> np.ndarray:
        return heatmap_lib.heatmap(predict, images, labels, eps, key=key, batch_size=batch,
                                   freq_chunk=freq_chunk)

    # Plain evaluation: the same predict calls over a pool of clean images on device (a few
    # batches cycled through, so memory stays bounded for any N).
    pool_batches = min(calls, 8)
    pool_x = jax.device_put(np.resize(np.asarray(exp.dataset.test_images),
                                      (pool_batches * model_batch, h, w, c)))
    pool_y = jax.device_put(np.resize(np.asarray(exp.dataset.test_labels, np.int32),
                                      (pool_batches * model_batch,)))
    plain_step = make_plain_eval(predict, model_batch, (h, w, c))
    # Committed to the device like the accumulator each call returns, so that every call
    # has one signature (an uncommitted first accumulator would compile a second program).
    zeros = jax.device_put(np.zeros((REALIZATIONS,), np.int32), jax.local_devices()[0])
    starts = [np.int32((i % pool_batches) * model_batch) for i in range(calls)]

    def run_plain() -> jax.Array:
        acc = zeros
        for start in starts:  # dispatched asynchronously; one read-back at the end
            acc = plain_step(acc, pool_x, pool_y, start)
        return acc

    log.info("heatmap: N=%d, eps=%s, K=%d frequencies (%d padded), chunk %d freq x %d "
             "images -> model batch %d, %d predict calls, %d map images", n, eps, num_freq,
             padded_freq, freq_chunk, batch, model_batch, calls, map_images)
    warm = {}
    for name, fn in (("heatmap", run_heatmap), ("plain", run_plain)):
        wall, compile_s, compiles = clock.timed(fn)
        warm[name] = {"first_call_s": round(wall, 3), "first_call_compile_s": round(compile_s, 3),
                      "first_call_compiles": compiles}
        log.info("warm-up %s: %.2fs (%.2fs compiling, %d XLA compiles)", name, wall, compile_s,
                 compiles)

    records: dict[str, list[tuple[float, float, int]]] = {"heatmap": [], "plain": []}

    def sampler(name: str, fn: Callable, count: int) -> Callable[[], float]:
        def sample() -> float:
            wall, compile_s, compiles = clock.timed(fn)
            records[name].append((wall, compile_s, compiles))
            return count / (wall - compile_s)  # images/s, compilation excluded
        return sample

    samples = common.interleave({
        "heatmap": sampler("heatmap", run_heatmap, map_images),
        "plain": sampler("plain", run_plain, calls * model_batch),
    }, args.heatmap_rounds)
    raw_heatmap = [map_images / wall for wall, _, _ in records["heatmap"]]

    def timing(name: str) -> dict[str, Any]:
        rec = records[name]
        return {
            "seconds_samples": [round(wall - comp, 3) for wall, comp, _ in rec],
            "compile_s_samples": [round(comp, 3) for _, comp, _ in rec],
            "xla_compiles_per_call": [count for _, _, count in rec],
            **warm[name],
        }

    return {
        "model": "conv4", "width": args.width, "realizations": REALIZATIONS,
        "images": n, "eps": list(eps), "frequencies": num_freq,
        "padded_frequencies": padded_freq, "batch_size": batch, "freq_chunk": freq_chunk,
        "model_batch": model_batch, "predict_calls": calls, "rounds": args.heatmap_rounds,
        "heatmap": {"images": map_images, **rate_summary(samples["heatmap"]),
                    "images_per_s_incl_compile": common.median(raw_heatmap),
                    **timing("heatmap")},
        "plain": {"images": calls * model_batch, **rate_summary(samples["plain"]),
                  **timing("plain")},
        "heatmap_over_plain": ratio_entry(
            samples["heatmap"], samples["plain"],
            "(N * len(eps) * K perturbed images / heat-map seconds less its compile seconds) / "
            "(images / seconds of plain evaluation: same predict, same model batch, same "
            "number of predict calls)", TARGET_HEATMAP_OVER_PLAIN),
        "heatmap_over_plain_incl_compile": ratio_entry(
            raw_heatmap, samples["plain"],
            "as heatmap_over_plain, with the compilation every heat-map call does"),
    }


# ------------------------------------------------------------------------------------------
# 3. Evaluation over a "-C" folder vs plain evaluation
# ------------------------------------------------------------------------------------------


def write_c_folder(folder: pathlib.Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The CIFAR-10-C layout: `<corruption>.npy` uint8 [5 n, H, W, C] (severities 1..5
    stacked) for the 15 benchmark corruptions and `labels.npy` [5 n] (uint8, as released)."""
    severities = len(corruption_sets.SEVERITIES)
    stacked = np.concatenate([images] * severities)
    for name in corruption_sets.CORRUPTIONS:
        np.save(folder / f"{name}.npy", stacked)
    np.save(folder / corruption_sets.LABELS_FILE,
            np.concatenate([labels] * severities).astype(np.uint8))


def bench_corruption_eval(args: argparse.Namespace, exp, compiled, state) -> dict[str, Any]:
    n, batch = args.c_images, args.eval_batch
    images = np.asarray(exp.dataset.test_images[:n])
    labels = np.asarray(exp.dataset.test_labels[:n], np.int32)
    cells = len(corruption_sets.CORRUPTIONS) * len(corruption_sets.SEVERITIES)
    total = cells * n
    # The plain path: the same cells' images, all on device before the clock starts.
    plain_x, plain_y = compiled.place_data(np.concatenate([images] * cells),
                                           np.concatenate([labels] * cells))
    cell_x, cell_y = compiled.place_data(images, labels)
    padded_cell = math.ceil(n / batch) * batch

    with tempfile.TemporaryDirectory(prefix="card_jax_bench_c_") as tmp:
        folder = pathlib.Path(tmp)
        write_c_folder(folder, images, labels)
        nbytes = sum(f.stat().st_size for f in folder.iterdir())
        log.info("wrote a -C folder of %d cells x %d images (%.1f MB) in %s", cells, n,
                 nbytes / 1e6, folder)

        # Compile both eval shapes ([n] per cell, [75 n] plain) with one batch each.
        for x, y in ((cell_x, cell_y), (plain_x, plain_y)):
            jax.block_until_ready(compiled.eval(state, x, y, jnp.int32(0)))

        results: dict[str, Any] = {}

        def run_c() -> float:
            seconds, results["c"] = common.timed(
                lambda: evaluate.corruption_metrics(compiled, state, str(folder), batch))
            return total / seconds

        def run_plain() -> float:
            seconds, results["plain"] = common.timed(
                lambda: train.evaluation_sums(compiled, state, plain_x, plain_y, batch))
            return total / seconds

        samples = common.interleave({"corruption_metrics": run_c, "plain": run_plain},
                                    args.c_rounds)

    c_acc = np.asarray(results["c"]["corruption_acc"])
    plain_acc = results["plain"]["correct"] / total
    return {
        "images_per_cell": n, "cells": cells, "images": total, "eval_batch": batch,
        "folder_mb": round(nbytes / 1e6, 2), "rounds": args.c_rounds,
        "corruption_metrics": {"evaluated_images": cells * padded_cell,
                               **rate_summary(samples["corruption_metrics"])},
        "plain": {"evaluated_images": math.ceil(total / batch) * batch,
                  **rate_summary(samples["plain"])},
        "corruption_eval_over_plain": ratio_entry(
            samples["corruption_metrics"], samples["plain"],
            "(75 n images / seconds of evaluate.corruption_metrics over the -C folder) / "
            "(75 n images / seconds of train.evaluation_sums on the same images on device)"),
        # Every cell holds the clean images, so both paths must agree exactly.
        "accuracy_match": bool(np.allclose(c_acc, plain_acc)),
        "accuracy": np.asarray(plain_acc).tolist(),
    }


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke settings (< 40 s)")
    p.add_argument("--width", type=float, default=None,
                   help="Conv-4 width multiplier (default 1.0; 0.25 with --quick)")
    p.add_argument("--corruptions", default=None,
                   help="'all', 'benchmark', 'extra' or names (default all; 4 with --quick)")
    p.add_argument("--severities", default=None, help="'all' or e.g. '3' (default all; 3 "
                   "with --quick)")
    p.add_argument("--corruption-images", type=int, default=None,
                   help="images per corrupt() call (default 512; 64 with --quick)")
    p.add_argument("--corruption-reps", type=int, default=None,
                   help="timed rounds of section 1 (default 3; 2 with --quick)")
    p.add_argument("--min-sample-s", type=float, default=None,
                   help="calls are repeated until a sample lasts this long (default 0.2; "
                        "0.02 with --quick)")
    p.add_argument("--max-calls", type=int, default=50, help="cap on calls per sample")
    p.add_argument("--heatmap-images", type=int, default=None,
                   help="test images N of the heat map (default 16; 4 with --quick): it "
                        "evaluates N * 3 eps * 514 frequencies, ~50 s per call at width 1 "
                        "on 2 CPU cores for N = 16")
    p.add_argument("--eps", type=lambda s: [float(e) for e in s.split(",")],
                   default=list(_HEATMAP_DEFAULTS["eps"]), help="heat-map eps values")
    p.add_argument("--heatmap-batch", type=int, default=_HEATMAP_DEFAULTS["batch_size"],
                   help="heat-map batch_size (clean images per chunk; capped at N)")
    p.add_argument("--freq-chunk", type=int, default=_HEATMAP_DEFAULTS["freq_chunk"])
    p.add_argument("--heatmap-rounds", type=int, default=None,
                   help="timed rounds of section 2 after a warm-up (default 2; 1 with --quick)")
    p.add_argument("--c-images", type=int, default=None,
                   help="images per (corruption, severity) cell (default 200; 40 with --quick)")
    p.add_argument("--c-rounds", type=int, default=None,
                   help="timed rounds of section 3 (default 2; 1 with --quick)")
    p.add_argument("--eval-batch", type=int, default=None,
                   help="eval batch of section 3 (default min(100, c-images): a divisor of "
                        "the cell size, so the ratio prices streaming, not padding)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "width": 0.25 if quick else 1.0,
        "corruptions": ",".join(QUICK_CORRUPTIONS) if quick else "all",
        "severities": "3" if quick else "all",
        "corruption_images": 64 if quick else 512,
        "corruption_reps": 2 if quick else 3,
        "min_sample_s": 0.02 if quick else 0.2,
        "heatmap_images": 4 if quick else 16,
        "heatmap_rounds": 1 if quick else 2,
        "c_images": 40 if quick else 200,
        "c_rounds": 1 if quick else 2,
    }
    common.fill_defaults(args, defaults)
    if args.eval_batch is None:
        args.eval_batch = min(100, args.c_images)
    args.corruptions = corruption_sets.resolve_corruptions(args.corruptions)
    args.severities = corruption_sets.resolve_severities(args.severities)
    for name in ("corruption_images", "heatmap_images", "c_images", "eval_batch",
                 "corruption_reps", "heatmap_rounds", "c_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    common.setup_logging()
    args = parse_args(argv)
    tic = time.perf_counter()
    clock = CompileClock()
    env = common.environment()
    log.info("backend %s (%s), %d device(s); quick=%s", env["backend"], env["device_kind"],
             env["device_count"], args.quick)

    section_s = {}
    t0 = time.perf_counter()
    generation = bench_corruptions(args)
    section_s["corruption_generation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    exp, compiled, state, predict = build_model(args)
    section_s["build_model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    heat = bench_heatmap(args, exp, predict, clock)
    section_s["heatmap"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    c_eval = bench_corruption_eval(args, exp, compiled, state)
    section_s["corruption_eval"] = time.perf_counter() - t0

    doc = {
        "benchmark": "robustness",
        "quick": args.quick,
        "settings": {
            "width": args.width, "realizations": REALIZATIONS, "strategy": compiled.strategy,
            "corruption_images": args.corruption_images,
            "corruptions": list(args.corruptions), "severities": list(args.severities),
            "heatmap_images": args.heatmap_images, "eps": list(args.eps),
            "c_images": args.c_images, "eval_batch": args.eval_batch,
            "statistic": "median over interleaved rounds; compilation excluded",
        },
        "environment": env,
        "corruption_generation": generation,
        "heatmap": heat,
        "corruption_eval": c_eval,
        "section_s": {k: round(v, 1) for k, v in section_s.items()},
        "wall_s": round(time.perf_counter() - tic, 1),
    }
    common.emit_json(doc)
    return doc


if __name__ == "__main__":
    from card_jax import entry

    entry.prepare()  # XLA:CPU flags and malloc tunables for this machine (card_jax/entry.py)
    main()
