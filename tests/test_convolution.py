"""card_jax.models.convolution: the CPU im2col passes against XLA's own convolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from card_jax.models import convolution, conv4, resnet18

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(autouse=True)
def im2col_on():
    """The tests below are of the im2col passes: on, whatever XLA's convolutions here."""
    with convolution.cpu_im2col():
        yield


def test_im2col_only_against_ynnpack_convolutions(monkeypatch):
    x, w = jnp.ones((2, 8, 8, 64)), jnp.ones((3, 3, 64, 64))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)

    def names():
        jaxpr = jax.make_jaxpr(lambda x, w: jax.grad(lambda w: convolution.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=dn).sum())(w))(x, w)
        return str(jaxpr)

    assert " scan[" in names()  # inside cpu_im2col (the fixture)
    with monkeypatch.context() as m:
        m.setattr(convolution, "_im2col_depth", 0)
        m.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution")
        assert not convolution.im2col_enabled()
        assert convolution.im2col_passes(64, 64, (1, 1)) == (False, False, False)
        assert " scan[" not in names() and "platform_index" not in names()
        assert convolution.uses_tap_sum(1)  # the grey first layer's tap sum stays
        m.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
        assert convolution.im2col_enabled()
        assert " scan[" in names()


def test_accelerator_backends_take_plain_xla_convolutions(monkeypatch):
    """With an accelerator as default backend the traced gradient is JAX's own: no custom VJP
    (whose flipped-kernel input gradient cost 20% of the Conv-4 step on an H200)."""
    x, w = jnp.ones((2, 8, 8, 64)), jnp.ones((3, 3, 64, 64))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)

    def grad_jaxpr(conv):
        return str(jax.make_jaxpr(lambda x, w: jax.grad(lambda w: conv(
            x, w, (1, 1), "SAME", dimension_numbers=dn).sum())(w))(x, w))

    assert "platform_index" in grad_jaxpr(convolution.conv_general_dilated)  # CPU: im2col
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert (grad_jaxpr(convolution.conv_general_dilated)
            == grad_jaxpr(lax.conv_general_dilated))


def _xla(x, w, strides, padding):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)


def _ours(x, w, strides, padding):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    return convolution.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)


CASES = [
    # batch, size, C, O, kernel, stride, padding: which passes take im2col (im2col_passes)
    (4, 8, 64, 40, 3, 1, "SAME"),  # all three
    (3, 9, 64, 8, 3, 2, ((1, 1), (1, 1))),  # strided (weight gradient only), odd batch/size
    (4, 8, 64, 6, 1, 2, "VALID"),  # ResNet's projection shortcut
    (2, 7, 40, 36, 3, 1, "VALID"),  # forward and input gradient, XLA's weight gradient
    (1, 6, 64, 64, 3, 1, ((2, 0), (0, 1))),  # batch 1, asymmetric padding
    (5, 6, 80, 8, 3, 1, "SAME"),  # weight gradient only
    (2, 6, 8, 48, 3, 1, "SAME"),  # input gradient only
    (3, 8, 1, 16, 3, 1, "SAME"),  # tap-sum forward (a grey first layer), XLA's gradients
    (2, 9, 1, 8, 3, 2, ((1, 1), (1, 1))),  # tap sum, strided, odd size
    (2, 7, 1, 5, 1, 1, "VALID"),  # tap sum, 1x1 kernel
    (2, 8, 3, 16, 3, 1, "SAME"),  # RGB first layer: plain lax
]


