"""Edge-popup (EP): learn a mask over frozen random weights by top-k of learned scores.

Ramanujan et al., "What's Hidden in a Randomly Weighted Neural Network?", CVPR 2020
(allenai/hidden-networks); SPEC §2(a). The global variant (one threshold over all layers) and
its sparsity warm-up follow chrundle/biprop's GlobalSubnetConv (SPEC §3(a), §14.6
[unverified] that the paper's global EP used the warm-up too).

Also the shared machinery of the score-based methods (biprop reuses it): weight/score
initialisation, the score mask with its warm-up counts, and the straight-through estimator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from card_jax.pruning import masks, schedules
from card_jax.pruning.base import Method


class ScoreState(NamedTuple):
    """Method state of the score-based methods (EP, BP).

    Attributes:
      scores: float32 tree in the params structure; the trainable pytree (zeros, and unused,
        on non-prunable leaves so the tree stays full-structure).
      n_keep: int32 `[]`, number of prunable weights the global mask keeps at the current step
        (moves during the warm-up). Layerwise masks use static per-layer counts; there it only
        records the total kept.
    """

    scores: Any
    n_keep: jax.Array


def fan_in(shape: Sequence[int]) -> int:
    """Fan-in of an HWIO conv kernel (kh kw Cin/groups) or an [in, out] dense kernel."""
    return int(np.prod(shape[:-1]))


def _per_leaf_keys(key: jax.Array, tree: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))[:len(leaves)]
    return jax.tree.unflatten(treedef, list(keys))


def init_weights(params: Any, prunable: Any, key: jax.Array, init: str,
                 sparsity: float = 0.0, scale_fan: bool = False) -> Any:
    """Frozen weights for the prunable kernels (SPEC §2(a)).

    init:
      'signed_constant': sign(W0) sqrt(2 / fan_in), W0 the model's own (symmetric) init, so
        signs are i.i.d. +-1 (sign(0) is taken as +1). Binary-valued.
      'kaiming_normal': N(0, 2 / fan_in), drawn from `key`.
      'model': keep the model's initialisation.
    scale_fan: fan_in <- fan_in (1 - sparsity), the kept fan-in ("scaled Kaiming", Ramanujan
      et al. §4). The reference code scales by one minus its rate argument, which there is the
      KEPT fraction (SPEC §2(d)); this implements the paper's stated intent. Off by default.
    """
    if init not in ("signed_constant", "kaiming_normal", "model"):
        raise ValueError(f"init must be signed_constant, kaiming_normal or model, got {init!r}")
    if init == "model":
        return params

    def leaf(w, f, k):
        if not f:
            return w
        fan = fan_in(w.shape) * ((1.0 - sparsity) if scale_fan else 1.0)
        std = math.sqrt(2.0 / max(fan, 1e-12))
        if init == "signed_constant":
            return jnp.where(w >= 0, std, -std).astype(w.dtype)
        return (std * jax.random.normal(k, w.shape, jnp.float32)).astype(w.dtype)

    return jax.tree.map(leaf, params, prunable, _per_leaf_keys(key, params))


def init_scores(params: Any, prunable: Any, key: jax.Array) -> Any:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per prunable kernel (kaiming_uniform, a = sqrt(5));
    zeros elsewhere."""
    def leaf(w, f, k):
        if not f:
            return jnp.zeros(w.shape, jnp.float32)
        bound = 1.0 / math.sqrt(fan_in(w.shape))
        return jax.random.uniform(k, w.shape, jnp.float32, -bound, bound)

    return jax.tree.map(leaf, params, prunable, _per_leaf_keys(key, params))


@jax.custom_vjp
def straight_through(value: jax.Array, weight: jax.Array, scores: jax.Array) -> jax.Array:
    """Returns `value` (the effective weight); the backward pass gives only the scores a
    gradient: dL/ds = dL/dvalue * weight * sign(s).

    For EP value = W * m and this is hidden-networks' estimator: the top-k is the identity
    backwards (dL/dm = dL/d(W m) * W) and |s| contributes sign(s). For biprop value =
    alpha sign(W) m and the same formula is biprop's custom backward (SPEC §3(a)); alpha gets
    no gradient. A custom_vjp (not `m + |s| - stop_gradient(|s|)`) keeps the forward value
    bit-exact and the gradient formula explicit.
    """
    del weight, scores
    return value


def _st_fwd(value, weight, scores):
    return value, (weight, jnp.sign(scores))


def _st_bwd(res, g):
    weight, sign = res
    return jnp.zeros_like(g), jnp.zeros_like(weight), (g * weight * sign).astype(sign.dtype)


straight_through.defvjp(_st_fwd, _st_bwd)


