"""One training level for R realizations at once: compile, resume, step, log, checkpoint.

`card_jax.run` owns the level loop (LTH/LRR/FT) and the results; this module owns the step
loop of one level. Side effects are limited to the level's checkpoint directory, the metric
writer and logging; the compiled steps come from the pure modules `steps`, `pruning`,
`models` and `data.pipeline`.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from card_jax import checkpoint as checkpoint_lib
from card_jax import config_util, models, optim, pruning, realizations, steps
from card_jax import state as state_lib
from card_jax import writer as writer_lib
from card_jax.data import pipeline, sources
from card_jax.progress import Progress

log = logging.getLogger("card_jax")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the realization."""


@dataclasses.dataclass(frozen=True)
class LevelPlan:
    """One training run of a level: steps [start, end) with the LR `lr_fn(step)`."""

    index: int
    start: int
    end: int
    lr_fn: Callable[[jax.Array], jax.Array]


@dataclasses.dataclass
class Experiment:
    """Everything built from a config before any training (no side effects)."""

    config: ml_collections.ConfigDict
    dataset: sources.Dataset
    graphdef: Any
    method: pruning.Method
    tx: Any                         # optimizer direction; the LR comes from the level plan
    state: state_lib.TrainState     # host arrays with a leading [R] axis: level 0's start
    steps_per_epoch: int
    total_steps: int
    levels: list[LevelPlan]


def _take(images: np.ndarray, labels: np.ndarray, count: int, what: str):
    if count < 0:
        return images, labels
    if count > len(images):
        raise ValueError(f"data.{what}={count} but the dataset has only {len(images)} examples")
    return images[:count], labels[:count]


def synthetic_options(data_config) -> dict:
    """`config.data.synthetic` in the form `sources.load(synthetic=...)` takes."""
    syn = data_config.synthetic
    return dict(train_size=syn.train_size, test_size=syn.test_size,
                image_shape=(syn.image_size, syn.image_size, syn.channels),
                num_classes=syn.num_classes, seed=syn.seed)


def load_data(data_config) -> sources.Dataset:
    ds = sources.load(data_config.name, data_config.dir, pad_to=data_config.pad_to,
                      synthetic=synthetic_options(data_config))
    train_x, train_y = _take(ds.train_images, ds.train_labels, data_config.train_examples,
                             "train_examples")
    test_x, test_y = _take(ds.test_images, ds.test_labels, data_config.test_examples,
                           "test_examples")
    return dataclasses.replace(ds, train_images=train_x, train_labels=train_y,
                               test_images=test_x, test_labels=test_y)


def dataset_info(ds: sources.Dataset) -> dict:
    """What a workdir needs to rebuild its model without loading the data again."""
    return {"name": ds.name, "num_classes": ds.num_classes,
            "image_shape": list(ds.train_images.shape[1:]), "mean": list(ds.mean),
            "std": list(ds.std), "num_train": len(ds.train_images),
            "num_test": len(ds.test_images)}


def placeholder_dataset(info: dict) -> sources.Dataset:
    """A Dataset with the recorded shapes and constants but no pixels (export, restore)."""
    shape = tuple(info["image_shape"])
    return sources.Dataset(
        name=info["name"], train_images=np.zeros((info["num_train"],) + shape, np.uint8),
        train_labels=np.zeros((info["num_train"],), np.int32),
        test_images=np.zeros((0,) + shape, np.uint8), test_labels=np.zeros((0,), np.int32),
        num_classes=info["num_classes"], mean=tuple(info["mean"]), std=tuple(info["std"]))


def build_model(config, dataset: sources.Dataset, key: jax.Array) -> nnx.Module:
    return models.build(
        config.model.name, num_classes=dataset.num_classes,
        in_channels=dataset.train_images.shape[-1], mean=tuple(dataset.mean),
        std=tuple(dataset.std), rngs=nnx.Rngs(params=key), **config.model.kw.to_dict())


def realization_seeds(config) -> list[int]:
    return [config.seed + r for r in range(config.train.realizations)]


