"""Builds a CARD-Deck from finished runs, evaluates it and writes the deck's results.json.

    python -m card_jax.main --config=configs/deck.py --config.deck.members=DIR1,DIR2 \
        [--config.eval.corruption_dir=DIR] --workdir=OUT

Steps (paper §3.2, SPEC §1(c)-(e)):
1. describe and check the members from their JSON files (`members.check`);
2. the gate's representatives: P augmented training images per group, their spectral
   features saved in OUT/gate/ (reused when gate.json's settings match);
3. stack the members' effective parameters `[K, ...]` (`members.load_stacks`);
4. evaluate, cell by cell (clean test set, then each corruption x severity in file order):
   - domain-agnostic: all K members on batches of eval.batch_size; their mean softmax is
     the deck's output and each member's own softmax gives the members-alone numbers;
   - domain-adaptive: batches of deck.gate_batch images that never span two cells; the gate
     picks a group per batch (or per image with deck.per_example) and only that group's
     members are evaluated; the output is the mean of their softmaxes;
5. time agnostic vs adaptive inference on the same batches of clean test images;
6. write results.json; its presence marks the deck done, and a re-run with the same config
   does nothing (a change to eval.* only re-evaluates; any other change is refused).

WORKDIR layout: config.json, gate/{<group>.npy [P, D] float32, gate.json}, results.json:

  kind "deck", n_members K, groups [G names], members [{workdir, realization, group,
  method, sparsity}] in deck order, model, dataset, method, sparsity,
  agnostic       {clean_acc, ece_clean, and with eval.corruption_dir: corruption_acc (mean of
                  the 15 x 5 cells), corruption_table [15][5], corruption_names [15], with
                  eval.extra_corruptions: extra_corruption_table [4][5],
                  extra_corruption_names [4]}
  adaptive       the same keys + gate_histogram {"clean" | corruption name: {group: count}},
                 counts of gate batches (of images with deck.per_example), summed over the
                 5 severities
  members_alone  [K] blocks like agnostic, each member by itself
  memory_mb, packed_bytes   sums over the members of their runs' per-realization entries
  inference_time_s {agnostic, adaptive, gate: seconds, images: count}: the same clean test
                 images in gate batches, median of TIMING_ROUNDS interleaved rounds; adaptive
                 includes the gate (and its host round trip)
  gate           {representatives, gate_batch, per_example, nn, spectrum {...}}
  config         the resolved deck config; format_version
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

import card_jax
from card_jax import config_util
from card_jax import run as run_lib
from card_jax import steps
from card_jax.deck import gate as gate_lib
from card_jax.deck import members as members_lib
from card_jax.deck import options as options_lib
from card_jax.deck import predict, spectral

log = logging.getLogger("card_jax")

TIMING_ROUNDS = 3        # interleaved rounds of the agnostic/adaptive/gate timing (median)
TIMING_MAX_IMAGES = 2000  # clean test images timed per round (whole gate batches)
# The member data options that decide the training images the representatives come from.
_TRAINING_IMAGES_KEYS = ("name", "dir", "pad_to", "train_examples", "synthetic")


# ---------------------------------------------------------------------------------------------
# Accuracy and calibration sums (host side, numpy)


def _ece_sums(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`[3, ECE_BINS]` (count, confidence, correct) per confidence bin, as steps.eval_step."""
    confidence = probs.max(-1)
    hit = (probs.argmax(-1) == labels).astype(np.float64)
    bins = np.clip((confidence * steps.ECE_BINS).astype(np.int64), 0, steps.ECE_BINS - 1)
    return np.stack([np.bincount(bins, weights=w, minlength=steps.ECE_BINS)
                     for w in (np.ones_like(confidence, np.float64), confidence, hit)])


def _ece(sums: np.ndarray) -> float:
    return float(steps.expected_calibration_error(*sums))


class _Tally:
    """Correct predictions and calibration sums of one predictor over one cell."""

    def __init__(self):
        self.correct, self.count, self.calibration = 0, 0, np.zeros((3, steps.ECE_BINS))

    def add(self, probs: np.ndarray, labels: np.ndarray) -> None:
        self.correct += int((probs.argmax(-1) == labels).sum())
        self.count += len(labels)
        self.calibration += _ece_sums(probs, labels)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)


# ---------------------------------------------------------------------------------------------
# Cells and batches


