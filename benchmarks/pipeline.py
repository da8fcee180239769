"""Input pipeline cost: training steps with on-device AugMix / JSD / Gaussian vs without.

Usage:
  python benchmarks/pipeline.py [--quick] [--widths=1.0,0.25] [--rounds=N]

`--quick` (CI smoke, ~25 s on 2 CPU cores): Conv-4 at width 0.25 only, without the JSD and
Gaussian steps, 2 rounds, and the AugMix breakdown (without depth 1) on 32 images.

Prints ONE JSON document to stdout (logs go to stderr).

Where the input pipeline runs: card_jax has no host-side pipeline to prefetch. The whole
training set lives on device as uint8 and every step gathers its batch, crops, flips and
augments it inside the compiled step (`steps.make_train_step_parts(...).batch`), so a step
does no host work and no host->device copy. Section `steps` measures what that costs:

  none / augmix / jsd / gaussian   the production step (`train.CompiledSteps`, Conv-4 dense,
                                   one realization, batch 128, synthetic 32x32x3) with
                                   data.augment=none, augmix, augmix + data.jsd (the clean and
                                   two AugMix views in ONE forward batch of 3 x 128), gaussian
  batch_ms                         the batch gather + crop + flip alone (jitted), and
  host_to_device_uint8_ms          `jax.device_put` of one uint8 batch from the host: what
                                   a host pipeline would pay per step instead
  augmix_over_none                 step time with AugMix / without; target <= 1.15
  jsd_over_none, gaussian_over_none   the same for JSD and Gaussian noise (no target: JSD
                                   triples the forward/backward batch by design)

Section `augmix_breakdown` (where AugMix's time goes; `card_jax/data/augment.py` is not
changed by this benchmark): ms per batch of the production AugMix (3 chains of depth 1-3 per
image, 6 chain steps on average, each computing only the table or warp its op needs), of the
earlier layout `augmix_all_steps` (9 masked steps per image, every piece in each: same
values), AugMix with depth 1, one full chain step, and its pieces: the image-dependent colour
tables (autocontrast; equalize needs a per-image histogram), applying a table, the
bilinear affine warp, and all of a batch's random draws (`draws`).
"""

from __future__ import annotations

import argparse
import functools
import logging
import pathlib
import sys
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
from benchmarks import profile as profile_bench  # noqa: E402
from card_jax import train  # noqa: E402
from card_jax.data import augment  # noqa: E402

log = logging.getLogger("card_jax.benchmarks.pipeline")

TARGET_AUGMIX_OVER_NONE = 1.15
BREAKDOWN = ("augmix", "augmix_all_steps", "augmix_depth1", "chain_step", "colour_tables",
             "apply_table", "affine_warp", "draws")
VARIANTS = {  # name -> (data.augment, data.jsd)
    "none": ("none", False),
    "augmix": ("augmix", False),
    "jsd": ("augmix", True),
    "gaussian": ("gaussian", False),
}


def ratio(num: list[float], den: list[float], definition: str,
          target: float | None = None) -> dict[str, Any]:
    """Time ratio median(num) / median(den) (lower is better) and its paired median."""
    return common.median_ratio(num, den, definition, target, comparison="<=")


