"""Mask math on parameter pytrees: which leaves are prunable, exact top-k masks, reports.

Pure, jittable building blocks shared by every compression method (SPEC §2-§5, DESIGN §5.2).
Masks always have the full params structure with bool leaves; non-prunable leaves are all True.

Counting rule (used everywhere, SPEC §2(d) "keep exactly numel - int((1 - k) numel)"):
  a group of n weights at sparsity s (fraction REMOVED) keeps exactly

      keep_count(n, s) = n - floor(s * n)

  weights. "Group" is one leaf for layerwise masks and the union of all prunable leaves for
  global masks, so layerwise masks are exact to the weight in every layer and global masks are
  exact overall. `floor` is evaluated in float64 with a 1e-9 relative tolerance so that e.g.
  0.29 * 100 = 28.999999999999996 removes 29 weights, not 28. Sparsities are Python floats,
  so counts are static Python ints; anything that varies during training (GMP, the global
  EP/BP warm-up) precomputes its counts on the host and indexes them with the step (`*_n`
  functions take counts, possibly traced int32 scalars).

Ranking and ties: a mask keeps the k largest scores. Ties at the threshold are broken by flat
index, lower index kept first. The flat index of a global mask runs over the prunable leaves in
`jax.tree.leaves` order (dict keys sorted), row-major inside each leaf. Scores are compared as
float32 through an order-preserving uint32 encoding, which orders floats totally (-0.0 ranks
just below +0.0; NaNs rank by their bits, above +inf when positive).

The ranking never sorts (`_topk_groups`). The keys are laid out as rows of 1024 (each leaf
starting a new row, zero keys padding its last one). The k-th largest key is found exactly by
setting its 32 bits from the most significant one, each bit one fused compare-and-count pass
over the keys; then the ties to keep are located from per-row tie counts and one cumulative
sum over one row per group. A layerwise mask ranks all its layers in the same passes (one threshold
per layer), so its cost is that of a global mask. O(34 n), no sort and no cumulative sum over
n (on XLA:CPU a cumulative sum over all weights, sliced back into leaves, cost ten times the
whole bisection): Conv-4's 2.4M scores take ~15-20 ms on 2 CPU cores, under 3% of its training
step (benchmarks/masks.py), against ~0.5 s for `lax.top_k` and ~0.55 s for a sort.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Params = Any
Mask = Any     # params structure, bool leaves
Prunable = Any  # params structure, Python bool leaves (static)

# Relative tolerance of the floor in keep_count (see module docstring).
_COUNT_TOL = 1e-9


# --------------------------------------------------------------------------- paths / leaves

def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_str(path: Sequence[Any]) -> str:
    """'/'-joined keys of a pytree path, e.g. 'convs/0/kernel'. The names used in reports."""
    return "/".join(_key_name(e) for e in path)


def _shape(x: Any) -> tuple[int, ...]:
    # Works for arrays, ShapeDtypeStructs (nnx.eval_shape) and Python scalars.
    return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def _size(x: Any) -> int:
    return int(np.prod(_shape(x), dtype=np.int64))


def _all_prunable(tree: Any) -> Prunable:
    return jax.tree.map(lambda _: True, tree)


def _prunable_or_all(tree: Any, prunable: Prunable | None) -> Prunable:
    # `None` means "every leaf": the literal-tree convention of the mask functions. Methods
    # always pass an explicit `prunable_tree(params)`.
    return _all_prunable(tree) if prunable is None else prunable


# --------------------------------------------------------------------------- prunable leaves

def numeric_path_key(path: str) -> tuple:
    """Sort key that orders digit runs numerically ('layers/10' after 'layers/2')."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t)
                 for t in re.split(r"(\d+)", path) if t)


def path_layer_order(params: Params) -> tuple[str, ...]:
    """Kernel paths (ndim >= 2) sorted numerically-aware by path.

    Equals the network order only when the path names follow it (Conv-k: 'convs/*' then
    'linears/*'). It is WRONG for this repo's ResNets ('blocks/*' sorts before the stem
    'conv1') and VGGs ('fc' sorts before 'layers/*'); use `forward_layer_order` there.
    """
    paths = [path_str(p) for p, x in jax.tree.flatten_with_path(params)[0] if len(_shape(x)) >= 2]
    return tuple(sorted(paths, key=numeric_path_key))