@pytest.mark.parametrize("batch,size,c,o,k,s,padding", CASES)
def test_forward_and_gradients_match_xla(batch, size, c, o, k, s, padding):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, size, size, c))
    w = jax.random.normal(kw, (k, k, c, o))
    want, xla_vjp = jax.vjp(lambda x, w: _xla(x, w, (s, s), padding), x, w)
    got, our_vjp = jax.jit(lambda x, w: jax.vjp(
        lambda x, w: _ours(x, w, (s, s), padding), x, w))(x, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    g = jax.random.normal(kg, want.shape)
    for mine, ref in zip(jax.jit(our_vjp)(g), xla_vjp(g)):
        np.testing.assert_allclose(mine, ref, rtol=1e-5, atol=1e-4)


def test_weight_gradient_by_hand():
    """Literal cases worked out by hand."""
    # x: one 2x2 image, one channel; kernel 2x2 VALID -> one output pixel y = sum x * w.
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    g = jnp.array([10.0]).reshape(1, 1, 1, 1)
    dw = convolution.weight_grad_im2col(x, g, kernel_shape=(2, 2, 1, 1), strides=(1, 1),
                                        pads=((0, 0), (0, 0)))
    # dL/dw[i, j] = g * x[i, j]
    np.testing.assert_array_equal(dw[..., 0, 0], [[10.0, 20.0], [30.0, 40.0]])
    # SAME padding, 3x3 kernel of ones: each output is the sum of its (zero-padded) window.
    y = convolution.conv_im2col(x, jnp.ones((3, 3, 1, 1)), strides=(1, 1),
                                pads=((1, 1), (1, 1)))
    np.testing.assert_array_equal(y[0, ..., 0], [[10.0, 10.0], [10.0, 10.0]])


def test_tap_sum_by_hand():
    # One 2x2 grey image, SAME 3x3: every output sums its zero-padded window, scaled per
    # output channel (ones and twos).
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    w = jnp.stack([jnp.ones((3, 3, 1)), 2 * jnp.ones((3, 3, 1))], axis=-1)
    y = convolution.conv_tap_sum(x, w, strides=(1, 1), pads=((1, 1), (1, 1)))
    np.testing.assert_array_equal(y[0, ..., 0], [[10.0, 10.0], [10.0, 10.0]])
    np.testing.assert_array_equal(y[0, ..., 1], [[20.0, 20.0], [20.0, 20.0]])
    # Only the centre tap, stride 2 on a 3x3 image: the corners, times 3.
    x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    w = jnp.zeros((3, 3, 1, 1)).at[1, 1, 0, 0].set(3.0)
    y = convolution.conv_tap_sum(x, w, strides=(2, 2), pads=((1, 1), (1, 1)))
    np.testing.assert_array_equal(y[0, ..., 0], [[0.0, 6.0], [18.0, 24.0]])


def test_tap_sum_layer_keeps_xla_gradients_exactly():
    """A first layer's forward is the tap sum; its weight gradient is XLA's, bit for bit."""
    x = jax.random.uniform(jax.random.key(11), (4, 8, 8, 1))
    w = jax.random.normal(jax.random.key(12), (3, 3, 1, 16))
    g = jax.random.normal(jax.random.key(13), (4, 8, 8, 16))
    _, ours = jax.vjp(lambda w: _ours(x, w, (1, 1), "SAME"), w)
    _, xla = jax.vjp(lambda w: _xla(x, w, (1, 1), "SAME"), w)
    np.testing.assert_array_equal(jax.jit(ours)(g)[0], jax.jit(xla)(g)[0])


@pytest.mark.parametrize("chunk_bytes", [1, 600, 10**9])
def test_chunking_does_not_change_results(chunk_bytes):
    x = jax.random.normal(jax.random.key(1), (6, 5, 5, 3))
    w = jax.random.normal(jax.random.key(2), (3, 3, 3, 4))
    g = jax.random.normal(jax.random.key(3), (6, 5, 5, 4))
    pads = ((1, 1), (1, 1))
    np.testing.assert_allclose(
        convolution.conv_im2col(x, w, strides=(1, 1), pads=pads, chunk_bytes=chunk_bytes),
        _xla(x, w, (1, 1), "SAME"), rtol=1e-5, atol=1e-5)
    _, vjp = jax.vjp(lambda w: _xla(x, w, (1, 1), "SAME"), w)
    np.testing.assert_allclose(
        convolution.weight_grad_im2col(x, g, kernel_shape=w.shape, strides=(1, 1), pads=pads,
                                       chunk_bytes=chunk_bytes),
        vjp(g)[0], rtol=1e-5, atol=1e-4)


def test_width_taps_by_hand():
    """One 1x3 image, two channels, kernel width 2 with one pixel of padding on each side:
    row (r, x) holds pixels x and x + 1 of the padded row r, channels side by side."""
    x = jnp.array([[[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]]]).reshape(1, 1, 3, 2)
    x_pad = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))  # [1, 1, 5, 2]
    np.testing.assert_array_equal(convolution.width_taps(x_pad, 2, 4, 1), [
        [0.0, 0.0, 1.0, 10.0], [1.0, 10.0, 2.0, 20.0], [2.0, 20.0, 3.0, 30.0],
        [3.0, 30.0, 0.0, 0.0]])
    # Stride 2 along the width: windows at x = 0 and 2 of the padded row.
    np.testing.assert_array_equal(convolution.width_taps(x_pad, 2, 2, 2), [
        [0.0, 0.0, 1.0, 10.0], [2.0, 20.0, 3.0, 30.0]])