class ScoreMasker(NamedTuple):
    """Static description of how scores become a mask (shared by EP and BP)."""

    sparsity: float
    scope: str
    warmup_epochs: float
    steps_per_epoch: int | None

    def keep_table(self, params: Any, prunable: Any) -> np.ndarray:
        """Global keep count per epoch, int32 `[E + 1]`: warm-up epochs, then the final count."""
        n = masks.num_prunable(params, prunable)
        e = schedules.warmup_epochs_needed(self.sparsity, self.warmup_epochs)
        return np.asarray([masks.keep_count(n, schedules.warmup_sparsity(
            i, self.sparsity, self.warmup_epochs)) for i in range(e + 1)], np.int32)

    def n_keep(self, params: Any, prunable: Any, step: jax.Array) -> jax.Array:
        """The global keep count in force for the forward pass of optimizer step `step`."""
        if self.scope == "layerwise":
            counts = masks.layer_keep_counts(params, self.sparsity, prunable)
            return jnp.int32(sum(c for c, f in zip(jax.tree.leaves(counts),
                                                   jax.tree.leaves(prunable)) if f))
        table = self.keep_table(params, prunable)
        if len(table) == 1:
            return jnp.int32(table[0])
        epoch = jnp.asarray(step, jnp.int32) // self.steps_per_epoch
        return jnp.asarray(table)[jnp.minimum(epoch, len(table) - 1)]

    def mask(self, params: Any, prunable: Any, ms: ScoreState) -> Any:
        """Top-k of |scores| (no gradient: the estimator lives in `straight_through`)."""
        magnitude = jax.tree.map(lambda s: jnp.abs(jax.lax.stop_gradient(s)), ms.scores)
        if self.scope == "global":
            return masks.global_topk_mask_n(magnitude, ms.n_keep, prunable)
        return masks.topk_mask_n(
            magnitude, masks.layer_keep_counts(params, self.sparsity, prunable), prunable)


def check_score_args(sparsity: float, scope: str, warmup_epochs: float,
                     steps_per_epoch: int | None) -> ScoreMasker:
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (fraction of weights REMOVED), "
                         f"got {sparsity!r}")
    if scope not in ("global", "layerwise"):
        raise ValueError(f"scope must be 'global' or 'layerwise', got {scope!r}")
    masker = ScoreMasker(float(sparsity), scope, float(warmup_epochs), steps_per_epoch)
    if (scope == "global" and schedules.warmup_epochs_needed(sparsity, warmup_epochs)
            and not steps_per_epoch):
        raise ValueError("global warm-up needs steps_per_epoch (pruning.from_config passes it); "
                         "or set warmup_epochs=0")
    return masker


def score_method(name: str, masker: ScoreMasker, prunable_fn, effective, *, init: str,
                 scale_fan: bool, binary: bool) -> Method:
    """A trainable='scores' Method; `effective(w, m, s) -> value` gives the forward weight."""

    def init_params(params, key):
        return init_weights(params, prunable_fn(params), jax.random.fold_in(key, 0), init,
                            masker.sparsity, scale_fan)

    def init_state(params, key):
        flags = prunable_fn(params)
        return ScoreState(init_scores(params, flags, jax.random.fold_in(key, 1)),
                          masker.n_keep(params, flags, 0))

    def apply(params, ms):
        flags = prunable_fn(params)
        mask = masker.mask(params, flags, ms)
        return jax.tree.map(
            lambda w, s, m, f: straight_through(effective(w, m), w, s) if f else w,
            params, ms.scores, mask, flags)

    def step(params, ms, t):
        return ms._replace(n_keep=masker.n_keep(params, prunable_fn(params), t))

    return Method(
        name=name,
        init=init_state,
        apply=apply,
        step=step,
        post_update=lambda params, ms: params,  # weights are frozen
        trainable="scores",
        init_params=init_params,
        mask=lambda params, ms: masker.mask(params, prunable_fn(params), ms),
        binary=binary,
    )


def edge_popup(
    sparsity: float,
    scope: str = "global",
    *,
    init: str = "signed_constant",
    scale_fan: bool = False,
    warmup_epochs: float = 10,
    steps_per_epoch: int | None = None,
    prune_first_layer: bool = True,
    prune_last_layer: bool = True,
    layer_order: Sequence[str] | None = None,
) -> Method:
    """Edge-popup: W_eff = W * TopK(|s|), W frozen, only the scores s train (straight-through).

    `sparsity` = fraction removed (hidden-networks' rate argument is the kept fraction,
    1 - sparsity; SPEC §2(d)).
    scope 'layerwise' keeps keep_count(numel, sparsity) per layer (hidden-networks); 'global'
    one ranking over all layers with biprop's warm-up (`warmup_epochs`, only when sparsity
    >= 0.5; epochs converted with `steps_per_epoch`, which `pruning.from_config` supplies).
    With init='signed_constant' the network is binary-valued (+-c per layer; SPEC §9(b)).

    References:
      Ramanujan et al., CVPR 2020; allenai/hidden-networks utils/conv_type.py.
    """
    masker = check_score_args(sparsity, scope, warmup_epochs, steps_per_epoch)
    order = None if layer_order is None else tuple(layer_order)
    prunable_fn = lambda params: masks.prunable_tree(  # noqa: E731
        params, first_layer=prune_first_layer, last_layer=prune_last_layer, layer_order=order)
    return score_method(
        "ep", masker, prunable_fn,
        lambda w, m: jnp.where(m, w, jnp.zeros((), w.dtype)),
        init=init, scale_fan=scale_fan, binary=(init == "signed_constant"))
