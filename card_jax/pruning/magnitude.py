"""Magnitude pruning methods that train the weights: FT, GMP, LTH and LRR.

- FT (Han et al. 2015 as framed by Renda et al. 2020; SPEC §5(a)): level 0 trains dense, level 1
  prunes once to the target and fine-tunes with the mask enforced.
- GMP (Zhu & Gupta 2017; SPEC §5(a)): the cubic schedule prunes inside one training run.
- LTH (Frankle et al. 2019/2020; SPEC §4(a)): IMP, weights rewound to step k at every level.
- LRR (Renda et al. 2020; SPEC §4(a)): IMP, weights kept, learning-rate schedule rewound to 0.

All masks are monotone (a pruned weight stays pruned): magnitudes are ranked on |theta| with
already-pruned coordinates ranked first (`masks.magnitude_mask(..., existing_mask=...)`).
`sparsity` is always the fraction of prunable weights REMOVED; `scope` is 'global' (one
threshold over all prunable layers, the paper's setting) or 'layerwise'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from card_jax.pruning import masks, schedules
from card_jax.pruning.base import Method


class MaskState(NamedTuple):
    """Method state of the magnitude methods.

    Attributes:
      mask: bool tree in the params structure (all True on non-prunable leaves).
    """

    mask: Any


def _check(sparsity: float, scope: str) -> None:
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (fraction of weights REMOVED), "
                         f"got {sparsity!r}")
    if scope not in ("global", "layerwise"):
        raise ValueError(f"scope must be 'global' or 'layerwise', got {scope!r}")


def _prunable_fn(prune_first_layer: bool, prune_last_layer: bool,
                 layer_order: Sequence[str] | None):
    order = None if layer_order is None else tuple(layer_order)
    return lambda params: masks.prunable_tree(
        params, first_layer=prune_first_layer, last_layer=prune_last_layer, layer_order=order)


def _masked_method(name: str, **fields) -> Method:
    """Shared pieces: the forward sees W * m and every update is re-masked."""
    return Method(
        name=name,
        init=fields.pop("init", lambda params, key: MaskState(masks.ones_mask(params))),
        apply=lambda params, ms: masks.apply_mask(params, ms.mask),
        step=fields.pop("step", lambda params, ms, step: ms),
        post_update=lambda params, ms: masks.apply_mask(params, ms.mask),
        mask=lambda params, ms: ms.mask,
        **fields,
    )


def fine_tuning(
    sparsity: float,
    scope: str = "global",
    *,
    prune_first_layer: bool = True,
    prune_last_layer: bool = True,
    layer_order: Sequence[str] | None = None,
) -> Method:
    """FT: level 0 dense training, level 1 one-shot magnitude prune + fine-tuning (2 levels).

    The fine-tuning run (its length and small constant LR, SPEC §5(b) [unverified]) is the
    training loop's level-1 configuration; the method only supplies the mask.
    """
    _check(sparsity, scope)
    prunable = _prunable_fn(prune_first_layer, prune_last_layer, layer_order)

    def prune(params, ms, rewind_params, level):
        del rewind_params, level
        mask = masks.magnitude_mask(params, sparsity, prunable(params), scope, ms.mask)
        return masks.apply_mask(params, mask), MaskState(mask)

    return _masked_method("ft", prune=prune, levels=2, dense_level0=True)


def _imp(name: str, sparsity: float, scope: str, rewind: bool, rewind_step: int,
         level_mode: str, levels: int | None, level_fraction: float,
         prune_first_layer: bool, prune_last_layer: bool, layer_order) -> Method:
    _check(sparsity, scope)
    if int(rewind_step) < 0:
        raise ValueError(f"rewind_step must be >= 0, got {rewind_step}")
    targets = schedules.level_sparsities(sparsity, mode=level_mode, levels=levels,
                                         fraction=level_fraction)
    prunable = _prunable_fn(prune_first_layer, prune_last_layer, layer_order)

    def prune(params, ms, rewind_params, level):
        if not 1 <= level < len(targets):
            raise ValueError(f"{name}: level must be in [1, {len(targets) - 1}], got {level}")
        # Rank the weights trained in the previous level (never the rewind point's values).
        mask = masks.magnitude_mask(params, targets[level], prunable(params), scope, ms.mask)
        if rewind:
            if rewind_params is None:
                raise ValueError(f"{name}: prune needs the params snapshot taken at "
                                 f"rewind_step={rewind_step}")
            params = rewind_params
        return masks.apply_mask(params, mask), MaskState(mask)

    return _masked_method(
        name, prune=prune, levels=len(targets),
        rewind_step=int(rewind_step) if rewind else None,
        level_start_step=int(rewind_step) if rewind else 0, dense_level0=True)


def lth(
    sparsity: float,
    scope: str = "global",
    *,
    rewind_step: int = 0,
    level_mode: str = "exact",
    levels: int | None = None,
    level_fraction: float = 0.2,
    prune_first_layer: bool = True,
    prune_last_layer: bool = True,
    layer_order: Sequence[str] | None = None,
) -> Method:
    """Lottery ticket IMP with weight rewinding (rewind_step = 0: the original LTH).

    Level L >= 1 starts from theta_k * m_L (k = rewind_step) with a fresh optimizer and the LR
    schedule resumed at step k; m_L ranks the weights trained in level L - 1. Level targets
    from `schedules.level_sparsities(sparsity, mode=level_mode, levels, level_fraction)`.

    References:
      Frankle & Carbin, ICLR 2019; Frankle et al., ICML 2020 (open_lth lottery/runner.py).
    """
    return _imp("lth", sparsity, scope, True, rewind_step, level_mode, levels, level_fraction,
                prune_first_layer, prune_last_layer, layer_order)


def lrr(
    sparsity: float,
    scope: str = "global",
    *,
    level_mode: str = "exact",
    levels: int | None = None,
    level_fraction: float = 0.2,
    prune_first_layer: bool = True,
    prune_last_layer: bool = True,
    layer_order: Sequence[str] | None = None,
) -> Method:
    """Learning-rate rewinding: IMP that keeps the trained weights theta_T * m_L at each level
    and restarts the LR schedule (and step counter) at 0 with a fresh optimizer.

    References:
      Renda, Frankle & Carbin, ICLR 2020.
    """
    return _imp("lrr", sparsity, scope, False, 0, level_mode, levels, level_fraction,
                prune_first_layer, prune_last_layer, layer_order)


def gmp(
    sparsity: float,
    scope: str = "global",
    *,
    initial_sparsity: float = 0.0,
    start_step: int | None = None,
    end_step: int | None = None,
    start_fraction: float = 0.1,
    end_fraction: float = 0.75,
    frequency: int = 100,
    total_steps: int | None = None,
    prune_first_layer: bool = True,
    prune_last_layer: bool = True,
    layer_order: Sequence[str] | None = None,
) -> Method:
    """Gradual magnitude pruning with Zhu & Gupta's cubic schedule, inside one training run.

    At every event step t of `schedules.gmp_events(start, end, frequency)` the mask becomes the
    top keep_count(., s(t)) of |theta * m| (monotone); between events it is fixed, and after
    `end` it stays at `sparsity` until training ends. start/end default to start_fraction /
    end_fraction of `total_steps` (10 % / 75 %, SPEC §5(b) [unverified]); `total_steps` is
    supplied by `pruning.from_config` from the training length.

    References:
      Zhu & Gupta, "To prune, or not to prune", 2017.
    """
    _check(sparsity, scope)
    if start_step is None or end_step is None:
        if total_steps is None:
            raise ValueError("gmp: give start_step and end_step, or total_steps for "
                             "start_fraction/end_fraction")
        if not 0.0 <= start_fraction <= end_fraction <= 1.0:
            raise ValueError(f"gmp: need 0 <= start_fraction <= end_fraction <= 1, "
                             f"got {start_fraction}, {end_fraction}")
        start_step = int(round(start_fraction * total_steps)) if start_step is None else start_step
        end_step = int(round(end_fraction * total_steps)) if end_step is None else end_step
    events = schedules.gmp_events(start_step, end_step, frequency)
    targets = [schedules.gmp_sparsity(int(t), final_sparsity=sparsity, start_step=start_step,
                                      end_step=end_step, frequency=frequency,
                                      initial_sparsity=initial_sparsity) for t in events]
    prunable = _prunable_fn(prune_first_layer, prune_last_layer, layer_order)
    events_i32 = np.asarray(events, np.int32)

    def step(params, ms, t):
        flags = prunable(params)
        # Exact keep counts per event, computed on the host from the (static) shapes.
        if scope == "global":
            n = masks.num_prunable(params, flags)
            table = np.asarray([masks.keep_count(n, s) for s in targets], np.int32)
        else:
            table = jax.tree.map(
                lambda x, f: np.asarray([masks.keep_count(x.size, s) if f else x.size
                                         for s in targets], np.int32), params, flags)
        idx = jnp.clip(jnp.searchsorted(events_i32, t), 0, len(events) - 1)
        is_event = jnp.asarray(events_i32)[idx] == t

        def update(_):
            score = masks.magnitude_scores(params, ms.mask)
            if scope == "global":
                new = masks.global_topk_mask_n(score, jnp.asarray(table)[idx], flags)
            else:
                new = masks.topk_mask_n(
                    score, jax.tree.map(lambda c: jnp.asarray(c)[idx], table), flags)
            return jax.tree.map(jnp.logical_and, new, ms.mask)

        return MaskState(jax.lax.cond(is_event, update, lambda _: ms.mask, None))

    def init(params, key):
        del key
        return step(params, MaskState(masks.ones_mask(params)), jnp.int32(0))

    return _masked_method("gmp", init=init, step=step)