def test_row_taps_by_hand():
    """Two 2x2 images (a chunk of 2: rows straddling them must not leak into either)."""
    x = jnp.array([[1.0, 2.0], [3.0, 4.0], [100.0, 200.0], [300.0, 400.0]]).reshape(2, 2, 2, 1)
    ones = jnp.ones((3, 3, 1, 1))
    y = convolution.conv_row_taps(x, ones, strides=(1, 1), pads=((1, 1), (1, 1)),
                                  chunk_bytes=10**9)
    np.testing.assert_array_equal(y[..., 0], [[[10.0, 10.0], [10.0, 10.0]],
                                              [[1000.0, 1000.0], [1000.0, 1000.0]]])
    # Only the bottom-right tap: output (y, x) reads input (y + 1, x + 1), zero outside.
    corner = jnp.zeros((3, 3, 1, 1)).at[2, 2, 0, 0].set(1.0)
    y = convolution.conv_row_taps(x, corner, strides=(1, 1), pads=((1, 1), (1, 1)))
    np.testing.assert_array_equal(y[..., 0], [[[4.0, 0.0], [0.0, 0.0]],
                                              [[400.0, 0.0], [0.0, 0.0]]])
    # Weight gradient of a 2x2 VALID kernel on one 2x2 image: dL/dw[i, j] = g * x[i, j],
    # summed over both images.
    g = jnp.array([10.0, 1.0]).reshape(2, 1, 1, 1)
    dw = convolution.weight_grad_row_taps(x, g, kernel_shape=(2, 2, 1, 1), strides=(1, 1),
                                          pads=((0, 0), (0, 0)), chunk_bytes=10**9)
    np.testing.assert_array_equal(dw[..., 0, 0], [[110.0, 220.0], [330.0, 440.0]])


@pytest.mark.parametrize("batch,size,c,o,k,stride_x,pads,chunk_bytes", [
    (4, 9, 5, 3, 3, 1, ((1, 1), (1, 1)), 1),  # one image per chunk
    (4, 9, 5, 3, 3, 1, ((1, 1), (1, 1)), 10**9),  # the whole batch in one chunk
    (3, 8, 4, 6, 3, 2, ((2, 0), (0, 1)), 10**9),  # asymmetric padding, horizontal stride
    (2, 7, 3, 2, 1, 1, ((0, 0), (0, 0)), 10**9),  # 1x1 kernel
    (6, 6, 2, 3, 5, 1, ((2, 2), (2, 2)), 3000),  # 5x5 kernel, chunks of 2 images
])
def test_row_taps_match_xla(batch, size, c, o, k, stride_x, pads, chunk_bytes):
    kx, kw, kg = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(kx, (batch, size, size, c))
    w = jax.random.normal(kw, (k, k, c, o))
    want, vjp = jax.vjp(lambda w: _xla(x, w, (1, stride_x), pads), w)
    got = convolution.conv_row_taps(x, w, strides=(1, stride_x), pads=pads,
                                    chunk_bytes=chunk_bytes)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    g = jax.random.normal(kg, want.shape)
    dw = convolution.weight_grad_row_taps(x, g, kernel_shape=w.shape, strides=(1, stride_x),
                                          pads=pads, chunk_bytes=chunk_bytes)
    np.testing.assert_allclose(dw, vjp(g)[0], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="vertical stride"):
        convolution.conv_row_taps(x, w, strides=(2, 1), pads=pads)