def _batches(images: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(images padded to `size` rows, valid bool `[size]`, start) in file order: every batch
    has the same shape (one compilation); padded rows are repeats of row 0, masked out."""
    for start in range(0, len(images), size):
        part = images[start:start + size]
        valid = np.zeros(size, bool)
        valid[:len(part)] = True
        if len(part) < size:
            part = np.concatenate([part, np.repeat(part[:1], size - len(part), axis=0)])
        yield part, valid, start


def _corruption_names(config) -> list[tuple[str, tuple[str, ...]]]:
    """[(results key prefix, corruption names)]: the 15 benchmark ones, then the extras."""
    from card_jax.data import corruption_sets

    tables = [("", corruption_sets.CORRUPTIONS)]
    if config.eval.extra_corruptions:
        tables.append(("extra_", corruption_sets.EXTRA_CORRUPTIONS))
    return tables


def _cells(config, clean_images, clean_labels, pad_to: int):
    """Yields (name, severity, images uint8 [n, H, W, C], labels int32 [n]): the clean test
    set first ('clean', 0), then every cell of the "-C" folder in file order."""
    from card_jax.data import corruption_sets, sources

    yield "clean", 0, clean_images, clean_labels
    if not config.eval.corruption_dir:
        return
    for _, names in _corruption_names(config):
        for name, severity, images, labels in corruption_sets.iterate(
                config.eval.corruption_dir, names, corruption_sets.SEVERITIES,
                config.eval.corruption_examples):
            if pad_to:
                # Corrupt first, then pad, as the members' own evaluation (evaluate.py).
                images = sources.pad_images(images, pad_to, f"{name} severity {severity}")
            yield name, severity, images, labels.astype(np.int32)


class _Report:
    """Per-cell tallies of one predictor -> the results.json block of the schema."""

    def __init__(self):
        self.cells: dict[tuple[str, int], _Tally] = {}

    def tally(self, name: str, severity: int) -> _Tally:
        return self.cells.setdefault((name, severity), _Tally())

    def block(self, config) -> dict:
        clean = self.cells["clean", 0]
        out = {"clean_acc": clean.accuracy, "ece_clean": _ece(clean.calibration)}
        if config.eval.corruption_dir:
            from card_jax.data import corruption_sets

            for prefix, names in _corruption_names(config):
                table = [[self.cells[n, s].accuracy for s in corruption_sets.SEVERITIES]
                         for n in names]
                if not prefix:
                    out["corruption_acc"] = float(np.mean(table))
                out[f"{prefix}corruption_table"] = table
                out[f"{prefix}corruption_names"] = list(names)
        return out


# ---------------------------------------------------------------------------------------------
# The deck


class Deck:
    """A loaded deck: stacked members on device, the gate, and the two ways to predict.

    Attributes:
      members: `members_lib.Member` per card, in deck order.
      groups: gate group names; `group_members[g]` the indices of group g's members.
      forward_batches: int `[K]`, how many gate batches each member has served in the
        adaptive deck (evidence that only the gated group is used).
    """

    def __init__(self, config, members: list[members_lib.Member],
                 by_group: dict[str, list[int]], references: np.ndarray, graphdef,
                 params, batch_stats):
        deck = config.deck
        self.members, self.groups = members, list(by_group)
        self.group_members = [by_group[g] for g in self.groups]
        self.per_example = bool(deck.per_example)
        self.gate = gate_lib.Gate(references, spectral.SpectrumOptions(
            **options_lib.spectrum_dict(config)), per_example=self.per_example, nn=deck.nn)
        k = len(members)
        self.all_fn = predict.DeckFn(graphdef, k, deck.strategy)
        self.all_params = (self.all_fn.place_members(params),
                           self.all_fn.place_members(batch_stats))
        self.group_fn = predict.DeckFn(graphdef, k // len(self.groups), deck.strategy)
        self.group_params = [
            (self.group_fn.place_members(predict.select_members(params, idx)),
             self.group_fn.place_members(predict.select_members(batch_stats, idx)))
            for idx in self.group_members]
        self.forward_batches = np.zeros(k, np.int64)
        log.info("deck: %d members (%s), member axis %s on %s", k, ", ".join(
            f"{g} {len(ix)}" for g, ix in zip(self.groups, self.group_members)),
            self.all_fn.strategy, "one device" if self.all_fn.mesh is None else
            f"a mesh of {self.all_fn.mesh.size} devices")

    def agnostic(self, images) -> tuple[jax.Array, jax.Array]:
        """(mean softmax `[B, C]`, member softmaxes `[K, B, C]`) of all members."""
        return self.all_fn(*self.all_params, self.all_fn.place_batch(images))

    def adaptive(self, images, valid) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities `[M, C]` numpy, chosen group per query `[Q]`) of one gate batch.

        Only the chosen group's members run. With per_example each image gets its group's
        mean softmax; a group is evaluated (on the whole batch) only if some valid image
        chose it.
        """
        return self._gated(images, valid, lambda g: self.group_fn(
            *self.group_params[g], self.group_fn.place_batch(images))[0])

    def adaptive_from(self, member_probs: np.ndarray, images, valid
                      ) -> tuple[np.ndarray, np.ndarray]:
        """`adaptive` for a batch whose member softmaxes `[K, M, C]` are known already.

        The evaluation runs every member for the agnostic deck anyway; the adaptive deck's
        answer is the gated group's mean of those same softmaxes (what `adaptive` computes,
        with the mean taken by `group_mean`, the group DeckFn's own reduction), so its
        members need not run a second time. `forward_batches` counts the same as `adaptive`.
        """
        return self._gated(images, valid,
                           lambda g: _group_mean(member_probs[self.group_members[g]]))

    def _gated(self, images, valid, group_probs) -> tuple[np.ndarray, np.ndarray]:
        """Gates one batch and assembles each image's group answer.

        `group_probs(g)` gives group g's mean softmax `[M, C]` for the whole batch; it is
        called once for the batch's group, or (per_example) once for each group that some
        valid image chose.
        """
        choice, _ = self.gate(images, valid)
        groups = np.unique(choice[valid]) if self.per_example else [int(choice[0])]
        out = None
        for g in groups:
            self.forward_batches[self.group_members[g]] += 1
            probs = np.asarray(group_probs(int(g)))
            out = probs if out is None else np.where((choice == g)[:, None], probs, out)
        return out, choice


@jax.jit
def _group_mean(member_probs: jax.Array) -> jax.Array:
    """Mean softmax `[M, C]` of a group's member softmaxes `[K', M, C]` (`deck_probs`' mean)."""
    return member_probs.mean(0)


def _evaluate(config, deck: Deck, clean_images, clean_labels, pad_to: int) -> dict:
    """Runs both decks and every member over all cells; the three results.json blocks."""
    agnostic, adaptive = _Report(), _Report()
    alone = [_Report() for _ in deck.members]
    histogram: dict[str, dict[str, int]] = {}
    gate_batch = config.deck.gate_batch
    for name, severity, images, labels in _cells(config, clean_images, clean_labels, pad_to):
        size = min(config.eval.batch_size, len(images))
        cell_members = []  # [K, size, C] per batch: the adaptive deck reuses them
        for x, valid, start in _batches(images, size):
            y = labels[start:start + size]
            mean, members = (np.asarray(a) for a in deck.agnostic(x))
            agnostic.tally(name, severity).add(mean[valid], y)
            for k, report in enumerate(alone):
                report.tally(name, severity).add(members[k][valid], y)
            cell_members.append(members[:, valid])
        cell_members = np.concatenate(cell_members, axis=1)  # [K, n, C]
        counts = histogram.setdefault(name, {g: 0 for g in deck.groups})
        cell_counts = np.zeros(len(deck.groups), np.int64)
        for x, valid, start in _batches(images, gate_batch):
            rows = cell_members[:, start:start + gate_batch]
            if rows.shape[1] < gate_batch:  # padded rows repeat row 0, as in `_batches`
                rows = np.concatenate([rows, np.repeat(rows[:, :1], gate_batch - rows.shape[1],
                                                       axis=1)], axis=1)
            probs, choice = deck.adaptive_from(rows, x, valid)
            adaptive.tally(name, severity).add(probs[valid],
                                               labels[start:start + gate_batch])
            cell_counts += np.bincount(choice if not deck.per_example else choice[valid],
                                       minlength=len(deck.groups))
        for g, n in zip(deck.groups, cell_counts):
            counts[g] += int(n)
        log.info("deck: %s%s: agnostic %.4f, adaptive %.4f; gate %s", name,
                 f" severity {severity}" if severity else "",
                 agnostic.tally(name, severity).accuracy,
                 adaptive.tally(name, severity).accuracy,
                 ", ".join(f"{g} {n}" for g, n in zip(deck.groups, cell_counts)))
    return {"agnostic": agnostic.block(config),
            "adaptive": {**adaptive.block(config), "gate_histogram": histogram},
            "members_alone": [r.block(config) for r in alone]}


def _time_inference(config, deck: Deck, images: np.ndarray) -> dict:
    """Median seconds over interleaved rounds for agnostic, adaptive (gate + chosen group)
    and the gate alone, on the same whole gate batches of clean test images."""
    gate_batch = config.deck.gate_batch
    count = min(len(images), TIMING_MAX_IMAGES)
    count = max(gate_batch, count - count % gate_batch)
    batches = [(deck.all_fn.place_batch(x), v) for x, v, _ in
               _batches(images[:count], gate_batch)]
    forward_before = deck.forward_batches.copy()

    def agnostic():
        return [deck.agnostic(x)[0] for x, _ in batches]

    def adaptive():
        return [deck.adaptive(x, v)[0] for x, v in batches]

    def gate():
        return [deck.gate(x, v)[0] for x, v in batches]

    variants = {"agnostic": agnostic, "adaptive": adaptive, "gate": gate}
    # Compile and warm up on one batch (every group, whichever the gate picks there).
    first = batches[0][0]
    jax.block_until_ready([deck.agnostic(first), deck.gate(first, batches[0][1])]
                          + [deck.group_fn(*params, first) for params in deck.group_params])
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(TIMING_ROUNDS):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            tic = time.perf_counter()
            jax.block_until_ready(variants[name]())
            samples[name].append(time.perf_counter() - tic)
    deck.forward_batches[:] = forward_before  # the counters describe the evaluation only
    out = {name: float(np.median(s)) for name, s in samples.items()}
    log.info("deck inference on %d clean images in batches of %d: agnostic %.3fs, adaptive "
             "%.3fs (gate %.3fs); adaptive/agnostic %.2f", len(batches) * gate_batch,
             gate_batch, out["agnostic"], out["adaptive"], out["gate"],
             out["adaptive"] / max(out["agnostic"], 1e-12))
    return {**out, "images": len(batches) * gate_batch}


# ---------------------------------------------------------------------------------------------
# Entry point


def _check_workdir_config(workdir: pathlib.Path, config) -> bool:
    """Writes config.json, or checks it against an existing deck's; True if only eval.*
    changed (then the deck is re-evaluated, the saved representatives reused)."""
    path = workdir / run_lib.CONFIG_FILE
    new = config_util.to_dict(config)
    if not path.exists():
        run_lib._write_json(path, new)  # the codebase's atomic JSON write
        return False
    changes = config_util.diff(json.loads(path.read_text(encoding="utf-8")), new)
    fixed = [c for c in changes if not c.startswith("eval.")]
    if fixed:
        raise run_lib.ConfigMismatchError(
            f"{workdir} already holds a deck with a different config; use a new --workdir or "
            "the same config. Differences (saved -> requested):\n  " + "\n  ".join(fixed))
    if changes:
        log.info("evaluation settings changed (%s): re-evaluating the deck", "; ".join(changes))
        run_lib._write_json(path, new)
    return bool(changes)


def load_deck(config, workdir: str | pathlib.Path) -> tuple[Deck, Any]:
    """Checks the members, builds (or reuses) the gate and loads the members: (deck, data).

    `data` is the members' dataset (`sources.Dataset`, from the first member's data config).
    """
    from card_jax import train

    groups = options_lib.groups_of(config)
    members = members_lib.describe(config.deck.members)
    by_group = members_lib.check(members, groups)
    if len(members) not in (2, 4, 6):
        log.info("deck of %d members (the paper uses 2, 4 or 6)", len(members))
    data_config = ml_collections.ConfigDict(members[0].data_config)
    data = train.load_data(data_config)
    if tuple(data.train_images.shape[1:]) != members[0].image_shape:
        raise members_lib.DeckError(
            f"the data of {members[0].label} now loads as images "
            f"{data.train_images.shape[1:]}, but the run trained on {members[0].image_shape}")
    spectrum = spectral.SpectrumOptions(**options_lib.spectrum_dict(config))
    pad_after = int(data_config.pad_to) if config.deck.augment_unpadded else 0
    wanted = gate_lib.settings(
        groups, config.deck.representatives, config.seed, config.deck.gaussian_always_noisy,
        spectrum, {**{k: members[0].data_config.get(k) for k in _TRAINING_IMAGES_KEYS},
                   "image_shape": list(data.train_images.shape[1:]),
                   "num_train": len(data.train_images)}, pad_after)

    def training_images():
        if not pad_after:
            return data.train_images
        # The stored images are already padded: load them again at their own size.
        unpadded = data_config.copy_and_resolve_references()
        unpadded.pad_to = 0
        return train.load_data(unpadded).train_images

    features = gate_lib.load_or_build(workdir, wanted, training_images)
    references = np.stack([features[g] for g in groups])
    graphdef, params, batch_stats = members_lib.load_stacks(members)
    return Deck(config, members, by_group, references, graphdef, params, batch_stats), data


def use_synchronous_dispatch() -> None:
    """Runs this process's XLA:CPU computations on the calling thread (JAX's
    `jax_cpu_enable_async_dispatch` off). Takes effect only before JAX's CPU backend starts,
    so a deck job calls it first (`card_jax.main`), and so does `benchmarks/deck.py`.

    A deck job waits for every batch: the gate's choice on the host picks the members that run
    next, and each batch's softmaxes are tallied on the host. Asynchronous dispatch overlaps
    nothing there; it only hands each call to a PjRt worker thread and back, which on a
    2-vCPU VM cost the ~0.3 ms gate about a fifth of its time (benchmarks/README.md,
    section 23). Training keeps asynchronous dispatch (its input pipeline overlaps the step).
    """
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    log.info("deck: synchronous dispatch (each XLA:CPU computation runs on the calling thread)")


def build_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | pathlib.Path) -> dict:
    """The deck command: checks, builds, evaluates and writes WORKDIR/results.json.

    Raises config_util.ConfigError / members.DeckError (bad options or members),
    run.ConfigMismatchError (another deck in `workdir`), FileNotFoundError (missing data).
    """
    options_lib.check(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    reevaluate = _check_workdir_config(workdir, config)
    results_path = workdir / run_lib.RESULTS_FILE
    if results_path.exists() and not reevaluate:
        log.info("%s is complete (results.json exists); nothing to do", workdir)
        return json.loads(results_path.read_text(encoding="utf-8"))
    if config.eval.corruption_dir:  # fail now, not after loading, if files are missing
        from card_jax.data import corruption_sets

        corruption_sets.open_folder(config.eval.corruption_dir,
                                    sum((n for _, n in _corruption_names(config)), ()))
    deck, data = load_deck(config, workdir)
    pad_to = int(deck.members[0].data_config.get("pad_to", 0))
    test_labels = data.test_labels.astype(np.int32)
    evaluation = _evaluate(config, deck, data.test_images, test_labels, pad_to)
    log.info("deck: gate batches served per member in the adaptive evaluation %s",
             deck.forward_batches.tolist())
    timing = _time_inference(config, deck, data.test_images)
    first = deck.members[0]
    results = {
        "kind": "deck",
        "n_members": len(deck.members),
        "groups": deck.groups,
        "members": [m.to_json() for m in deck.members],
        "model": first.model,
        "dataset": first.dataset,
        "method": first.method,
        "sparsity": first.sparsity,
        **evaluation,
        "memory_mb": float(sum(m.memory_mb for m in deck.members)),
        "packed_bytes": int(sum(m.packed_bytes for m in deck.members)),
        "inference_time_s": timing,
        "gate": {"representatives": config.deck.representatives,
                 "gate_batch": config.deck.gate_batch,
                 "per_example": bool(config.deck.per_example), "nn": config.deck.nn,
                 "spectrum": options_lib.spectrum_dict(config)},
        "config": config_util.to_dict(config),
        "format_version": card_jax.FORMAT_VERSION,
    }
    if jax.process_index() == 0:
        run_lib._write_json(results_path, results)
    log.info("deck done: clean agnostic %.4f / adaptive %.4f%s", results["agnostic"][
        "clean_acc"], results["adaptive"]["clean_acc"], "" if not config.eval.corruption_dir
        else f"; corrupted agnostic {results['agnostic']['corruption_acc']:.4f} / adaptive "
             f"{results['adaptive']['corruption_acc']:.4f}")
    return results
