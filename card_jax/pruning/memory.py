"""Model memory as the paper measures it (reference [54], Xu et al. CVPR 2019; SPEC §9).

    memory_MB = (32 * #surviving full-precision weights + 1 * #surviving binary weights) / 8 / 1e6

Only prunable conv/dense kernels are counted; masks, BN parameters, biases and the per-layer
gains alpha are not. MB is decimal. Edge-popup with signed-constant init and biprop are binary
(`Method.binary`); every other method stores 32-bit weights.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from card_jax.pruning import masks


def _flags(params: Any, prunable: Any | None) -> Any:
    # Unlike the mask helpers, the default here is the model rule (kernels only).
    return masks.prunable_tree(params) if prunable is None else prunable


def bits_per_weight(binary: bool) -> int:
    return 1 if binary else 32


def memory_mb_from_count(num_weights: int, binary: bool) -> float:
    """Decimal MB of `num_weights` stored weights."""
    return num_weights * bits_per_weight(binary) / 8 / 1e6


def memory_mb(effective_params: Any, prunable: Any | None = None, binary: bool = False) -> float:
    """Memory of a trained model from its EFFECTIVE weights (`method.apply(params, state)`):
    counts the nonzero prunable weights. Host-side (reads values; one realization)."""
    flags = _flags(effective_params, prunable)
    nonzero = sum(int(np.count_nonzero(np.asarray(x)))
                  for x, f in zip(jax.tree.leaves(effective_params), jax.tree.leaves(flags)) if f)
    return memory_mb_from_count(nonzero, binary)


def memory_mb_at_sparsity(params: Any, sparsity: float, *, prunable: Any | None = None,
                          binary: bool = False, scope: str = "global") -> float:
    """Memory predicted from shapes alone (arrays or ShapeDtypeStructs) under the counting rule
    of `masks.keep_count` (global: over all prunable weights; layerwise: per layer)."""
    flags = _flags(params, prunable)
    if scope == "global":
        kept = masks.keep_count(masks.num_prunable(params, flags), sparsity)
    elif scope == "layerwise":
        counts = masks.layer_keep_counts(params, sparsity, flags)
        kept = sum(c for c, f in zip(jax.tree.leaves(counts), jax.tree.leaves(flags)) if f)
    else:
        raise ValueError(f"scope must be 'global' or 'layerwise', got {scope!r}")
    return memory_mb_from_count(kept, binary)
