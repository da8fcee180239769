"""Clean/corrupted evaluation: the 15x5 table, ECE, and BN statistics left untouched."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from card_jax import evaluate, run, steps, train
from card_jax.data import corruption_sets
from card_jax.models import convolution, resnet18
from tests.helpers import smoke_config

pytestmark = pytest.mark.usefixtures("fast_compile")


def _write_c_folder(folder, images, labels, names):
    """A "-C" folder whose every cell is the clean test set (CIFAR-10-C layout)."""
    folder.mkdir()
    for name in names:
        np.save(folder / f"{name}.npy", np.concatenate([images] * 5))
    np.save(folder / "labels.npy", np.concatenate([labels] * 5).astype(np.uint8))


def test_identity_corruptions_give_clean_accuracy_in_every_cell(tmp_path):
    config = smoke_config(train__steps=6)
    exp = train.build_experiment(config)
    folder = tmp_path / "C"
    _write_c_folder(folder, exp.dataset.test_images, exp.dataset.test_labels,
                    corruption_sets.ALL_CORRUPTIONS)
    config.eval.corruption_dir = str(folder)
    config.eval.extra_corruptions = True
    results = run.train_and_evaluate(config, tmp_path / "run")
    table = np.array(results["corruption_table"])
    assert table.shape == (2, 15, 5)
    assert np.array(results["extra_corruption_table"]).shape == (2, 4, 5)
    for r in range(2):
        np.testing.assert_allclose(table[r], results["clean_acc"][r])
        assert results["corruption_acc"][r] == pytest.approx(table[r].mean())
        assert results["ece_corrupted"][r] == pytest.approx(results["ece_clean"][r], abs=1e-6)
        assert 0.0 <= results["ece_clean"][r] <= 1.0
    assert results["corruption_names"][0] == "gaussian_noise"


def test_missing_corruption_folder_fails_before_training(tmp_path):
    config = smoke_config(train__steps=6)
    config.eval.corruption_dir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="gaussian_noise.npy"):
        run.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_more_examples_than_exist_is_an_error(tmp_path):
    config = smoke_config(train__steps=2)
    exp = train.build_experiment(config)
    folder = tmp_path / "C"
    _write_c_folder(folder, exp.dataset.test_images[:8], exp.dataset.test_labels[:8],
                    corruption_sets.CORRUPTIONS)
    compiled = train.CompiledSteps(exp, exp.levels[0].lr_fn)
    state = compiled.place_state(exp.state)
    with pytest.raises(ValueError, match="9"):
        evaluate.corruption_metrics(compiled, state, str(folder), 4, n_examples=9)


def test_eval_uses_and_keeps_running_statistics():
    config = smoke_config(model__name="vgg11", train__steps=1)
    config.model.kw = {"width": 0.0625}
    exp = train.build_experiment(config)
    compiled = train.CompiledSteps(exp, exp.levels[0].lr_fn)
    state = compiled.place_state(exp.state)
    x, y = compiled.place_data(exp.dataset.test_images, exp.dataset.test_labels.astype(np.int32))
    stats_before = {k: np.asarray(v) for k, v in
                    train.realizations.to_host(state.batch_stats)["layers"]["0"]["bn"].items()}
    first = train.evaluation_sums(compiled, state, x, y, 64)
    second = train.evaluation_sums(compiled, state, x, y, 64)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    stats_after = train.realizations.to_host(state.batch_stats)["layers"]["0"]["bn"]
    for key, value in stats_before.items():
        np.testing.assert_array_equal(stats_after[key], value)


def test_a_set_smaller_than_the_eval_batch_is_not_padded_up_to_it():
    config = smoke_config(train__steps=1)
    exp = train.build_experiment(config)
    compiled = train.CompiledSteps(exp, exp.levels[0].lr_fn)
    state = compiled.place_state(exp.state)
    x, y = compiled.place_data(exp.dataset.test_images[:40],
                               exp.dataset.test_labels[:40].astype(np.int32))
    # 40 images with batches of 1000 run one batch of 40 (its own compiled step), and give
    # the sums of batches of 8 and of 16 (the last one padded).
    whole = train.evaluation_sums(compiled, state, x, y, 1000)
    assert set(compiled._evals) >= {40, config.eval.batch_size}
    for batch in (8, 16):
        by_parts = train.evaluation_sums(compiled, state, x, y, batch)
        for key in whole:
            np.testing.assert_allclose(by_parts[key], whole[key], rtol=1e-5, atol=1e-5)
    assert whole["bin_count"].sum(-1).tolist() == [40.0] * config.train.realizations
    assert compiled.eval_step(16) is compiled.eval_step(16)


def test_micro_batch_bounds():
    assert steps.micro_batch_bounds(1000, 128) == [(125 * i, 125 * (i + 1)) for i in range(8)]
    sizes = [b - a for a, b in steps.micro_batch_bounds(997, 128)]
    assert sizes == [125] * 5 + [124] * 3
    assert steps.micro_batch_bounds(64, 128) == [(0, 64)]
    assert steps.micro_batch_bounds(129, 128) == [(0, 65), (65, 129)]
    assert steps.micro_batch_bounds(5, 2) == [(0, 2), (2, 4), (4, 5)]


def test_inference_in_slices_equals_one_pass():
    """On CPU `inference_logits` runs slices of at most EVAL_MICRO_BATCH images (here 87, 87
    and 86) with XLA's forward convolutions; it gives the logits of one eval-mode pass over
    the whole batch (BatchNorm with non-trivial running statistics; the third stage's
    64-channel layers are ones that train by im2col)."""
    batch = 260
    model = resnet18(num_classes=10, in_channels=3, mean=(0.5,) * 3, std=(0.25,) * 3,
                     width=16, rngs=nnx.Rngs(0))
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.BatchNorm):
            module.mean[...] = 0.1 * jax.random.normal(jax.random.key(1), module.mean.shape)
            module.var[...] = 1.0 + jax.random.uniform(jax.random.key(2), module.var.shape)
    x = jax.random.uniform(jax.random.key(3), (batch, 8, 8, 3))
    graphdef, rest = nnx.split(model)
    sliced = jax.jit(lambda r, x: steps.inference_logits(nnx.merge(graphdef, r), x))(rest, x)
    with convolution.xla_convolutions():
        one_pass = jax.jit(lambda r, x: nnx.merge(graphdef, r)(x, train=False))(rest, x)
    assert len(steps.micro_batch_bounds(batch)) == 3
    np.testing.assert_allclose(sliced, one_pass, rtol=1e-5, atol=1e-5)


def test_ece_literal():
    # Two bins used: 3 examples at confidence 0.9 (2 correct), 1 at 0.55 (correct).
    count = np.zeros(15); conf = np.zeros(15); correct = np.zeros(15)
    count[13], conf[13], correct[13] = 3, 2.7, 2
    count[8], conf[8], correct[8] = 1, 0.55, 1
    ece = steps.expected_calibration_error(count, conf, correct)
    assert float(ece) == pytest.approx((abs(2 - 2.7) + abs(1 - 0.55)) / 4)


def test_generated_corruptions_are_padded_like_the_clean_data(tmp_path):
    config = smoke_config(train__steps=2, data__pad_to=32, data__test_examples=8,
                          data__crop_padding=0)
    config.data.synthetic.image_size = 28
    config.data.synthetic.channels = 1
    config.model.kw = {"width": 0.125, "image_size": 32}
    config.eval.corruption_dir = str(tmp_path / "C")
    config.eval.generate_corruptions = True
    config.eval.extra_corruptions = True
    config.train.progress = "none"
    results = run.train_and_evaluate(config, tmp_path / "run")
    assert np.array(results["corruption_table"]).shape == (2, 15, 5)
    assert np.load(tmp_path / "C" / "gaussian_noise.npy").shape == (40, 28, 28, 1)
    assert results["dataset"]["image_shape"] == [32, 32, 1]