def bench_width(width: float, args: argparse.Namespace) -> dict[str, Any]:
    pieces: dict[str, profile_bench.Piece] = {}
    setups = {}
    for name, (aug, jsd) in VARIANTS.items():
        if name not in args.variants:
            continue
        setup = profile_bench.build(f"conv4/{name}", profile_bench.make_config(
            "conv4", width, augment_name=aug, jsd=jsd))
        setups[name] = setup
        pieces[name] = profile_bench.calibrated(name, profile_bench.step_runner(setup),
                                                args.min_sample_ms / 1e3, args.max_calls)
        log.info("width %g %s: compiled, first step %.2fs", width, name,
                 pieces[name].first_call_s)
    plain = setups["none"]
    one = plain.one
    batch_c, _, _ = profile_bench.aot(plain.parts().batch, one, plain.images, plain.labels)
    pieces["batch"] = profile_bench.calibrated(
        "batch", lambda: batch_c(one, plain.images, plain.labels), args.min_sample_ms / 1e3,
        args.max_calls)
    host = np.asarray(plain.exp.dataset.train_images[:profile_bench.BATCH])
    device = jax.local_devices()[0]
    pieces["host_to_device_uint8"] = profile_bench.calibrated(
        "host_to_device_uint8", lambda: jax.device_put(host, device), args.min_sample_ms / 1e3,
        args.max_calls)
    samples = common.interleave({n: p.sample for n, p in pieces.items()}, args.rounds)
    none = samples["none"]
    out: dict[str, Any] = {
        "width": width,
        "step_ms": {n: 1e3 * common.median(samples[n]) for n in args.variants},
        "step_ms_samples": {n: [round(1e3 * s, 3) for s in samples[n]] for n in args.variants},
        "batch_ms": 1e3 * common.median(samples["batch"]),
        "batch_fraction_of_step": common.median(samples["batch"]) / common.median(none),
        "host_to_device_uint8_ms": 1e3 * common.median(samples["host_to_device_uint8"]),
        "host_to_device_fraction_of_step":
            common.median(samples["host_to_device_uint8"]) / common.median(none),
        "augmix_extra_ms": 1e3 * (common.median(samples["augmix"]) - common.median(none)),
        "ratios": {},
    }
    definitions = {
        "augmix": "seconds per production step with data.augment=augmix / with none (Conv-4 "
                  "dense, same batch)",
        "jsd": "seconds per step with AugMix + JSD (3 views in one forward of 3B images) / "
               "without augmentation",
        "gaussian": "seconds per step with Gaussian noise / without",
    }
    for name, definition in definitions.items():
        if name in samples:
            out["ratios"][f"{name}_over_none"] = ratio(
                samples[name], none, definition,
                TARGET_AUGMIX_OVER_NONE if name == "augmix" else None)
    log.info("width %g: %s", width, ", ".join(f"{k} {v['value']:.3f}"
                                              for k, v in out["ratios"].items()))
    return out


def augmix_all_steps(key: jax.Array, x01: jax.Array) -> jax.Array:
    """AugMix laid out as card_jax computed it before the paged chain steps: per image, a
    scan over 3 masked steps of 3 chains, each step building every table and the warp.

    Same values as `augment.augmix` (the same draws); timed beside it for the before/after.
    """
    def one(k, x):
        weights, m, chain_key = augment._mix_draws(k, 3, 1.0)
        levels = jnp.round(x * 255.0).astype(jnp.int32)

        def chain(ck):
            depth_key, step_key = jax.random.split(ck)
            d = jax.random.randint(depth_key, (), 1, 4)

            def body(image, s):
                stepped = augment._chain_step(jax.random.fold_in(step_key, s), image, 3.0)
                return jnp.where(s < d, stepped, image), None

            image, _ = jax.lax.scan(body, levels, jnp.arange(3))
            return image.astype(jnp.float32) * (1.0 / 255.0)

        mix = jnp.tensordot(weights, jax.vmap(chain)(jax.random.split(chain_key, 3)), axes=1)
        return jnp.clip((1.0 - m) * x + m * mix, 0.0, 1.0)

    return jax.vmap(one)(jax.random.split(key, x01.shape[0]), x01)


