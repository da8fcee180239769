"""Where a training step's time goes: forward, backward, mask selection, optimizer, data.

Usage:
  python benchmarks/profile.py [--quick] [--configs=conv4/dense,conv4/ep,...] [--rounds=N]

`--quick` (CI smoke, ~20 s on 2 CPU cores): Conv-4 at width 0.25 with EP only, and the
bf16-vs-fp32 comparison on the same model, 2 rounds.

Prints ONE JSON document to stdout (logs go to stderr). For every (model, method) config
(default: Conv-4 and Conv-8 at full width, CIFAR ResNet-18 of base width 16, each dense, EP
and BP at 80% global sparsity; synthetic 32x32x3 images, 10 classes, batch 128, one
realization) it builds the experiment exactly as `card_jax.train` does and times, as separate
jitted functions built from the production pieces (`steps.make_train_step_parts`):

  batch           gather the batch from the device-resident uint8 training set, crop, flip
  forward         the loss with the method's effective weights (includes mask selection)
  value_and_grad  `jax.value_and_grad` of the same loss
  backward        value_and_grad - forward (derived per round; includes the VJP of the mask's
                  straight-through estimator)
  mask_selection  `method.apply(params, method_state)` alone (EP/BP: exact top-k + the
                  effective weights; dense: the identity)
  optimizer       `tx.update` + learning rate + the method's step hook + `post_update`
  augmix, gaussian   `card_jax.data.augment` on a float batch [128, 32, 32, 3]
  host_to_device_uint8 / _float32   `jax.device_put` of one host batch (what a host-side
                  input pipeline would pay per step; card_jax keeps the training set on
                  device and pays it once)
  full_step       the production `train.CompiledSteps.train` (R = 1), state threaded

Every piece is compiled ahead of time (`jax.jit(f).lower(...).compile()`), so XLA's own cost
analysis (`flops`, `bytes accessed`) comes for free and is reported next to card_jax's
matmul/conv FLOP count (`card_jax.flops`). Pieces are timed round-robin in interleaved rounds
(`common.interleave`); a sample repeats a piece until it lasts `--min-sample-ms`, blocking on
every call. Each piece reports its median ms and its fraction of the full step (ratio of
medians, and the median of per-round ratios, `fraction_of_step_paired`). The pieces are
compiled separately, so they need not add up to the step: XLA fuses across their boundaries
inside the step (`sum_of_parts_over_step`).

A `precision` section times the full step with `train.compute_dtype` float32 vs bfloat16 on
the same model (Conv-4 and ResNet-18; `bf16_over_fp32` = step-time ratio, < 1 is faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable

_REPO = pathlib.Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    # Run as a script, Python puts benchmarks/ first on sys.path, where profile.py would shadow
    # the standard library's `profile`; the repo root takes its place (card_jax importable).
    sys.path[0] = str(_REPO)

import jax
import numpy as np

from benchmarks import common
from benchmarks import train_step
from card_jax import config_util, steps, train
from card_jax import state as state_lib
from card_jax.data import augment
from card_jax.pruning import masks as masks_lib
from card_jax.pruning.base import get_trainable

log = logging.getLogger("card_jax.benchmarks.profile")

MODELS = ("conv4", "conv8", "resnet18")
METHODS = ("dense", "ep", "bp")
RESNET_WIDTH = 16
BATCH = 128
SPARSITY = 0.8


# --------------------------------------------------------------------------------------
# Building the production pieces (shared with masks.py, pipeline.py, evaluation.py)
# --------------------------------------------------------------------------------------

def make_config(model: str, width: float, *, method: str = "dense", scope: str = "global",
                sparsity: float = SPARSITY, dtype: str = "float32", augment_name: str = "none",
                jsd: bool = False, realizations: int = 1, batch_size: int = BATCH,
                train_size: int = 512, **extra: Any):
    """`train_step.make_config` (configs/smoke.py, CIFAR-shaped synthetic data) with the
    method, compute dtype and augmentation set; ResNets take an integer base width and
    no image size. `extra` maps dotted config keys to values."""
    config = train_step.make_config(model, width, realizations, "auto", batch_size,
                                    train_size)
    if model.startswith("resnet"):
        del config.model.kw["image_size"]
        config.model.kw.width = int(width)
    overrides = {"method.name": method, "method.scope": scope, "method.sparsity": sparsity,
                 "train.compute_dtype": dtype, "data.augment": augment_name,
                 "data.jsd": jsd, **extra}
    config_util.set_values(config, overrides)
    return config

@dataclasses.dataclass
class Setup:
    """One experiment with its production step, device data and a realization's state."""

    name: str
    exp: train.Experiment
    compiled: train.CompiledSteps
    state: Any           # [R] device state for compiled.train (donated by every step)
    images: jax.Array    # uint8 [N, H, W, C] on device
    labels: jax.Array    # int32 [N]
    one: Any             # realization 0's state on device, never donated (for pieces)

    @property
    def config(self):
        return self.exp.config

    def spec(self) -> steps.BatchSpec:
        """The BatchSpec `train.CompiledSteps` builds from the config."""
        return train.batch_spec(self.exp)

    def parts(self) -> steps.TrainStepParts:
        cfg = self.config
        return steps.make_train_step_parts(self.exp.graphdef, self.exp.method, self.exp.tx,
                                           self.exp.levels[0].lr_fn, self.spec(),
                                           dtype=cfg.train.compute_dtype)

