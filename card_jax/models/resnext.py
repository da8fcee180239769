"""ResNeXt-29 (32x4d) for CIFAR (Xie et al., "Aggregated Residual Transformations", CVPR 2017).

Follows the CIFAR ResNeXt of the AugMix code (Hendrycks et al., ICLR 2020,
``third_party/ResNeXt_DenseNet/models/resnext.py``), which the "Winning Hand" paper
(Diffenderfer et al., NeurIPS 2021, App. A) uses as its ResNeXt-29:

    stem: 3x3 conv (W=64) -> BN -> ReLU
    3 stages x 3 bottleneck blocks, planes W, 2W, 4W, stride 2 at stages 2 and 3
    block: 1x1 (D*C) -> BN -> ReLU -> grouped 3x3_s (D*C, C groups) -> BN -> ReLU
           -> 1x1 (4 * planes) -> BN, + shortcut, ReLU
    global average pool -> Linear(16W -> num_classes)

with cardinality C=32, group width D = planes * base_width / W (4, 8, 16 for "32x4d"),
expansion ("widen factor") 4, so stage outputs are 256 / 512 / 1024 channels. With the
default W=64 the group width matches the reference ``floor(planes * base_width / 64)``;
the extra ``width`` kwarg (not in the reference) only exists to build tiny test versions.

Init as in the reference: convs N(0, 2 / (k*k*out)) (kaiming normal, fan_out), BN 1/0,
classifier kaiming-normal (fan_in) with zero bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from card_jax.models import layers
from card_jax.models.layers import (
    ImageClassifier,
    batch_norm,
    global_avg_pool,
    kaiming_normal_fan_in,
)
from card_jax.models.resnet import Shortcut, conv_kxk

_EXPANSION = 4
_BLOCKS_PER_STAGE = 3  # (depth 29 - 2) // 9


class ResNeXtBottleneck(nnx.Module):
    """Aggregated-transformation bottleneck: ``[B, H, W, c_in] -> [B, H/s, W/s, 4 * planes]``."""

    def __init__(
        self,
        c_in: int,
        planes: int,
        group_width: int,
        cardinality: int,
        stride: int,
        *,
        bn_affine: bool,
        rngs: nnx.Rngs,
    ) -> None:
        inner = group_width * cardinality
        c_out = planes * _EXPANSION
        self.conv_reduce = conv_kxk(c_in, inner, 1, 1, rngs)
        self.bn_reduce = batch_norm(inner, affine=bn_affine, rngs=rngs)
        # The C parallel paths of the paper (Fig. 3a) are one grouped conv (Fig. 3c):
        # kernel [3, 3, inner / C, inner], so pruning sees the real weight count.
        self.conv_conv = conv_kxk(inner, inner, 3, stride, rngs, groups=cardinality)
        self.bn = batch_norm(inner, affine=bn_affine, rngs=rngs)
        self.conv_expand = conv_kxk(inner, c_out, 1, 1, rngs)
        self.bn_expand = batch_norm(c_out, affine=bn_affine, rngs=rngs)
        self.shortcut = (
            Shortcut(c_in, c_out, stride, bn_affine=bn_affine, rngs=rngs)
            if stride != 1 or c_in != c_out
            else None
        )

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        ura = not train
        out = layers.relu(self.bn_reduce(self.conv_reduce(x), use_running_average=ura), train)
        out = layers.relu(self.bn(self.conv_conv(out), use_running_average=ura), train)
        out = self.bn_expand(self.conv_expand(out), use_running_average=ura)
        residual = x if self.shortcut is None else self.shortcut(x, train)
        return layers.relu(out + residual, train)


class ResNeXt29(ImageClassifier):
    """CIFAR ResNeXt-29 (Cx{base_width}d). Input ``[B, H, W, C]``, output ``[B, num_classes]``."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        rngs: nnx.Rngs,
        cardinality: int = 32,
        base_width: int = 4,
        width: int = 64,
        bn_affine: bool = True,
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
        for name, value in (("cardinality", cardinality), ("base_width", base_width), ("width", width)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        cardinality, base_width, width = int(cardinality), int(base_width), int(width)

        self.conv1 = conv_kxk(in_channels, width, 3, 1, rngs)
        self.bn1 = batch_norm(width, affine=bn_affine, rngs=rngs)
        blocks = []
        c_in = width
        for stage in range(3):
            planes = width * 2**stage
            # Reference: D = floor(planes * base_width / 64) with W = 64.
            group_width = max(1, planes * base_width // width)
            for i in range(_BLOCKS_PER_STAGE):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(
                    ResNeXtBottleneck(
                        c_in, planes, group_width, cardinality, stride, bn_affine=bn_affine, rngs=rngs
                    )
                )
                c_in = planes * _EXPANSION
        self.blocks = nnx.List(blocks)
        self.fc = nnx.Linear(
            c_in,
            num_classes,
            kernel_init=kaiming_normal_fan_in,
            bias_init=nnx.initializers.zeros,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """``[B, H, W, C]`` pixels in [0, 1] -> logits ``[B, num_classes]`` float32."""
        x = self.normalize(x)
        x = layers.relu(self.bn1(self.conv1(x), use_running_average=not train), train)
        for blk in self.blocks:
            x = blk(x, train)
        return self.fc(global_avg_pool(x))


def resnext29(
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    rngs: nnx.Rngs,
    cardinality: int = 32,
    base_width: int = 4,
    width: int = 64,
    bn_affine: bool = True,
) -> ResNeXt29:
    """ResNeXt-29 32x4d (AugMix CIFAR code); see :class:`ResNeXt29`."""
    return ResNeXt29(
        num_classes=num_classes,
        in_channels=in_channels,
        mean=mean,
        std=std,
        rngs=rngs,
        cardinality=cardinality,
        base_width=base_width,
        width=width,
        bn_affine=bn_affine,
    )
