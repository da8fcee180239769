"""Compression methods (FT, GMP, LTH, LRR, EP, BP) on a tiny real model: invariants that must
hold after every optimizer step, rewinding, straight-through gradients (SPEC §2-§5)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from card_jax import models, optim, state
from card_jax import pruning
from card_jax.pruning import biprop, edgepopup, masks, schedules


# XLA's optimisation passes dominate CPU compile time of these tiny graphs (DESIGN §7).
pytestmark = pytest.mark.usefixtures("fast_compile")

# --------------------------------------------------------------------------- fixtures


@functools.cache
def tiny_conv2():
    """(graphdef, params) of Conv-2 at width 1/8 on 8x8 images; Kaiming-normal values drawn
    with numpy (shapes from eval_shape: eager module construction is slow on CPU)."""
    model = nnx.eval_shape(lambda: models.build(
        "conv2", num_classes=10, in_channels=3, mean=(0.5,) * 3, std=(0.5,) * 3,
        rngs=nnx.Rngs(0), width=0.125, image_size=8))
    graphdef, params, _ = state.split_model(model)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(
        rng.standard_normal(s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1])), s.dtype), params)
    return graphdef, params


@functools.cache
def batch():
    rng = np.random.default_rng(1)
    return (jnp.asarray(rng.uniform(size=(16, 8, 8, 3)), jnp.float32),
            jnp.asarray(rng.integers(0, 10, size=(16,)), jnp.int32))


@functools.cache
def optimizers():
    return {
        "sgd": optim.make_optimizer("sgd", optax.constant_schedule(0.05), momentum=0.9,
                                    weight_decay=5e-4),
        "adamw": optim.make_optimizer("adamw", optax.constant_schedule(0.01), weight_decay=0.1),
    }


def loss_of(graphdef, method, params, ms, x, y):
    logits = state.merge_model(graphdef, method.apply(params, ms), {})(x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.cache
def make_step(method: pruning.Method, tx: optax.GradientTransformation):
    """One optimizer step in the order base.py prescribes: update, `step` hook, `post_update`."""
    graphdef, _ = tiny_conv2()

    def loss(trainable, params, ms, x, y):
        params, ms = pruning.set_trainable(method, params, ms, trainable)
        return loss_of(graphdef, method, params, ms, x, y)

    @jax.jit
    def step(params, ms, opt_state, t, x, y):
        trainable = pruning.get_trainable(method, params, ms)
        grads = jax.grad(loss)(trainable, params, ms, x, y)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        params, ms = pruning.set_trainable(method, params, ms,
                                           optax.apply_updates(trainable, updates))
        ms = method.step(params, ms, t + 1)
        return method.post_update(params, ms), ms, opt_state

    return step


@functools.cache
def jitted(method: pruning.Method):
    """The method's functions under jit (one compile each; eager dispatch is slow on CPU)."""
    return {
        "init_params": jax.jit(method.init_params),
        "init": jax.jit(method.init),
        "apply": jax.jit(method.apply),
        "mask": jax.jit(functools.partial(pruning.current_mask, method)),
        "prune": jax.jit(method.prune, static_argnums=3),
        "post_update": jax.jit(method.post_update),
    }


# --------------------------------------------------------------------------- invariant checker


