"""Speed work (issue 7): the benchmarks' JSON structure, exact mask selection, compute dtype.

Timings are never asserted (shared CI machines make them noise): the benchmark test runs
`benchmarks/run_all.py --quick` on the new benchmarks and checks the structure of what they
report. The mask tests check the blocked top-k search against a stable-sort reference; the
compute-dtype tests check that bfloat16 trains with float32 state and that float32 adds
nothing to the compiled step.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from card_jax import config_util, steps, train
from card_jax.pruning import masks
from tests.helpers import REPO, cli_env, smoke_config

NEW_BENCHMARKS = ("profile", "masks", "pipeline", "evaluation")
RATIO_KEYS = {"benchmark", "name", "value", "paired_median", "target", "comparison", "met",
              "definition"}


# --------------------------------------------------------------------------- run_all --quick

@pytest.fixture(scope="module")
def run_all_quick() -> dict:
    # ~80 s on 2 busy cores; train_step and robustness have their own quick tests, and deck
    # belongs to a colleague, so only the new benchmarks run here. cli_env drops the 4 fake
    # devices of conftest: the benchmarks measure a plain 1-device user run.
    cmd = [sys.executable, "benchmarks/run_all.py", "--quick",
           f"--only={','.join(NEW_BENCHMARKS)}"]
    out = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)  # stdout must hold exactly one JSON document


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_run_all_summary(run_all_quick):
    doc = run_all_quick
    assert doc["benchmark"] == "run_all" and doc["quick"] is True
    assert set(doc["runs"]) == set(NEW_BENCHMARKS)
    for name, run in doc["runs"].items():
        assert run["ok"] is True and run["returncode"] == 0, (name, run)
        assert "--quick" in run["command"] and positive(run["wall_s"])
    assert set(doc["documents"]) == set(NEW_BENCHMARKS)
    assert doc["environment"]["device_count"] == 1
    ratios = doc["ratios"]
    assert ratios and all(RATIO_KEYS <= set(r) for r in ratios)
    for r in ratios:
        assert positive(r["value"]), r
        if r["target"] is None:
            assert r["met"] is None and r["comparison"] is None, r
        else:
            assert r["comparison"] in (">=", "<=", "<"), r
            expect = {">=": r["value"] >= r["target"], "<=": r["value"] <= r["target"],
                      "<": r["value"] < r["target"]}[r["comparison"]]
            assert r["met"] is expect, r
    targeted = [r for r in ratios if r["target"] is not None]
    summary = doc["summary"]
    assert summary["targets"] == len(targeted)
    assert summary["met"] == sum(r["met"] for r in targeted)
    assert len(summary["unmet"]) == summary["targets"] - summary["met"]
    assert summary["informative"] == len(ratios) - len(targeted)
    assert summary["failed_benchmarks"] == []
    targets = {(r["benchmark"], r["name"]): (r["target"], r["comparison"]) for r in targeted}
    assert targets[("masks", "conv4/ep_global_over_dense")] == (0.85, ">=")
    assert targets[("pipeline", "conv4_w0.25/augmix_over_none")] == (1.15, "<=")
    assert targets[("evaluation", "inference/eval_fraction_of_peak")] == (0.7, ">=")
    assert targets[("evaluation", "corruption_eval/corruption_over_clean")] == (0.9, ">=")


@pytest.mark.slow
def test_profile_document(run_all_quick):
    doc = run_all_quick["documents"]["profile"]
    assert doc["benchmark"] == "profile" and doc["settings"]["conv_width"] == 0.25
    assert set(doc["configs"]) == {"conv4/ep"}
    cfg = doc["configs"]["conv4/ep"]
    assert cfg["method"] == "ep" and cfg["num_prunable"] < cfg["num_params"] + 1
    pieces = cfg["pieces"]
    expected = {"batch", "forward", "value_and_grad", "backward", "mask_selection", "optimizer",
                "augmix", "gaussian", "host_to_device_uint8", "host_to_device_float32",
                "full_step"}
    assert set(pieces) == expected
    for name, piece in pieces.items():
        assert {"ms", "ms_samples", "fraction_of_step", "fraction_of_step_paired"} <= set(piece)
        assert len(piece["ms_samples"]) == doc["settings"]["rounds"], name
        if name != "backward":  # a difference of two timings may come out <= 0 under load
            assert positive(piece["ms"]), name
    assert pieces["full_step"]["fraction_of_step"] == 1.0
    for name in ("forward", "value_and_grad", "full_step"):
        assert positive(pieces[name]["flops"]) and positive(pieces[name]["fraction_of_peak"])
    # The step counts forward + backward: about 3x the forward's convolution/matmul FLOPs.
    assert 2.5 < pieces["full_step"]["flops"] / pieces["forward"]["flops"] < 3.5
    assert pieces["host_to_device_uint8"]["bytes"] == 128 * 32 * 32 * 3
    assert set(cfg["ranked"]) == expected - {"full_step", "value_and_grad"}
    precision = doc["precision"]["conv4"]
    assert positive(precision["float32_ms"]) and positive(precision["bfloat16_ms"])
    assert positive(precision["bf16_over_fp32"]["value"])


@pytest.mark.slow
def test_masks_pipeline_evaluation_documents(run_all_quick):
    docs = run_all_quick["documents"]
    masks_doc = docs["masks"]["models"]["conv4"]
    assert set(masks_doc["steps"]) == {"dense", "ep_global", "bp_layerwise"}
    for name, step in masks_doc["steps"].items():
        assert positive(step["step_ms"]) and positive(step["images_per_s"])
        if name != "dense":
            assert positive(step["selection_ms"])
    assert set(masks_doc["ratios"]) == {"ep_global_over_dense", "bp_layerwise_over_dense"}

    pipe = docs["pipeline"]
    width = pipe["widths"]["0.25"]
    assert set(width["step_ms"]) == {"none", "augmix"}
    assert positive(width["batch_ms"]) and positive(width["host_to_device_uint8_ms"])
    assert "on device" in pipe["input_pipeline"]
    breakdown = pipe["augmix_breakdown"]
    assert {"augmix", "chain_step", "colour_tables", "apply_table", "affine_warp"} <= set(
        breakdown["ms"])
    assert all(positive(v) for v in breakdown["ms"].values())

    ev = docs["evaluation"]
    inference = ev["inference"]
    assert inference["batch"] == 1000
    for name in ("eval_step", "forward", "forward_bf16"):
        assert positive(inference[name]["flops"]) and positive(inference[name]["fraction_of_peak"])
    # The eval step's FLOPs are its forward pass's (argmax/softmax/bins are not counted).
    assert inference["eval_step"]["flops"] == inference["forward"]["flops"]
    c_eval = ev["corruption_eval"]
    assert c_eval["cells"] == 75 and c_eval["images"] == 75 * c_eval["images_per_cell"]
    assert c_eval["accuracy_match"] is True


# --------------------------------------------------------------------------- exact top-k

def _reference_topk(x: np.ndarray, k: int) -> np.ndarray:
    """k largest, ties to the lower flat index: a stable sort on (-x, index)."""
    flat = x.ravel()
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat.astype(np.float32), kind="stable")[:k]] = True
    return keep.reshape(x.shape)


def _tree(ties: bool) -> dict[str, np.ndarray]:
    """Leaves of awkward sizes: several blocks, partial blocks, a leaf smaller than a block."""
    rng = np.random.default_rng(0)
    shapes = {"a": (3, 3, 3, 8), "b": (1500,), "c": (40, 70), "d": (2049,), "e": (5,)}
    tree = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    if ties:  # coarse values: many exact ties, also across leaves and block boundaries
        # (+ 0.0 turns the -0.0 of rounding into +0.0, which the reference's sort sees as equal)
        tree = {k: np.round(v * 4) / 4 + 0.0 for k, v in tree.items()}
    return tree


def test_run_all_out_file_and_resume(tmp_path, monkeypatch):
    """--out keeps every finished benchmark; --resume reruns only the failed and missing ones."""
    from benchmarks import run_all

    calls = []

    def fake_run_one(name, args, cache_dir):
        calls.append(name)
        if name == "pipeline" and len(calls) <= 2:  # fails the first time only
            return {"command": [name], "returncode": 1, "wall_s": 0.1, "ok": False}, None
        doc = {"ratios": [{"name": f"{name}/x", "value": 2.0, "target": 1.0,
                           "comparison": ">=", "definition": "d"}]}
        return {"command": [name], "returncode": 0, "wall_s": 0.1, "ok": True}, doc

    monkeypatch.setattr(run_all, "run_one", fake_run_one)
    monkeypatch.setattr(run_all.common, "environment", lambda: {})
    out = tmp_path / "all.json"
    assert run_all.main(["--only=masks,pipeline", f"--out={out}", "--compile-cache=none"]) == 1
    first = json.loads(out.read_text())
    assert calls == ["masks", "pipeline"]
    assert first["summary"]["failed_benchmarks"] == ["pipeline"]
    assert set(first["documents"]) == {"masks"}
    assert first["summary"]["met"] == 1 and first["summary"]["pending_benchmarks"] == []

    assert run_all.main(["--only=masks,pipeline,evaluation", f"--out={out}", "--resume",
                         "--compile-cache=none"]) == 0
    assert calls == ["masks", "pipeline", "pipeline", "evaluation"]  # masks kept
    second = json.loads(out.read_text())
    assert set(second["documents"]) == {"masks", "pipeline", "evaluation"}
    assert second["runs"]["masks"] == first["runs"]["masks"]
    assert [r["name"] for r in second["ratios"]] == ["masks/x", "pipeline/x", "evaluation/x"]
    assert second["summary"]["met"] == 3 and second["summary"]["failed_benchmarks"] == []

    assert run_all.main(["--only=masks,pipeline,evaluation", f"--out={out}", "--resume",
                         "--rerun=masks", "--compile-cache=none"]) == 0
    assert calls[4:] == ["masks"]
    third = json.loads(out.read_text())
    assert third["runs"]["pipeline"] == second["runs"]["pipeline"]
    assert set(third["documents"]) == {"masks", "pipeline", "evaluation"}

    with pytest.raises(SystemExit, match="quick"):  # never mix --quick and full numbers
        run_all.main(["--quick", "--only=masks", f"--out={out}", "--resume"])
    out.write_text("{not json")
    with pytest.raises(SystemExit, match="not a JSON document"):
        run_all.main(["--only=masks", f"--out={out}", "--resume"])


@pytest.mark.parametrize("ties", [False, True])
def test_global_selection_equals_sort_reference(ties):
    tree = _tree(ties)
    flat = np.concatenate([tree[k].ravel() for k in sorted(tree)])
    n = flat.size
    select = jax.jit(lambda t, k: masks.global_topk_mask_n(t, k))
    for k in (0, 1, 7, 1023, 1024, 1025, n // 3, n // 2, n - 1, n):
        got = select(tree, jnp.int32(k))
        got_flat = np.concatenate([np.asarray(got[key]).ravel() for key in sorted(tree)])
        np.testing.assert_array_equal(got_flat, _reference_topk(flat, k), err_msg=f"k={k}")


@pytest.mark.parametrize("ties", [False, True])
def test_layerwise_selection_equals_sort_reference(ties):
    tree = _tree(ties)
    for sparsity in (0.0, 0.3, 0.8, 0.99):
        got = masks.topk_mask(tree, sparsity)
        for key, x in tree.items():
            k = masks.keep_count(x.size, sparsity)
            np.testing.assert_array_equal(np.asarray(got[key]), _reference_topk(x, k),
                                          err_msg=f"{key} s={sparsity}")


def test_selection_under_vmap_and_traced_counts():
    tree = _tree(False)
    stacked = jax.tree.map(lambda x: np.stack([x, -x, np.abs(x)]), tree)
    counts = jnp.asarray([3, 2000, 4000], jnp.int32)
    got = jax.vmap(lambda t, k: masks.global_topk_mask_n(t, k))(stacked, counts)
    for r in range(3):
        flat = np.concatenate([stacked[key][r].ravel() for key in sorted(tree)])
        got_flat = np.concatenate([np.asarray(got[key][r]).ravel() for key in sorted(tree)])
        np.testing.assert_array_equal(got_flat, _reference_topk(flat, int(counts[r])))
    per_leaf = {key: jnp.int32(max(1, x.size // 4)) for key, x in tree.items()}
    got = jax.jit(lambda t, c: masks.topk_mask_n(t, c))(tree, per_leaf)
    for key, x in tree.items():
        np.testing.assert_array_equal(np.asarray(got[key]), _reference_topk(x, x.size // 4 or 1))


def test_selection_keeps_non_prunable_leaves_and_negative_zero():
    tree = {"w": np.array([0.0, -0.0, 1.0, -1.0, 0.0], np.float32), "bias": np.ones(3, np.float32)}
    flags = {"w": True, "bias": False}
    got = masks.global_topk_mask_n(tree, 3, flags)
    np.testing.assert_array_equal(got["bias"], [True] * 3)
    # Keys order float32 totally (-0.0 below +0.0): -1 < -0.0 < 0.0 = 0.0 < 1, and the tie
    # of the two +0.0 at the threshold goes to the lower index.
    np.testing.assert_array_equal(got["w"], [True, False, True, False, True])


# --------------------------------------------------------------------------- compute dtype

def _compiled(**overrides):
    config = smoke_config(train__realizations=1, **overrides)
    exp = train.build_experiment(config)
    compiled = train.CompiledSteps(exp, exp.levels[0].lr_fn)
    state = compiled.place_state(exp.state)
    data = compiled.place_data(exp.dataset.train_images, exp.dataset.train_labels.astype(np.int32),
                               exp.dataset.test_images, exp.dataset.test_labels.astype(np.int32))
    return exp, compiled, state, data


def _dtypes(tree) -> set[str]:
    return {str(x.dtype) for x in jax.tree.leaves(tree)}


@pytest.mark.slow
def test_bfloat16_trains_with_float32_state():
    exp, compiled, state, (x, y, tx, ty) = _compiled(train__compute_dtype="bfloat16")
    jaxpr = str(jax.make_jaxpr(compiled.train)(state, x, y))
    convs = [line for line in jaxpr.splitlines() if "conv_general_dilated" in line]
    assert convs and all("bf16" in line for line in convs)  # forward and backward convs
    losses = []
    for _ in range(30):
        state, metrics = compiled.train(state, x, y)
        losses.append(float(metrics["loss"][0]))
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    for part in (state.params, state.opt_state, state.batch_stats, state.method_state):
        assert _dtypes(part) <= {"float32", "int32"}
    acc = train.evaluate(compiled, state, tx, ty, exp.config.eval.batch_size)
    assert acc.shape == (1,) and 0.0 <= acc[0] <= 1.0


@pytest.mark.slow
def test_bfloat16_batchnorm_statistics_stay_float32():
    exp, compiled, state, (x, y, _, _) = _compiled(
        train__compute_dtype="bfloat16", model__name="resnet18",
        model__kw=dict(width=2), train__batch_size=16)
    before = state.batch_stats
    state, metrics = compiled.train(state, x, y)
    assert math.isfinite(float(metrics["loss"][0]))
    assert _dtypes(state.batch_stats) == {"float32"} and _dtypes(state.params) == {"float32"}
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                        jax.tree.leaves(state.batch_stats)))


def test_float32_adds_no_casts(fast_compile):
    exp, compiled, state, (x, y, tx, ty) = _compiled()
    train_jaxpr = str(jax.make_jaxpr(compiled.train)(state, x, y))
    eval_jaxpr = str(jax.make_jaxpr(compiled.eval)(state, tx, ty, jnp.int32(0)))
    assert "bf16" not in train_jaxpr and "bf16" not in eval_jaxpr
    # A saved config without the key (written before it existed) is read as float32, and the
    # step built without the argument is the very same as the explicit float32 one.
    saved = config_util.to_dict(exp.config)
    for dotted in config_util.ADDED_KEYS:  # compute_dtype and the keys added after it
        section, key = dotted.split(".")
        del saved[section][key]
    assert config_util.with_added_keys(saved)["train"]["compute_dtype"] == "float32"
    assert config_util.without_added_defaults(config_util.to_dict(exp.config)) == saved
    spec = steps.BatchSpec(exp.config.train.batch_size, len(exp.dataset.train_images),
                           exp.config.data.seed, exp.config.data.crop_padding,
                           exp.config.data.flip)
    plain = steps.make_train_step(exp.graphdef, exp.method, exp.tx, exp.levels[0].lr_fn, spec)
    one = jax.tree.map(lambda a: a[0], state)
    explicit = steps.make_train_step(exp.graphdef, exp.method, exp.tx, exp.levels[0].lr_fn,
                                     spec, dtype="float32")
    assert str(jax.make_jaxpr(plain)(one, x, y)) == str(jax.make_jaxpr(explicit)(one, x, y))


def test_unknown_compute_dtype_is_refused():
    with pytest.raises(ValueError, match="compute_dtype"):
        steps.compute_dtype("float16")
    assert steps.compute_dtype("float32") is None
    assert steps.compute_dtype("bfloat16") == jnp.bfloat16


# --------------------------------------------------------------------------- max-pool VJP

@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (3, 7, 6, 2), (1, 5, 5, 1)])
def test_max_pool_matches_select_and_scatter(shape):
    """The reshape max-pool (even sizes) has nnx.max_pool's values and, ties included, its
    gradient: everything to the first maximum of each window; odd sizes use nnx.max_pool."""
    from flax import nnx

    from card_jax.models import layers

    def reference(x):
        return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="SAME")

    rng = np.random.default_rng(1)
    # ReLU'd coarse values: all-zero windows and exact ties between positive values.
    x = jnp.asarray(np.maximum(np.round(rng.standard_normal(shape) * 2) / 2, 0.0), jnp.float32)
    y = layers.max_pool_2x2(x)
    np.testing.assert_array_equal(y, reference(x))
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    got = jax.jit(lambda x, g: jax.vjp(layers.max_pool_2x2, x)[1](g)[0])(x, g)
    want = jax.jit(lambda x, g: jax.vjp(reference, x)[1](g)[0])(x, g)
    np.testing.assert_array_equal(got, want)
    if shape[1] % 2 or shape[2] % 2:
        return  # odd sizes are nnx.max_pool itself, whose JVP breaks ties differently
    # Forward mode works too (a custom JVP, not a custom VJP), consistent with reverse mode.
    t = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    _, jt = jax.jvp(layers.max_pool_2x2, (x,), (t,))
    np.testing.assert_allclose(jnp.vdot(jt, g), jnp.vdot(t, got), rtol=1e-5)