def forward_layer_order(fn: Callable[..., Any], params: Params, *args: Any) -> tuple[str, ...]:
    """Kernel paths (ndim >= 2) in the order the forward pass `fn(params, *args)` first uses them.

    Traces `fn` once with `jax.make_jaxpr` (no FLOPs) and records, for each kernel, the first
    primitive that reads it, descending into nested jaxprs (jit, custom_jvp, ...) whose inputs
    map one-to-one onto the equation's inputs. `fn` must be the plain dense forward (e.g.
    `lambda p, x: merge_model(graphdef, p, batch_stats)(x, train=False)`), not one that applies
    a mask first: a mask reads every kernel up front, in flatten order. Kernels `fn` never
    reads are appended in `path_layer_order`.
    """
    from jax.extend import core as jcore

    flat, _ = jax.tree.flatten_with_path(params)
    names = [path_str(p) for p, _ in flat]
    closed = jax.make_jaxpr(lambda leaves, *a: fn(jax.tree.unflatten(
        jax.tree.structure(params), leaves), *a))([x for _, x in flat], *args)
    env = {v: i for i, v in enumerate(closed.jaxpr.invars[:len(flat)])}
    order: list[int] = []

    def visit(jaxpr, env):
        for eqn in jaxpr.eqns:
            inner = [p.jaxpr if isinstance(p, jcore.ClosedJaxpr) else p
                     for p in eqn.params.values()
                     if isinstance(p, (jcore.ClosedJaxpr, jcore.Jaxpr))]
            inner = [j for j in inner if len(j.invars) == len(eqn.invars)]
            if inner:
                for j in inner:
                    visit(j, {iv: env[ov] for iv, ov in zip(j.invars, eqn.invars)
                              if not isinstance(ov, jcore.Literal) and ov in env})
            else:
                order.extend(env[v] for v in eqn.invars
                             if not isinstance(v, jcore.Literal) and v in env)

    visit(closed.jaxpr, env)
    seen: dict[str, None] = {}
    for i in order:
        if len(_shape(flat[i][1])) >= 2:
            seen.setdefault(names[i], None)
    rest = [p for p in path_layer_order(params) if p not in seen]
    return tuple(seen) + tuple(rest)


def prunable_tree(
    params: Params,
    *,
    first_layer: bool = True,
    last_layer: bool = True,
    layer_order: Sequence[str] | None = None,
) -> Prunable:
    """Static bool tree: True for conv/dense kernels (ndim >= 2), False for biases and BN.

    Args:
      params: params pytree (arrays or ShapeDtypeStructs; only shapes are read).
      first_layer / last_layer: False keeps the first / last kernel of the NETWORK dense
        (e.g. open_lth's VGG ignores 'fc'). Which kernel is first/last comes from
        `layer_order`; flatten order is not network order (dict keys sort 'blocks' < 'conv1'
        and '10' < '2'), so excluding a layer without `layer_order` is an error.
      layer_order: '/'-joined kernel paths in network order, from `forward_layer_order`
        (exact, traced from the model) or `path_layer_order` (numeric-aware path sort, only
        right when the names follow the network).

    Returns:
      Python bools in the params structure (usable as a static `optax.masked` mask).
    """
    flat, treedef = jax.tree.flatten_with_path(params)
    flags = {path_str(p): len(_shape(x)) >= 2 for p, x in flat}
    if not (first_layer and last_layer):
        if layer_order is None:
            raise ValueError(
                "prunable_tree: excluding the first/last layer needs layer_order (network order "
                "of the kernels); get it from masks.forward_layer_order(forward_fn, params, x)")
        order = [p for p in layer_order if flags.get(p)]
        missing = sorted(p for p, f in flags.items() if f and p not in set(order))
        unknown = sorted(set(layer_order) - set(flags))
        if missing or unknown:
            raise ValueError(f"layer_order does not match the kernels of params: "
                             f"missing {missing}, unknown {unknown}")
        if not first_layer and order:
            flags[order[0]] = False
        if not last_layer and order:
            flags[order[-1]] = False
    return jax.tree.unflatten(treedef, [flags[path_str(p)] for p, _ in flat])


# --------------------------------------------------------------------------- counting