def bench_augmix_breakdown(args: argparse.Namespace) -> dict[str, Any]:
    """ms per batch of AugMix and of the pieces of one chain step (vmapped over the batch)."""
    # The benchmarks' synthetic CIFAR-shaped images (class prototypes, not noise: the colour
    # tables' histograms see realistic content).
    ds = train.load_data(profile_bench.make_config("conv4", 0.25).data)
    x01 = jnp.asarray(np.asarray(ds.train_images[:args.breakdown_images], np.float32) / 255.0)
    levels = jnp.round(x01 * 255.0).astype(jnp.int32)
    key = jax.random.key(0)
    keys = jax.random.split(key, x01.shape[0])
    h, w, _ = x01.shape[1:]
    rotate = augment.rotate_matrix(jnp.float32(20.0), h, w)
    fns: dict[str, tuple[Callable, tuple]] = {
        "augmix": (augment.augmix, (key, x01)),
        "augmix_all_steps": (augmix_all_steps, (key, x01)),
        "augmix_depth1": (functools.partial(augment.augmix, depth=1), (key, x01)),
        "chain_step": (jax.vmap(lambda k, im: augment._chain_step(k, im, 3.0)), (keys, levels)),
        "colour_tables": (jax.vmap(lambda im: (augment.autocontrast_lut(im),
                                               augment.equalize_lut(im))), (levels,)),
        "apply_table": (jax.vmap(lambda im: augment._apply_lut(
            im, augment.posterize_lut(jnp.int32(2), im.shape[-1]))), (levels,)),
        "affine_warp": (jax.vmap(lambda im: augment.affine(im, rotate)), (levels,)),
        # every random draw of AugMix for this batch, as `augmix` makes them
        "draws": (lambda k: augment._batch_draws(k, x01.shape[0], 3, -1, 3.0, 1.0), (key,)),
    }
    pieces = {}
    for name, (fn, fargs) in fns.items():
        if name not in args.breakdown:
            continue
        compiled, _, compile_s = profile_bench.aot(fn, *fargs)
        pieces[name] = profile_bench.calibrated(
            name, lambda c=compiled, a=fargs: c(*a), args.min_sample_ms / 1e3, args.max_calls,
            {"compile_s": round(compile_s, 2)})
    samples = common.interleave({n: p.sample for n, p in pieces.items()}, args.rounds)
    ms = {n: 1e3 * common.median(s) for n, s in samples.items()}
    return {
        "images": int(x01.shape[0]),
        "ms": ms,
        "ms_per_image": {n: v / x01.shape[0] for n, v in ms.items()},
        "compile_s": {n: p.info["compile_s"] for n, p in pieces.items()},
        "chain_steps_drawn_per_image": 6,
        "augmix_over_6_chain_steps": ms["augmix"] / (6 * ms["chain_step"]),
        "augmix_over_all_steps": ms["augmix"] / ms["augmix_all_steps"]
        if "augmix_all_steps" in ms else None,
        "colour_tables_fraction_of_chain_step": ms["colour_tables"] / ms["chain_step"],
        "draws_fraction_of_augmix": ms["draws"] / ms["augmix"] if "draws" in ms else None,
        "definition": "AugMix draws 3 chains of depth 1-3 per image (6 chain steps on "
                      "average); `augmix` computes a histogram table only for the chain steps "
                      "that drew autocontrast/equalize and a warp only for the geometric ones "
                      "(augment._paged_rows). augmix_all_steps: the earlier layout, 9 masked "
                      "steps per image each building every table and the warp (same values); "
                      "chain_step: one such step of every image",
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke settings (~25 s)")
    p.add_argument("--widths", default=None,
                   help="Conv-4 width multipliers (default 1.0,0.25; 0.25 with --quick)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved timed rounds (default 5; 2 with --quick)")
    p.add_argument("--min-sample-ms", type=float, default=None,
                   help="a sample repeats a step until it lasts this long (default 300; 30 "
                        "with --quick)")
    p.add_argument("--max-calls", type=int, default=20)
    p.add_argument("--breakdown-images", type=int, default=None,
                   help="images of the AugMix breakdown (default 128; 32 with --quick)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"widths": "0.25" if quick else "1.0,0.25", "rounds": 2 if quick else 5,
                "min_sample_ms": 30.0 if quick else 300.0,
                "breakdown_images": 32 if quick else profile_bench.BATCH}
    common.fill_defaults(args, defaults)
    args.widths = [float(w) for w in args.widths.split(",") if w.strip()]
    # --quick skips what only adds compile time: the JSD and Gaussian steps, AugMix at depth 1
    # and in its earlier layout.
    args.variants = [v for v in VARIANTS if not (quick and v in ("jsd", "gaussian"))]
    args.breakdown = [b for b in BREAKDOWN
                      if not (quick and b in ("augmix_depth1", "augmix_all_steps"))]
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    common.setup_logging()
    args = parse_args(argv)
    tic = time.perf_counter()
    env = common.environment()
    widths = {f"{w:g}": bench_width(w, args) for w in args.widths}
    breakdown = bench_augmix_breakdown(args)
    ratios = []
    for key, result in widths.items():
        for name, entry in result["ratios"].items():
            ratios.append({"name": f"conv4_w{key}/{name}", **entry})
    doc = {
        "benchmark": "pipeline",
        "quick": args.quick,
        "settings": {"model": "conv4", "method": "dense", "batch_size": profile_bench.BATCH,
                     "image_shape": [32, 32, 3], "realizations": 1, "rounds": args.rounds,
                     "statistic": "median over interleaved rounds"},
        "environment": env,
        "input_pipeline": "the training set is on device (uint8); each step gathers, crops, "
                          "flips and augments its batch inside the compiled step: no host "
                          "work and no host->device copy per step, so nothing to prefetch",
        "widths": widths,
        "augmix_breakdown": breakdown,
        "ratios": ratios,
        "wall_s": round(time.perf_counter() - tic, 1),
    }
    common.emit_json(doc)
    return doc


if __name__ == "__main__":
    from card_jax import entry

    entry.prepare()  # XLA:CPU flags and malloc tunables for this machine (card_jax/entry.py)
    main()