def build(name: str, config) -> Setup:
    exp = train.build_experiment(config)
    compiled = train.CompiledSteps(exp, exp.levels[0].lr_fn)
    state = compiled.place_state(exp.state)
    images, labels = compiled.place_data(exp.dataset.train_images,
                                         exp.dataset.train_labels.astype(np.int32))
    one = jax.device_put(state_lib.index(exp.state, 0))
    return Setup(name, exp, compiled, state, images, labels, one)

# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Piece:
    """A callable timed as `calls` blocking calls per sample; seconds per call."""

    name: str
    fn: Callable[[], Any]
    calls: int = 1
    first_call_s: float = 0.0
    info: dict = dataclasses.field(default_factory=dict)

    def sample(self) -> float:
        tic = time.perf_counter()
        for _ in range(self.calls):
            jax.block_until_ready(self.fn())
        return (time.perf_counter() - tic) / self.calls

def calibrated(name: str, fn: Callable[[], Any], min_sample_s: float, max_calls: int,
               info: dict | None = None) -> Piece:
    """Warms `fn` up (it must already be compiled) and picks calls per sample."""
    first, _ = common.timed(fn)
    warm = min(common.timed(fn)[0] for _ in range(2))
    calls = int(min(max_calls, max(1, math.ceil(min_sample_s / max(warm, 1e-6)))))
    return Piece(name, fn, calls, first, dict(info or {}))

def aot(fn: Callable, *args, donate: tuple[int, ...] = ()):
    """`jax.jit(fn)` compiled for `args`: (compiled, XLA cost analysis, compile seconds)."""
    tic = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    return compiled, xla_cost(compiled), time.perf_counter() - tic

def xla_cost(compiled) -> dict[str, float]:
    """flops / bytes accessed from XLA's cost analysis (a dict, or a list of one dict in
    older JAX); empty if the backend gives none."""
    try:
        cost = compiled.cost_analysis()
    except Exception as e:  # noqa: BLE001 - optional information
        log.info("no cost analysis: %s", e)
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    out = {}
    for key, name in (("flops", "xla_flops"), ("bytes accessed", "xla_bytes_accessed")):
        if cost and key in cost:
            out[name] = float(cost[key])
    return out

def step_runner(setup: Setup, step: Callable | None = None) -> Callable[[], Any]:
    """One production step (`step`, default `setup.compiled.train`), threading (and
    donating) the [R] state."""
    step = setup.compiled.train if step is None else step

    def run():
        setup.state, metrics = step(setup.state, setup.images, setup.labels)
        return metrics
    return run

# --------------------------------------------------------------------------------------
# One (model, method) config
# --------------------------------------------------------------------------------------

