"""The pure per-realization training and evaluation steps (written for ONE seed).

`card_jax.train` lifts them over the realization axis with `card_jax.realizations` and jits
them once. Nothing here touches the host: metrics come back as arrays.

A training step is three parts (`TrainStepParts`), composed by `make_train_step` and also
usable one by one (benchmarks/profile.py times them separately):
  batch   gather the batch from the device-resident training set, crop/flip, augment
  loss    the method's effective weights, the forward pass and the loss
  update  the optimizer direction, the learning rate, the method's hooks and re-masking

Compute dtype (`train.compute_dtype`): with "bfloat16" the convolutions, dense layers and
BatchNorm of the forward and backward passes run in bfloat16 (every `nnx.Conv`, `nnx.Linear`
and `nnx.BatchNorm` of the merged model gets `dtype=bfloat16`, so each casts its input and its
fp32 weights when called), while parameters, scores, optimizer state, BatchNorm statistics
(always reduced and stored in fp32 by Flax) and the loss/softmax stay float32: the logits are
cast back to float32 before the loss. "float32" (the default) adds no cast at all: the traced
step is exactly the one without the option. Why layer dtypes rather than casting the effective
parameters and the batch once: the models normalise their input in float32 and
`nnx.BatchNorm` promotes its input to the dtype of its float32 running statistics, so cast
trees would be promoted back to float32 at the first such layer; a layer's `dtype` casts its
input, weights and statistics instead (the batch is cast by the first convolution, after the
model's fp32 normalisation).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import optax
from flax import nnx

from card_jax import fusion, state as state_lib
from card_jax.data import pipeline
from card_jax.models import convolution
from card_jax.pruning.base import Method, get_trainable, set_trainable

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The Flax layers that take a computation `dtype`; all the layers card_jax's models use.
_DTYPE_LAYERS = (nnx.Conv, nnx.ConvTranspose, nnx.Linear, nnx.BatchNorm, nnx.LayerNorm,
                 nnx.GroupNorm)


def compute_dtype(name: str | None):
    """`train.compute_dtype` -> the dtype to cast to, or None for float32 (no casts at all)."""
    if name in (None, "float32"):
        return None
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"train.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, "
                         f"got {name!r}")
    return COMPUTE_DTYPES[name]


def _set_compute_dtype(model: nnx.Module, dtype) -> None:
    """Makes every Conv/Linear/norm layer of a freshly merged (traced) model compute in `dtype`.

    The attribute is static: it only changes what the layers trace, never the parameters,
    which stay float32 in the state; the casts are differentiated back to float32 grads.
    """
    for _, module in nnx.iter_modules(model):
        if isinstance(module, _DTYPE_LAYERS):
            module.dtype = dtype


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """Static description of how a training batch is drawn and augmented."""

    batch_size: int
    num_examples: int
    data_seed: int
    crop_padding: int
    flip: bool
    augment: str = "none"       # card_jax.data.augment.AUGMENTATIONS key (SPEC §8)
    jsd: bool = False           # AugMix's Jensen-Shannon consistency loss (two augmented views)


def forward(graphdef, method: Method, params, batch_stats, method_state, x, train: bool,
            dtype=None):
    """Logits `[B, classes]` (float32) and the (possibly updated) batch statistics.

    `dtype` (from `compute_dtype`): None computes in float32; bfloat16 runs the layers in
    bfloat16 and casts the logits back to float32.
    """
    model = _merged_model(graphdef, method, params, batch_stats, method_state, dtype)
    logits = _logits(model, x, True, dtype) if train else inference_logits(model, x, dtype)
    return logits, state_lib.batch_stats_of(model)


def _merged_model(graphdef, method: Method, params, batch_stats, method_state, dtype):
    """The model with the method's effective weights, in compute dtype `dtype`."""
    model = state_lib.merge_model(graphdef, method.apply(params, method_state), batch_stats)
    if dtype is not None:
        _set_compute_dtype(model, dtype)
    return model


def _logits(model: nnx.Module, x: jax.Array, train: bool, dtype) -> jax.Array:
    logits = model(x, train=train)
    return logits if dtype is None else logits.astype(jnp.float32)