def keep_count(n: int, sparsity: float) -> int:
    """Weights kept out of `n` at `sparsity` (fraction removed): n - floor(s n), exact."""
    s = float(sparsity)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1] (fraction REMOVED), got {sparsity!r}")
    removed = math.floor(s * n * (1.0 + _COUNT_TOL))
    return int(n - min(removed, n))


def num_prunable(params: Params, prunable: Prunable | None = None) -> int:
    """Total number of weights in the prunable leaves."""
    prunable = _prunable_or_all(params, prunable)
    return sum(_size(x) for x, f in zip(jax.tree.leaves(params), jax.tree.leaves(prunable)) if f)


def layer_keep_counts(params: Params, sparsity: float, prunable: Prunable | None = None) -> Any:
    """Per-leaf keep counts (Python ints; leaf size for non-prunable leaves), params structure."""
    prunable = _prunable_or_all(params, prunable)
    return jax.tree.map(lambda x, f: keep_count(_size(x), sparsity) if f else _size(x),
                        params, prunable)


# --------------------------------------------------------------------------- exact top-k

def _ordered_u32(x: jax.Array) -> jax.Array:
    """Order-preserving map float32 -> uint32 (a < b  <=>  key(a) < key(b) for non-NaN)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


# Keys are laid out as [blocks, _BLOCK]: every leaf starts on a block boundary (zero keys pad
# its last block), so one row-wise reduction gives per-block counts from which per-group counts
# follow by a short cumulative sum over blocks, never over the n weights.
_BLOCK = 1024


class _Layout(NamedTuple):
    """Static placement of the selected leaves in the blocked key matrix (numpy, host side)."""

    leaf_block: tuple[int, ...]   # first block of each leaf
    leaf_size: tuple[int, ...]    # weights per leaf
    block_group: np.ndarray       # int32 [nb], group of each block
    block_valid: np.ndarray       # int32 [nb], real (non-padding) entries of each block
    group_first: np.ndarray       # int32 [G], first block of each group
    group_last: np.ndarray        # int32 [G], last block of each group
    group_size: tuple[int, ...]   # weights per group


def _layout(sizes: Sequence[int], groups: Sequence[int]) -> _Layout:
    """`groups[i]` is the group of leaf i; groups are contiguous runs 0, 1, ... (sorted)."""
    leaf_block, block_group, block_valid = [], [], []
    for size, g in zip(sizes, groups):
        leaf_block.append(len(block_group))
        blocks = -(-size // _BLOCK)
        block_group += [g] * blocks
        block_valid += [_BLOCK] * (blocks - 1) + ([size - (blocks - 1) * _BLOCK] if blocks else [])
    num_groups = max(groups) + 1
    bg = np.asarray(block_group, np.int32)
    first = np.asarray([np.flatnonzero(bg == g)[0] for g in range(num_groups)], np.int32)
    last = np.asarray([np.flatnonzero(bg == g)[-1] for g in range(num_groups)], np.int32)
    group_size = tuple(sum(s for s, h in zip(sizes, groups) if h == g) for g in range(num_groups))
    return _Layout(tuple(leaf_block), tuple(sizes), bg, np.asarray(block_valid, np.int32), first,
                   last, group_size)


def _before_groups(cs: jax.Array, lay: _Layout) -> jax.Array:
    """Inclusive cumulative sums over blocks `[nb]` -> the total before each group `[G]`."""
    return jnp.where(lay.group_first > 0, cs[np.maximum(lay.group_first - 1, 0)], 0)


def _group_sums(per_block: jax.Array, lay: _Layout) -> jax.Array:
    """int32 [nb] -> [G]: sums over each group's contiguous blocks (cumsum over blocks only)."""
    cs = jnp.cumsum(per_block, dtype=jnp.int32)
    return cs[lay.group_last] - _before_groups(cs, lay)


def _row_counts(pred: jax.Array) -> jax.Array:
    """bool [nb, _BLOCK] -> int32 [nb], True entries per row.

    Summed as float32 (exact: a row holds at most _BLOCK = 1024 ones): XLA:CPU fuses the
    comparison into a float row reduction, whereas an int32 one materialises the int32
    indicator first and reduces it with a tree of reduce-windows, 2-5x slower per pass
    (measured on 2.4M keys).
    """
    return jnp.sum(pred, axis=1, dtype=jnp.float32).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(2,))
