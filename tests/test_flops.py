"""card_jax.flops on cases whose FLOP counts are known by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from card_jax import flops

DN = ("NHWC", "HWIO", "NHWC")


def conv(x, w, stride=1):
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=DN)


def test_single_matmul():
    a, b = jnp.ones((4, 8)), jnp.ones((8, 16))
    assert flops.count_flops(jnp.matmul, a, b) == 2 * 4 * 16 * 8 == 1024


def test_vmapped_matmul_counts_the_batch():
    a, b = jnp.ones((3, 4, 8)), jnp.ones((3, 8, 16))
    assert flops.count_flops(jax.vmap(jnp.matmul), a, b) == 3 * 1024
    # Shared weights (in_axes None) fold the batch into M instead: same total.
    assert flops.count_flops(jax.vmap(jnp.matmul, in_axes=(0, None)), a, b[0]) == 3 * 1024


def test_dot_general_with_batch_and_two_contracting_dims():
    a, b = jnp.ones((5, 2, 3, 7)), jnp.ones((5, 3, 7, 11))
    dims = (((2, 3), (1, 2)), ((0,), (0,)))
    f = lambda a, b: lax.dot_general(a, b, dims)  # noqa: E731
    assert flops.count_flops(f, a, b) == 2 * 5 * 2 * 11 * (3 * 7)


def test_conv_same_3x3():
    x, w = jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 2, 4))
    assert flops.count_flops(conv, x, w) == 2 * 8 * 8 * 4 * 9 * 2


def test_grouped_conv_counts_input_channels_per_group():
    x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 2, 6))
    f = lambda x, w: lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2)
    assert flops.count_flops(f, x, w) == 2 * 8 * 8 * 6 * 9 * 2


def test_conv_grad_is_three_forwards():
    x, w = jnp.ones((2, 8, 8, 2)), jnp.ones((3, 3, 2, 4))
    forward = flops.count_flops(conv, x, w)
    loss = lambda x, w: jnp.sum(conv(x, w) ** 2)  # noqa: E731
    both = flops.count_flops(jax.value_and_grad(loss, argnums=(0, 1)), x, w)
    # Stride 1: the input and weight gradients are exactly as large as the forward conv.
    assert both == 3 * forward
    # Gradient w.r.t. the weights only (as in training): no input-gradient conv.
    assert flops.count_flops(jax.value_and_grad(loss, argnums=1), x, w) == 2 * forward


def test_strided_conv_grad_does_not_count_inserted_zeros():
    x, w = jnp.ones((2, 16, 16, 3)), jnp.ones((3, 3, 3, 8))
    f = lambda x, w: conv(x, w, stride=2)  # noqa: E731
    forward = flops.count_flops(f, x, w)
    loss = lambda x, w: jnp.sum(f(x, w))  # noqa: E731
    both = flops.count_flops(jax.value_and_grad(loss, argnums=(0, 1)), x, w)
    # Counting every tap of the zero-stuffed transposed conv would give 1 + 1 + 4 = 6x;
    # the real work is ~3x (slightly less: the forward's border taps read padding).
    assert 2.8 * forward <= both <= 3 * forward


def test_follows_jit_remat_custom_jvp_and_scan():
    a, b = jnp.ones((4, 8)), jnp.ones((8, 8))

    def f(a, b):
        y = jax.jit(jnp.matmul)(a, b)                         # 512
        y = jax.checkpoint(lambda y: jax.nn.relu(y @ b))(y)   # 512
        y, _ = lax.scan(lambda c, _: (c @ b, None), y, None, length=3)  # 3 * 512
        y = lax.fori_loop(0, 5, lambda i, c: c @ b, y)        # 5 * 512 (a scan)
        return y

    assert flops.count_flops(f, a, b) == (1 + 1 + 3 + 5) * 512


def test_while_with_literal_bounds_and_cond_takes_the_larger_branch():
    a, b = jnp.ones((4, 8)), jnp.ones((8, 8))

    def f(a, b):
        y = lax.while_loop(lambda c: c[0] < 7, lambda c: (c[0] + 1, c[1] @ b), (0, a))[1]
        return lax.cond(y.sum() > 0, lambda y: y @ b @ b, lambda y: y, y)

    assert flops.count_flops(f, a, b) == (7 + 2) * 512


def test_custom_vjp_counts_the_primal():
    @jax.custom_vjp
    def g(a, b):
        return a @ b

    g.defvjp(lambda a, b: (a @ b, (a, b)), lambda res, ct: (ct @ res[1].T, res[0].T @ ct))
    a, b = jnp.ones((4, 8)), jnp.ones((8, 16))
    assert flops.count_flops(g, a, b) == 1024
    # Under value_and_grad the fwd rule and the user's bwd rule are traced inline:
    # forward + two matmuls.
    loss = lambda a, b: g(a, b).sum()  # noqa: E731
    assert flops.count_flops(jax.value_and_grad(loss, argnums=(0, 1)), a, b) == 3072
    # jax.grad drops the loss value, and the bwd rule does not need the product: dead code.
    assert flops.count_flops(jax.grad(loss, argnums=(0, 1)), a, b) == 2048


def test_accepts_shape_dtype_structs():
    a = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    b = jax.ShapeDtypeStruct((8, 16), jnp.float32)
    assert flops.count_flops(jnp.matmul, a, b) == 1024


@pytest.mark.parametrize("strategy_R", [1, 2])
def test_vmapped_conv_over_weights_scales_with_realizations(strategy_R):
    # jax.vmap over conv weights lowers to one grouped conv; FLOPs must still be R x one.
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((strategy_R, 3, 3, 3, 4))
    one = flops.count_flops(conv, x, w[0])
    assert flops.count_flops(jax.vmap(conv, in_axes=(None, 0)), x, w) == strategy_R * one


def test_dead_code_is_not_counted():
    x, w = jnp.ones((2, 8, 8, 2)), jnp.ones((3, 3, 2, 4))
    g = jnp.ones((2, 8, 8, 4))
    forward = flops.count_flops(conv, x, w)
    # The vjp's primal conv is traced but its output is discarded; XLA removes it.
    dgrad = lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]  # noqa: E731
    assert flops.count_flops(dgrad, x, w, g) == forward
    # Also inside a jit: only the outputs its caller uses count.
    both = jax.jit(lambda x, w: (conv(x, w), w.reshape(18, 4) @ jnp.ones((4, 4))))
    assert flops.count_flops(lambda x, w: both(x, w)[0], x, w) == forward
