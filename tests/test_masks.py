"""Mask math, schedules and memory accounting on literal trees (SPEC §2-§5, §9)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from card_jax import models, state
from card_jax.pruning import masks, memory, schedules


# XLA's optimisation passes dominate CPU compile time of these tiny graphs (DESIGN §7).
pytestmark = pytest.mark.usefixtures("fast_compile")


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def _reference_topk(x: np.ndarray, k: int) -> np.ndarray:
    """k largest, ties to the lower flat index: a stable sort on (-x, index)."""
    flat = x.ravel()
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    return keep.reshape(x.shape)


# --------------------------------------------------------------------------- counting / top-k

def test_layerwise_magnitude_literal():
    mask = masks.layerwise_magnitude_mask({"w": jnp.array([0.1, 0.9, -0.2, 0.5])}, 0.5)
    np.testing.assert_array_equal(mask["w"], [False, True, False, True])


def test_global_vs_layerwise_literal():
    tree = {"a": jnp.array([1.0, 2.0, -3.0, 4.0]), "b": jnp.array([10.0, -20.0, 30.0, 40.0])}
    layer = masks.layerwise_magnitude_mask(tree, 0.5)
    glob = masks.global_magnitude_mask(tree, 0.5)
    np.testing.assert_array_equal(layer["a"], [False, False, True, True])
    np.testing.assert_array_equal(layer["b"], [False, False, True, True])
    # One threshold, no per-layer normalisation: the small layer is emptied.
    np.testing.assert_array_equal(glob["a"], [False] * 4)
    np.testing.assert_array_equal(glob["b"], [True] * 4)


@pytest.mark.parametrize("s", [0.0, 0.29, 0.5, 0.6, 0.8, 0.9, 0.95, 0.999])
def test_keep_count_rule(s):
    for n in (1, 7, 100, 1000, 44_643_712):
        expect = n - math.floor(round(s * n, 6))  # decimal floor of the exact product
        assert masks.keep_count(n, s) == expect
    assert masks.keep_count(100, 0.29) == 71  # 0.29 * 100 = 28.999999999999996 in float64


def test_keep_count_rejects_bad_sparsity():
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="REMOVED"):
            masks.keep_count(10, bad)


@pytest.mark.parametrize("s", [0.0, 0.29, 0.5, 0.9, 0.95])
def test_exact_counts_layerwise_and_global(s):
    key = jax.random.key(0)
    k1, k2, k3 = jax.random.split(key, 3)
    tree = {"conv": jax.random.normal(k1, (3, 3, 4, 5)), "fc": jax.random.normal(k2, (17, 3)),
            "bias": jax.random.normal(k3, (5,))}
    flags = masks.prunable_tree(tree)
    layer = masks.layerwise_magnitude_mask(tree, s, flags)
    for name in ("conv", "fc"):
        n = tree[name].size
        assert int(layer[name].sum()) == n - math.floor(round(s * n, 6))
    glob = masks.global_magnitude_mask(tree, s, flags)
    total = tree["conv"].size + tree["fc"].size
    assert int(glob["conv"].sum() + glob["fc"].sum()) == masks.keep_count(total, s)
    assert bool(layer["bias"].all()) and bool(glob["bias"].all())  # never pruned
    # The global mask keeps exactly the largest magnitudes across both kernels.
    flat = np.concatenate([np.abs(np.asarray(tree["conv"])).ravel(),
                           np.abs(np.asarray(tree["fc"])).ravel()])
    ref = _reference_topk(flat, masks.keep_count(total, s))
    got = np.concatenate([np.asarray(glob["conv"]).ravel(), np.asarray(glob["fc"]).ravel()])
    np.testing.assert_array_equal(got, ref)


def test_topk_matches_stable_sort_reference():
    x = np.array(jax.random.normal(jax.random.key(1), (2000,)))
    x[::7] = 0.25  # many exact ties
    x[5] = -0.0
    for k in (0, 1, 3, 285, 286, 1000, 1999, 2000):
        np.testing.assert_array_equal(masks.topk_leaf_mask(jnp.asarray(x), k),
                                      _reference_topk(x, k), err_msg=f"k={k}")


def test_ties_broken_by_flat_index_across_leaves():
    tree = {"a": jnp.ones((2, 2)), "b": jnp.ones((3,))}
    mask = masks.global_topk_mask_n(tree, 5)
    np.testing.assert_array_equal(mask["a"], [[True, True], [True, True]])
    np.testing.assert_array_equal(mask["b"], [True, False, False])
    layer = masks.topk_mask(tree, 0.5)  # a keeps 2 of 4, b keeps 3 - 1 = 2
    np.testing.assert_array_equal(layer["a"], [[True, True], [False, False]])
    np.testing.assert_array_equal(layer["b"], [True, True, False])


def test_traced_count_under_jit_and_vmap():
    tree = {"a": jax.random.normal(jax.random.key(2), (6, 5)),
            "b": jax.random.normal(jax.random.key(3), (4, 4))}
    fn = jax.jit(lambda t, k: masks.global_topk_mask_n(t, k))
    for k in (0, 7, 46):
        got = fn(tree, jnp.int32(k))
        assert int(got["a"].sum() + got["b"].sum()) == k
    batched = jax.vmap(lambda t, k: masks.global_topk_mask_n(t, k))(
        jax.tree.map(lambda x: jnp.stack([x, -x]), tree), jnp.array([3, 10], jnp.int32))
    assert [int(batched["a"][i].sum() + batched["b"][i].sum()) for i in range(2)] == [3, 10]


def test_existing_mask_is_monotone():
    params = {"w": jnp.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])}
    first = masks.global_magnitude_mask(params, 0.5)
    np.testing.assert_array_equal(first["w"], [True, True, True, False, False, False])
    # A pruned coordinate whose raw value grew large must not come back.
    grown = {"w": jnp.array([0.1, 4.0, 3.0, 100.0, 1.0, 0.5])}
    second = masks.global_magnitude_mask(grown, 0.7, existing_mask=first)  # keeps 2
    np.testing.assert_array_equal(second["w"], [False, True, True, False, False, False])
    layer = masks.layerwise_magnitude_mask(grown, 0.5, existing_mask=first)
    np.testing.assert_array_equal(layer["w"], first["w"])


def test_apply_and_ones_mask():
    params = {"w": jnp.array([-1.0, jnp.inf, jnp.nan, 2.0]), "b": jnp.array([3.0])}
    mask = {"w": jnp.array([True, False, False, True]), "b": jnp.array([True])}
    out = masks.apply_mask(params, mask)
    np.testing.assert_array_equal(out["w"], [-1.0, 0.0, 0.0, 2.0])
    assert not np.signbit(np.asarray(out["w"])[1:3]).any()
    ones = masks.ones_mask(params)
    assert all(bool(m.all()) and m.dtype == jnp.bool_ for m in jax.tree.leaves(ones))


def test_sparsity_report():
    mask = {"k1": jnp.array([[True, False], [False, False]]), "k2": jnp.ones((2, 3), bool),
            "bias": jnp.zeros((3,), bool)}
    flags = {"k1": True, "k2": True, "bias": False}
    rep = masks.sparsity_report(mask, flags)
    assert rep["per_layer"] == {"k1": 0.75, "k2": 0.0}
    assert rep["global"] == pytest.approx(3 / 10)
    assert float(jax.jit(lambda m: masks.sparsity_of(m, flags))(mask)) == pytest.approx(0.3)


# --------------------------------------------------------------------------- prunable leaves

def _tiny_vgg():
    # Shapes from eval_shape, values from numpy: building the module eagerly is slow on CPU.
    model = nnx.eval_shape(lambda: models.build(
        "vgg11", num_classes=10, in_channels=3, mean=(0.5,) * 3, std=(0.5,) * 3,
        rngs=nnx.Rngs(0), width=0.0625))
    graphdef, params, batch_stats = state.split_model(model)
    rng = np.random.default_rng(0)
    params, batch_stats = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), (params, batch_stats))
    return graphdef, params, batch_stats


def test_prunable_tree_and_layer_order():
    graphdef, params, batch_stats = _tiny_vgg()
    flags = masks.prunable_tree(params)
    for (path, x), f in zip(jax.tree.flatten_with_path(params)[0], jax.tree.leaves(flags)):
        assert f == (x.ndim >= 2 and masks.path_str(path).endswith("kernel"))
    # Flatten / path order is not network order: 'fc' sorts before 'layers/*'.
    assert masks.path_layer_order(params)[0] == "fc/kernel"
    order = masks.forward_layer_order(
        lambda p, x: state.merge_model(graphdef, p, batch_stats)(x, train=False),
        params, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    assert order[0] == "layers/0/conv/kernel" and order[-1] == "fc/kernel"
    assert sorted(order) == sorted(masks.path_layer_order(params))
    no_fc = masks.prunable_tree(params, last_layer=False, layer_order=order)
    assert no_fc["fc"]["kernel"] is False and no_fc["layers"]["0"]["conv"]["kernel"] is True
    no_first = masks.prunable_tree(params, first_layer=False, layer_order=order)
    assert no_first["layers"]["0"]["conv"]["kernel"] is False and no_first["fc"]["kernel"]
    with pytest.raises(ValueError, match="layer_order"):
        masks.prunable_tree(params, last_layer=False)
    with pytest.raises(ValueError, match="missing"):
        masks.prunable_tree(params, last_layer=False, layer_order=order[:-1])
    # Masks keep the full structure, all ones on biases and BN.
    mask = masks.global_magnitude_mask(params, 0.9, no_fc)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    for m, f in zip(jax.tree.leaves(mask), jax.tree.leaves(no_fc)):
        if not f:
            assert bool(m.all())


def test_numeric_path_sort():
    paths = ["layers/10/kernel", "layers/2/kernel", "layers/1/kernel"]
    assert sorted(paths, key=masks.numeric_path_key) == [
        "layers/1/kernel", "layers/2/kernel", "layers/10/kernel"]


def test_reset_pruned_optimizer_state():
    params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([0.5])}
    mask = {"w": jnp.array([True, False, True]), "b": jnp.array([True])}
    grads = jax.tree.map(jnp.ones_like, params)
    for tx in (optax.sgd(0.1, momentum=0.9), optax.adamw(1e-3, weight_decay=0.1)):
        opt_state = tx.init(params)
        _, opt_state = tx.update(grads, opt_state, params)
        reset = masks.reset_pruned_optimizer_state(opt_state, mask)
        before, after = jax.tree.leaves(opt_state), jax.tree.leaves(reset)
        assert len(before) == len(after)
        vectors = [a for a in after if a.shape == (3,)]
        assert vectors and all(float(v[1]) == 0.0 and float(v[0]) != 0.0 for v in vectors)
        counts = [(b, a) for b, a in zip(before, after) if a.shape == ()]
        assert all(int(b) == int(a) for b, a in counts)


# --------------------------------------------------------------------------- schedules

def test_gmp_schedule_values():
    kw = dict(final_sparsity=0.8, start_step=0, end_step=100, frequency=10)
    assert schedules.gmp_sparsity(0, **kw) == 0.0  # s_i at the first event
    assert schedules.gmp_sparsity(9, **kw) == 0.0
    assert schedules.gmp_sparsity(10, **kw) == pytest.approx(0.8 - 0.8 * 0.9 ** 3)
    assert schedules.gmp_sparsity(55, **kw) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)
    assert schedules.gmp_sparsity(100, **kw) == 0.8
    assert schedules.gmp_sparsity(10_000, **kw) == 0.8
    kw2 = dict(final_sparsity=0.9, start_step=20, end_step=45, frequency=10,
               initial_sparsity=0.1)
    np.testing.assert_array_equal(schedules.gmp_events(20, 45, 10), [20, 30, 40, 45])
    assert schedules.gmp_sparsity(19, **kw2) == 0.0  # dense before start
    assert schedules.gmp_sparsity(20, **kw2) == pytest.approx(0.1)
    assert schedules.gmp_sparsity(44, **kw2) == pytest.approx(0.9 - 0.8 * (1 - 20 / 25) ** 3)
    assert schedules.gmp_sparsity(45, **kw2) == 0.9
    values = [schedules.gmp_sparsity(t, **kw) for t in range(0, 120)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_warmup_schedule():
    assert schedules.warmup_sparsity(0, 0.9) == pytest.approx(0.5)
    assert schedules.warmup_sparsity(5, 0.9) == pytest.approx(0.9 - 0.4 * 0.5 ** 3)
    assert schedules.warmup_sparsity(10, 0.9) == 0.9
    assert schedules.warmup_sparsity(0, 0.3) == 0.3  # keep 0.7 > 0.5: no warm-up
    assert schedules.warmup_sparsity(0, 0.9, warmup_epochs=0) == 0.9


def test_level_sparsities():
    geo = schedules.level_sparsities(0.45, mode="geometric")
    assert len(geo) == 4 and geo[0] == 0.0
    np.testing.assert_allclose(geo, [1 - 0.8 ** L for L in range(4)])
    np.testing.assert_allclose(schedules.level_sparsities(0.8, mode="geometric", levels=14)[-1],
                               1 - 0.8 ** 14)
    for target, n in ((0.5, 3), (0.6, 4), (0.8, 7), (0.9, 10), (0.95, 13)):
        exact = schedules.level_sparsities(target)
        assert len(exact) == n + 1 and exact[0] == 0.0 and exact[-1] == target
        assert all(a < b for a, b in zip(exact, exact[1:]))
        rate = 1 - (1 - target) ** (1 / n)
        assert abs(rate - 0.2) < 0.01
    assert schedules.level_sparsities(0.8, levels=2) == (0.0, 1 - 0.2 ** 0.5, 0.8)
    with pytest.raises(ValueError):
        schedules.level_sparsities(1.0)


# --------------------------------------------------------------------------- memory (SPEC §9)

def test_memory_resnet18_width128():
    model = nnx.eval_shape(lambda: models.build(
        "resnet18", num_classes=10, in_channels=3, mean=(0.5,) * 3, std=(0.5,) * 3,
        rngs=nnx.Rngs(0), width=128))
    _, params, _ = state.split_model(model)
    assert masks.num_prunable(params, masks.prunable_tree(params)) == 44_643_712
    fp = memory.memory_mb_at_sparsity(params, 0.95)
    binary = memory.memory_mb_at_sparsity(params, 0.95, binary=True)
    assert round(fp, 3) == 8.929 and round(fp, 2) == 8.93
    assert round(binary, 3) == 0.279
    assert round(6 * fp, 2) == 53.57 and round(6 * binary, 3) == 1.674
    assert round(memory.memory_mb_at_sparsity(params, 0.0), 1) == 178.6


def test_memory_counts_surviving_weights():
    params = {"k": jax.random.normal(jax.random.key(0), (10, 20)), "bias": jnp.ones((20,))}
    flags = masks.prunable_tree(params)
    eff = masks.apply_mask(params, masks.global_magnitude_mask(params, 0.9, flags))
    assert memory.memory_mb(eff) == pytest.approx(20 * 32 / 8 / 1e6)
    assert memory.memory_mb(eff, binary=True) == pytest.approx(20 / 8 / 1e6)
    assert memory.memory_mb(eff) == memory.memory_mb_at_sparsity(params, 0.9)