def make_data_pieces(setup: Setup, args) -> dict[str, Piece]:
    """Augmentation and host->device pieces: they depend only on the batch shape, so they
    are compiled once per run and timed within every config's rounds."""
    batch = setup.config.train.batch_size
    host_u8 = np.asarray(setup.exp.dataset.train_images[:batch])
    host_f32 = host_u8.astype(np.float32) / 255.0
    x01 = jax.device_put(host_f32)
    key = jax.random.key(0)
    pieces: dict[str, Piece] = {}
    for name in ("augmix", "gaussian"):
        aug_c, cost, _ = aot(augment.AUGMENTATIONS[name], key, x01)
        pieces[name] = calibrated(name, lambda aug_c=aug_c: aug_c(key, x01),
                                  args.min_sample_ms / 1e3, args.max_calls, cost)
    device = jax.local_devices()[0]
    for name, host in (("host_to_device_uint8", host_u8),
                       ("host_to_device_float32", host_f32)):
        pieces[name] = calibrated(name, lambda host=host: jax.device_put(host, device),
                                  args.min_sample_ms / 1e3, args.max_calls,
                                  {"bytes": int(host.nbytes)})
    return pieces


def make_pieces(setup: Setup, args) -> dict[str, Piece]:
    """The jitted pieces of one config (and its production step), compiled, warmed up and
    calibrated."""
    exp, one = setup.exp, setup.one
    parts = setup.parts()
    method = exp.method
    trainable = get_trainable(method, one.params, one.method_state)

    def cal(name, fn, info=None):
        return calibrated(name, fn, args.min_sample_ms / 1e3, args.max_calls, info)

    def forward(tr, st, x, y):
        return parts.loss(tr, st, x, y)[0]

    def value_and_grad(tr, st, x, y):
        return jax.value_and_grad(parts.loss, has_aux=True)(tr, st, x, y)

    pieces: dict[str, Piece] = {}
    batch_c, cost, _ = aot(parts.batch, one, setup.images, setup.labels)
    x, y = batch_c(one, setup.images, setup.labels)
    pieces["batch"] = cal("batch", lambda: batch_c(one, setup.images, setup.labels), cost)
    fwd_c, cost, _ = aot(forward, trainable, one, x, y)
    pieces["forward"] = cal("forward", lambda: fwd_c(trainable, one, x, y), {
        **cost, "flops": train_step.model_flops(forward, trainable, one, x, y)})
    vg_c, cost, _ = aot(value_and_grad, trainable, one, x, y)
    (_, (_, batch_stats)), grads = vg_c(trainable, one, x, y)
    pieces["value_and_grad"] = cal("value_and_grad", lambda: vg_c(trainable, one, x, y), {
        **cost, "flops": train_step.model_flops(value_and_grad, trainable, one, x, y)})
    mask_c, cost, _ = aot(method.apply, one.params, one.method_state)
    pieces["mask_selection"] = cal(
        "mask_selection", lambda: mask_c(one.params, one.method_state), cost)
    upd_c, cost, _ = aot(parts.update, one, trainable, grads, batch_stats)
    pieces["optimizer"] = cal("optimizer", lambda: upd_c(one, trainable, grads, batch_stats),
                              cost)

    # The production step: CompiledSteps.train compiled ahead of time (same executable as its
    # first call would build, donation included), so the cost analysis needs no 2nd compile.
    step_flops = train_step.model_step_flops(setup.exp, setup.state, setup.images,
                                             setup.labels)
    step_c = setup.compiled.jitted_train.lower(setup.state, setup.images,
                                               setup.labels).compile()
    pieces["full_step"] = cal("full_step", step_runner(setup, step_c),
                              {**xla_cost(step_c), "flops": step_flops})
    return pieces


