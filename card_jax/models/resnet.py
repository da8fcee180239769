"""CIFAR ResNet-18 / ResNet-50 (He et al., CVPR 2016), as used by the "Winning Hand" paper.

The CIFAR variant (kuangliu/pytorch-cifar style, also the CARD repository's ResNet-18 and
the "WideResNet-18-2" of Diffenderfer et al., NeurIPS 2021, Sec. 4 / App. A): a 3x3
stride-1 stem conv -> BN -> ReLU with no max-pool, four stages with widths W, 2W, 4W, 8W
(stride 2 in the first block of stages 2-4), post-activation residual blocks (ReLU after
the residual add), global average pool and ``Linear(C_out -> num_classes)`` with bias.

* ResNet-18: BasicBlocks ``[2, 2, 2, 2]``; ``width=64`` is the standard net (11.16 M
  prunable weights), ``width=128`` the paper's WideResNet-18-2 (44.64 M).
* ResNet-50: Bottleneck blocks ``[3, 4, 6, 3]``, expansion 4 (stride on the 3x3 conv).

Projection shortcuts (1x1 conv + BN) are used whenever the stride or channel count
changes. Conv kernels use kaiming-normal (fan_out, ReLU gain); BN scale 1, bias 0; the
classifier keeps PyTorch's default Linear init.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from card_jax.models import layers
from card_jax.models.convolution import conv_general_dilated
from card_jax.models.layers import (
    ImageClassifier,
    batch_norm,
    global_avg_pool,
    kaiming_normal_fan_out,
    torch_default_bias,
    torch_default_kernel,
)


def conv_kxk(c_in: int, c_out: int, k: int, stride: int, rngs: nnx.Rngs, groups: int = 1) -> nnx.Conv:
    """Bias-free ``k x k`` conv with padding ``k // 2`` (PyTorch ``padding=1`` for 3x3).

    Explicit symmetric padding instead of 'SAME': for stride 2 on even inputs 'SAME' pads
    only bottom/right, which would shift the sampling grid relative to PyTorch.
    """
    pad = k // 2
    return nnx.Conv(
        c_in,
        c_out,
        kernel_size=(k, k),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=False,
        kernel_init=kaiming_normal_fan_out,
        conv_general_dilated=conv_general_dilated,
        rngs=rngs,
    )


class Shortcut(nnx.Module):
    """Projection shortcut: 1x1 conv (stride ``s``) -> BN. ``[B, H, W, c_in] -> [B, H/s, W/s, c_out]``."""

    def __init__(self, c_in: int, c_out: int, stride: int, *, bn_affine: bool, rngs: nnx.Rngs) -> None:
        self.conv = conv_kxk(c_in, c_out, 1, stride, rngs)
        self.bn = batch_norm(c_out, affine=bn_affine, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return self.bn(self.conv(x), use_running_average=not train)


class BasicBlock(nnx.Module):
    """Post-activation basic block (He et al. 2016, Fig. 2 left).

    ``relu(bn2(conv3x3(relu(bn1(conv3x3_s(x))))) + shortcut(x))``:
    ``[B, H, W, c_in] -> [B, H/s, W/s, planes]``.
    """

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int, *, bn_affine: bool, rngs: nnx.Rngs) -> None:
        self.conv1 = conv_kxk(c_in, planes, 3, stride, rngs)
        self.bn1 = batch_norm(planes, affine=bn_affine, rngs=rngs)
        self.conv2 = conv_kxk(planes, planes, 3, 1, rngs)
        self.bn2 = batch_norm(planes, affine=bn_affine, rngs=rngs)
        c_out = planes * self.expansion
        self.shortcut = (
            Shortcut(c_in, c_out, stride, bn_affine=bn_affine, rngs=rngs)
            if stride != 1 or c_in != c_out
            else None
        )

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        ura = not train
        out = layers.relu(self.bn1(self.conv1(x), use_running_average=ura), train)
        out = self.bn2(self.conv2(out), use_running_average=ura)
        residual = x if self.shortcut is None else self.shortcut(x, train)
        return layers.relu(out + residual, train)


class Bottleneck(nnx.Module):
    """Post-activation bottleneck block (He et al. 2016, Fig. 5 right), stride on the 3x3.

    ``1x1 (planes) -> 3x3_s (planes) -> 1x1 (4 * planes)``, BN after each, ReLU after the
    first two and after the residual add: ``[B, H, W, c_in] -> [B, H/s, W/s, 4 * planes]``.
    """

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int, *, bn_affine: bool, rngs: nnx.Rngs) -> None:
        c_out = planes * self.expansion
        self.conv1 = conv_kxk(c_in, planes, 1, 1, rngs)
        self.bn1 = batch_norm(planes, affine=bn_affine, rngs=rngs)
        self.conv2 = conv_kxk(planes, planes, 3, stride, rngs)
        self.bn2 = batch_norm(planes, affine=bn_affine, rngs=rngs)
        self.conv3 = conv_kxk(planes, c_out, 1, 1, rngs)
        self.bn3 = batch_norm(c_out, affine=bn_affine, rngs=rngs)
        self.shortcut = (
            Shortcut(c_in, c_out, stride, bn_affine=bn_affine, rngs=rngs)
            if stride != 1 or c_in != c_out
            else None
        )

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        ura = not train
        out = layers.relu(self.bn1(self.conv1(x), use_running_average=ura), train)
        out = layers.relu(self.bn2(self.conv2(out), use_running_average=ura), train)
        out = self.bn3(self.conv3(out), use_running_average=ura)
        residual = x if self.shortcut is None else self.shortcut(x, train)
        return layers.relu(out + residual, train)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(ImageClassifier):
    """CIFAR ResNet. Input ``[B, H, W, C]`` (any H, W >= 1), output ``[B, num_classes]``.

    ``block`` is ``"basic"`` or ``"bottleneck"``, ``layers`` the number of blocks per stage,
    ``width`` the stage-1 width W (stages use W, 2W, 4W, 8W).
    """

    def __init__(
        self,
        block: str,
        layers: Sequence[int],
        *,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        rngs: nnx.Rngs,
        width: int = 64,
        bn_affine: bool = True,
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
        if block not in _BLOCKS:
            raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {block!r}")
        if isinstance(width, bool) or int(width) != width or width < 1:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        width = int(width)
        block_cls = _BLOCKS[block]

        self.conv1 = conv_kxk(in_channels, width, 3, 1, rngs)
        self.bn1 = batch_norm(width, affine=bn_affine, rngs=rngs)
        blocks = []
        c_in = width
        for stage, num_blocks in enumerate(layers):
            planes = width * 2**stage
            for i in range(num_blocks):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(block_cls(c_in, planes, stride, bn_affine=bn_affine, rngs=rngs))
                c_in = planes * block_cls.expansion
        self.blocks = nnx.List(blocks)
        self.fc = nnx.Linear(
            c_in,
            num_classes,
            kernel_init=torch_default_kernel,
            bias_init=torch_default_bias(c_in),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """``[B, H, W, C]`` pixels in [0, 1] -> logits ``[B, num_classes]`` float32."""
        x = self.normalize(x)
        x = layers.relu(self.bn1(self.conv1(x), use_running_average=not train), train)
        for blk in self.blocks:
            x = blk(x, train)
        return self.fc(global_avg_pool(x))


def resnet18(
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    rngs: nnx.Rngs,
    width: int = 64,
    bn_affine: bool = True,
) -> ResNet:
    """CIFAR ResNet-18 (BasicBlocks [2, 2, 2, 2]); ``width=128`` is WideResNet-18-2."""
    return ResNet(
        "basic",
        (2, 2, 2, 2),
        num_classes=num_classes,
        in_channels=in_channels,
        mean=mean,
        std=std,
        rngs=rngs,
        width=width,
        bn_affine=bn_affine,
    )


def resnet50(
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    rngs: nnx.Rngs,
    width: int = 64,
    bn_affine: bool = True,
) -> ResNet:
    """CIFAR ResNet-50 (Bottleneck blocks [3, 4, 6, 3], expansion 4, output 32W channels)."""
    return ResNet(
        "bottleneck",
        (3, 4, 6, 3),
        num_classes=num_classes,
        in_channels=in_channels,
        mean=mean,
        std=std,
        rngs=rngs,
        width=width,
        bn_affine=bn_affine,
    )
