"""Shared building blocks for the model zoo: input normalisation, initialisers, pooling, ReLU.

Every model in ``card_jax.models`` derives from :class:`ImageClassifier`, which owns the
per-channel normalisation constants (plain Python tuples, never nnx Variables, so that
``nnx.split(model, nnx.Param, nnx.BatchStat)`` captures the whole model state) and
validates the input at call time.

The initialisers reproduce the PyTorch defaults used by the reference implementations
(hidden-networks, open_lth, the AugMix ResNeXt code and the CARD repository), expressed in
Flax's HWIO / [in, out] kernel layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from card_jax import fusion

# PyTorch BatchNorm2d(momentum=0.1) updates ``running = 0.9 * running + 0.1 * batch``;
# Flax's ``momentum`` is the weight of the *old* value, hence 0.9.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# kaiming_normal_(mode="fan_out", nonlinearity="relu"): std = sqrt(2 / fan_out), where
# fan_out = kh * kw * out_channels. Flax computes fan_out from the last kernel axis
# times the receptive field, which is the same number for HWIO kernels (also grouped
# ones: the kernel is [kh, kw, in / groups, out]). "normal" (untruncated) as in PyTorch.
kaiming_normal_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

# kaiming_normal_(mode="fan_in", nonlinearity="relu"): std = sqrt(2 / fan_in).
kaiming_normal_fan_in = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")

# PyTorch's default Linear / Conv2d weight init, kaiming_uniform_(a=sqrt(5)), is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)); variance_scaling's uniform limit is
# sqrt(3 * scale / fan_in), so scale = 1/3 gives the same bound.
torch_default_kernel = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int) -> nnx.Initializer:
    """PyTorch's default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    A bias initialiser only sees the bias shape ``[out]``, so the fan-in of the layer
    has to be closed over.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def scale_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded half-up, at least 1 (for the ``width`` kwargs)."""
    return max(1, int(math.floor(channels * width + 0.5)))


def batch_norm(num_features: int, *, affine: bool, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """BatchNorm2d with PyTorch's momentum/epsilon; ``affine=False`` drops scale and bias.

    Scale is initialised to 1 and bias to 0 (the PyTorch default and what all reference
    models use).
    """
    return nnx.BatchNorm(
        num_features,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        use_scale=affine,
        use_bias=affine,
        rngs=rngs,
    )


def relu(x: jax.Array, train: bool) -> jax.Array:
    """``jax.nn.relu`` of a layer output that a convolution reads, e.g. ``[B, H, W, C]``.

    The same values and gradients as ``jax.nn.relu``. In a training step on XLA:CPU the ReLU
    is computed apart (:func:`card_jax.fusion.computed_apart`), once, into a buffer of its own.
    Why (benchmarks/README.md, section 20): the weight gradient of the next convolution is
    XLA's backward-filter convolution, which reads this activation with its batch and channel
    axes swapped (``[C, H, W, B]``). XLA duplicates a cheap producer such as the ReLU (or
    BN + ReLU) into each consumer, and a transpose fused with elementwise work gets XLA:CPU's
    plain element loop, where a lone transpose gets its tiled transpose kernel: 62-79 ms
    against 9-13 for the 32x32x64 activations of a batch of 128. Training steps at batch 128:
    ResNet-18 (width 16) 12%, Conv-4 6%, Conv-8 5%, VGG-11 (width 0.5) 3% faster;
    bit-identical states.

    Both branches of the conditional are the ReLU, so any run-time predicate will do: the
    sign of the first element. Outside training (evaluation, the deck's inference) nothing
    differentiates through the activation, and the plain ReLU fuses with what surrounds it.
    """
    if not train or x.size == 0:
        return jax.nn.relu(x)
    return fusion.computed_apart(jax.nn.relu, x, x.reshape(-1)[0] > 0)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2: ``[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]``.

    'SAME' padding (pads with -inf) equals PyTorch's ``MaxPool2d(2)`` for even sizes
    (every CIFAR-sized layer) and, for odd sizes, behaves like ``ceil_mode=True`` instead
    of dropping the last row/column. That keeps every spatial size >= 1, so deep plans
    (Conv-8, VGG) still run on small inputs such as 8x8.

    Even sizes take :func:`_max_pool_2x2_even`, the same values and gradients without
    XLA's select-and-scatter backward pass (4x faster on CPU; see its docstring).
    """
    if x.ndim == 4 and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
        return _max_pool_2x2_even(x)
    return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="SAME")