def invariant_violations(method: pruning.Method, params, ms) -> list[str]:
    """Every way (params, method_state) breaks the method's contract; [] when all hold.

    - the mask has the params structure, bool leaves, all True on non-prunable leaves;
    - the effective weights are finite and exactly 0 where pruned;
    - trainable='params': raw pruned weights are exactly 0 and apply() == params;
    - edge-popup: kept effective weights equal the frozen weights;
    - biprop: kept effective weights of layer l are exactly +-alpha_l, alpha_l = mean |W| kept.
    """
    bad = []
    fns = jitted(method)
    flags = masks.prunable_tree(params)
    mask = fns["mask"](params, ms)
    if jax.tree.structure(mask) != jax.tree.structure(params):
        return [f"mask structure {jax.tree.structure(mask)} != params structure"]
    eff = fns["apply"](params, ms)
    flat = jax.tree.flatten_with_path(params)[0]
    for (path, p), m, e, f in zip(flat, jax.tree.leaves(mask), jax.tree.leaves(eff),
                                  jax.tree.leaves(flags)):
        name = masks.path_str(path)
        p, m, e = np.asarray(p), np.asarray(m), np.asarray(e)
        if m.dtype != np.bool_ or m.shape != p.shape:
            bad.append(f"{name}: mask dtype/shape {m.dtype}{m.shape}")
            continue
        if not np.isfinite(e).all():
            bad.append(f"{name}: non-finite effective weights")
        if not f:
            if not m.all():
                bad.append(f"{name}: non-prunable leaf has pruned entries")
            continue
        if np.any(e[~m] != 0):
            bad.append(f"{name}: effective weight nonzero where pruned")
        if method.trainable == "params":
            if np.any(p[~m] != 0):
                bad.append(f"{name}: raw weight nonzero where pruned "
                           f"({int(np.count_nonzero(p[~m]))} entries)")
            if not np.array_equal(e, p):
                bad.append(f"{name}: apply(params) differs from the re-masked params")
        elif method.name == "ep":
            if not np.array_equal(e[m], p[m]):
                bad.append(f"{name}: kept EP weight differs from the frozen weight")
        elif method.name == "bp" and m.any():
            alpha = np.abs(p[m]).astype(np.float64).mean()
            values = np.unique(np.abs(e[m]))
            if values.size != 1 or not np.isclose(values[0], alpha, rtol=1e-5):
                bad.append(f"{name}: BP magnitudes {values[:4]} != alpha {alpha}")
            if not np.array_equal(np.sign(e[m]), np.sign(p[m])):
                bad.append(f"{name}: BP signs differ from sign(W)")
    return bad


def assert_invariants(method, params, ms, where=""):
    bad = invariant_violations(method, params, ms)
    assert not bad, f"{method.name} {where}: " + "; ".join(bad)


def run_method(method: pruning.Method, tx, steps: int = 4, check: bool = True):
    """Drives `method` through all its levels as base.py prescribes; checks the invariants
    after every step. Returns a list of per-level records."""
    _, params0 = tiny_conv2()
    x, y = batch()
    key = jax.random.key(0)
    fns = jitted(method)
    params = fns["init_params"](params0, key)
    ms = fns["init"](params, key)
    params = fns["post_update"](params, ms)
    step = make_step(method, tx)
    rewind, records = None, []
    for level in range(method.levels):
        t = 0
        if level > 0:
            params, ms = fns["prune"](params, ms, rewind, level)
            t = method.level_start_step
        record = {"start": params, "start_ms": ms, "snapshots": {}}
        opt_state = tx.init(pruning.get_trainable(method, params, ms))
        if check:
            assert_invariants(method, params, ms, f"level {level} start")
        while t < steps:
            record["snapshots"][t] = params
            if level == 0 and t == method.rewind_step:
                rewind = params
            params, ms, opt_state = step(params, ms, opt_state, jnp.int32(t), x, y)
            t += 1
            if check:
                assert_invariants(method, params, ms, f"level {level} step {t}")
        record.update(end=params, end_ms=ms)
        records.append(record)
    return records


def _tree_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(u), np.asarray(v))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# --------------------------------------------------------------------------- registry / config


def test_registry_and_prune_rate_refused():
    assert set(pruning.METHODS) == {"dense", "ft", "gmp", "lth", "lrr", "ep", "bp"}
    cfg = ml_collections.ConfigDict({"name": "ep", "prune_rate": 0.5})
    with pytest.raises(ValueError, match="prune_rate"):
        pruning.from_config(cfg)
    for name in ("ft", "lth", "lrr", "ep", "bp"):
        with pytest.raises(TypeError):
            pruning.METHODS[name](prune_rate=0.5)
    with pytest.raises(ValueError, match="unknown method"):
        pruning.from_config(ml_collections.ConfigDict({"name": "magic"}))
    with pytest.raises(ValueError, match="REMOVED"):
        pruning.METHODS["lth"](sparsity=1.0)
    with pytest.raises(ValueError, match="scope"):
        pruning.METHODS["ft"](sparsity=0.5, scope="per-layer")


def test_from_config_injects_run_context():
    cfg = ml_collections.ConfigDict({"name": "gmp", "sparsity": 0.8, "scope": "global"})
    with pytest.raises(ValueError, match="total_steps"):
        pruning.from_config(cfg)
    assert pruning.from_config(cfg, total_steps=100, steps_per_epoch=10).name == "gmp"
    ep = ml_collections.ConfigDict({"name": "ep", "sparsity": 0.9, "scope": "global"})
    with pytest.raises(ValueError, match="steps_per_epoch"):
        pruning.from_config(ep)
    method = pruning.from_config(ep, steps_per_epoch=10, total_steps=100)
    assert method.trainable == "scores" and method.binary
    assert pruning.from_config(ml_collections.ConfigDict({"name": "dense"}),
                               total_steps=5).name == "dense"


