"""Conv-2/4/6/8: the small VGG-like networks of the Lottery Ticket Hypothesis.

Architecture as in Frankle & Carbin (ICLR 2019, Fig. 2) and its replication in
hidden-networks (Ramanujan et al., CVPR 2020, ``models/frankle.py``), used by the
"Winning Hand" paper (Diffenderfer et al., NeurIPS 2021, Sec. 4 / App. A) for its
Conv-k experiments:

    [3x3 conv -> ReLU] x 2 -> 2x2 max-pool, repeated k/2 times with widths 64, 128, 256, 512
    flatten -> linear 256 -> ReLU -> linear 256 -> ReLU -> linear num_classes

No batch norm and no biases anywhere. The reference implements the three "linear" layers
as 1x1 convolutions on the flattened ``[B, D, 1, 1]`` tensor; a dense layer on ``[B, D]``
is the same function with the same number of weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from card_jax.models import layers
from card_jax.models.convolution import conv_general_dilated
from card_jax.models.layers import (
    ImageClassifier,
    kaiming_normal_fan_in,
    max_pool_2x2,
    pooled_size,
    scale_channels,
)

# Channels of each conv pair, one pair per max-pool (hidden-networks models/frankle.py).
_STAGE_WIDTHS = (64, 128, 256, 512)
_HIDDEN = 256


class ConvNet(ImageClassifier):
    """Conv-k for k in {2, 4, 6, 8}.

    Input ``[B, H, W, C]`` with ``(H, W) == image_size``; output logits ``[B, num_classes]``.
    The flatten size of the first linear layer is fixed at construction from
    ``image_size`` (the reference hard-codes 32x32, e.g. ``64 * 16 * 16`` for Conv-2).

    Weights use kaiming-normal (fan_in, ReLU gain), the dense-training setting of the
    hidden-networks builder.
    """

    def __init__(
        self,
        depth: int,
        *,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        rngs: nnx.Rngs,
        width: float = 1.0,
        image_size: int | Sequence[int] = 32,
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
        if depth not in (2, 4, 6, 8):
            raise ValueError(f"Conv-k depth must be 2, 4, 6 or 8, got {depth}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        height, width_px = (int(s) for s in image_size)
        if height < 1 or width_px < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = (height, width_px)

        convs = []
        c_in = in_channels
        num_pools = depth // 2
        for stage in range(num_pools):
            c_out = scale_channels(_STAGE_WIDTHS[stage], width)
            for _ in range(2):
                convs.append(
                    nnx.Conv(
                        c_in,
                        c_out,
                        kernel_size=(3, 3),
                        padding="SAME",
                        use_bias=False,
                        kernel_init=kaiming_normal_fan_in,
                        conv_general_dilated=conv_general_dilated,
                        rngs=rngs,
                    )
                )
                c_in = c_out
        self.convs = nnx.List(convs)

        flat = pooled_size(height, num_pools) * pooled_size(width_px, num_pools) * c_in
        hidden = scale_channels(_HIDDEN, width)
        dims = (flat, hidden, hidden, num_classes)
        self.linears = nnx.List(
            [
                nnx.Linear(d_in, d_out, use_bias=False, kernel_init=kaiming_normal_fan_in, rngs=rngs)
                for d_in, d_out in zip(dims[:-1], dims[1:])
            ]
        )

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """``[B, H, W, C]`` pixels in [0, 1] -> logits ``[B, num_classes]`` float32.

        ``train`` picks the training step's ReLU (:func:`layers.relu`, the same values); Conv-k
        has no BN or dropout.
        """
        x = self.normalize(x)
        if tuple(x.shape[1:3]) != self.image_size:
            raise ValueError(
                f"{type(self).__name__} was built for image_size={self.image_size} "
                f"(its first linear layer depends on it) but got input of shape {x.shape}; "
                "pass image_size=(H, W) when building the model"
            )
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i % 2 == 1:
                # relu(pool(x)) is pool(relu(x)) (max commutes with a monotone function), with
                # the same gradient: both route a window's cotangent to its first maximum
                # when it is positive, and give zero otherwise. The ReLU then runs on a
                # quarter of the elements (and its backward pass too).
                x = max_pool_2x2(x)
            x = layers.relu(x, train)
        x = x.reshape(x.shape[0], -1)
        for linear in self.linears[:-1]:
            x = jax.nn.relu(linear(x))
        return self.linears[-1](x)


def _conv_factory(depth: int):
    def factory(
        *,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        rngs: nnx.Rngs,
        width: float = 1.0,
        image_size: int | Sequence[int] = 32,
    ) -> ConvNet:
        return ConvNet(
            depth,
            num_classes=num_classes,
            in_channels=in_channels,
            mean=mean,
            std=std,
            rngs=rngs,
            width=width,
            image_size=image_size,
        )

    factory.__name__ = f"conv{depth}"
    factory.__qualname__ = f"conv{depth}"
    factory.__doc__ = f"Conv-{depth} (Frankle & Carbin 2019); see :class:`ConvNet`."
    return factory


conv2 = _conv_factory(2)
conv4 = _conv_factory(4)
conv6 = _conv_factory(6)
conv8 = _conv_factory(8)
