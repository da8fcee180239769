"""The training loop for R realizations at once, with checkpoints, resume and metrics.

Side effects (files, logging) live here and in main.py; the step functions it compiles come
from the pure modules `steps`, `pruning`, `models` and `data.pipeline`.

Workdir contract (read by export, report and launch):
  config.json      the resolved config
  metrics.jsonl    {"step", "level", "split", "name", "value": [R floats]} records
  tensorboard/     TensorBoard event files
  checkpoints/     Orbax checkpoints (step_XXXXXXXX/), newest K kept
  results.json     per-realization lists; written last, so its presence means "done"
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import card_jax
from card_jax import checkpoint as checkpoint_lib
from card_jax import config_util, optim, pruning, realizations, steps, writer as writer_lib
from card_jax import state as state_lib
from card_jax.data import sources
from card_jax.progress import Progress
from card_jax import models

log = logging.getLogger("card_jax")

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the realization."""


class ConfigMismatchError(ValueError):
    """The workdir holds a run of a different config."""


@dataclasses.dataclass
class Experiment:
    """Everything built from a config before the loop starts (no training done yet)."""

    config: ml_collections.ConfigDict
    dataset: sources.Dataset
    graphdef: Any
    method: pruning.Method
    tx: Any
    schedule: Any
    state: state_lib.TrainState     # host arrays, leading [R] axis
    steps_per_epoch: int
    total_steps: int


def package_versions() -> dict[str, str]:
    import flax
    import optax

    return {"card_jax": card_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "orbax-checkpoint": checkpoint_lib.ORBAX_VERSION,
            "numpy": np.__version__}


def _take(images: np.ndarray, labels: np.ndarray, count: int, what: str):
    if count < 0:
        return images, labels
    if count > len(images):
        raise ValueError(f"data.{what}={count} but the dataset has only {len(images)} examples")
    return images[:count], labels[:count]


def load_data(data_config) -> sources.Dataset:
    syn = data_config.synthetic
    synthetic = dict(train_size=syn.train_size, test_size=syn.test_size,
                     image_shape=(syn.image_size, syn.image_size, syn.channels),
                     num_classes=syn.num_classes, seed=syn.seed)
    ds = sources.load(data_config.name, data_config.dir, pad_to=data_config.pad_to,
                      synthetic=synthetic)
    train_x, train_y = _take(ds.train_images, ds.train_labels, data_config.train_examples,
                             "train_examples")
    test_x, test_y = _take(ds.test_images, ds.test_labels, data_config.test_examples,
                           "test_examples")
    return dataclasses.replace(ds, train_images=train_x, train_labels=train_y,
                               test_images=test_x, test_labels=test_y)


def build_model(config, dataset: sources.Dataset, key: jax.Array) -> nnx.Module:
    return models.build(
        config.model.name, num_classes=dataset.num_classes,
        in_channels=dataset.train_images.shape[-1], mean=tuple(dataset.mean),
        std=tuple(dataset.std), rngs=nnx.Rngs(params=key), **config.model.kw.to_dict())


def dataset_info(ds: sources.Dataset) -> dict:
    """What a workdir needs to rebuild its model without loading the data again."""
    return {"name": ds.name, "num_classes": ds.num_classes,
            "image_shape": list(ds.train_images.shape[1:]), "mean": list(ds.mean),
            "std": list(ds.std), "num_train": len(ds.train_images),
            "num_test": len(ds.test_images)}


def placeholder_dataset(info: dict) -> sources.Dataset:
    """A Dataset with the recorded shapes and constants but no examples (for export/restore)."""
    shape = tuple(info["image_shape"])
    empty_x = np.zeros((info["num_train"],) + shape, np.uint8)
    return sources.Dataset(
        name=info["name"], train_images=empty_x,
        train_labels=np.zeros((info["num_train"],), np.int32),
        test_images=np.zeros((0,) + shape, np.uint8), test_labels=np.zeros((0,), np.int32),
        num_classes=info["num_classes"], mean=tuple(info["mean"]), std=tuple(info["std"]))


def realization_seeds(config) -> list[int]:
    return [config.seed + r for r in range(config.train.realizations)]


def init_realization(config, dataset, method, tx, seed: int):
    """One realization's initial (graphdef, TrainState); depends only on `seed` and the config."""
    seed_key = jax.random.key(seed)
    model = build_model(config, dataset, jax.random.fold_in(seed_key, state_lib.INIT_STREAM))
    graphdef, params, batch_stats = state_lib.split_model(model)
    method_state = method.init(params, jax.random.fold_in(seed_key, state_lib.METHOD_STREAM))
    params = method.post_update(params, method_state)
    st = state_lib.TrainState(
        params=params, batch_stats=batch_stats, opt_state=tx.init(params),
        method_state=method_state, step=jnp.int32(0), seed=jnp.int32(seed),
        first_bad_step=jnp.int32(-1))
    return graphdef, st


