"""Tests for card_jax.models: shapes, state layout, prunable counts, normalisation, BN, init.

Real forward passes use tiny widths; full-size models are only traced with
``nnx.eval_shape`` so nothing big is allocated.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from card_jax.models import MODELS, build, count_prunable, model_kwargs

# Tiny variants of every registry entry, cheap enough for an eager CPU forward pass.
TINY_KWARGS = {
    "conv2": {"width": 0.125},
    "conv4": {"width": 0.125},
    "conv6": {"width": 0.125},
    "conv8": {"width": 0.125},
    "vgg11": {"width": 0.0625},
    "vgg16": {"width": 0.0625},
    "vgg19": {"width": 0.0625},
    "resnet18": {"width": 16},
    "resnet50": {"width": 2},
    "resnext29": {"width": 16, "cardinality": 4},
}

NUM_CLASSES = 7
# One input shape shared by most tests so that eagerly compiled ops are reused.
CIFAR_SHAPE = (2, 32, 32, 3)


def _rngs(seed=0):
    # The "rbg" PRNG compiles ~10x faster than threefry on CPU, and every distinct kernel
    # shape costs one compile of the initialiser; the models are agnostic to the key impl.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _build(name, *, in_channels=3, mean=None, std=None, seed=0, **kwargs):
    mean = (0.5,) * in_channels if mean is None else mean
    std = (0.25,) * in_channels if std is None else std
    return build(
        name,
        num_classes=kwargs.pop("num_classes", NUM_CLASSES),
        in_channels=in_channels,
        mean=mean,
        std=std,
        rngs=_rngs(seed),
        **kwargs,
    )


def _images(shape, seed=0):
    return jax.random.uniform(jax.random.key(seed), shape, jnp.float32)


def _abstract(name, *, in_channels=3, **kwargs):
    """Full-size model traced with eval_shape: Params hold ShapeDtypeStructs, no memory."""
    return nnx.eval_shape(
        lambda: build(
            name,
            num_classes=10,
            in_channels=in_channels,
            mean=(0.0,) * in_channels,
            std=(1.0,) * in_channels,
            rngs=nnx.Rngs(0),
            **kwargs,
        )
    )


def _leaf_items(state):
    """[(path-as-tuple-of-names, array)] of an nnx.State."""
    flat = jax.tree.flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    out = []
    for path, leaf in flat:
        names = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
        out.append((names, leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf))
    return out


def test_registry_is_complete():
    assert set(MODELS) == set(TINY_KWARGS)
    for name in MODELS:
        assert set(TINY_KWARGS[name]) <= set(model_kwargs(name))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shapes_and_state_layout(name):
    for shape in [CIFAR_SHAPE, (3, 28, 28, 1)]:
        kwargs = dict(TINY_KWARGS[name])
        if name.startswith("conv"):
            kwargs["image_size"] = shape[1]
        model = _build(name, in_channels=shape[-1], **kwargs)
        x = _images(shape)
        graphdef, state = nnx.split(model)
        # One compiled forward per mode: run eagerly, every op of a ResNet-50 compiled on
        # its own (25 s for this test alone).
        forward = jax.jit(lambda state, x, train: nnx.merge(graphdef, state)(x, train=train),
                          static_argnums=2)
        for train in (True, False):
            y = forward(state, x, train)
            assert y.shape == (shape[0], NUM_CLASSES)
            assert y.dtype == jnp.float32
            assert bool(jnp.all(jnp.isfinite(y)))
        # The training loop splits into exactly these two collections: nothing may be
        # left for a rest filter (no stored Rngs, RngState, caches, ...).
        _, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        assert len(jax.tree.leaves(rest)) == 0, rest
        assert len(jax.tree.leaves(params)) > 0
        has_bn = not name.startswith("conv")
        assert (len(jax.tree.leaves(batch_stats)) > 0) == has_bn


def test_small_inputs_work():
    # 8x8 would pool to 0x0 with floor pooling in Conv-8 / VGG; ceil-style pooling keeps 1x1.
    # (ResNets downsample with strided convs, which never reach 0x0.)
    x = _images((2, 8, 8, 3))
    for name in ("conv8", "vgg19"):
        kwargs = dict(TINY_KWARGS[name])
        if name == "conv8":
            kwargs["image_size"] = 8
        assert _build(name, **kwargs)(x, train=False).shape == (2, NUM_CLASSES)


def test_split_merge_inside_jit_matches_eager():
    # VGG-11 rather than a ResNet only because it compiles faster; the mechanism is generic.
    model = _build("vgg11", **TINY_KWARGS["vgg11"])
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    x = _images(CIFAR_SHAPE)

    @jax.jit
    def step(params, batch_stats, x):
        m = nnx.merge(graphdef, params, batch_stats)
        logits = m(x, train=True)
        return logits, nnx.state(m, nnx.BatchStat)

    logits, new_stats = step(params, batch_stats, x)
    eager = model(x, train=True)
    np.testing.assert_allclose(logits, eager, rtol=1e-4, atol=1e-5)
    for (_, a), (_, b) in zip(_leaf_items(new_stats), _leaf_items(nnx.state(model, nnx.BatchStat))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        # CIFAR ResNet-18, width 64, 10 classes (bias-free convs, projection shortcuts):
        #   stem 3*3*3*64 = 1,728
        #   stage 1: 4 * 3*3*64*64 = 147,456
        #   stage 2: 3*3*64*128 + 3*3*128*128 + 64*128 (shortcut) + 2 * 3*3*128*128 = 524,288
        #   stage 3: 3*3*128*256 + 3*3*256*256 + 128*256 + 2 * 3*3*256*256 = 2,097,152
        #   stage 4: 3*3*256*512 + 3*3*512*512 + 256*512 + 2 * 3*3*512*512 = 8,388,608
        #   fc 512*10 = 5,120                                       total 11,164,352
        ("resnet18", {}, 11_164_352),
        # Width 128 (WideResNet-18-2): every conv x4 (stem x2), fc x2 -> SPEC §9 anchor.
        #   3,456 + 589,824 + 2,097,152 + 8,388,608 + 33,554,432 + 10,240 = 44,643,712
        ("resnet18", {"width": 128}, 44_643_712),
        # Conv-4 on 32x32x3: convs 3*3*3*64 + 3*3*64*64 + 3*3*64*128 + 3*3*128*128
        #   = 1,728 + 36,864 + 73,728 + 147,456 = 259,776
        #   linears (128*8*8)*256 + 256*256 + 256*10 = 2,097,152 + 65,536 + 2,560
        #   total 2,425,024
        ("conv4", {}, 2_425_024),
        # Conv-8: convs 259,776 + 3*3*128*256 + 3*3*256*256 + 3*3*256*512 + 3*3*512*512
        #   = 259,776 + 294,912 + 589,824 + 1,179,648 + 2,359,296 = 4,683,456
        #   linears (512*2*2)*256 + 256*256 + 256*10 = 524,288 + 65,536 + 2,560
        #   total 5,275,840
        ("conv8", {}, 5_275_840),
        # VGG-16 (open_lth plan): convs 1,728 + 36,864 + 73,728 + 147,456 + 294,912
        #   + 2*589,824 + 1,179,648 + 2*2,359,296 + 3*2,359,296 = 14,710,464; fc 512*10
        #   total 14,715,584
        ("vgg16", {}, 14_715_584),
    ],
)
def test_prunable_counts(name, kwargs, expected):
    abstract = _abstract(name, **kwargs)
    assert count_prunable(nnx.state(abstract, nnx.Param)) == expected
    assert count_prunable(abstract) == expected


def test_prunable_count_tiny_conv4_fashion_mnist():
    # Conv-4, width 0.25 on 28x28x1: channels 16,16,32,32, hidden 64.
    #   convs 3*3*1*16 + 3*3*16*16 + 3*3*16*32 + 3*3*32*32 = 144 + 2,304 + 4,608 + 9,216 = 16,272
    #   pooled 28 -> 14 -> 7: linears (7*7*32)*64 + 64*64 + 64*10 = 100,352 + 4,096 + 640
    #   total 121,360
    model = _abstract("conv4", in_channels=1, width=0.25, image_size=28)
    assert count_prunable(model) == 121_360


def test_count_prunable_only_counts_kernels():
    tree = {
        "conv": {"kernel": np.zeros((3, 3, 2, 4)), "bias": np.zeros((4,))},
        "bn": {"scale": np.zeros((4,)), "bias": np.zeros((4,))},
        "dense": {"kernel": np.zeros((4, 5))},
        "odd": {"kernel": np.zeros((6,))},  # 1-D "kernel" is not a conv/dense weight
    }
    assert count_prunable(tree) == 3 * 3 * 2 * 4 + 4 * 5
    # nnx.State from a real model and its pure-dict form agree.
    params = nnx.state(_build("resnet18", **TINY_KWARGS["resnet18"]), nnx.Param)
    assert count_prunable(params) == count_prunable(nnx.to_pure_dict(params))


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("name", ["conv2", "vgg11", "resnet18", "resnext29"])
def test_normalisation_is_first_op(name):
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    kwargs = dict(TINY_KWARGS[name])
    # Same seed -> same weights: mean/std never influence initialisation.
    normalised = _build(name, mean=mean, std=std, **kwargs)
    identity = _build(name, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **kwargs)
    x = _images(CIFAR_SHAPE)
    by_hand = (x - jnp.asarray(mean)) / jnp.asarray(std)
    np.testing.assert_allclose(
        normalised(x, train=False), identity(by_hand, train=False), rtol=1e-4, atol=1e-5
    )
    # ... and the constants matter (the model does not silently ignore them).
    assert not np.allclose(normalised(x, train=False), identity(x, train=False), atol=1e-3)
    # Constants are plain Python floats, not arrays or Variables.
    assert normalised.mean == mean and all(type(v) is float for v in normalised.std)


def test_input_validation():
    model = _build("conv2", width=0.125)
    with pytest.raises(ValueError, match="input channel"):
        model(_images((1, 32, 32, 1)), train=False)
    with pytest.raises(ValueError, match="image_size"):
        model(_images((1, 28, 28, 3)), train=False)
    with pytest.raises(ValueError, match="one entry per input channel"):
        _build("resnet18", in_channels=3, mean=(0.5,), std=(0.25,))
    with pytest.raises(ValueError, match="std"):
        _build("resnet18", mean=(0.5,) * 3, std=(0.2, 0.0, 0.2))


# --------------------------------------------------------------------------- batch norm


def _batch_stats(model):
    return {names: np.array(v) for names, v in _leaf_items(nnx.state(model, nnx.BatchStat))}


def test_batchnorm_train_updates_eval_does_not():
    model = _build("resnet18", **TINY_KWARGS["resnet18"])
    x = _images(CIFAR_SHAPE)
    before = _batch_stats(model)

    model(x, train=False)
    after_eval = _batch_stats(model)
    assert before.keys() == after_eval.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after_eval[k])

    model(x, train=True)
    after_train = _batch_stats(model)
    changed = [k for k in before if not np.allclose(before[k], after_train[k])]
    assert len(changed) == len(before), "every BN layer should update its running stats"

    # PyTorch momentum 0.1: running_mean = 0.9 * 0 + 0.1 * batch_mean for the stem BN.
    h = model.conv1(model.normalize(x))
    np.testing.assert_allclose(
        after_train[("bn1", "mean")], 0.1 * np.asarray(jnp.mean(h, axis=(0, 1, 2))), rtol=1e-4, atol=1e-6
    )


def test_bn_affine_false_has_no_bn_params():
    for name in ("resnet18", "vgg11", "resnext29"):
        model = _build(name, bn_affine=False, **TINY_KWARGS[name])
        names = {path[-1] for path, _ in _leaf_items(nnx.state(model, nnx.Param))}
        assert "scale" not in names
        bn_stats = _leaf_items(nnx.state(model, nnx.BatchStat))
        assert bn_stats, "BN still tracks running statistics without affine parameters"
        assert model(_images(CIFAR_SHAPE), train=True).shape == (2, NUM_CLASSES)


# --------------------------------------------------------------------------- init


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext29"])
def test_resnet_init_statistics(name):
    model = _build(name, **TINY_KWARGS[name])
    checked = 0
    for path, value in _leaf_items(nnx.state(model, nnx.Param)):
        value = np.asarray(value)
        if path[-1] == "kernel" and value.ndim == 4:
            kh, kw, _, c_out = value.shape
            if value.size < 1000:  # relative std error ~1/sqrt(2n): 10% is > 4.5 sigma here
                continue
            expected = math.sqrt(2.0 / (kh * kw * c_out))  # kaiming normal, fan_out, ReLU
            assert abs(value.std() / expected - 1.0) < 0.1, (path, value.std(), expected)
            assert abs(value.mean()) < 0.1 * expected, path
            checked += 1
        elif path[-1] == "scale":
            np.testing.assert_array_equal(value, 1.0)
        elif path[-1] == "bias" and path[0] != "fc":
            np.testing.assert_array_equal(value, 0.0)
    assert checked >= 5


# --------------------------------------------------------------------------- errors


def test_unknown_model_name():
    with pytest.raises(ValueError, match="valid names:.*resnet18"):
        _build("resnet19")


def test_unknown_kwarg_is_named():
    with pytest.raises(TypeError, match="widht"):
        _build("conv4", widht=0.5)
    # A kwarg valid for another model is still rejected.
    with pytest.raises(TypeError, match="image_size"):
        _build("resnet18", image_size=32)


def test_convnet_pools_before_relu_with_relu_then_pool_values_and_gradients():
    """Conv-k applies ReLU after its max-pools (cheaper); that must be the paper's
    conv -> ReLU -> pool exactly: same logits and gradients, bit for bit, also when whole
    windows are negative or tied (integer-valued inputs and kernels make many ties)."""
    from card_jax.models import convolution
    from card_jax.models.layers import max_pool_2x2

    model = build("conv4", num_classes=10, in_channels=1, mean=(0.0,), std=(1.0,),
                  width=0.125, image_size=8, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rounded = jax.tree.map(lambda p: jnp.round(4 * p) / 4, params)  # many ties
    x = jnp.round(jax.random.normal(jax.random.key(1), (6, 8, 8, 1)) * 2)
    y = jnp.arange(6) % 10

    def reference(m, x):  # conv -> ReLU -> pool, as in the paper's Conv-k
        for i, conv in enumerate(m.convs):
            x = jax.nn.relu(conv(x))
            if i % 2 == 1:
                x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        for linear in m.linears[:-1]:
            x = jax.nn.relu(linear(x))
        return m.linears[-1](x)

    def loss(params, forward):
        logits = forward(nnx.merge(graphdef, params), x)
        return jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)), logits

    with convolution.xla_convolutions():  # the same convolutions in both
        (_, got), g_got = jax.value_and_grad(loss, has_aux=True)(
            rounded, lambda m, x: m(x, train=True))
        (_, want), g_want = jax.value_and_grad(loss, has_aux=True)(rounded, reference)
    np.testing.assert_array_equal(got, want)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_array_equal(a, b)
    assert any(float(jnp.abs(a).sum()) > 0 for a in jax.tree.leaves(g_got))


@pytest.mark.parametrize("train", [False, True])
def test_layer_relu_is_jax_relu_in_values_and_gradients(train):
    """`layers.relu` gives `jax.nn.relu`'s values and gradients (0 at 0), also under vmap
    (where the training form's predicate is batched)."""
    from card_jax.models import layers

    x = jnp.asarray([[-2.0, -0.0, 0.0, 0.5], [3.0, -1e-30, 1e-30, -7.0]])
    np.testing.assert_array_equal(layers.relu(x, train),
                                  np.float32([[0, 0, 0, 0.5], [3, 0, 1e-30, 0]]))
    weights = jnp.arange(1.0, 9.0).reshape(2, 4)
    got = jax.grad(lambda x: jnp.sum(weights * layers.relu(x, train)))(x)
    want = jax.grad(lambda x: jnp.sum(weights * jax.nn.relu(x)))(x)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, [[0, 0, 0, 4], [5, 0, 7, 0]])
    batched = jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(weights[0] * layers.relu(x, train)))))
    np.testing.assert_array_equal(batched(x), weights[0] * (x > 0))


def test_training_relu_is_not_fused_into_the_weight_gradient_transpose():
    """On CPU the weight gradient of a convolution reads its input with batch and channels
    swapped. With the training ReLU that transpose reads the ReLU's own buffer (a fused
    ReLU + transpose is XLA:CPU's slow element loop; benchmarks/README.md, section 20);
    the evaluation form leaves XLA free to fuse."""
    import re

    from card_jax.models import layers

    z = jax.random.normal(jax.random.key(0), (8, 8, 8, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 4))

    def loss(w, z, train):
        a = layers.relu(z, train)
        y = jax.lax.conv_general_dilated(a, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y ** 2)

    def fused_relu_transposes(train):
        hlo = jax.jit(jax.grad(loss), static_argnums=2).lower(w, z, train).compile().as_text()
        computations = re.split(r"\n(?=%|ENTRY)", hlo)
        return [c.split("\n")[0] for c in computations
                if " transpose(" in c and " maximum(" in c]

    assert fused_relu_transposes(train=False)  # what XLA does with a plain ReLU here
    assert fused_relu_transposes(train=True) == []
    np.testing.assert_array_equal(jax.grad(loss)(w, z, True), jax.grad(loss)(w, z, False))
