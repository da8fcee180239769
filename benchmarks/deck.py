"""CARD-Deck inference cost: the spectral gate against member inference, adaptive vs agnostic.

Usage:
  python benchmarks/deck.py [--quick] [--model=conv4] [--width=0.25] [--image_size=32]
      [--channels=1] [--members=4] [--representatives=5000] [--gate_batch=100]

Defaults are the embedded default's cards (Conv-4 width 0.25 on 32x32x1 Fashion-MNIST-sized
images), a 2 + 2 deck and the paper's gate (P = 5000 representatives per group, batches of
M = 100). The members are freshly initialised (inference cost does not depend on training)
and the representatives are real gate features (`gate.representative_features`) of
synthetic images; the production code paths time them: `gate.Gate` and `predict.DeckFn`.

Per batch of M images (medians over interleaved rounds, each round `--batches` batches):
  gate_brute_s, gate_kdtree_s  the gate alone: spectral features on device, nearest
                               representative of the batch mean in every group, the choice
                               on the host (brute force on device / scipy cKDTree)
  member_s                     ONE member's forward pass + softmax
  agnostic_s                   all K members (mean of softmaxes)
  adaptive_s                   gate (brute) + the chosen group's K/2 members
Ratios (value from medians; paired_median = median of the per-round ratios):
  gate_over_member_inference          gate_brute_s / member_s, target < 0.05
  adaptive_over_agnostic_throughput   agnostic_s / adaptive_s, expected ~2 for 2 groups
Everything runs with the deck job's synchronous dispatch (`deck.run.use_synchronous_dispatch`,
as `card_jax.main` sets it for decks): each call runs on the calling thread.
`--quick` (tests, CI): 2 rounds of 2 batches and 1000 representatives.
Prints ONE JSON document on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time

_REPO = pathlib.Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    # Run as a script, Python puts benchmarks/ first on sys.path, where profile.py would shadow
    # the standard library's `profile`; the repo root takes its place (card_jax importable).
    sys.path[0] = str(_REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from card_jax import state as state_lib  # noqa: E402
from card_jax import train  # noqa: E402
from card_jax.data import sources  # noqa: E402
from card_jax.deck import gate as gate_lib  # noqa: E402
from card_jax.deck import predict, spectral  # noqa: E402
from card_jax.deck import run as deck_run  # noqa: E402

log = logging.getLogger("card_jax.benchmarks.deck")

TARGET_GATE_OVER_MEMBER = 0.05
EXPECTED_ADAPTIVE_SPEEDUP = 2.0
NUM_CLASSES = 10


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="conv4")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--representatives", type=int, default=5000)
    parser.add_argument("--gate_batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=10, help="batches per round")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.batches = 2, 2
        args.representatives = min(args.representatives, 1000)
    if args.members < 2 or args.members % 2:
        parser.error("--members must be even and >= 2 (two equal groups)")
    return args


def init_members(args, dataset: sources.Dataset):
    """(graphdef, params [K, ...], batch_stats [K, ...]) of K freshly initialised members, in
    one compiled, vmapped initialisation."""
    import ml_collections

    config = ml_collections.ConfigDict({"model": {"name": args.model, "kw": {
        "width": args.width, **({"image_size": args.image_size}
                                if args.model.startswith("conv") else {})}}})
    graphdefs = []

    def init(key):
        graphdef, params, batch_stats = state_lib.split_model(
            train.build_model(config, dataset, key))
        graphdefs.append(graphdef)
        return params, batch_stats

    keys = jax.random.split(jax.random.key(0), args.members)
    params, batch_stats = jax.jit(jax.vmap(init))(keys)
    return graphdefs[0], jax.device_get(params), jax.device_get(batch_stats)


def main(argv=None) -> None:
    common.setup_logging()
    args = parse_args(argv)
    # The deck job's dispatch (`card_jax.main` sets it for decks): every call runs on the
    # calling thread; gate and members are timed as the deck runs them.
    deck_run.use_synchronous_dispatch()
    size = args.image_size
    dataset = sources.load("synthetic", synthetic=dict(
        train_size=512, test_size=max(args.gate_batch * args.batches, args.gate_batch),
        image_size=size, channels=args.channels, num_classes=NUM_CLASSES, seed=0))
    options = spectral.SpectrumOptions()
    # Two groups with different spectra; "none" stands in for AugMix, whose compilation
    # takes seconds and whose representatives cost the gate exactly as much.
    groups = ("none", "gaussian")
    references = np.stack([gate_lib.representative_features(
        gate_lib.group_key(0, g), dataset.train_images, args.representatives, g, options)
        for g in groups])
    gates = {nn: gate_lib.Gate(references, options, nn=nn) for nn in gate_lib.NN_METHODS}
    graphdef, params, batch_stats = init_members(args, dataset)
    k, half = args.members, args.members // 2
    one = predict.DeckFn(graphdef, 1, mesh=None)
    group = predict.DeckFn(graphdef, half, mesh=None)
    every = predict.DeckFn(graphdef, k, mesh=None)
    stacks = {
        "one": jax.device_put(predict.select_members((params, batch_stats), [0])),
        "groups": [jax.device_put(predict.select_members((params, batch_stats),
                                                         list(range(g * half, (g + 1) * half))))
                   for g in range(2)],
        "all": jax.device_put((params, batch_stats)),
    }
    batches = [(jax.device_put(x), v) for x, v in _batches(dataset.test_images,
                                                           args.gate_batch)][:args.batches]

    def per_batch(fn):
        def sample() -> float:
            tic = time.perf_counter()
            for x, valid in batches:
                jax.block_until_ready(fn(x, valid))
            return (time.perf_counter() - tic) / len(batches)
        return sample

    def adaptive(x, valid):
        choice, _ = gates["brute"](x, valid)
        return group(*stacks["groups"][int(choice[0])], x)[0]

    variants = {
        "gate_brute_s": per_batch(lambda x, v: gates["brute"](x, v)[0]),
        "gate_kdtree_s": per_batch(lambda x, v: gates["kdtree"](x, v)[0]),
        "member_s": per_batch(lambda x, v: one(*stacks["one"], x)[0]),
        "agnostic_s": per_batch(lambda x, v: every(*stacks["all"], x)[0]),
        "adaptive_s": per_batch(adaptive),
    }
    for sample in variants.values():
        sample()  # compile and warm up
    samples = common.interleave(variants, args.rounds)
    med = {name: common.median(s) for name, s in samples.items()}

    def ratio(a: str, b: str) -> dict:
        return {"value": med[a] / med[b],
                "paired_median": common.median([x / y for x, y in zip(samples[a],
                                                                       samples[b])])}

    gate_ratio = ratio("gate_brute_s", "member_s")
    speedup = ratio("agnostic_s", "adaptive_s")
    doc = {
        "benchmark": "deck",
        "quick": args.quick,
        "settings": {"model": args.model, "width": args.width,
                     "image_shape": [size, size, args.channels], "members": k,
                     "groups": list(groups), "representatives": args.representatives,
                     "gate_batch": args.gate_batch, "rounds": args.rounds,
                     "batches_per_round": len(batches), "member_strategy": every.strategy,
                     "feature_dim": int(references.shape[-1])},
        "environment": common.environment(),
        "per_batch_s": {name: med[name] for name in variants},
        "samples_s": {name: [round(s, 6) for s in samples[name]] for name in variants},
        "gate_over_member_inference": {**gate_ratio, "target": TARGET_GATE_OVER_MEMBER,
                                       "met": bool(gate_ratio["value"] < TARGET_GATE_OVER_MEMBER),
                                       "definition": "gate time per batch / one member's "
                                                     "inference time per batch"},
        "adaptive_over_agnostic_throughput": {
            **speedup, "expected": EXPECTED_ADAPTIVE_SPEEDUP,
            "definition": "images/s of the adaptive deck (gate + chosen group) over the "
                          "agnostic deck (all members)"},
    }
    log.info("gate %.3f ms, member %.3f ms per batch of %d: ratio %.3f; adaptive/agnostic "
             "throughput %.2f", med["gate_brute_s"] * 1e3, med["member_s"] * 1e3,
             args.gate_batch, gate_ratio["value"], speedup["value"])
    common.emit_json(doc)


def _batches(images: np.ndarray, size: int):
    """Whole batches of `size` images with an all-True valid mask."""
    for start in range(0, len(images) - size + 1, size):
        yield images[start:start + size], np.ones(size, bool)


if __name__ == "__main__":
    from card_jax import entry

    entry.prepare()  # XLA:CPU flags and malloc tunables for this machine (card_jax/entry.py)
    main()
