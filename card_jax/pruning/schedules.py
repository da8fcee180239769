"""Sparsity schedules: GMP's cubic ramp, the global EP/BP warm-up, and LTH/LRR level targets.

All functions here are host-side (Python floats and ints, float64 arithmetic): methods turn the
resulting sparsities into exact keep counts once (see `masks.keep_count`) and index the count
tables with the step inside jit, so counting never depends on float32 rounding.

References: Zhu & Gupta 2017 (GMP, SPEC §5(a)); chrundle/biprop main.py (global warm-up,
SPEC §3(a)); Frankle et al. 2019/2020 and Renda et al. 2020 (IMP levels, SPEC §4(a)).
"""

from __future__ import annotations

import math

import numpy as np


def _check_sparsity(name: str, s: float, allow_one: bool = False) -> float:
    s = float(s)
    if not (0.0 <= s < 1.0 or (allow_one and s == 1.0)):
        raise ValueError(f"{name} must be in [0, 1) (fraction of weights REMOVED), got {s!r}")
    return s


# --------------------------------------------------------------------------- GMP

def gmp_events(start_step: int, end_step: int, frequency: int) -> np.ndarray:
    """Steps at which GMP recomputes its mask: start, start + f, ... (< end), then end.

    Zhu & Gupta prune at t0 + j dt for j = 0..n with end = t0 + n dt; when (end - start) is not
    a multiple of `frequency` we keep the grid and add `end` itself, so the final sparsity is
    reached exactly at `end_step`. Returns int64 `[E]`, strictly increasing.
    """
    start_step, end_step, frequency = int(start_step), int(end_step), int(frequency)
    if start_step < 0 or end_step < start_step:
        raise ValueError(f"GMP needs 0 <= start_step <= end_step, got {start_step}, {end_step}")
    if frequency <= 0:
        raise ValueError(f"GMP frequency must be a positive number of steps, got {frequency}")
    grid = list(range(start_step, end_step, frequency))
    return np.asarray(grid + [end_step], np.int64)


def gmp_sparsity(step: int, *, final_sparsity: float, start_step: int, end_step: int,
                 frequency: int, initial_sparsity: float = 0.0) -> float:
    """Zhu & Gupta cubic schedule, held constant between pruning events.

        s(t) = s_f + (s_i - s_f) (1 - (e - t0) / (end - t0))^3,  e = last event <= t

    0 before `start_step` (the network is dense until GMP starts), s_i at the start event,
    exactly s_f from `end_step` on. With start == end it is a one-shot prune at that step.
    """
    s_f = _check_sparsity("final_sparsity", final_sparsity)
    s_i = _check_sparsity("initial_sparsity", initial_sparsity)
    events = gmp_events(start_step, end_step, frequency)
    step = int(step)
    if step < events[0]:
        return 0.0
    e = int(events[np.searchsorted(events, step, side="right") - 1])
    if e >= end_step:
        return s_f
    progress = (e - start_step) / (end_step - start_step)
    return s_f + (s_i - s_f) * (1.0 - progress) ** 3


# --------------------------------------------------------------------------- global warm-up

def warmup_sparsity(epoch: int, final_sparsity: float, warmup_epochs: float = 10) -> float:
    """biprop's global-pruning warm-up (SPEC §3(a)), a function of the integer epoch.

    Only when the final keep fraction is <= 0.5 (s_f >= 0.5):
      s(e) = s_f + (0.5 - s_f) (1 - e / E_w)^3  for e < E_w  (starts at 50 %),  s_f after.
    Otherwise (and with E_w <= 0) the sparsity is s_f from the first step.
    """
    s_f = _check_sparsity("final_sparsity", final_sparsity)
    if s_f < 0.5 or warmup_epochs <= 0 or epoch >= warmup_epochs:
        return s_f
    return s_f + (0.5 - s_f) * (1.0 - epoch / warmup_epochs) ** 3


def warmup_epochs_needed(final_sparsity: float, warmup_epochs: float) -> int:
    """Number of distinct epochs whose warm-up sparsity differs from s_f (0 if inactive)."""
    if float(final_sparsity) < 0.5 or warmup_epochs <= 0:
        return 0
    return int(math.ceil(warmup_epochs))


# --------------------------------------------------------------------------- IMP levels

def level_sparsities(sparsity: float, *, mode: str = "exact", levels: int | None = None,
                     fraction: float = 0.2) -> tuple[float, ...]:
    """Target sparsity of each IMP level (LTH/LRR), level 0 = dense: (0, s_1, ..., s_N).

    Modes:
      'geometric': open_lth, each level removes `fraction` of the REMAINING weights,
        s_L = 1 - (1 - fraction)^L. `levels` defaults to the smallest N with s_N >= sparsity,
        so the final sparsity is the first geometric value reaching the target (e.g. 0.8 ->
        N = 8, s_N = 0.832; the paper's round numbers are not hit).
      'exact' (default): same shape of schedule but the per-level fraction is adjusted so the
        last level lands exactly on `sparsity`: s_L = 1 - (1 - sparsity)^(L / N), s_N =
        `sparsity` itself. `levels` defaults to N = round(log(1 - s) / log(1 - fraction)),
        the count whose per-level fraction is closest to `fraction` (0.5 -> 3, 0.6 -> 4,
        0.8 -> 7, 0.9 -> 10, 0.95 -> 13 levels, i.e. 20.6 %, 20.5 %, 20.5 %, 20.6 %, 20.6 %
        per level). Whether the paper did this is [unverified] (SPEC §4(a)).

    Each s_L is turned into a keep count by `masks.keep_count` at the level boundary, so the
    final mask holds exactly n - floor(sparsity n) weights in both modes' last level when the
    target is hit.
    """
    s = _check_sparsity("sparsity", sparsity)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction (per-level pruning rate) must be in (0, 1), got {fraction}")
    if levels is not None and int(levels) < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if s == 0.0:
        return (0.0,)
    ratio = math.log(1.0 - s) / math.log(1.0 - fraction)  # levels needed at `fraction`
    if mode == "geometric":
        n = int(levels) if levels is not None else int(math.ceil(ratio - 1e-9))
        return (0.0,) + tuple(1.0 - (1.0 - fraction) ** i for i in range(1, n + 1))
    if mode == "exact":
        n = int(levels) if levels is not None else max(1, int(round(ratio)))
        inner = tuple(1.0 - (1.0 - s) ** (i / n) for i in range(1, n))
        return (0.0,) + inner + (s,)
    raise ValueError(f"level mode must be 'exact' or 'geometric', got {mode!r}")