class TrainStepParts(NamedTuple):
    """The pieces `make_train_step` composes, each a pure function of one realization.

    batch(st, images, labels) -> (x, y)
      x float32 `[B, H, W, C]` (`[3B, ...]` with JSD: clean, aug1, aug2) in [0, 1], y int32 `[B]`.
    loss(trainable, st, x, y) -> (loss, (logits, batch_stats))
      differentiable in `trainable` (`get_trainable`); logits float32 `[B, classes]` (the clean
      view's with JSD).
    update(st, trainable, grads, batch_stats) -> state
      the optimizer step, the method's step hook and `post_update`. The returned state keeps
      st.step and st.first_bad_step: the composed step advances them.
    """

    batch: Callable
    loss: Callable
    update: Callable


def _materialized(x: jax.Array, step: jax.Array) -> jax.Array:
    """`x`, computed once into a buffer of its own on CPU (`fusion.computed_apart`; elsewhere
    `x` as it is). A step counter is never negative, so the `zeros_like` branch never runs;
    it only keeps XLA from removing a conditional of two identities."""
    return fusion.computed_apart(lambda v: v, x, step >= 0, otherwise=jnp.zeros_like)


def make_train_step_parts(
    graphdef,
    method: Method,
    tx: optax.GradientTransformation,
    lr_fn: Callable[[jax.Array], jax.Array],
    spec: BatchSpec,
    constrain_batch: Callable[[jax.Array], jax.Array] = lambda x: x,
    dtype: str | None = "float32",
) -> TrainStepParts:
    """The batch, loss and update functions of `make_train_step` (same arguments)."""
    cast = compute_dtype(dtype)
    augment_fn, jsd_loss, jsd_weight = None, None, 0.0
    if spec.augment != "none" or spec.jsd:
        from card_jax.data import augment  # only runs that augment need it

        if spec.augment not in augment.AUGMENTATIONS or spec.augment == "none":
            raise ValueError(f"data.augment={spec.augment!r}" + (" with data.jsd" if spec.jsd
                             else "") + "; valid: augmix, gaussian")
        augment_fn = augment.AUGMENTATIONS[spec.augment]
        jsd_loss, jsd_weight = augment.jsd_loss, augment.JSD_WEIGHT

    def batch(st: state_lib.TrainState, images: jax.Array, labels: jax.Array,
              order: pipeline.EpochOrder | None = None):
        # A precomputed epoch order is used only if it is this realization's (same seed).
        known = None if order is None else (
            jnp.where(order[1] == st.seed, order[0], jnp.int32(-1)), order[2])
        idx = pipeline.batch_indices(
            pipeline.order_key(spec.data_seed, st.seed), st.step, spec.num_examples,
            spec.batch_size, known,
        )
        seed_key = jax.random.key(st.seed)
        aug_key = jax.random.fold_in(
            jax.random.fold_in(seed_key, state_lib.AUGMENT_STREAM), st.step)
        x = pipeline.random_crop_flip(
            aug_key, pipeline.to_float(images[idx]), spec.crop_padding, spec.flip)
        if spec.jsd:
            # (clean, aug1, aug2) as ONE forward batch [3B]: one pass, and BatchNorm sees all
            # three views as in the reference AugMix training (SPEC §8(a), (c)).
            x = jnp.concatenate([x, augment_fn(jax.random.fold_in(aug_key, 1), x),
                                 augment_fn(jax.random.fold_in(aug_key, 2), x)])
        elif augment_fn is not None:
            # After crop/flip, on [0, 1] pixels, before the model's normalisation (SPEC §8).
            # The cropped batch gets a buffer of its own first: fused into the augmentation,
            # the gather, crop and flip were recomputed by each op that reads the batch
            # (AugMix's levels and its final mix; Gaussian noise's sum and its choice of
            # images). Quarter-width Conv-4, batch 128: a Gaussian step cost 8.9 ms more than
            # a plain one against 3.7 ms for the noise alone, now 4.0-4.7 (benchmarks/README.md,
            # section 18). Not for JSD, whose step it slowed (197 -> 238 ms).
            x = augment_fn(jax.random.fold_in(aug_key, 1), _materialized(x, st.step))
        if augment_fn is not None:
            # Materialize the augmented batch once. Otherwise XLA fuses the augmentation (the
            # Gaussian noise's random bits and inverse erf) into each consumer of the first
            # layer's input (every tap of its convolution, its weight gradient) and recomputes
            # it there: a Gaussian step of the embedded model cost 30-35 ms more than a plain
            # one (R = 2, one core), now the same.
            x = _materialized(x, st.step)
        return constrain_batch(x), labels[idx]

    def loss_fn(trainable, st: state_lib.TrainState, x: jax.Array, y: jax.Array):
        params, method_state = set_trainable(method, st.params, st.method_state, trainable)
        logits, batch_stats = forward(
            graphdef, method, params, batch_stats=st.batch_stats,
            method_state=method_state, x=x, train=True, dtype=cast)
        if spec.jsd:
            clean, aug1, aug2 = jnp.split(logits, 3)
            loss = (optax.softmax_cross_entropy_with_integer_labels(clean, y).mean()
                    + jsd_weight * jsd_loss(clean, aug1, aug2))
            return loss, (clean, batch_stats)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits, batch_stats)

    def update(st: state_lib.TrainState, trainable, grads, batch_stats):
        direction, opt_state = tx.update(grads, st.opt_state, trainable)
        lr = lr_fn(st.step)
        trainable = jax.tree.map(lambda p, d: p - lr * d, trainable, direction)
        params, method_state = set_trainable(method, st.params, st.method_state, trainable)
        method_state = method.step(params, method_state, st.step + 1)
        params = method.post_update(params, method_state)
        # The counter (and first_bad_step) advance in the composed step, after the loss check,
        # in the order the step has always been traced in.
        return st._replace(params=params, batch_stats=batch_stats, opt_state=opt_state,
                           method_state=method_state)

    return TrainStepParts(batch, loss_fn, update)