# Position of each element inside its 2x2 window in row-major order, laid out like
# ``_windows(x)`` ([B, H/2, 2, W/2, 2, C]); 4 marks "not a maximum".
_WINDOW_POSITION = np.arange(4, dtype=np.int8).reshape(1, 1, 2, 1, 2, 1)


def _windows(x: jax.Array) -> jax.Array:
    """``[B, H, W, C] -> [B, H/2, 2, W/2, 2, C]`` (a free reshape; H and W even)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_jvp
def _max_pool_2x2_even(x: jax.Array) -> jax.Array:
    """2x2/2 max-pool of ``[B, H, W, C]`` with even H, W: ``[B, H/2, W/2, C]``.

    Forward: a max over the reshaped windows, bit-identical to ``nnx.max_pool``.
    Derivative: the whole tangent (or cotangent) of a window goes to its FIRST maximum in
    row-major order, exactly what XLA's select-and-scatter (``lax.ge`` selection) does for
    ``nnx.max_pool``, ties included (a plain ``jnp.max`` would split it among the ties).
    Written as a JVP (linear in the tangent), so reverse mode comes from JAX's transposes: a
    broadcast and a select, fused elementwise passes. Measured on 2 CPU cores at batch 128:
    32x32x64 and 16x16x128 backward passes 22 + 8 ms instead of 95 + 48 ms with
    select-and-scatter, ~110 ms off a full-width Conv-4 training step.
    """
    return _windows(x).max(axis=(2, 4))


@_max_pool_2x2_even.defjvp
def _max_pool_2x2_even_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    xw = _windows(x)
    y = xw.max(axis=(2, 4))
    # Row-major index of each maximum, then keep the smallest per window: the first one.
    index = jnp.where(xw == y[:, :, None, :, None, :], _WINDOW_POSITION, np.int8(4))
    first = index == index.min(axis=(2, 4), keepdims=True)
    return y, jnp.sum(jnp.where(first, _windows(t), jnp.zeros((), t.dtype)), axis=(2, 4))


def pooled_size(size: int, num_pools: int) -> int:
    """Spatial size after ``num_pools`` applications of :func:`max_pool_2x2`."""
    for _ in range(num_pools):
        size = -(-size // 2)
    return size


def global_avg_pool(x: jax.Array) -> jax.Array:
    """``[B, H, W, C] -> [B, C]`` mean over the spatial axes."""
    return jnp.mean(x, axis=(1, 2))


def _as_float_tuple(values: Sequence[float], what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except TypeError as e:
        raise TypeError(f"{what} must be a sequence of floats, got {values!r}") from e


class ImageClassifier(nnx.Module):
    """Base class: stores and applies the per-channel input normalisation.

    Subclasses call ``super().__init__(...)`` first and start ``__call__`` with
    ``x = self.normalize(x)``. ``x`` is ``[B, H, W, C]`` float32 with pixels in [0, 1];
    the model normalises it as ``(x - mean) / std`` per channel, so datasets and
    corruption pipelines never have to know the statistics of the training set.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if int(in_channels) < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        mean_t = _as_float_tuple(mean, "mean")
        std_t = _as_float_tuple(std, "std")
        if len(mean_t) != in_channels or len(std_t) != in_channels:
            raise ValueError(
                f"mean and std need one entry per input channel (in_channels={in_channels}), "
                f"got mean={mean_t} and std={std_t}"
            )
        if any(not s > 0.0 for s in std_t):
            raise ValueError(f"std entries must be > 0, got {std_t}")
        # Plain Python ints / tuples are static pytree metadata in NNX: they live in the
        # graphdef, not in any Variable, so split/merge round-trips them for free.
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.mean = mean_t
        self.std = std_t

    def normalize(self, x: jax.Array) -> jax.Array:
        """Validate ``x`` ``[B, H, W, C]`` and return ``(x - mean) / std`` as float32."""
        x = jnp.asarray(x, jnp.float32)
        if x.ndim != 4:
            raise ValueError(f"{type(self).__name__} expects [B, H, W, C] input, got shape {x.shape}")
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} was built for {self.in_channels} input channel(s) "
                f"but got input of shape {x.shape} (NHWC expected)"
            )
        mean = jnp.asarray(self.mean, jnp.float32)
        std = jnp.asarray(self.std, jnp.float32)
        return (x - mean) / std
