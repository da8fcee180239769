"""`method.level0_from`: FT/LTH/LRR take level 0 from a finished dense run, and every result
is the one the run computes alone; bad sources are refused with the reason."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from card_jax import export, level0, run
from tests.helpers import smoke_config

pytestmark = pytest.mark.usefixtures("fast_compile")

STEPS = 6


def _config(**kw):
    return smoke_config(train__steps=STEPS, train__checkpoint_every=2, train__keep_checkpoints=5,
                        **kw)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    # Compiled like the tests' runs (the `fast_compile` fixture is set up after this one):
    # programs optimised differently may round differently.
    workdir = tmp_path_factory.mktemp("dense")
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        run.train_and_evaluate(_config(method__name="dense"), workdir)
    finally:
        jax.config.update("jax_disable_most_optimizations", old)
    return workdir


@pytest.mark.parametrize("method", [
    dict(method__name="lth", method__sparsity=0.5, method__levels=1, method__rewind_step=2),
    dict(method__name="lth", method__sparsity=0.5, method__levels=1),
    dict(method__name="lrr", method__sparsity=0.5, method__levels=1),
    dict(method__name="ft", method__sparsity=0.5, method__finetune_epochs=0.0),
], ids=["lth-k2", "lth-k0", "lrr", "ft"])
def test_shared_level0_gives_the_results_of_a_run_alone(method, dense_run, tmp_path):
    alone = run.train_and_evaluate(_config(**method), tmp_path / "alone")
    shared = run.train_and_evaluate(_config(**method, method__level0_from=str(dense_run)),
                                    tmp_path / "shared")
    # Bit-identical final weights, masks and BN statistics, and the same numbers.
    a = export.effective_arrays(*export.load_final_state(tmp_path / "alone"))
    b = export.effective_arrays(*export.load_final_state(tmp_path / "shared"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for key in ("clean_acc", "sparsity_global", "num_params"):
        assert shared[key] == alone[key], key
    assert [lv["clean_acc"] for lv in shared["levels"]] == [
        lv["clean_acc"] for lv in alone["levels"]]
    assert shared["levels"][0]["level0_from"] == str(dense_run.resolve())
    assert "level0_from" not in alone["levels"][0] and alone["level0_from"] == ""
    # Level 0 was copied, not trained: its checkpoint says so and carries the source's wall time.
    meta = json.loads((tmp_path / "shared" / "levels" / "level_0" / "checkpoints"
                       / f"step_{STEPS:08d}" / "card_jax_metadata.json").read_text())
    dense_meta = json.loads((dense_run / "checkpoints" / f"step_{STEPS:08d}"
                             / "card_jax_metadata.json").read_text())
    assert meta["level0_from"] == str(dense_run.resolve())
    assert meta["wall_time_s"] == dense_meta["wall_time_s"] > 0
    # Running it again finds everything done (the copy is not repeated).
    again = run.train_and_evaluate(_config(**method, method__level0_from=str(dense_run)),
                                   tmp_path / "shared")
    assert again["clean_acc"] == shared["clean_acc"]


def test_refuses_a_source_that_trained_differently(dense_run, tmp_path):
    config = _config(method__name="lrr", method__sparsity=0.5, method__levels=1,
                     method__level0_from=str(dense_run), optim__lr=0.05)
    with pytest.raises(level0.Level0SourceError, match=r"optim\.lr: 0\.02 -> 0\.05"):
        run.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "levels").exists()


def test_refuses_an_unfinished_or_non_dense_source(dense_run, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(dense_run, unfinished)
    (unfinished / "results.json").unlink()
    lrr = dict(method__name="lrr", method__sparsity=0.5, method__levels=1)
    with pytest.raises(level0.Level0SourceError, match="not a finished run"):
        run.train_and_evaluate(_config(**lrr, method__level0_from=str(unfinished)),
                               tmp_path / "a")
    gmp_run = tmp_path / "gmp"
    run.train_and_evaluate(_config(method__name="gmp", method__sparsity=0.5,
                                   method__frequency=2), gmp_run)
    with pytest.raises(level0.Level0SourceError, match="trained method 'gmp'"):
        run.train_and_evaluate(_config(**lrr, method__level0_from=str(gmp_run)), tmp_path / "b")


def test_refuses_methods_without_a_dense_level0(dense_run, tmp_path):
    config = _config(method__name="gmp", method__sparsity=0.5, method__level0_from=str(dense_run))
    with pytest.raises(level0.Level0SourceError, match="level 0 is dense training"):
        run.train_and_evaluate(config, tmp_path / "run")


def test_lth_rewind_point_must_be_a_source_checkpoint(dense_run, tmp_path):
    config = _config(method__name="lth", method__sparsity=0.5, method__levels=1,
                     method__rewind_step=3, method__level0_from=str(dense_run))
    with pytest.raises(level0.Level0SourceError, match="no checkpoint at step 3"):
        run.train_and_evaluate(config, tmp_path / "run")