def _init_models(config, dataset, seeds: list[int]):
    """(graphdef, [(params, batch_stats)] per seed): each realization initialised by ONE
    jitted function, compiled once for all seeds.

    Eager initialisation compiles every random op separately (seconds per layer on CPU),
    and a fresh `jax.jit` per seed compiled the whole initialiser again for each
    realization (~3.5 s each for a quarter-width Conv-4, 30 s of an R=8 start).
    """
    graphdefs = []

    @jax.jit
    def init(seed_key):
        model = build_model(config, dataset, jax.random.fold_in(seed_key, state_lib.INIT_STREAM))
        graphdef, params, batch_stats = state_lib.split_model(model)
        graphdefs.append(graphdef)  # at trace time, once
        return params, batch_stats

    inits = [init(jax.random.key(seed)) for seed in seeds]
    return graphdefs[0], inits


def _layer_order(graphdef, params, batch_stats, dataset) -> tuple[str, ...]:
    x = jnp.zeros((1,) + dataset.train_images.shape[1:], jnp.float32)
    forward = lambda p, x: state_lib.merge_model(graphdef, p, batch_stats)(x, train=False)  # noqa: E731
    return pruning.masks.forward_layer_order(forward, params, x)


def _check_warmup_fits(config, total: int, steps_per_epoch: int) -> None:
    """Global EP/BP reach their sparsity only after the warm-up: it must end before training."""
    m = config.method
    if m.name not in ("ep", "bp") or m.scope != "global":
        return
    epochs = pruning.schedules.warmup_epochs_needed(m.sparsity, m.warmup_epochs)
    if epochs and epochs * steps_per_epoch >= total:
        raise ValueError(
            f"method.warmup_epochs={m.warmup_epochs} ({epochs * steps_per_epoch} steps) does not "
            f"end before training does ({total} steps): the target sparsity {m.sparsity} would "
            "never be reached. Lower method.warmup_epochs or train longer.")


def level_plans(config, method: pruning.Method, schedule, total: int,
                steps_per_epoch: int) -> list[LevelPlan]:
    """Level 0 trains [0, T); LTH levels resume at k, LRR restart at 0, FT fine-tunes."""
    plans = [LevelPlan(0, 0, total, schedule)]
    for level in range(1, method.levels):
        if method.name == "ft":
            epochs = config.method.finetune_epochs
            epochs = config.train.epochs / 4 if epochs < 0 else epochs
            length = max(int(round(epochs * steps_per_epoch)), 1)
            lr = config.method.finetune_lr
            lr = config.optim.lr / 100 if lr < 0 else lr
            plans.append(LevelPlan(level, 0, length, lambda step, lr=lr: jnp.float32(lr)))
        else:
            plans.append(LevelPlan(level, method.level_start_step, total, schedule))
    return plans


def build_experiment(config, dataset: sources.Dataset | None = None) -> Experiment:
    """Data, model, method, optimizer, level plans and the initial `[R]`-stacked state."""
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

    graphdef, inits = _init_models(config, dataset, realization_seeds(config))
    order = None
    if not (config.method.prune_first_layer and config.method.prune_last_layer):
        order = _layer_order(graphdef, inits[0][0], inits[0][1], dataset)
    method = pruning.from_config(config.method, steps_per_epoch=steps_per_epoch,
                                 total_steps=total, layer_order=order)
    _check_warmup_fits(config, total, steps_per_epoch)

    @jax.jit
    def init_method(params, seed):
        key = jax.random.fold_in(jax.random.key(seed), state_lib.METHOD_STREAM)
        params = method.init_params(params, jax.random.fold_in(key, 0))
        method_state = method.init(params, jax.random.fold_in(key, 1))
        params = method.post_update(params, method_state)
        opt_state = tx.init(pruning.get_trainable(method, params, method_state))
        return params, method_state, opt_state

    states = []
    for seed, (params, batch_stats) in zip(realization_seeds(config), inits):
        params, method_state, opt_state = init_method(params, seed)
        states.append(state_lib.TrainState(
            params=params, batch_stats=batch_stats, opt_state=opt_state,
            method_state=method_state, step=jnp.int32(0), seed=jnp.int32(seed),
            first_bad_step=jnp.int32(-1)))
    state = jax.device_get(state_lib.stack(states))
    return Experiment(config, dataset, graphdef, method, tx, state, steps_per_epoch, total,
                      level_plans(config, method, schedule, total, steps_per_epoch))