def _topk_groups(values: list[jax.Array], k: jax.Array, groups: tuple[int, ...]) -> list[jax.Array]:
    """Exact top-k of every group of leaves; returns a bool mask per leaf.

    Args:
      values: non-empty leaves, compared as float32.
      k: int32 [G], how many to keep in each group (traced; clipped to [0, group size]).
      groups: static, the group of each leaf, sorted (0, 0, 1, 2, ...). A group's ranking runs
        over the concatenation of its leaves in the given order.

    Per group g the k_g largest values are kept; ties at the threshold go to the lower flat
    index (position in the concatenation of the group's leaves, row-major in each leaf).

    1. Threshold: the key t_g of the k_g-th largest value, the largest t with
       count(key >= t) >= k_g, found for all groups at once by setting bits from the MSB
       (32 passes, each one fused compare-and-count over the keys; the count is monotone in
       t, so greedy bit setting is exact).
    2. Ties: keep the first need_g = k_g - count(key > t_g) entries equal to t_g. The block
       holding the need_g-th tie is found from per-block tie counts, and the position inside
       it from one cumulative sum over that block's _BLOCK entries: three more passes over the
       keys (count above, count ties, build the mask) however many ties there are, and no
       cumulative sum over all n weights (on XLA:CPU a cumulative sum over n, sliced back
       into leaves, cost 10x the whole bisection).
    """
    lay = _layout([int(v.size) for v in values], groups)
    nb = len(lay.block_group)
    parts = []
    for v in values:
        flat = _ordered_u32(v.ravel())
        pad = -v.size % _BLOCK
        parts += [flat, jnp.zeros(pad, jnp.uint32)] if pad else [flat]
    # Padding keys are 0, the smallest key; no threshold candidate is 0 (the search only
    # tests t with a bit set), so padding is never counted, and it is excluded from ties.
    keys = jnp.concatenate(parts).reshape(nb, _BLOCK)
    col = jax.lax.broadcasted_iota(jnp.int32, (nb, _BLOCK), 1)
    real = col < lay.block_valid[:, None]
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, np.asarray(lay.group_size, np.int32))

    def count(pred_fn, t):
        """Per-group count of entries with pred_fn(keys, t per block)."""
        return _group_sums(_row_counts(pred_fn(keys, t[lay.block_group][:, None])), lay)

    def body(i, t):
        cand = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(count(jnp.greater_equal, cand) >= k, cand, t)

    t = jax.lax.fori_loop(0, 32, body, jnp.zeros(k.shape, jnp.uint32))
    t_block = t[lay.block_group][:, None]
    need = k - count(jnp.greater, t)                      # ties to keep, 0 <= need <= ties
    tie = (keys == t_block) & real
    tie_block = _row_counts(tie)                            # [nb]
    cs = jnp.cumsum(tie_block, dtype=jnp.int32)
    base = _before_groups(cs, lay)                          # [G]
    # Blocks of a group whose inclusive tie count is still below need come before the target.
    short = (cs - base[lay.block_group]) < need[lay.block_group]
    target = jnp.minimum(lay.group_first + _group_sums(short.astype(jnp.int32), lay),
                         lay.group_last)                                               # [G]
    ties_before = cs[target] - tie_block[target] - base
    row_cum = jnp.cumsum(tie[target], axis=1, dtype=jnp.int32) + ties_before[:, None]  # [G, B]
    within = jnp.sum(row_cum < need[:, None], axis=1, dtype=jnp.int32)
    # Last kept tie, as a padded position inside the group (-1: keep no tie).
    bound = jnp.where(need > 0, (target - lay.group_first) * _BLOCK + within, -1)
    row = jax.lax.broadcasted_iota(jnp.int32, (nb, _BLOCK), 0)
    pos = (row - lay.group_first[lay.block_group][:, None]) * _BLOCK + col
    keep = ((keys > t_block) | (tie & (pos <= bound[lay.block_group][:, None]))).reshape(-1)
    return [keep[b * _BLOCK:b * _BLOCK + v.size].reshape(v.shape)
            for b, v in zip(lay.leaf_block, values)]


