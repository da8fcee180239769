"""Model zoo of the "Winning Hand" paper (Diffenderfer et al., NeurIPS 2021, Sec. 4, App. A).

All models are pruning-agnostic Flax NNX modules: pruning transforms the parameter pytree
from the outside. A model holds only ``nnx.Param`` and ``nnx.BatchStat`` variables, so

    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)

captures its whole state and ``nnx.merge(graphdef, params, batch_stats)`` rebuilds it
(inside ``jax.jit`` too). Every model is called as ``model(x, train)`` with ``x``
``[B, H, W, C]`` float32 pixels in [0, 1] (normalised inside the model with the
``mean``/``std`` given at construction) and returns logits ``[B, num_classes]`` float32.

Registry (``MODELS``) and model-specific kwargs:

* ``conv2``, ``conv4``, ``conv6``, ``conv8``: ``width: float = 1.0``, ``image_size = 32``
* ``vgg11``, ``vgg16``, ``vgg19``: ``width: float = 1.0``, ``bn_affine: bool = True``
* ``resnet18``, ``resnet50``: ``width: int = 64``, ``bn_affine: bool = True``
* ``resnext29``: ``cardinality = 32``, ``base_width = 4``, ``width: int = 64``,
  ``bn_affine: bool = True``
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from card_jax.models.conv import ConvNet, conv2, conv4, conv6, conv8
from card_jax.models.layers import ImageClassifier
from card_jax.models.resnet import ResNet, resnet18, resnet50
from card_jax.models.resnext import ResNeXt29, resnext29
from card_jax.models.vgg import VGG, vgg11, vgg16, vgg19

__all__ = [
    "MODELS",
    "ConvNet",
    "ImageClassifier",
    "ResNeXt29",
    "ResNet",
    "VGG",
    "build",
    "count_prunable",
    "model_kwargs",
]

MODELS: dict[str, Callable[..., nnx.Module]] = {
    "conv2": conv2,
    "conv4": conv4,
    "conv6": conv6,
    "conv8": conv8,
    "vgg11": vgg11,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "resnext29": resnext29,
}

# Arguments every factory takes; everything else is model-specific.
_COMMON_ARGS = frozenset({"num_classes", "in_channels", "mean", "std", "rngs"})


def _lookup(name: str) -> Callable[..., nnx.Module]:
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}") from None


def model_kwargs(name: str) -> dict[str, Any]:
    """The model-specific keyword arguments of ``name`` and their defaults."""
    params = inspect.signature(_lookup(name)).parameters
    return {k: p.default for k, p in params.items() if k not in _COMMON_ARGS}


def build(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    rngs: nnx.Rngs,
    **kwargs: Any,
) -> nnx.Module:
    """Build model ``name`` from :data:`MODELS`.

    Raises ``ValueError`` for an unknown name (listing the valid ones) and ``TypeError``
    naming any keyword argument the model does not accept (checked up front, so a typo
    such as ``widht=`` never silently falls back to a default).
    """
    factory = _lookup(name)
    accepted = model_kwargs(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"model {name!r} got unknown keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"it accepts: {', '.join(sorted(accepted)) or '(none)'}"
        )
    return factory(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, rngs=rngs, **kwargs)


def _key_name(key: Any) -> Any:
    """The name in one pytree path entry (dict key, attribute name or sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def count_prunable(params: Any) -> int:
    """Number of prunable weights: elements of every leaf named ``kernel`` with ndim >= 2.

    These are exactly the conv (``[kh, kw, in/groups, out]``) and dense (``[in, out]``)
    weights; biases and BN scale/bias are never counted. ``params`` may be an
    ``nnx.State`` (e.g. from ``nnx.split``), a pure nested dict, an abstract state from
    ``nnx.eval_shape`` (``ShapeDtypeStruct`` leaves) or a module (its ``nnx.Param``s).
    """
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    leaves = jax.tree.flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    total = 0
    for path, leaf in leaves:
        if isinstance(leaf, nnx.Variable):
            leaf = leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
        if not path or _key_name(path[-1]) != "kernel":
            continue
        shape = tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape)
        if len(shape) >= 2:
            total += int(np.prod(shape))
    return total