def build_experiment(config, dataset: sources.Dataset | None = None) -> Experiment:
    """Data, model, method, optimizer and the initial `[R]`-stacked state for a config."""
    config_util.refuse_legacy_keys(config)
    dataset = dataset or load_data(config.data)
    batch_size = config.train.batch_size
    num_train = len(dataset.train_images)
    if batch_size > num_train:
        raise ValueError(f"train.batch_size={batch_size} exceeds the {num_train} training examples")
    steps_per_epoch = num_train // batch_size
    total = (config.train.steps if config.train.steps > 0
             else int(round(config.train.epochs * steps_per_epoch)))
    if total <= 0:
        raise ValueError("training has no steps: set train.epochs > 0 or train.steps > 0")
    tx, schedule = optim.from_config(config.optim, total, steps_per_epoch)
    method = pruning.from_config(config.method)
    inits = [init_realization(config, dataset, method, tx, s) for s in realization_seeds(config)]
    state = jax.device_get(state_lib.stack([st for _, st in inits]))
    return Experiment(config, dataset, inits[0][0], method, tx, schedule, state,
                      steps_per_epoch, total)


class CompiledSteps:
    """The jitted `[R]` train and eval steps, and where their inputs live."""

    def __init__(self, exp: Experiment):
        cfg = exp.config
        R = cfg.train.realizations
        self.strategy = realizations.choose_strategy(cfg.train.strategy)
        self.mesh = realizations.make_mesh(R) if self.strategy == "vmap" else None
        mesh = self.mesh
        constrain = (lambda x: x) if mesh is None else (
            lambda x: jax.lax.with_sharding_constraint(x, realizations.batch_sharding(mesh)))
        spec = steps.BatchSpec(cfg.train.batch_size, len(exp.dataset.train_images),
                               cfg.data.seed, cfg.data.crop_padding, cfg.data.flip)
        train_one = steps.make_train_step(exp.graphdef, exp.method, exp.tx, spec, constrain)
        eval_one = steps.make_eval_step(exp.graphdef, exp.method, cfg.eval.batch_size)
        train_r = realizations.over_realizations(train_one, self.strategy, num_shared=2)
        eval_r = realizations.over_realizations(
            lambda st, x, y, start: eval_one(st, x, y, start), self.strategy, num_shared=3)
        if mesh is None:
            device = jax.devices()[0]
            self.state_sharding = jax.tree.map(
                lambda _: jax.sharding.SingleDeviceSharding(device), exp.state)
            self.data_sharding = jax.sharding.SingleDeviceSharding(device)
        else:
            self.state_sharding = realizations.realization_sharding(mesh, exp.state)
            self.data_sharding = realizations.replicated(mesh)
        self.train = jax.jit(train_r, donate_argnums=0, out_shardings=(
            self.state_sharding, self.data_sharding if mesh is None else
            realizations.realization_sharding(mesh, {"loss": 0, "accuracy": 0})))
        self.eval = jax.jit(eval_r)

    def place_state(self, host_state):
        return realizations.place(host_state, self.state_sharding)

    def place_data(self, *arrays):
        return [realizations.place(a, self.data_sharding) for a in arrays]


def evaluate(compiled: CompiledSteps, state, images, labels, batch_size: int) -> np.ndarray:
    """Accuracy per realization `[R]` on device-resident uint8 images (BN running stats)."""
    total = images.shape[0]
    correct = None
    for start in range(0, total, batch_size):
        c = compiled.eval(state, images, labels, jnp.int32(start))
        correct = c if correct is None else correct + c
    return realizations.to_host(correct) / total