def summarize_pieces(pieces: dict[str, Piece], samples: dict[str, list[float]],
                     peaks: list[float]) -> dict[str, Any]:
    step = samples["full_step"]
    derived = {"backward": [a - b for a, b in zip(samples["value_and_grad"],
                                                  samples["forward"])]}
    out: dict[str, Any] = {}
    for name, secs in list(samples.items()) + list(derived.items()):
        piece = pieces.get(name)
        entry: dict[str, Any] = {
            "ms": 1e3 * common.median(secs),
            "ms_samples": [round(1e3 * s, 3) for s in secs],
            "fraction_of_step": common.median(secs) / common.median(step),
            "fraction_of_step_paired": common.median([a / b for a, b in zip(secs, step)]),
        }
        if piece is not None:
            entry.update(calls_per_sample=piece.calls,
                         first_call_ms=round(1e3 * piece.first_call_s, 3), **piece.info)
            if piece.info.get("flops"):
                gflops = piece.info["flops"] / common.median(secs) / 1e9
                entry.update(achieved_gflops=gflops, fraction_of_peak=gflops / max(peaks))
        else:
            entry["definition"] = "value_and_grad - forward, per round"
        out[name] = entry
    return out

def bench_config(name: str, model: str, method: str, args, peak,
                 data_pieces: dict[str, Piece]) -> dict[str, Any]:
    width = RESNET_WIDTH if model.startswith("resnet") else args.width
    tic = time.perf_counter()
    setup = build(name, make_config(model, width, method=method))
    if not data_pieces:  # the first config compiles the model-independent pieces
        data_pieces.update(make_data_pieces(setup, args))
    pieces = {**make_pieces(setup, args), **data_pieces}
    build_s = time.perf_counter() - tic
    timers = {n: p.sample for n, p in pieces.items()}
    timers["matmul_peak_gflops"] = peak
    samples = common.interleave(timers, args.rounds)
    peaks = samples.pop("matmul_peak_gflops")
    summary = summarize_pieces(pieces, samples, peaks)
    parts = ("batch", "value_and_grad", "optimizer")
    prunable = masks_lib.prunable_tree(setup.one.params)
    ranked = sorted((n for n in summary if n not in ("full_step", "value_and_grad")),
                    key=lambda n: -summary[n]["ms"])
    log.info("%s: step %.1f ms; %s", name, summary["full_step"]["ms"], ", ".join(
        f"{n} {summary[n]['ms']:.1f}" for n in ranked[:5]))
    return {
        "model": model, "method": method, "width": width,
        "scope": setup.config.method.scope if method != "dense" else None,
        "sparsity": SPARSITY if method != "dense" else 0.0,
        "num_params": int(sum(np.size(x) for x in jax.tree.leaves(setup.one.params))),
        "num_prunable": masks_lib.num_prunable(setup.one.params, prunable),
        "build_and_compile_s": round(build_s, 1),
        "pieces": summary,
        "sum_of_parts_over_step": sum(summary[n]["ms"] for n in parts)
        / summary["full_step"]["ms"],
        "ranked": ranked,
    }

# --------------------------------------------------------------------------------------
# Precision: the full step in float32 vs bfloat16
# --------------------------------------------------------------------------------------

def bench_precision(models: list[str], args) -> dict[str, Any]:
    results = {}
    for model in models:
        width = RESNET_WIDTH if model.startswith("resnet") else args.width
        runners = {}
        for dtype in ("float32", "bfloat16"):
            setup = build(f"{model}/{dtype}", make_config(model, width, dtype=dtype))
            runners[dtype] = calibrated(dtype, step_runner(setup), args.min_sample_ms / 1e3,
                                        args.max_calls)
        samples = common.interleave({d: p.sample for d, p in runners.items()}, args.rounds)
        fp32, bf16 = samples["float32"], samples["bfloat16"]
        results[model] = {
            "width": width,
            "float32_ms": 1e3 * common.median(fp32),
            "bfloat16_ms": 1e3 * common.median(bf16),
            "float32_ms_samples": [round(1e3 * s, 3) for s in fp32],
            "bfloat16_ms_samples": [round(1e3 * s, 3) for s in bf16],
            "bf16_over_fp32": {
                "value": common.median(bf16) / common.median(fp32),
                "paired_median": common.median([b / f for b, f in zip(bf16, fp32)]),
                "definition": "full production step seconds with train.compute_dtype="
                              "bfloat16 / with float32 (< 1: bf16 is faster)",
            },
        }
        log.info("precision %s: fp32 %.1f ms, bf16 %.1f ms", model,
                 results[model]["float32_ms"], results[model]["bfloat16_ms"])
    return results

# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke settings (~20 s)")
    p.add_argument("--configs", default=None,
                   help="comma-separated model/method pairs (default: conv4, conv8 and "
                        "resnet18 x dense, ep, bp; conv4/ep with --quick)")
    p.add_argument("--width", type=float, default=None,
                   help="Conv-k width multiplier (default 1.0; 0.25 with --quick); "
                        f"ResNet-18 always has base width {RESNET_WIDTH}")
    p.add_argument("--precision-models", default=None,
                   help="models of the fp32/bf16 section (default conv4,resnet18; conv4 "
                        "with --quick; 'none' to skip)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved timed rounds (default 5; 2 with --quick)")
    p.add_argument("--min-sample-ms", type=float, default=None,
                   help="a sample repeats a piece until it lasts this long (default 200; "
                        "20 with --quick)")
    p.add_argument("--max-calls", type=int, default=50)
    p.add_argument("--matmul-size", type=int, default=2048)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "configs": "conv4/ep" if quick else ",".join(
            f"{m}/{k}" for m in MODELS for k in METHODS),
        "width": 0.25 if quick else 1.0,
        "precision_models": "conv4" if quick else "conv4,resnet18",
        "rounds": 2 if quick else 5,
        "min_sample_ms": 20.0 if quick else 200.0,
    }
    common.fill_defaults(args, defaults)
    args.configs = [tuple(c.strip().split("/")) for c in args.configs.split(",") if c.strip()]
    for pair in args.configs:
        if len(pair) != 2 or pair[0] not in MODELS or pair[1] not in METHODS:
            p.error(f"--configs entries are model/method with model in {MODELS} and "
                    f"method in {METHODS}, got {'/'.join(pair)!r}")
    args.precision_models = ([] if args.precision_models == "none" else
                             [m.strip() for m in args.precision_models.split(",")])
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args

def main(argv: list[str] | None = None) -> dict[str, Any]:
    common.setup_logging()
    args = parse_args(argv)
    tic = time.perf_counter()
    env = common.environment()
    log.info("backend %s, configs %s, width %g", env["backend"], args.configs, args.width)
    peak_sample = common.make_matmul_peak(args.matmul_size)
    configs = {}
    all_peaks: list[float] = []

    def peak() -> float:
        value = max(peak_sample() for _ in range(2))
        all_peaks.append(value)
        return value

    data_pieces: dict[str, Piece] = {}
    for model, method in args.configs:
        name = f"{model}/{method}"
        configs[name] = bench_config(name, model, method, args, peak, data_pieces)
    precision = bench_precision(args.precision_models, args) if args.precision_models else {}
    doc = {
        "benchmark": "profile",
        "quick": args.quick,
        "settings": {
            "batch_size": BATCH, "image_shape": [32, 32, 3], "num_classes": 10,
            "realizations": 1, "conv_width": args.width, "resnet_width": RESNET_WIDTH,
            "sparsity": SPARSITY, "scope": "global", "rounds": args.rounds,
            "min_sample_ms": args.min_sample_ms,
            "statistic": "median over interleaved rounds of ms per call",
        },
        "environment": env,
        "matmul_peak": {"size": args.matmul_size, "dtype": "float32",
                        "gflops": max(all_peaks) if all_peaks else None,
                        "samples_gflops": [round(p, 2) for p in all_peaks]},
        "configs": configs,
        "precision": precision,
        "wall_s": round(time.perf_counter() - tic, 1),
    }
    common.emit_json(doc)
    return doc


if __name__ == "__main__":
    from card_jax import entry

    entry.prepare()  # XLA:CPU flags and malloc tunables for this machine (card_jax/entry.py)
    main()
