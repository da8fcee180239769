"""The level loop on real (smoke) training: LTH/LRR/FT levels, rewinding, exact zeros, BN
re-calibration, and realizations equal to separate runs for a pruning method."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from card_jax import checkpoint, export, run, train
from tests.helpers import smoke_config

pytestmark = pytest.mark.usefixtures("fast_compile")


def _effective(workdir):
    return export.effective_arrays(*export.load_final_state(workdir))


def _kernels(arrays, r):
    return {k: v for k, v in arrays.items()
            if k.startswith(f"r{r}/") and "batch_stats" not in k and v.ndim >= 2}


@pytest.mark.parametrize("method", ["lth", "lrr"])
def test_imp_levels_reach_the_target_and_keep_every_level(method, tmp_path):
    config = smoke_config(method__name=method, method__sparsity=0.75, method__rewind_step=3,
                          train__steps=12) if method == "lth" else smoke_config(
        method__name=method, method__sparsity=0.75, train__steps=12)
    results = run.train_and_evaluate(config, tmp_path)
    assert [lv["level"] for lv in results["levels"]] == [0, 1, 2]
    sparsities = [lv["sparsity_global"][0] for lv in results["levels"]]
    assert sparsities[0] == 0.0 and 0 < sparsities[1] < sparsities[2]
    assert results["sparsity_global"] == [0.75, 0.75]
    for level in range(3):
        level_dir = tmp_path / "levels" / f"level_{level}"
        assert json.loads((level_dir / "results.json").read_text())["level"] == level
        assert (level_dir / "checkpoints" / "step_00000012").is_dir()
    assert (tmp_path / "levels" / "level_0" / "rewind").is_dir() == (method == "lth")
    # Exported weights: exactly 75% zeros in the prunable kernels of each realization.
    arrays = _effective(tmp_path)
    for r in range(2):
        kernels = _kernels(arrays, r)
        zeros = sum(int((v == 0).sum()) for v in kernels.values())
        total = sum(v.size for v in kernels.values())
        assert zeros == total - (total - int(np.floor(0.75 * total + 1e-9)))


def test_lth_rewinds_surviving_weights_to_step_k(tmp_path):
    config = smoke_config(method__name="lth", method__sparsity=0.5, method__levels=1,
                          method__rewind_step=4, train__steps=4, train__checkpoint_every=100)
    run.train_and_evaluate(config, tmp_path)
    exp = train.build_experiment(smoke_config(method__name="lth", method__sparsity=0.5,
                                              method__levels=1, method__rewind_step=4,
                                              train__steps=4))
    _, rewind, _ = checkpoint.Checkpointer(
        tmp_path / "levels" / "level_0" / "rewind").restore_latest(train.abstract_of(exp.state.params))
    # Level 1 starts at step k = 4 = its end: its final weights ARE rewind * mask.
    _, state, _ = checkpoint.Checkpointer(
        tmp_path / "levels" / "level_1" / "checkpoints").restore_latest(train.abstract_of(exp.state))
    mask = state.method_state.mask
    for w, w0, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(rewind),
                        jax.tree.leaves(mask)):
        np.testing.assert_array_equal(np.asarray(w), np.where(m, w0, 0))


def test_pruning_realizations_equal_separate_runs(tmp_path):
    kw = dict(method__name="gmp", method__sparsity=0.8, method__frequency=4, train__steps=12)
    run.train_and_evaluate(smoke_config(**kw), tmp_path / "both")
    run.train_and_evaluate(smoke_config(**kw, train__realizations=1, seed=1), tmp_path / "r1")
    both, alone = _effective(tmp_path / "both"), _effective(tmp_path / "r1")
    for key, value in alone.items():
        np.testing.assert_allclose(both[key.replace("r0/", "r1/", 1)], value, rtol=1e-5,
                                   atol=1e-6, err_msg=key)


def test_bn_recalibration_changes_only_statistics(tmp_path, fast_compile):
    base = dict(model__name="vgg11", method__name="bp", method__scope="layerwise",
                method__sparsity=0.5, train__steps=4)
    config = smoke_config(**base)
    config.model.kw = {"width": 0.0625}
    plain = run.train_and_evaluate(config, tmp_path / "plain")
    config = smoke_config(**base, method__bn_recalibration_batches=3)
    config.model.kw = {"width": 0.0625}
    recal = run.train_and_evaluate(config, tmp_path / "recal")
    assert recal["bn_recalibration_batches"] == 3 and plain["bn_recalibration_batches"] == 0
    a, b = _effective(tmp_path / "plain"), _effective(tmp_path / "recal")
    stats = [k for k in a if "batch_stats" in k]
    assert stats and any(not np.allclose(a[k], b[k]) for k in stats)
    for key in a:
        if "batch_stats" not in key:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
