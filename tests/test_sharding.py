"""Realization and batch axes sharded over 4 fake CPU devices (conftest sets the count)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from card_jax import export, realizations, run, train
from tests.helpers import smoke_config

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake) devices")


def test_choose_strategy():
    # One device of any platform unrolls the seeds: on an H200 too, vmap ran R = 4 seeds 2-3x
    # slower (benchmarks/README.md, section 17).
    assert realizations.choose_strategy("auto", num_devices=1) == "map"
    assert realizations.choose_strategy("auto", num_devices=4) == "vmap"
    with pytest.raises(ValueError, match="train.strategy"):
        realizations.choose_strategy("pmap")


@pytest.mark.parametrize("R, mesh_shape", [(2, (2, 2)), (4, (4, 1)), (1, (1, 4)), (3, (1, 4))])
def test_mesh_puts_realizations_first(R, mesh_shape):
    assert tuple(realizations.make_mesh(R).devices.shape) == mesh_shape


def test_sharded_training_equals_single_device(tmp_path):
    sharded = run.train_and_evaluate(
        smoke_config(train__steps=6, train__strategy="vmap"), tmp_path / "sharded")
    single = run.train_and_evaluate(
        smoke_config(train__steps=6, train__strategy="map"), tmp_path / "single")
    assert sharded["strategy"] == "vmap" and single["strategy"] == "map"
    exp_s, state_s = export.load_final_state(tmp_path / "sharded")
    exp_m, state_m = export.load_final_state(tmp_path / "single")
    want = export.effective_arrays(exp_m, state_m)
    got = export.effective_arrays(exp_s, state_s)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(sharded["clean_acc"], single["clean_acc"], atol=1 / 256)


def test_state_is_sharded_over_realizations():
    exp = train.build_experiment(smoke_config(train__realizations=4, train__strategy="vmap"))
    compiled = train.CompiledSteps(exp, exp.levels[0].lr_fn)
    state = compiled.place_state(exp.state)
    kernel = state.params["convs"]["0"]["kernel"]
    assert kernel.shape[0] == 4
    assert len(kernel.sharding.device_set) == 4
    shard_shapes = {s.data.shape for s in kernel.addressable_shards}
    assert shard_shapes == {(1,) + kernel.shape[1:]}  # one realization per device
    x, y = compiled.place_data(exp.dataset.train_images, exp.dataset.train_labels.astype(np.int32))
    new_state, metrics = compiled.train(state, x, y)
    assert new_state.params["convs"]["0"]["kernel"].sharding.is_equivalent_to(kernel.sharding, 5)
    assert metrics["loss"].shape == (4,)
