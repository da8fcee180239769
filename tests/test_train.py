"""End-to-end training on the smoke config: outputs, realizations, NaN handling, resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from card_jax import export, run, train
from tests.helpers import REPO, SMOKE, cli_env, load_npz, run_cli, smoke_config


def _final_params(workdir):
    exp, state = export.load_final_state(workdir)
    return exp, export.effective_arrays(exp, state)


def test_smoke_run_writes_the_output_contract(tmp_path):
    results = run.train_and_evaluate(smoke_config(train__steps=12), tmp_path)
    for name in ("config.json", "metrics.jsonl", "results.json"):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "tensorboard").iterdir()), "no TensorBoard event file"
    assert (tmp_path / "checkpoints" / "step_00000012").is_dir()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for key in ("clean_acc", "num_params", "steps", "wall_time_s"):
        assert len(saved[key]) == 2, key
    assert saved["steps"] == [12, 12]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if r["name"] == "loss" and r["split"] == "train"]
    assert [r["step"] for r in losses] == [10, 12]
    assert all(len(r["value"]) == 2 for r in losses)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"]["steps"] == 12
    # A second call finds results.json and does nothing.
    again = run.train_and_evaluate(smoke_config(train__steps=12), tmp_path)
    assert again == saved


def test_learns_the_synthetic_task(tmp_path):
    results = run.train_and_evaluate(smoke_config(train__steps=60), tmp_path)
    assert min(results["clean_acc"]) > 0.5  # chance is 0.1


def test_two_realizations_equal_two_separate_runs(tmp_path):
    run.train_and_evaluate(smoke_config(train__steps=8), tmp_path / "both")
    run.train_and_evaluate(smoke_config(train__steps=8, train__realizations=1, seed=0),
                             tmp_path / "r0")
    run.train_and_evaluate(smoke_config(train__steps=8, train__realizations=1, seed=1),
                             tmp_path / "r1")
    _, both = _final_params(tmp_path / "both")
    _, alone0 = _final_params(tmp_path / "r0")
    _, alone1 = _final_params(tmp_path / "r1")
    assert {k for k in both if k.startswith("r0/")} == set(alone0)
    for key, value in alone0.items():
        np.testing.assert_allclose(both[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    for key, value in alone1.items():
        np.testing.assert_allclose(both[key.replace("r0/", "r1/", 1)], value, rtol=1e-5,
                                   atol=1e-6, err_msg=key)
    # ... and the two realizations really differ.
    assert not np.allclose(both["r0/convs/0/kernel"], both["r1/convs/0/kernel"])


def test_changed_config_in_same_workdir_is_refused(tmp_path):
    run.train_and_evaluate(smoke_config(train__steps=2), tmp_path)
    with pytest.raises(run.ConfigMismatchError, match=r"optim.lr: 0.02 -> 0.1"):
        run.train_and_evaluate(smoke_config(train__steps=2, optim__lr=0.1), tmp_path)


def test_nonfinite_loss_stops_names_step_and_keeps_good_checkpoint(tmp_path):
    # lr 0.05 for the first epoch (16 steps), then x1e12: the loss explodes after step 16.
    out = run_cli(f"--config={SMOKE}", f"--workdir={tmp_path}", "--config.optim.schedule=step",
                  "--config.optim.milestones=1", "--config.optim.gamma=1e12",
                  "--config.train.checkpoint_every=5", "--config.train.log_every=1")
    assert out.returncode == 3, out.stderr[-2000:]
    assert "non-finite loss at step" in out.stderr and "realization" in out.stderr
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert steps[-1] == "step_00000015", steps
    assert not (tmp_path / "results.json").exists()
    from card_jax import checkpoint

    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
    exp = train.build_experiment(smoke_config())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), exp.state)
    step, state, _ = ckpt.restore_latest(abstract)
    assert step == 15
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    args = [f"--config={SMOKE}", "--config.train.steps=40", "--config.train.checkpoint_every=3",
            "--config.train.log_every=1"]
    reference = tmp_path / "reference"
    assert run_cli(*args, f"--workdir={reference}").returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "card_jax.main", *args, f"--workdir={killed}"],
                            cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # Kill at a random moment after the first checkpoint, before the run can finish.
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step_00000003").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "run died before step 3"
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists(), "the run finished before it was killed"
    resumed = run_cli(*args, f"--workdir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from the checkpoint at step" in resumed.stderr
    for workdir in (reference, killed):
        out = run_cli(f"--workdir={workdir}", f"--out={workdir / 'final.npz'}",
                      module="card_jax.export")
        assert out.returncode == 0, out.stderr[-2000:]
    want, got = load_npz(reference / "final.npz"), load_npz(killed / "final.npz")
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # metrics.jsonl has each logged step exactly once after the resume.
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, 41))


def test_export_keys_and_values(tmp_path):
    run.train_and_evaluate(smoke_config(train__steps=3), tmp_path)
    exp, arrays = _final_params(tmp_path)
    assert "r0/convs/0/kernel" in arrays and "r1/linears/2/kernel" in arrays
    assert arrays["r0/convs/0/kernel"].shape[:3] == (3, 3, 3)


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_default_config_smoke_variant_on_fashion_mnist(tmp_path):
    out = run_cli("--config=configs/default.py:smoke", f"--workdir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dataset"]["image_shape"] == [32, 32, 1]
    assert results["steps"] == [20, 20]
    # 20 steps on 10 classes (chance 0.1): both above chance, one well on its way.
    assert min(results["clean_acc"]) > 0.15 and max(results["clean_acc"]) > 0.5


def test_evaluation_settings_may_change_on_a_finished_run(tmp_path):
    first = run.train_and_evaluate(smoke_config(train__steps=3), tmp_path)
    again = run.train_and_evaluate(smoke_config(train__steps=3, eval__batch_size=64), tmp_path)
    assert again["clean_acc"] == first["clean_acc"]  # re-evaluated from the final checkpoint
    assert json.loads((tmp_path / "config.json").read_text())["eval"]["batch_size"] == 64


def test_epoch_orders_passed_by_the_loop_give_the_same_training():
    """`CompiledSteps.train(..., step=)` (one permutation per epoch, as the training loop
    runs it) and the step that permutes the data itself train bit-identically, across an
    epoch boundary and for two realizations."""
    exp = train.build_experiment(smoke_config(train__realizations=2))
    spec = train.batch_spec(exp)
    steps_per_epoch = spec.num_examples // spec.batch_size
    results = []
    for with_step in (False, True):
        compiled = train.CompiledSteps(exp, exp.levels[0].lr_fn)
        state = compiled.place_state(exp.state)
        x, y = compiled.place_data(exp.dataset.train_images,
                                   exp.dataset.train_labels.astype(np.int32))
        losses = []
        for step in range(steps_per_epoch + 2):
            state, metrics = compiled.train(state, x, y, step=step if with_step else None)
            losses.append(np.asarray(metrics["loss"]))
        results.append((jax.tree.leaves(jax.device_get(state.params)), losses))
    (params_a, losses_a), (params_b, losses_b) = results
    np.testing.assert_array_equal(np.stack(losses_a), np.stack(losses_b))
    for a, b in zip(params_a, params_b):
        np.testing.assert_array_equal(a, b)


def test_augmented_batch_is_materialized_once_and_unchanged():
    """steps._materialized is the identity, computed on CPU into its own buffer (a
    conditional), so XLA does not recompute an augmentation inside each consumer."""
    from card_jax import steps

    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    f = jax.jit(lambda x, step: steps._materialized(jnp.tanh(x), step) * 2.0)
    np.testing.assert_array_equal(f(x, jnp.int32(3)), jnp.tanh(x) * 2.0)
    assert "conditional(" in f.lower(x, jnp.int32(3)).compile().as_text()
