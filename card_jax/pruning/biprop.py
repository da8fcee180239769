"""Biprop (BP): multi-prize tickets, a learned mask over frozen weights, binarised with a gain.

Diffenderfer & Kailkhura, "Multi-Prize Lottery Ticket Hypothesis", ICLR 2021
(chrundle/biprop, utils/conv_type.py); SPEC §3(a). Per prunable layer l:

    m_l     = TopK(|s_l|)                       (layerwise or one global ranking)
    alpha_l = sum(|W_l| * m_l) / max(sum(m_l), 1)   (mean |W| over kept weights, no gradient)
    W_eff   = alpha_l * sign(W_l) * m_l
    dL/ds_l = dL/dW_eff * W_l * sign(s_l)      (straight-through, as edge-popup)

The max(., 1) is the epsilon guard of SPEC §3(d): a layer emptied by the global ranking gets
alpha = 0 and all-zero weights instead of 0/0 = NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from card_jax.pruning import masks
from card_jax.pruning.base import Method
from card_jax.pruning.edgepopup import check_score_args, score_method


def gain(w: jax.Array, m: jax.Array) -> jax.Array:
    """alpha = mean |w| over the kept weights (0 for an empty layer), float32 `[]`, no grad."""
    kept = jnp.sum(m, dtype=jnp.int32)
    total = jnp.sum(jnp.where(m, jnp.abs(w), 0.0), dtype=jnp.float32)
    return jax.lax.stop_gradient(total / jnp.maximum(kept, 1).astype(jnp.float32))


def binarize(w: jax.Array, m: jax.Array) -> jax.Array:
    """alpha sign(w) m: values in {-alpha, 0, +alpha} (sign(0) = 0, as torch.sign)."""
    return jnp.where(m, gain(w, m).astype(w.dtype) * jnp.sign(w), jnp.zeros((), w.dtype))


def biprop(
    sparsity: float,
    scope: str = "global",
    *,
    init: str = "kaiming_normal",
    scale_fan: bool = False,
    warmup_epochs: float = 10,
    steps_per_epoch: int | None = None,
    prune_first_layer: bool = True,
    prune_last_layer: bool = True,
    layer_order: Sequence[str] | None = None,
) -> Method:
    """Biprop / MPT-1/32: trainable scores select a mask over frozen weights; the forward pass
    sees alpha_l sign(W) m. Arguments as `edgepopup.edge_popup`; `init` defaults to biprop's
    kaiming_normal (only sign(W) and the per-layer mean |W| matter). Always binary (SPEC §9).

    References:
      Diffenderfer & Kailkhura, ICLR 2021; chrundle/biprop utils/conv_type.py, main.py.
    """
    masker = check_score_args(sparsity, scope, warmup_epochs, steps_per_epoch)
    order = None if layer_order is None else tuple(layer_order)

    def prunable_fn(params):
        return masks.prunable_tree(params, first_layer=prune_first_layer,
                                   last_layer=prune_last_layer, layer_order=order)

    return score_method("bp", masker, prunable_fn, binarize, init=init, scale_fan=scale_fan,
                        binary=True)