def test_dense_still_works():
    method = pruning.METHODS["dense"]()
    _, params = tiny_conv2()
    ms = method.init(params, jax.random.key(0))
    assert _tree_equal(method.apply(params, ms), params) and method.levels == 1
    assert all(bool(m.all()) for m in jax.tree.leaves(pruning.current_mask(method, params, ms)))
    assert not invariant_violations(method, params, ms)


# --------------------------------------------------------------------------- magnitude methods

MAGNITUDE = {
    "ft-global": lambda: pruning.METHODS["ft"](0.5, "global"),
    "gmp-layerwise": lambda: pruning.METHODS["gmp"](0.8, "layerwise", start_step=1,
                                                    end_step=3, frequency=1),
    "lth-global": lambda: pruning.METHODS["lth"](0.6, "global", rewind_step=2, levels=2),
    "lrr-layerwise": lambda: pruning.METHODS["lrr"](0.6, "layerwise", levels=2),
}


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("name", sorted(MAGNITUDE))
def test_magnitude_invariants(name, opt):
    method = method_for(name)
    records = run_method(method, optimizers()[opt])
    assert len(records) == method.levels
    final = records[-1]
    mask = method.mask(final["end"], final["end_ms"])
    flags = masks.prunable_tree(final["end"])
    target = {"ft-global": 0.5, "gmp-layerwise": 0.8, "lth-global": 0.6,
              "lrr-layerwise": 0.6}[name]
    rep = masks.sparsity_report(mask, flags)
    n = masks.num_prunable(final["end"], flags)
    if name.endswith("global"):
        assert n - round(rep["global"] * n) == masks.keep_count(n, target)
    else:
        for path, s in rep["per_layer"].items():
            size = np.prod(final["end"][path.split("/")[0]][path.split("/")[1]]["kernel"].shape)
            assert size - round(s * size) == masks.keep_count(int(size), target)
    # Masks are monotone from level to level.
    for before, after in zip(records, records[1:]):
        old, new = before["end_ms"].mask, after["end_ms"].mask
        assert all(not np.any(np.asarray(b) & ~np.asarray(a))
                   for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)))


def test_lth_rewinds_and_lrr_keeps():
    tx = optimizers()["sgd"]
    lth = run_method(method_for("lth-global"), tx, check=False)
    theta_k = lth[0]["snapshots"][2]  # weights after k = 2 updates of level 0
    for level in (1, 2):
        start, mask = lth[level]["start"], lth[level]["start_ms"].mask
        assert _tree_equal(start, masks.apply_mask(theta_k, mask))
        assert 2 not in lth[level]["snapshots"] or _tree_equal(lth[level]["snapshots"][2], start)
        assert min(lth[level]["snapshots"]) == 2  # schedule resumed at the rewind point
        # The mask ranks the weights trained in the previous level, not the rewound ones.
        prev = lth[level - 1]
        expect = masks.global_magnitude_mask(
            prev["end"], schedules.level_sparsities(0.6, levels=2)[level],
            masks.prunable_tree(prev["end"]), prev["end_ms"].mask)
        assert _tree_equal(mask, expect)
    lrr = run_method(method_for("lrr-layerwise"), tx, check=False)
    for level in (1, 2):
        start, mask = lrr[level]["start"], lrr[level]["start_ms"].mask
        assert _tree_equal(start, masks.apply_mask(lrr[level - 1]["end"], mask))
        assert min(lrr[level]["snapshots"]) == 0  # LR schedule rewound to the start
    ft = run_method(method_for("ft-global"), tx, check=False)
    assert _tree_equal(ft[1]["start"], masks.apply_mask(ft[0]["end"], ft[1]["start_ms"].mask))


