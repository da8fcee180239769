"""CIFAR VGG-11/16/19 with batch norm, as in open_lth ``models/cifar_vgg.py``.

The CIFAR variant of VGG (Simonyan & Zisserman, 2015) used by the lottery-ticket
literature (Frankle et al., "Linear Mode Connectivity and the LTH", ICML 2020) and by the
"Winning Hand" paper (Diffenderfer et al., NeurIPS 2021, App. A): every plan entry is
``3x3 conv (with bias) -> BN -> ReLU``, ``'M'`` is a 2x2 max-pool, and the classifier is a
single ``Linear(512 -> num_classes)`` on globally average-pooled features (open_lth's
``AvgPool2d(2)`` on the final 2x2 map of a 32x32 input is exactly a global average pool;
the global pool keeps any input size working).
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
    kaiming_normal_fan_in,
    max_pool_2x2,
    scale_channels,
    torch_default_bias,
)

# open_lth cifar_vgg plans; 'M' = 2x2 max-pool.
PLANS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    19: (
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512,
    ),
}


class _ConvBN(nnx.Module):
    """``3x3 conv (bias) -> BN -> ReLU``: ``[B, H, W, c_in] -> [B, H, W, c_out]``."""

    def __init__(self, c_in: int, c_out: int, *, bn_affine: bool, rngs: nnx.Rngs) -> None:
        # open_lth initialises conv/linear weights with kaiming_normal_ (fan_in, ReLU gain)
        # and leaves biases at PyTorch's default U(+-1/sqrt(fan_in)).
        self.conv = nnx.Conv(
            c_in,
            c_out,
            kernel_size=(3, 3),
            padding="SAME",
            use_bias=True,
            kernel_init=kaiming_normal_fan_in,
            bias_init=torch_default_bias(9 * c_in),
            conv_general_dilated=conv_general_dilated,
            rngs=rngs,
        )
        self.bn = batch_norm(c_out, affine=bn_affine, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return layers.relu(self.bn(self.conv(x), use_running_average=not train), train)


class VGG(ImageClassifier):
    """CIFAR VGG-``depth`` with BN. Input ``[B, H, W, C]``, output ``[B, num_classes]``."""

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
        bn_affine: bool = True,
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
        if depth not in PLANS:
            raise ValueError(f"VGG depth must be one of {sorted(PLANS)}, got {depth}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        # The plan (ints and 'M') is static structure, stored as a plain tuple so that
        # __call__ can walk it alongside the conv modules; pools have no parameters.
        layers: list[_ConvBN] = []
        c_in = in_channels
        for entry in PLANS[depth]:
            if entry == "M":
                continue
            c_out = scale_channels(int(entry), width)
            layers.append(_ConvBN(c_in, c_out, bn_affine=bn_affine, rngs=rngs))
            c_in = c_out
        self.plan = PLANS[depth]
        self.layers = nnx.List(layers)
        self.fc = nnx.Linear(
            c_in,
            num_classes,
            kernel_init=kaiming_normal_fan_in,
            bias_init=torch_default_bias(c_in),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """``[B, H, W, C]`` pixels in [0, 1] -> logits ``[B, num_classes]`` float32."""
        x = self.normalize(x)
        i = 0
        for entry in self.plan:
            if entry == "M":
                x = max_pool_2x2(x)
            else:
                x = self.layers[i](x, train)
                i += 1
        return self.fc(global_avg_pool(x))


def _vgg_factory(depth: int):
    def factory(
        *,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        rngs: nnx.Rngs,
        width: float = 1.0,
        bn_affine: bool = True,
    ) -> VGG:
        return VGG(
            depth,
            num_classes=num_classes,
            in_channels=in_channels,
            mean=mean,
            std=std,
            rngs=rngs,
            width=width,
            bn_affine=bn_affine,
        )

    factory.__name__ = f"vgg{depth}"
    factory.__qualname__ = f"vgg{depth}"
    factory.__doc__ = f"CIFAR VGG-{depth} with BN (open_lth cifar_vgg); see :class:`VGG`."
    return factory


vgg11 = _vgg_factory(11)
vgg16 = _vgg_factory(16)
vgg19 = _vgg_factory(19)