def batch_spec(exp: Experiment) -> steps.BatchSpec:
    """How the train step draws and augments its batches, from the config and the data."""
    cfg = exp.config
    return steps.BatchSpec(cfg.train.batch_size, len(exp.dataset.train_images), cfg.data.seed,
                           cfg.data.crop_padding, cfg.data.flip, cfg.data.augment, cfg.data.jsd)


def level_method(exp: Experiment, plan: LevelPlan) -> pruning.Method:
    """The method whose step trains `plan`.

    Level 0 of FT/LTH/LRR (`Method.dense_level0`) runs the dense step: its all-ones masks
    change no value, and so level 0 is bit for bit the dense baseline of the same config,
    which `method.level0_from` may then copy instead of training it again.
    """
    if plan.index == 0 and exp.method.dense_level0:
        return pruning.dense()
    return exp.method


class CompiledSteps:
    """The jitted `[R]` train and eval steps of one level plan, and where inputs live."""

    def __init__(self, exp: Experiment, lr_fn: Callable, method: pruning.Method | None = None):
        """`method` (default `exp.method`): the one whose step to compile (`level_method`)."""
        cfg = exp.config
        method = method or exp.method
        self.strategy = realizations.choose_strategy(cfg.train.strategy)
        self.mesh = (realizations.make_mesh(cfg.train.realizations)
                     if self.strategy == "vmap" else None)
        mesh = self.mesh
        constrain = (lambda x: x) if mesh is None else (
            lambda x: jax.lax.with_sharding_constraint(x, realizations.batch_sharding(mesh)))
        spec = batch_spec(exp)
        dtype = cfg.train.compute_dtype
        train_one = steps.make_train_step(exp.graphdef, method, exp.tx, lr_fn, spec,
                                          constrain, dtype=dtype)
        train_r = realizations.over_realizations(train_one, self.strategy, num_shared=2)
        ordered_r = realizations.over_realizations(
            lambda state_and_order, images, labels: train_one(
                state_and_order[0], images, labels, state_and_order[1]),
            self.strategy, num_shared=2)
        self._spec = spec
        if mesh is None:
            device = jax.local_devices()[0]
            one = jax.sharding.SingleDeviceSharding(device)
            self.state_sharding = jax.tree.map(lambda _: one, exp.state)
            self.data_sharding = one
            metrics_sharding = one
        else:
            self.state_sharding = realizations.realization_sharding(mesh, exp.state)
            self.data_sharding = realizations.replicated(mesh)
            metrics_sharding = realizations.realization_sharding(mesh, {"loss": 0, "accuracy": 0})
        # The jitted [R] step `(state, images, labels)` that computes its epoch's batch order
        # itself: what `train` runs without `step` (for AOT lowering and FLOP counts).
        self.jitted_train = jax.jit(train_r, donate_argnums=0,
                                    out_shardings=(self.state_sharding, metrics_sharding))
        self._train_ordered = jax.jit(
            lambda state, order, images, labels: ordered_r((state, order), images, labels),
            donate_argnums=0, out_shardings=(self.state_sharding, metrics_sharding))
        order_sharding = (self.state_sharding.step, self.state_sharding.seed,
                          self.state_sharding.seed)
        self._epoch_order = jax.jit(self._epoch_order_r, out_shardings=order_sharding)
        self._order: tuple[int, Any] | None = None  # (epoch, its `pipeline.EpochOrder`s)
        self._eval_parts = (exp.graphdef, method, dtype)
        self._evals: dict[int, Callable] = {}
        self.eval = self.eval_step(cfg.eval.batch_size)

    def train(self, state, images, labels, step: int | None = None):
        """One `[R]` training step: `(state, metrics)`; `state` is donated.

        `step`, when given, must be the step counter of `state` (as in the training loop):
        each epoch's batch order is then computed once, at its first step, instead of a
        permutation of the whole training set inside every step. The batches, and so the
        results, are the same either way (a mismatched order is ignored by the step).
        """
        if step is None:
            return self.jitted_train(state, images, labels)
        epoch = int(step) // (self._spec.num_examples // self._spec.batch_size)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self._epoch_order(state.seed, jnp.int32(epoch)))
        return self._train_ordered(state, self._order[1], images, labels)

    def _epoch_order_r(self, seeds: jax.Array, epoch: jax.Array):
        """`pipeline.EpochOrder` `[R]` of every realization (seeds `[R]`) for `epoch`."""
        spec = self._spec

        def one(seed):
            key = pipeline.order_key(spec.data_seed, seed)
            return epoch, seed, pipeline.epoch_order(key, epoch, spec.num_examples)

        return jax.vmap(one)(seeds)

    def eval_step(self, batch_size: int) -> Callable:
        """The jitted `[R]` eval step over `batch_size` examples, compiled on first use.

        `self.eval` is the one of `eval.batch_size`; a set smaller than that (e.g. "-C" cells
        of 500 images against batches of 1000) gets its own instead of being padded up to it,
        which would double the work.
        """
        if batch_size not in self._evals:
            graphdef, method, dtype = self._eval_parts
            one = steps.make_eval_step(graphdef, method, batch_size, dtype=dtype)
            self._evals[batch_size] = jax.jit(
                realizations.over_realizations(one, self.strategy, num_shared=3))
        return self._evals[batch_size]

    def place_state(self, host_state):
        return realizations.place(host_state, self.state_sharding)

    def place_data(self, *arrays):
        return [realizations.place(a, self.data_sharding) for a in arrays]