def test_large_images_take_row_taps_in_the_forward_pass(monkeypatch):
    """The forward pass (and stride-1 input gradient) of a 64-channel layer goes through row
    taps from `ROW_TAPS_FORWARD_MIN_PIXELS` output pixels, im2col below; both match XLA."""
    x = jax.random.normal(jax.random.key(8), (2, 8, 8, 64))
    w = jax.random.normal(jax.random.key(9), (3, 3, 64, 48))
    want, xla_vjp = jax.vjp(lambda x, w: _xla(x, w, (1, 1), "SAME"), x, w)
    g = jax.random.normal(jax.random.key(10), want.shape)
    for min_pixels, used in [(64, "conv_row_taps"), (65, "conv_im2col")]:
        monkeypatch.setattr(convolution, "ROW_TAPS_FORWARD_MIN_PIXELS", min_pixels)
        calls = []
        real = getattr(convolution, used)
        monkeypatch.setattr(convolution, used,
                            lambda *a, _real=real, **kw: calls.append(1) or _real(*a, **kw))
        got, our_vjp = jax.vjp(lambda x, w: _ours(x, w, (1, 1), "SAME"), x, w)
        grads = our_vjp(g)
        assert len(calls) == 2, (used, calls)  # the forward pass and the input gradient
        monkeypatch.setattr(convolution, used, real)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        for mine, ref in zip(grads, xla_vjp(g)):
            np.testing.assert_allclose(mine, ref, rtol=1e-5, atol=1e-4)


def test_im2col_passes_follow_the_channel_rules():
    assert convolution.im2col_passes(64, 64, (1, 1)) == (True, True, True)
    assert convolution.im2col_passes(128, 128, (1, 1)) == (False, False, True)
    assert convolution.im2col_passes(64, 128, (2, 2)) == (False, False, True)
    assert convolution.im2col_passes(32, 64, (1, 1)) == (False, True, False)
    assert convolution.im2col_passes(3, 16, (1, 1)) == (False, False, False)
    assert [convolution.uses_tap_sum(c) for c in (1, 2, 3, 16)] == [True, False, False, False]


def test_chunk_images():
    # 2.25 MB per image (32x32x64 patches): two images although that is over the budget.
    assert convolution.chunk_images(128, 9 * 64 * 1024 * 4) == 2
    assert convolution.chunk_images(128, 1000, budget=8000) == 8
    assert convolution.chunk_images(12, 1000, budget=5000) == 4  # largest divisor <= 5
    assert convolution.chunk_images(7, 1000, budget=5000) == 1  # prime batch
    assert convolution.chunk_images(1, 10**9) == 1


def test_bfloat16_matches_xla_within_bf16_precision():
    x = jax.random.normal(jax.random.key(4), (4, 8, 8, 64)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(5), (3, 3, 64, 40)).astype(jnp.bfloat16)
    want, xla_vjp = jax.vjp(lambda x, w: _xla(x, w, (1, 1), "SAME"), x, w)
    got, our_vjp = jax.vjp(lambda x, w: _ours(x, w, (1, 1), "SAME"), x, w)
    assert got.dtype == jnp.bfloat16
    g = jnp.ones_like(want)
    for mine, ref in [(got, want), *zip(our_vjp(g), xla_vjp(g))]:
        assert mine.dtype == ref.dtype == jnp.bfloat16
        scale = float(jnp.abs(ref.astype(jnp.float32)).max())
        err = float(jnp.abs(mine.astype(jnp.float32) - ref.astype(jnp.float32)).max())
        assert err <= 2e-2 * scale


def test_vmap_over_kernels_matches_per_kernel():
    """Realizations under `train.strategy=vmap` batch the kernel and the input."""
    x = jax.random.normal(jax.random.key(6), (3, 2, 6, 6, 64))
    w = jax.random.normal(jax.random.key(7), (3, 3, 3, 64, 40))

    def loss(x, w):
        return jnp.sum(_ours(x, w, (1, 1), "SAME") ** 2)

    batched = jax.vmap(jax.grad(loss, argnums=(0, 1)))(x, w)
    for r in range(3):
        want = jax.grad(lambda x, w: jnp.sum(_xla(x, w, (1, 1), "SAME") ** 2),
                        argnums=(0, 1))(x[r], w[r])
        # Gradients of a sum of squares of 576-term sums: float32 summation order alone moves
        # them by up to ~1e-4 relative (7.5e-5 seen against XLA's convolutions without YNNPACK).
        for got, ref in zip(batched, want):
            np.testing.assert_allclose(got[r], ref, rtol=2e-4, atol=1e-3)