def _check_config(workdir: pathlib.Path, config) -> None:
    """Writes config.json, or checks that an existing run in `workdir` has the same config."""
    path = workdir / CONFIG_FILE
    new = config_util.to_dict(config)
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        changes = config_util.diff(old, new)
        if changes:
            raise ConfigMismatchError(
                f"{workdir} already holds a run with a different config; use a new --workdir "
                "or the same config. Differences (saved -> requested):\n  " + "\n  ".join(changes))
        return
    if jax.process_index() == 0:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(config_util.to_json(config) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def _format(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in np.ravel(values)) + "]"


def _raise_if_nonfinite(state, host_step: int) -> None:
    bad = realizations.to_host(state.first_bad_step)
    if np.any(bad >= 0):
        r = int(np.argmax(bad >= 0))
        seeds = realizations.to_host(state.seed)
        raise NonFiniteLossError(
            f"non-finite loss at step {int(bad[r])} in realization {r} (seed {int(seeds[r])}); "
            f"stopped at step {host_step}. The last good checkpoint is kept. Lower optim.lr or "
            "check the data.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains `config.train.realizations` seeds in `workdir`, resuming if it holds a checkpoint.

    Returns the results dict written to `workdir/results.json`.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _check_config(workdir, config)
    results_path = workdir / RESULTS_FILE
    if results_path.exists():
        log.info("%s is complete (results.json exists); nothing to do", workdir)
        return json.loads(results_path.read_text(encoding="utf-8"))

    exp = build_experiment(config)
    compiled = CompiledSteps(exp)
    log.info("training %s/%s, R=%d, %d steps (%d per epoch), strategy=%s on %d device(s)",
             config.model.name, config.method.name, config.train.realizations, exp.total_steps,
             exp.steps_per_epoch, compiled.strategy, jax.device_count())

    ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), exp.state)
    restored = ckpt.restore_latest(abstract)
    wall_before = 0.0
    if restored is None:
        host_state, start = exp.state, 0
    else:
        start, host_state, meta = restored
        wall_before = float(meta.get("wall_time_s", 0.0))
        log.info("resuming from the checkpoint at step %d", start)
        writer_lib.truncate_after(workdir, start)
    state = compiled.place_state(realizations.to_host(host_state))
    train_x, train_y, test_x, test_y = compiled.place_data(
        exp.dataset.train_images, exp.dataset.train_labels.astype(np.int32),
        exp.dataset.test_images, exp.dataset.test_labels.astype(np.int32))

    is_main = jax.process_index() == 0
    writer = writer_lib.MetricWriter(workdir, tensorboard=is_main) if is_main else None
    metadata = {"config": config_util.to_dict(config), "versions": package_versions(),
                "dataset": dataset_info(exp.dataset),
                "workdir_format_version": card_jax.FORMAT_VERSION,
                "realization_seeds": realization_seeds(config)}
    progress = Progress(exp.total_steps, start, config.train.progress if is_main else "none")
    tic = time.monotonic()
    pending: list = []
    log_every, ckpt_every = max(config.train.log_every, 1), max(config.train.checkpoint_every, 1)
    try:
        for step in range(start, exp.total_steps):
            state, metrics = compiled.train(state, train_x, train_y)
            pending.append(metrics)
            done = step + 1
            last = done == exp.total_steps
            if done % log_every == 0 or last:
                host = realizations.to_host(pending)
                pending = []
                _raise_if_nonfinite(state, done)
                means = {k: np.mean([m[k] for m in host], axis=0) for k in host[0]}
                means["lr"] = float(exp.schedule(done - 1))
                if writer:
                    writer.write_scalars(done, means, split="train")
                progress.update(done, f"loss {_format(means['loss'])}")
            eval_every = config.train.eval_every
            if eval_every > 0 and done % eval_every == 0 and not last:
                acc = evaluate(compiled, state, test_x, test_y, config.eval.batch_size)
                if writer:
                    writer.write_scalars(done, {"accuracy": acc}, split="test")
            if done % ckpt_every == 0 or last:
                _raise_if_nonfinite(state, done)
                wall = wall_before + time.monotonic() - tic
                ckpt.save(done, state, {**metadata, "wall_time_s": wall})
                if writer:
                    writer.flush()
    finally:
        progress.close()
    wall = wall_before + time.monotonic() - tic
    clean = evaluate(compiled, state, test_x, test_y, config.eval.batch_size)
    params0 = state_lib.index(realizations.to_host(state.params), 0)
    effective = realizations.to_host(jax.vmap(exp.method.apply)(state.params, state.method_state))
    R = config.train.realizations
    kept = [int(sum(np.count_nonzero(x) for x in jax.tree.leaves(state_lib.index(effective, r))
                    if x.ndim >= 2)) for r in range(R)]
    results = {
        "clean_acc": [float(a) for a in clean],
        "num_params": kept,
        "num_prunable": [steps.count_prunable(params0)] * R,
        "num_params_total": [int(sum(x.size for x in jax.tree.leaves(params0)))] * R,
        "steps": [exp.total_steps] * R,
        "wall_time_s": [wall] * R,
        "realization_seeds": realization_seeds(config),
        "strategy": compiled.strategy,
        "dataset": dataset_info(exp.dataset),
        "format_version": card_jax.FORMAT_VERSION,
    }
    if writer:
        writer.write_scalars(exp.total_steps, {"accuracy": clean}, split="test")
        writer.close()
    if is_main:
        tmp = results_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, results_path)
    log.info("done: clean test accuracy per realization %s in %.0fs", _format(clean), wall)
    return results