def make_train_step(
    graphdef,
    method: Method,
    tx: optax.GradientTransformation,
    lr_fn: Callable[[jax.Array], jax.Array],
    spec: BatchSpec,
    constrain_batch: Callable[[jax.Array], jax.Array] = lambda x: x,
    dtype: str | None = "float32",
) -> Callable:
    """Returns `train_step(state, images, labels) -> (state, metrics)` for one realization.

    Args:
      tx: the optimizer direction (`optim.make_direction`); the update is
        `-lr_fn(state.step) * direction`, so the schedule follows the step counter that the
        level loop sets (LTH resumes it at the rewind step, LRR restarts it).
      images: uint8 `[N, H, W, C]`, the whole training set on device (shared by all seeds).
      labels: int32 `[N]`.
      constrain_batch: sharding constraint for the batch `[B, H, W, C]` (data parallelism).
      dtype: `train.compute_dtype`, "float32" or "bfloat16" (see the module docstring).

    The optimizer updates `method.trainable` (params, or the scores of EP/BP). After the
    update the method's per-step hook runs, then `post_update` re-applies its mask, so pruned
    weights are exactly zero after every step (SPEC §4(d)).
    `order`: optional `pipeline.EpochOrder` of this realization for the step's epoch (see
    `pipeline.batch_indices`); the batch is the same with or without it.
    Returns metrics {'loss': f32 [], 'accuracy': f32 []} of the step's batch.
    """
    parts = make_train_step_parts(graphdef, method, tx, lr_fn, spec, constrain_batch, dtype)
    loss_and_grads = jax.value_and_grad(parts.loss, has_aux=True)
    if spec.jsd:
        loss_and_grads = _jsd_in_micro_batches(loss_and_grads)

    def train_step(st: state_lib.TrainState, images: jax.Array, labels: jax.Array,
                   order: pipeline.EpochOrder | None = None):
        x, y = parts.batch(st, images, labels, order)
        trainable = get_trainable(method, st.params, st.method_state)
        (loss, (logits, batch_stats)), grads = loss_and_grads(trainable, st, x, y)
        new_state = parts.update(st, trainable, grads, batch_stats)
        finite = jnp.isfinite(loss)
        first_bad = jnp.where((st.first_bad_step < 0) & ~finite, st.step, st.first_bad_step)
        new_state = new_state._replace(step=st.step + 1, first_bad_step=first_bad)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
        return new_state, {"loss": loss, "accuracy": accuracy}

    return train_step