def test_gmp_follows_schedule():
    method = pruning.METHODS["gmp"](0.75, "global", start_step=1, end_step=5, frequency=2)
    _, params = tiny_conv2()
    n = masks.num_prunable(params)
    kept = []
    step = make_step(method, optimizers()["sgd"])
    x, y = batch()
    ms = method.init(params, jax.random.key(0))
    p = method.post_update(params, ms)
    opt_state = optimizers()["sgd"].init(p)
    prev = ms.mask
    for t in range(7):
        p, ms, opt_state = step(p, ms, opt_state, jnp.int32(t), x, y)
        count = sum(int(m.sum()) for m in jax.tree.leaves(ms.mask))
        s = schedules.gmp_sparsity(t + 1, final_sparsity=0.75, start_step=1, end_step=5,
                                   frequency=2)
        assert count == masks.keep_count(n, s), (t + 1, count, s)
        assert all(not np.any(np.asarray(b) & ~np.asarray(a))
                   for a, b in zip(jax.tree.leaves(prev), jax.tree.leaves(ms.mask)))
        prev = ms.mask
        kept.append(count)
    assert kept[0] > kept[2] > kept[4] == masks.keep_count(n, 0.75)


def test_broken_remasking_is_detected():
    good = pruning.METHODS["gmp"](0.8, "global", start_step=1, end_step=3, frequency=1)
    broken = good._replace(post_update=lambda params, ms: params)  # never re-masks
    run_method(good, optimizers()["sgd"], steps=3)  # passes
    with pytest.raises(AssertionError, match="raw weight nonzero where pruned"):
        run_method(broken, optimizers()["sgd"], steps=3)
    # The checker itself, on a hand-made violation.
    _, params = tiny_conv2()
    ms = good.init(params, jax.random.key(0))
    mask = masks.global_magnitude_mask(params, 0.5, masks.prunable_tree(params))
    assert invariant_violations(good, params, ms._replace(mask=mask))
    assert not invariant_violations(good, masks.apply_mask(params, mask), ms._replace(mask=mask))


def test_exact_target_levels_hit_the_count():
    params = {"a": jax.random.normal(jax.random.key(3), (20, 30)),
              "b": jax.random.normal(jax.random.key(4), (7, 11)), "bias": jnp.ones((11,))}
    for mode in ("exact", "geometric"):
        method = pruning.METHODS["lrr"](0.8, "global", level_mode=mode)
        ms = method.init(params, jax.random.key(0))
        p = params
        for level in range(1, method.levels):
            p, ms = method.prune(p, ms, None, level)
        n = 20 * 30 + 7 * 11
        kept = int(ms.mask["a"].sum() + ms.mask["b"].sum())
        if mode == "exact":
            assert method.levels == 8 and kept == masks.keep_count(n, 0.8) == 136
        else:
            assert method.levels == 9 and kept == masks.keep_count(n, 1 - 0.8 ** 8)
        assert bool(ms.mask["bias"].all())


# --------------------------------------------------------------------------- edge-popup / biprop

SCORES = {
    "ep-global": lambda: pruning.METHODS["ep"](0.8, "global", warmup_epochs=2, steps_per_epoch=1),
    "ep-layerwise": lambda: pruning.METHODS["ep"](0.5, "layerwise"),
    "bp-global": lambda: pruning.METHODS["bp"](0.9, "global", warmup_epochs=2,
                                               steps_per_epoch=1),
    "bp-layerwise": lambda: pruning.METHODS["bp"](0.6, "layerwise"),
}


ALL = {**MAGNITUDE, **SCORES}


@functools.cache
def method_for(name: str) -> pruning.Method:
    """One Method instance per name, so jit caches are shared between tests."""
    return ALL[name]()


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("name", sorted(SCORES))
def test_score_methods_train_scores_only(name, opt):
    method = method_for(name)
    records = run_method(method, optimizers()[opt])
    _, params0 = tiny_conv2()
    frozen = jitted(method)["init_params"](params0, jax.random.key(0))
    rec = records[0]
    assert _tree_equal(rec["end"], frozen)  # no weight ever changes
    moved = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(rec["start_ms"].scores), jax.tree.leaves(rec["end_ms"].scores))]
    assert all(moved)  # every layer's scores received gradient
    flags = masks.prunable_tree(frozen)
    mask = method.mask(rec["end"], rec["end_ms"])
    n = masks.num_prunable(frozen, flags)
    kept = sum(int(m.sum()) for m in jax.tree.leaves(mask))
    assert kept == int(rec["end_ms"].n_keep)
    sparsity = {"ep-global": 0.8, "ep-layerwise": 0.5, "bp-global": 0.9,
                "bp-layerwise": 0.6}[name]
    if name.endswith("global"):
        assert kept == masks.keep_count(n, sparsity)  # warm-up over after 2 epochs
    else:
        for m, x in zip(jax.tree.leaves(mask), jax.tree.leaves(frozen)):
            assert int(m.sum()) == masks.keep_count(x.size, sparsity)