def evaluation_sums(compiled: CompiledSteps, state, images, labels,
                    batch_size: int) -> dict[str, np.ndarray]:
    """Summed eval statistics per realization (`steps.make_eval_step`), leading axis `[R]`.

    Batches of `batch_size`, or one batch of the whole set when it is smaller.
    """
    batch_size = max(1, min(batch_size, images.shape[0]))
    step = compiled.eval_step(batch_size)
    sums = None
    for start in range(0, images.shape[0], batch_size):
        batch = step(state, images, labels, jnp.int32(start))
        sums = batch if sums is None else jax.tree.map(jnp.add, sums, batch)
    return realizations.to_host(sums)


def evaluate(compiled: CompiledSteps, state, images, labels, batch_size: int) -> np.ndarray:
    """Accuracy per realization `[R]` on device-resident uint8 images (BN running stats)."""
    return evaluation_sums(compiled, state, images, labels, batch_size)["correct"] / images.shape[0]


def format_values(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in np.ravel(values)) + "]"


def _raise_if_nonfinite(state, host_step: int, level: int) -> None:
    bad = realizations.to_host(state.first_bad_step)
    if np.any(bad >= 0):
        r = int(np.argmax(bad >= 0))
        seeds = realizations.to_host(state.seed)
        raise NonFiniteLossError(
            f"non-finite loss at step {int(bad[r])} of level {level} in realization {r} "
            f"(seed {int(seeds[r])}); stopped at step {host_step}. The last good checkpoint is "
            "kept. Lower optim.lr or check the data.")