JSD_MAX_MICRO_BATCHES = 8  # each is one more copy of the forward and backward pass to compile


def jsd_micro_batches(batch_size: int) -> int:
    """Micro-batches of a JSD step without BatchNorm: the smallest divisor of `batch_size`
    from 3 on (so that each holds at most `batch_size` images, its examples' three views),
    or 1 (one batch) when that exceeds JSD_MAX_MICRO_BATCHES."""
    return next((n for n in range(3, JSD_MAX_MICRO_BATCHES + 1) if batch_size % n == 0), 1)


def _jsd_in_micro_batches(loss_and_grads: Callable) -> Callable:
    """`loss_and_grads(trainable, st, x [3B, ...], y [B])` of a JSD step, over micro-batches
    when the model has no BatchNorm statistics.

    The JSD loss is a mean over examples of terms that each see only one example's three
    views, so the mean over equal micro-batches of examples (each with its clean, aug1 and
    aug2 rows, in that order) is the same loss, and its gradient the mean of theirs (equal up
    to float32 summation order). Why: a [3B] batch runs 1.5x slower per image than [B] on
    XLA:CPU when its activations leave the caches (quarter-width Conv-4, B = 128: 649 ms for
    a batch of 384 vs 142 ms for 128; benchmarks/README.md, section 12). With BatchNorm the
    three views must stay one batch (its statistics are taken over all of them), so such
    models keep the single pass.
    """
    def grouped(trainable, st, x, y):
        if jax.tree.leaves(st.batch_stats):
            return loss_and_grads(trainable, st, x, y)
        batch = y.shape[0]
        n = jsd_micro_batches(batch)
        if n == 1:
            return loss_and_grads(trainable, st, x, y)
        per = batch // n
        views = x.reshape(3, n, per, *x.shape[1:]).swapaxes(0, 1)   # [n, 3, B/n, ...]
        xs = views.reshape(n, 3 * per, *x.shape[1:])
        ys = y.reshape(n, per)

        # Unrolled, not a lax.scan: inside a loop XLA:CPU runs the convolutions through its
        # generic emitter, 20x slower here than the library calls of straight-line code.
        total, logits = None, []
        for i in range(n):
            (loss, (chunk_logits, _)), grads = loss_and_grads(trainable, st, xs[i], ys[i])
            total = (loss, grads) if total is None else jax.tree.map(jnp.add, total,
                                                                     (loss, grads))
            logits.append(chunk_logits)
        loss_sum, grad_sum = total
        grads = jax.tree.map(lambda g: g / n, grad_sum)
        return (loss_sum / n, (jnp.concatenate(logits), st.batch_stats)), grads

    return grouped


ECE_BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al.)

# On CPU an eval step's forward pass runs in slices of at most this many images (unrolled):
# the full-width Conv-4 eval step at batch 1000 went from 0.37-0.48 to 0.77 of the matmul
# peak (benchmarks/README.md, section 13). A whole-batch pass needs a 1 GB temporary buffer
# that XLA:CPU allocates afresh (one mmap) on every call: page faults and transparent huge
# page compaction cost 0.2-4.7 s of kernel time per call. Slices keep the buffer small
# (67 MB) and the activations of one slice in cache.
EVAL_MICRO_BATCH = 128