def test_warmup_keep_counts():
    method = pruning.METHODS["ep"](0.9, "global", warmup_epochs=10, steps_per_epoch=2)
    _, params = tiny_conv2()
    n = masks.num_prunable(params)
    ms = method.init(params, jax.random.key(0))
    assert int(ms.n_keep) == masks.keep_count(n, 0.5)  # warm-up starts at 50 %
    for t, epoch in ((1, 0), (2, 1), (9, 4), (19, 9), (20, 10), (1000, 10)):
        ms = method.step(params, ms, jnp.int32(t))
        expect = masks.keep_count(n, schedules.warmup_sparsity(epoch, 0.9, 10))
        assert int(ms.n_keep) == expect, t
        assert sum(int(m.sum()) for m in jax.tree.leaves(method.mask(params, ms))) == expect
    # Keep fraction above 0.5: no warm-up, so no steps_per_epoch needed.
    light = pruning.METHODS["bp"](0.3, "global")
    assert int(light.init(params, jax.random.key(0)).n_keep) == masks.keep_count(n, 0.3)


def test_score_init():
    params = {"conv": jax.random.normal(jax.random.key(5), (3, 3, 4, 6)),
              "fc": jax.random.normal(jax.random.key(6), (12, 5)), "bias": jnp.ones((5,))}
    method = pruning.METHODS["ep"](0.5, "layerwise")
    w = method.init_params(params, jax.random.key(0))
    for name, fan in (("conv", 36), ("fc", 12)):
        np.testing.assert_allclose(np.abs(w[name]), np.sqrt(2.0 / fan), rtol=1e-6)
        np.testing.assert_array_equal(np.sign(w[name]), np.sign(params[name]))
    np.testing.assert_array_equal(w["bias"], params["bias"])
    ms = method.init(w, jax.random.key(1))
    for name, fan in (("conv", 36), ("fc", 12)):
        s = np.asarray(ms.scores[name])
        assert np.abs(s).max() <= 1 / np.sqrt(fan) and np.unique(s).size == s.size
    np.testing.assert_array_equal(ms.scores["bias"], 0.0)
    bp = pruning.METHODS["bp"](0.5, "layerwise")  # kaiming_normal by default
    wb = bp.init_params(params, jax.random.key(0))
    assert not np.array_equal(wb["conv"], params["conv"]) and wb["bias"] is params["bias"]
    ep_model = pruning.METHODS["ep"](0.5, "layerwise", init="model")
    assert ep_model.init_params(params, jax.random.key(0)) is params and not ep_model.binary


def test_bp_values_and_empty_layer_guard():
    params = {"a": jax.random.normal(jax.random.key(7), (4, 4)),
              "b": jax.random.normal(jax.random.key(8), (4, 4))}
    method = biprop.biprop(0.5, "global", warmup_epochs=0)
    ms = method.init(params, jax.random.key(0))
    # Scores that rank every weight of 'b' below every weight of 'a': 'b' is emptied.
    ms = ms._replace(scores={"a": jnp.full((4, 4), 1.0) + jnp.arange(16.0).reshape(4, 4),
                             "b": jnp.full((4, 4), 0.01)})
    eff = method.apply(params, ms)
    np.testing.assert_array_equal(eff["b"], 0.0)
    alpha = float(np.abs(np.asarray(params["a"])).mean())
    np.testing.assert_allclose(np.abs(eff["a"]), alpha, rtol=1e-6)
    assert np.unique(np.abs(np.asarray(eff["a"]))).size == 1
    grads = jax.grad(lambda s: jnp.sum(method.apply(params, ms._replace(scores=s))["b"] ** 2
                                       + method.apply(params, ms._replace(scores=s))["a"]))(
        ms.scores)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert float(biprop.gain(params["b"], jnp.zeros((4, 4), bool))) == 0.0