@pytest.mark.parametrize("c,kernel_shape,kwargs", [
    (64, (3, 3, 32, 64), dict(feature_group_count=2)),  # 64 channels, but grouped
    (64, (3, 3, 64, 64), dict(rhs_dilation=(2, 2))),  # dilated
    (8, (3, 3, 8, 6), {}),  # too narrow for any im2col pass, too wide for the tap sum
    (3, (3, 3, 3, 16), {}),  # an RGB first layer
])
def test_other_convolutions_are_plain_lax(c, kernel_shape, kwargs):
    x = jax.random.normal(jax.random.key(8), (2, 8, 8, c))
    w = jax.random.normal(jax.random.key(9), kernel_shape)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)

    def ours(x, w):
        return convolution.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn,
                                                **kwargs)

    jaxpr = jax.make_jaxpr(ours)(x, w)
    assert [e.primitive.name for e in jaxpr.jaxpr.eqns] == ["conv_general_dilated"]
    np.testing.assert_array_equal(
        ours(x, w), lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn, **kwargs))


def test_xla_convolutions_context_traces_plain_lax():
    x = jax.random.normal(jax.random.key(8), (2, 8, 8, 64))
    w = jax.random.normal(jax.random.key(9), (3, 3, 64, 64))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)

    def names(x, w):
        jaxpr = jax.make_jaxpr(lambda x, w: convolution.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=dn))(x, w)
        return [e.primitive.name for e in jaxpr.jaxpr.eqns]

    assert names(x, w) == ["custom_vjp_call"]
    with convolution.xla_convolutions():
        assert names(x, w) == ["conv_general_dilated"]
    assert names(x, w) == ["custom_vjp_call"]


def test_xla_forward_convolutions_keep_the_gradient_rules_and_the_tap_sum():
    """Inside the context a 64-channel convolution traces XLA's forward (no im2col loop) and
    still its im2col weight gradient; a grey first layer keeps its tap sum. Traced outside
    first: JAX's trace cache must not hand the im2col forward to the context."""
    x = jax.random.normal(jax.random.key(8), (2, 8, 8, 64))
    w = jax.random.normal(jax.random.key(9), (3, 3, 64, 64))
    grey, w_grey = x[..., :1], w[:, :, :1, :16]

    def text(fn, *args):  # a new function each time: make_jaxpr caches traces per function
        return str(jax.make_jaxpr(lambda *a: fn(*a))(*args))

    def forward(x, w):
        return _ours(x, w, (1, 1), "SAME")

    def weight_grad(x, w):
        return jax.grad(lambda w: _ours(x, w, (1, 1), "SAME").sum())(w)

    assert " scan[" in text(forward, x, w)  # the im2col forward's lax.map over chunks
    with convolution.xla_forward_convolutions():
        assert " scan[" not in text(forward, x, w)
        assert " scan[" in text(weight_grad, x, w)  # the weight gradient's lax.scan
        # The tap sum still sits behind its CPU/accelerator switch.
        assert "platform_index" in text(forward, grey, w_grey)
        assert "platform_index" not in text(forward, x, w)
    assert " scan[" in text(forward, x, w)  # the same shapes traced again, outside


@pytest.mark.parametrize("build", [
    # Full width: 64 and 128 channels, so every kind of pass takes im2col somewhere.
    lambda rngs: conv4(num_classes=10, in_channels=3, mean=(0.5,) * 3, std=(0.25,) * 3,
                       width=1.0, image_size=8, rngs=rngs),
    lambda rngs: resnet18(num_classes=10, in_channels=3, mean=(0.5,) * 3, std=(0.25,) * 3,
                          width=16, rngs=rngs),
])
def test_models_match_plain_lax_convolutions(build):
    """The same model with every nnx.Conv switched back to lax gives the same loss/grads."""
    ours = build(nnx.Rngs(0))
    plain = build(nnx.Rngs(0))
    n = 0
    for _, module in nnx.iter_graph(plain):
        if isinstance(module, nnx.Conv):
            assert module.conv_general_dilated is convolution.conv_general_dilated
            module.conv_general_dilated = lax.conv_general_dilated
            n += 1
    assert n > 0
    x = jax.random.uniform(jax.random.key(10), (4, 8, 8, 3))
    y = jnp.arange(4) % 10

    def loss_and_grad(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params, rest):
            m = nnx.merge(graphdef, params, rest)
            logits = m(x, train=False)  # BatchNorm with its initial statistics
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

        return jax.jit(jax.value_and_grad(loss))(params, rest)

    (l1, g1), (l2, g2) = loss_and_grad(ours), loss_and_grad(plain)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
