"""Robustness evaluation of trained realizations: clean and corrupted accuracy, calibration.

The corrupted test sets are "-C" folders in the CIFAR-10-C layout (SPEC §7): released
CIFAR-10-C/100-C or one written by `python -m card_jax.corrupt`. They are streamed one
(corruption, severity) cell at a time, so memory stays bounded. The benchmark number is the
mean accuracy over the 15 corruptions x 5 severities (75 equal cells); the 4 extra
corruptions are reported separately.
"""

from __future__ import annotations

import logging

import numpy as np

from card_jax import steps, train
from card_jax.data import corruption_sets, sources

log = logging.getLogger("card_jax")


def _ece(sums: dict) -> np.ndarray:
    return np.asarray(steps.expected_calibration_error(
        sums["bin_count"], sums["bin_conf"], sums["bin_correct"]))


def clean_metrics(compiled, state, images, labels, batch_size: int) -> dict:
    """{'clean_acc': [R], 'ece_clean': [R]} on device-resident test images."""
    sums = train.evaluation_sums(compiled, state, images, labels, batch_size)
    return {"clean_acc": (sums["correct"] / images.shape[0]).tolist(),
            "ece_clean": _ece(sums).tolist()}


def corruption_metrics(compiled, state, folder: str, batch_size: int, *,
                       n_examples: int = -1, extra: bool = False, pad_to: int = 0) -> dict:
    """Accuracy of every (corruption, severity) cell of a "-C" folder, per realization.

    Returns (lists over realizations):
      corruption_acc        [R] mean over the 15 x 5 benchmark cells
      corruption_table      [R][15][5] accuracy per corruption (benchmark order) and severity
      corruption_names      the 15 names, in table order
      extra_corruption_table / extra_corruption_names   the 4 extras, if `extra`
      ece_corrupted         [R] ECE over all benchmark cells pooled
    Cells are zero-padded to `pad_to` like the clean data (corrupt first, then pad: the
    corruption sees the original image, the model its usual input size).
    """
    results = {}
    groups = [("", corruption_sets.CORRUPTIONS)]
    if extra:
        groups.append(("extra_", corruption_sets.EXTRA_CORRUPTIONS))
    pooled = None
    for prefix, names in groups:
        table = {}
        for name, severity, images, labels in corruption_sets.iterate(
                folder, names, corruption_sets.SEVERITIES, n_examples):
            if pad_to:
                images = sources.pad_images(images, pad_to, f"{name} severity {severity}")
            x, y = compiled.place_data(images, labels.astype(np.int32))
            sums = train.evaluation_sums(compiled, state, x, y, batch_size)
            table[name, severity] = sums["correct"] / len(images)
            if not prefix:
                pooled = sums if pooled is None else {k: pooled[k] + sums[k] for k in sums}
        cube = np.array([[table[n, s] for s in corruption_sets.SEVERITIES] for n in names])
        cube = np.moveaxis(cube, -1, 0)  # [R, corruptions, severities]
        results[f"{prefix}corruption_table"] = cube.tolist()
        results[f"{prefix}corruption_names"] = list(names)
        if not prefix:
            results["corruption_acc"] = cube.mean(axis=(1, 2)).tolist()
            results["ece_corrupted"] = _ece(pooled).tolist()
            log.info("corruption accuracy %s over %d cells", train.format_values(
                cube.mean(axis=(1, 2))), cube.shape[1] * cube.shape[2])
    return results