def micro_batch_bounds(batch_size: int, most: int = EVAL_MICRO_BATCH) -> list[tuple[int, int]]:
    """`[(start, stop), ...]`: `batch_size` rows as ceil(batch_size / most) consecutive
    slices of near-equal size (at most two distinct sizes, so at most two compiled shapes
    per layer): 1000 -> 8 x 125; 997 -> 5 x 125 + 3 x 124; 64 -> one slice."""
    count = -(-batch_size // most)
    base, extra = divmod(batch_size, count)
    bounds, start = [], 0
    for i in range(count):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def inference_logits(model: nnx.Module, x: jax.Array, dtype=None) -> jax.Array:
    """Eval-mode logits `[B, classes]` float32 of `model` on `x` `[B, H, W, C]`.

    One pass on accelerators. On CPU the slices of `micro_batch_bounds` (`EVAL_MICRO_BATCH`),
    unrolled, with XLA's forward convolutions (`convolution.xla_forward_convolutions`): equal
    to the one pass, since an eval-mode network treats every example on its own (BatchNorm
    uses its running statistics). Not a `lax.map`: inside a loop XLA:CPU emits convolutions
    with its generic loop emitter (0.58 instead of 0.78 of the matmul peak here).
    """
    def whole(x):
        return _logits(model, x, False, dtype)

    def in_slices(x):
        with convolution.xla_forward_convolutions():
            bounds = micro_batch_bounds(x.shape[0])
            if len(bounds) == 1:
                return whole(x)
            return jnp.concatenate([whole(x[a:b]) for a, b in bounds])

    return lax.platform_dependent(x, cpu=in_slices, default=whole)


def make_eval_step(graphdef, method: Method, batch_size: int,
                   dtype: str | None = "float32") -> Callable:
    """Returns `eval_step(state, images, labels, start) -> sums` for one realization.

    Evaluates examples [start, start + batch_size) of the device-resident uint8 `images`
    `[M, H, W, C]` with BatchNorm running statistics, which it never updates. Indices past M
    are masked out, so one compiled function serves every batch, the last partial one
    included. Returns sums to add up over batches:
      correct     int32 [], correct top-1 predictions
      bin_count   f32 [ECE_BINS], examples per confidence bin (max softmax probability)
      bin_conf    f32 [ECE_BINS], summed confidence per bin
      bin_correct f32 [ECE_BINS], correct predictions per bin
    `dtype` is `train.compute_dtype`: the forward pass runs as in training.
    """
    cast = compute_dtype(dtype)

    def eval_step(st: state_lib.TrainState, images, labels, start):
        positions = start + jnp.arange(batch_size)
        valid = positions < images.shape[0]
        safe = jnp.where(valid, positions, 0)
        x = pipeline.to_float(images[safe])
        logits, _ = forward(graphdef, method, st.params, st.batch_stats, st.method_state, x,
                            train=False, dtype=cast)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        confidence = probs.max(-1)
        hit = (jnp.argmax(logits, -1) == labels[safe]) & valid
        bins = jnp.clip((confidence * ECE_BINS).astype(jnp.int32), 0, ECE_BINS - 1)
        weight = valid.astype(jnp.float32)

        def per_bin(values):
            return jnp.zeros(ECE_BINS, jnp.float32).at[bins].add(values * weight)

        return {"correct": jnp.sum(hit), "bin_count": per_bin(jnp.ones_like(confidence)),
                "bin_conf": per_bin(confidence), "bin_correct": per_bin(hit.astype(jnp.float32))}

    return eval_step


def expected_calibration_error(bin_count, bin_conf, bin_correct) -> jax.Array:
    """ECE = sum_b |acc_b - conf_b| * n_b / N over the last axis of the bin sums."""
    total = jnp.maximum(bin_count.sum(-1), 1.0)
    return jnp.abs(bin_correct - bin_conf).sum(-1) / total


def make_bn_step(graphdef, method: Method, spec: BatchSpec) -> Callable:
    """Returns `bn_step(state, images, labels, i) -> state` for one realization.

    One train-mode forward pass on un-augmented batch `i` that only updates the BatchNorm
    running statistics (no gradients, weights untouched): the BN re-calibration that EP/BP
    networks may need after their masks stop changing.
    """

    def bn_step(st: state_lib.TrainState, images, labels, i):
        del labels
        idx = pipeline.batch_indices(pipeline.order_key(spec.data_seed, st.seed), i,
                                     spec.num_examples, spec.batch_size)
        _, batch_stats = forward(graphdef, method, st.params, st.batch_stats, st.method_state,
                                 pipeline.to_float(images[idx]), train=True)
        return st._replace(batch_stats=batch_stats)

    return bn_step