@pytest.mark.parametrize("name", ["ep-global", "bp-layerwise"])
def test_straight_through_gradient_formula(name):
    """dL/ds = dL/dW_eff * W * sign(s) on every prunable leaf (SPEC §2(a), §3(a)), pruned
    coordinates included; no gradient to the frozen weights."""
    method = method_for(name)
    graphdef, params0 = tiny_conv2()
    x, y = batch()
    fns = jitted(method)
    params = fns["init_params"](params0, jax.random.key(0))
    ms = fns["init"](params, jax.random.key(1))
    eff = fns["apply"](params, ms)

    def loss_eff(e):
        logits = state.merge_model(graphdef, e, {})(x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    g_eff = jax.grad(loss_eff)(eff)
    g_s = jax.grad(lambda s: loss_of(graphdef, method, params, ms._replace(scores=s), x, y))(
        ms.scores)
    mask = fns["mask"](params, ms)
    for ge, gs, w, s, m in zip(*(jax.tree.leaves(t) for t in
                                 (g_eff, g_s, params, ms.scores, mask))):
        np.testing.assert_allclose(gs, ge * w * jnp.sign(s), rtol=1e-4, atol=1e-10)
        assert np.count_nonzero(np.asarray(gs)[~np.asarray(m)]) > 0  # pruned scores learn too
    g_w = jax.grad(lambda p: loss_of(graphdef, method, p, ms, x, y))(params)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_w))
    # Literal check of the estimator itself.
    w, s = jnp.array([2.0, -3.0, 0.5]), jnp.array([-0.1, 0.4, 0.2])
    c = jnp.array([1.0, 2.0, 3.0])
    g = jax.grad(lambda s: jnp.sum(c * edgepopup.straight_through(w * 7.0, w, s)))(s)
    np.testing.assert_array_equal(g, c * w * jnp.sign(s))


# --------------------------------------------------------------------------- vmap / structure



def test_methods_vmap_over_realizations():
    """init/apply/step/prune under vmap equal two separate runs (no cross-seed leakage)."""
    _, params0 = tiny_conv2()
    keys = jax.random.split(jax.random.key(0), 2)
    params2 = jax.tree.map(lambda p: jnp.stack([p, -0.5 * p]), params0)
    for name in ("gmp-layerwise", "lth-global", "bp-global"):
        method = method_for(name)

        def one(params, key, method=method):
            p = method.init_params(params, key)
            ms = method.step(p, method.init(p, key), jnp.int32(3))
            out = method.apply(p, ms)
            if method.levels > 1:
                out = (out, method.prune(p, ms, p, 1))
            return out

        batched = jax.jit(jax.vmap(one))(params2, keys)
        single = jax.jit(one)
        for r in range(2):
            assert _tree_equal(state.index(batched, r), single(state.index(params2, r), keys[r]))


def test_full_structure_on_a_model_with_biases_and_bn():
    model = nnx.eval_shape(lambda: models.build(
        "vgg11", num_classes=10, in_channels=3, mean=(0.5,) * 3, std=(0.5,) * 3,
        rngs=nnx.Rngs(0), width=0.0625))
    _, params, _ = state.split_model(model)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), params)
    for name in ("lrr-layerwise", "ep-global"):
        method = method_for(name)

        def setup(params, method=method):
            p = method.init_params(params, jax.random.key(0))
            ms = method.init(p, jax.random.key(1))
            if method.levels > 1:
                p, ms = method.prune(p, ms, p, 1)
            return p, ms, method.apply(p, ms), method.mask(p, ms)

        p, ms, eff, mask = jax.jit(setup)(params)
        flags = masks.prunable_tree(params)
        assert jax.tree.structure(mask) == jax.tree.structure(params)
        for m, f in zip(jax.tree.leaves(mask), jax.tree.leaves(flags)):
            assert m.dtype == jnp.bool_ and (f or bool(m.all()))
        rep = masks.sparsity_report(mask, flags)
        if name == "lrr-layerwise":  # level 1 of 2 towards 0.6, exact in every layer
            target = schedules.level_sparsities(0.6, levels=2)[1]
            kernels = [x for x, f in zip(jax.tree.leaves(params), jax.tree.leaves(flags)) if f]
            for x, s in zip(kernels, rep["per_layer"].values()):
                assert x.size - round(s * x.size) == masks.keep_count(x.size, target)
        else:  # global warm-up starts at 50 %
            n = masks.num_prunable(params, flags)
            assert n - round(rep["global"] * n) == masks.keep_count(n, 0.5)
        np.testing.assert_array_equal(eff["layers"]["3"]["bn"]["scale"],
                                      params["layers"]["3"]["bn"]["scale"])
        np.testing.assert_array_equal(eff["fc"]["bias"], params["fc"]["bias"])