def abstract_of(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


@dataclasses.dataclass
class LevelContext:
    """Where one level writes and what it records in checkpoint metadata."""

    directory: pathlib.Path          # holds checkpoints/ (and rewind/ for LTH level 0)
    writer: writer_lib.MetricWriter | None
    metadata: dict
    progress_mode: str


def train_level(exp: Experiment, plan: LevelPlan, compiled: CompiledSteps, initial_state,
                ctx: LevelContext, data: tuple) -> tuple[Any, float]:
    """Trains one level from its checkpoint (or `initial_state`) to `plan.end`.

    Args:
      initial_state: host `[R]` state at `plan.start` (used when the level has no checkpoint).
      data: device-resident (train_images, train_labels, test_images, test_labels).

    Returns:
      (device state at plan.end, wall time of this level including earlier attempts).
    """
    cfg = exp.config
    train_x, train_y, test_x, test_y = data
    ckpt = checkpoint_lib.Checkpointer(ctx.directory / "checkpoints",
                                       keep=cfg.train.keep_checkpoints)
    restored = ckpt.restore_latest(abstract_of(initial_state))
    wall_before = 0.0
    if restored is None:
        host_state, start = initial_state, plan.start
    else:
        start, host_state, meta = restored
        wall_before = float(meta.get("wall_time_s", 0.0))
        log.info("level %d: resuming from the checkpoint at step %d", plan.index, start)
        if ctx.writer:
            ctx.writer.truncate_after(start, level=plan.index)
    state = compiled.place_state(host_state)
    rewind_dir = ctx.directory / "rewind"
    rewind_step = exp.method.rewind_step if plan.index == 0 else None
    needs_rewind = rewind_step is not None and not checkpoint_lib.Checkpointer(rewind_dir).steps()

    def save_rewind(state):
        params = realizations.to_host(state.params)
        checkpoint_lib.Checkpointer(rewind_dir, keep=1).save(
            rewind_step, params, {"rewind_step": rewind_step})

    if needs_rewind and start > rewind_step:
        raise checkpoint_lib.CheckpointError(
            f"{rewind_dir} is missing but training is past rewind_step={rewind_step}; "
            "the rewind weights cannot be recovered: start this run in a new workdir")
    if needs_rewind and start == rewind_step:
        save_rewind(state)
        needs_rewind = False

    desc = "train" if len(exp.levels) == 1 else f"level {plan.index}"
    progress = Progress(plan.end, start, ctx.progress_mode, desc=desc)
    tic = time.monotonic()
    pending: list = []
    log_every = max(cfg.train.log_every, 1)
    ckpt_every = max(cfg.train.checkpoint_every, 1)
    try:
        for step in range(start, plan.end):
            state, metrics = compiled.train(state, train_x, train_y, step=step)
            pending.append(metrics)
            done = step + 1
            last = done == plan.end
            if needs_rewind and done == rewind_step:
                _raise_if_nonfinite(state, done, plan.index)
                save_rewind(state)
                needs_rewind = False
            if done % log_every == 0 or last:
                host = realizations.to_host(pending)
                pending = []
                _raise_if_nonfinite(state, done, plan.index)
                means = {k: np.mean([m[k] for m in host], axis=0) for k in host[0]}
                means["lr"] = float(plan.lr_fn(jnp.int32(done - 1)))
                if ctx.writer:
                    ctx.writer.write_scalars(done, means, split="train")
                progress.update(done, f"loss {format_values(means['loss'])}")
            eval_every = cfg.train.eval_every
            if eval_every > 0 and done % eval_every == 0 and not last:
                acc = evaluate(compiled, state, test_x, test_y, cfg.eval.batch_size)
                if ctx.writer:
                    ctx.writer.write_scalars(done, {"accuracy": acc}, split="test")
            if done % ckpt_every == 0 or last:
                _raise_if_nonfinite(state, done, plan.index)
                wall = wall_before + time.monotonic() - tic
                if ctx.writer:  # metrics up to `done` must be on disk before its checkpoint
                    ctx.writer.flush()
                ckpt.save(done, state, {**ctx.metadata, "level": plan.index, "wall_time_s": wall})
    finally:
        progress.close()
    if start == plan.end and restored is None:
        # A level with no steps (e.g. LTH rewound to k = T) still records its final state.
        ckpt.save(plan.end, state, {**ctx.metadata, "level": plan.index, "wall_time_s": 0.0})
    return state, wall_before + time.monotonic() - tic