def _select(values: list[Any], ks: list[Any], groups: tuple[int, ...]) -> list[jax.Array]:
    """`_topk_groups` with empty leaves (and groups) taken out and given empty masks."""
    arrays = [jnp.asarray(v) for v in values]
    live = [i for i, v in enumerate(arrays) if v.size]
    out = [jnp.ones(v.shape, bool) for v in arrays]
    if not live:
        return out
    # Renumber the groups that still have leaves: 0, 1, ... in order.
    ids = {g: j for j, g in enumerate(dict.fromkeys(groups[i] for i in live))}
    k = jnp.stack([jnp.asarray(ks[g], jnp.int32) for g in ids])
    picked = _topk_groups([arrays[i] for i in live], k, tuple(ids[groups[i]] for i in live))
    for i, m in zip(live, picked):
        out[i] = m
    return out


def topk_leaf_mask(x: jax.Array, k: jax.Array | int) -> jax.Array:
    """Bool mask of x's shape keeping exactly its k largest entries (ties: lower index kept)."""
    return _select([x], [k], (0,))[0]


def _rank_prunable(scores: Any, prunable: Prunable | None, counts: list[Any],
                   group_of: Callable[[int], int]) -> Mask:
    """Ranks the prunable leaves of `scores` in one `_select`: the j-th prunable leaf is in
    group `group_of(j)`, which keeps `counts[group]`; other leaves get all-True masks."""
    prunable = _prunable_or_all(scores, prunable)
    leaves, treedef = jax.tree.flatten(scores)
    flags = jax.tree.leaves(prunable)
    chosen = [s for s, f in zip(leaves, flags) if f]
    it = iter(_select(chosen, counts, tuple(group_of(j) for j in range(len(chosen)))))
    return jax.tree.unflatten(
        treedef, [next(it) if f else jnp.ones(jnp.shape(s), bool) for s, f in zip(leaves, flags)])


def topk_mask_n(scores: Any, n_keep: Any, prunable: Prunable | None = None) -> Mask:
    """Per-leaf top-k: leaf i keeps its `n_keep[i]` largest scores (counts may be traced).

    All prunable leaves are ranked in one compiled search (one group per leaf), not one
    search per leaf."""
    flags = jax.tree.leaves(_prunable_or_all(scores, prunable))
    counts = jax.tree.structure(scores).flatten_up_to(n_keep)
    counts = [c for c, f in zip(counts, flags) if f]
    return _rank_prunable(scores, prunable, counts, lambda j: j)


def global_topk_mask_n(scores: Any, n_keep: jax.Array | int,
                       prunable: Prunable | None = None) -> Mask:
    """One ranking over all prunable leaves: keeps exactly `n_keep` (may be traced) scores."""
    return _rank_prunable(scores, prunable, [n_keep], lambda j: 0)


def topk_mask(scores: Any, sparsity: float, prunable: Prunable | None = None) -> Mask:
    """Per-leaf top-k of the raw `scores`: each prunable leaf keeps keep_count(size, sparsity)."""
    return topk_mask_n(scores, layer_keep_counts(scores, sparsity, prunable), prunable)


def global_topk_mask(scores: Any, sparsity: float, prunable: Prunable | None = None) -> Mask:
    """Global top-k of the raw `scores`: keeps keep_count(total prunable, sparsity) overall."""
    return global_topk_mask_n(scores, keep_count(num_prunable(scores, prunable), sparsity),
                              prunable)


# --------------------------------------------------------------------------- magnitude

def magnitude_scores(params: Params, existing_mask: Mask | None = None) -> Any:
    """|w|, with already-pruned weights (existing_mask False) set to -1 so they rank last."""
    # Already-pruned weights rank below every surviving one (-1 < |w|), whatever value the raw
    # parameter holds, so the new mask is a subset of the old one (monotone, SPEC §5(d)).
    if existing_mask is None:
        return jax.tree.map(jnp.abs, params)
    return jax.tree.map(lambda p, m: jnp.where(m, jnp.abs(p), -1.0), params, existing_mask)


def _and(mask: Mask, existing_mask: Mask | None) -> Mask:
    # Guarantees monotonicity even if more weights are requested than survive.
    return mask if existing_mask is None else jax.tree.map(jnp.logical_and, mask, existing_mask)


def layerwise_magnitude_mask(params: Params, sparsity: float, prunable: Prunable | None = None,
                             existing_mask: Mask | None = None) -> Mask:
    """Each prunable leaf keeps its keep_count(size, sparsity) largest |w|.

    `sparsity` is the TOTAL target of each leaf (not a fraction of the survivors). With
    `existing_mask`, pruned weights stay pruned. `prunable=None` prunes every leaf (literal
    trees); for a model pass `prunable_tree(params)`.
    """
    return _and(topk_mask(magnitude_scores(params, existing_mask), sparsity, prunable),
                existing_mask)


def global_magnitude_mask(params: Params, sparsity: float, prunable: Prunable | None = None,
                          existing_mask: Mask | None = None) -> Mask:
    """One |w| threshold over all prunable leaves, keeping keep_count(total, sparsity) weights.

    No per-layer normalisation (unlike jaxpruner's default, SPEC §11(c)): this is open_lth's
    global magnitude pruning, with our exact counting rule instead of its ceil / strict `>`.
    """
    return _and(global_topk_mask(magnitude_scores(params, existing_mask), sparsity, prunable),
                existing_mask)


def magnitude_mask(params: Params, sparsity: float, prunable: Prunable | None, scope: str,
                   existing_mask: Mask | None = None) -> Mask:
    """`global_magnitude_mask` or `layerwise_magnitude_mask` by `scope`."""
    if scope == "global":
        return global_magnitude_mask(params, sparsity, prunable, existing_mask)
    if scope == "layerwise":
        return layerwise_magnitude_mask(params, sparsity, prunable, existing_mask)
    raise ValueError(f"scope must be 'global' or 'layerwise', got {scope!r}")


# --------------------------------------------------------------------------- apply / report

def ones_mask(params: Params) -> Mask:
    """All-True mask in the params structure."""
    return jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), params)


def apply_mask(params: Params, mask: Mask) -> Params:
    """Zeroes masked-out weights exactly (+0.0, even for inf/NaN, unlike `params * mask`)."""
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), p.dtype)), params, mask)


def sparsity_of(mask: Mask, prunable: Prunable | None = None) -> jax.Array:
    """Global fraction of prunable weights removed, as a jittable float32 scalar."""
    prunable = _prunable_or_all(mask, prunable)
    pairs = [(m, f) for m, f in zip(jax.tree.leaves(mask), jax.tree.leaves(prunable)) if f]
    total = sum(int(m.size) for m, _ in pairs)
    if total == 0:
        return jnp.float32(0.0)
    kept = sum(jnp.sum(m, dtype=jnp.int32) for m, _ in pairs)
    return 1.0 - kept.astype(jnp.float32) / total


def sparsity_report(mask: Mask, prunable: Prunable | None = None) -> dict:
    """{'global': float, 'per_layer': {path: float}} over the prunable leaves (open_lth's
    sparsity_report). Host-side: reads concrete values (index out one realization first)."""
    prunable = _prunable_or_all(mask, prunable)
    flat = jax.tree.flatten_with_path(mask)[0]
    per_layer, kept, total = {}, 0, 0
    for (path, m), f in zip(flat, jax.tree.leaves(prunable)):
        if not f:
            continue
        m = np.asarray(m)
        n_kept = int(np.count_nonzero(m))
        per_layer[path_str(path)] = 1.0 - n_kept / m.size if m.size else 0.0
        kept, total = kept + n_kept, total + int(m.size)
    return {"global": 1.0 - kept / total if total else 0.0, "per_layer": per_layer}


def reset_pruned_optimizer_state(opt_state: Any, mask: Mask) -> Any:
    """Zeroes the optimizer statistics (momentum, Adam mu/nu) of pruned coordinates.

    Every sub-tree of `opt_state` with the params structure (optax's TraceState.trace,
    ScaleByAdamState.mu/nu, ...) is masked; counters and other leaves are left alone. Optional:
    `Method.post_update` already keeps pruned weights at exactly 0 for per-coordinate
    optimizers. Useful after a GMP mask event or when restoring a state, so stale momentum does
    not linger. Only for trainable='params' methods: edge-popup/biprop scores of pruned weights
    must keep their momentum (they can re-enter the mask).
    """
    treedef = jax.tree.structure(mask)

    def params_like(node: Any) -> bool:
        return not isinstance(node, (jax.Array, np.ndarray)) and jax.tree.structure(node) == treedef

    return jax.tree.map(lambda node: apply_mask(node, mask) if params_like(node) else node,
                        opt_state, is_leaf=params_like)
