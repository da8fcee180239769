"""Counting the floating-point operations of a JAX function from its jaxpr.

Only the two primitives that dominate a network's cost are counted, at 2 FLOPs per
multiply-add (the convention of the papers and of hardware peak numbers):

  dot_general           2 * batch * M * N * K, read from the dimension numbers.
  conv_general_dilated  2 * |out| * prod(kernel spatial taps) * in_features_per_group.

Elementwise ops, reductions, gathers and the optimizer's arithmetic are ignored: for a
convolutional network they are well under 1% of the total, and counting them would make the
number depend on how XLA happens to fuse them.

Backward passes need care. The input gradient of a strided convolution is a transposed
convolution, which JAX expresses as a convolution over the output gradient dilated with
zeros (`lhs_dilation`) and padded by `kernel - 1 - pad`. Counting every kernel tap of that
formulation would charge stride**2 times the real work for multiplying inserted zeros,
which no real implementation (cuDNN dgrad, XLA's transposed-conv lowering) performs. Along
a dilated spatial dimension we therefore count only the taps that land on a real input
element. Along undilated dimensions every tap is counted, padding included, exactly as a
dense forward convolution computes it; so a stride-1 convolution's gradient costs exactly
2x its forward pass and a strided one about 2x (less the border taps the forward spent on
padding). `rhs_dilation` (the weight gradient of a strided conv) needs nothing special: the
kernel's spatial size is already its number of real taps.

Dead code is skipped (see `jaxpr_flops`). Sub-jaxprs are followed: `jit`/`pjit`, `remat`, `custom_jvp_call`/`custom_vjp_call` (the
primal function), `scan` (body x length), `while` (body x trip count when it is static,
e.g. a `fori_loop` with literal bounds; otherwise once, with a warning), and `cond` (the most
expensive branch). Inside `shard_map` the body's per-shard shapes are counted once.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import jax
import numpy as np
from jax.extend import core as jcore

log = logging.getLogger("card_jax")

# Params that hold the function a higher-order primitive actually evaluates, in priority
# order. custom_jvp_call / custom_vjp_call also carry jvp / fwd / bwd rules; those are not
# run by the primal (under grad the rules are already traced inline into the jaxpr).
_PRIMAL_JAXPR_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def count_flops(fn: Callable, *args: Any) -> int:
    """FLOPs of `fn(*args)` (matmuls and convolutions), traced with `jax.make_jaxpr`.

    Args:
      fn: any JAX-traceable function, jitted or not (e.g. a whole jitted train step).
      *args: example arguments: arrays or `jax.ShapeDtypeStruct`s (nothing is executed).

    Returns:
      The total as a Python int.
    """
    return jaxpr_flops(jax.make_jaxpr(fn)(*args))


def jaxpr_flops(jaxpr: jcore.Jaxpr | jcore.ClosedJaxpr,
                used_outputs: list[bool] | None = None) -> int:
    """FLOPs of an already traced (closed) jaxpr; see the module docstring for the rules.

    Equations whose results are never used (and that have no side effects) are skipped, as
    XLA's dead-code elimination removes them: `make_jaxpr` does not, and e.g. the primal
    convolution of a `jax.vjp` whose primal output is discarded would otherwise be counted.

    Args:
      used_outputs: which outputs the caller consumes; default all.
    """
    if isinstance(jaxpr, jcore.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    if used_outputs is None:
        used_outputs = [True] * len(jaxpr.outvars)
    live = {v for v, used in zip(jaxpr.outvars, used_outputs)
            if used and not isinstance(v, jcore.Literal)}
    total = 0
    for eqn in reversed(jaxpr.eqns):
        used = [v in live for v in eqn.outvars]
        if not (any(used) or eqn.effects):
            continue
        total += _eqn_flops(eqn, used)
        # Conservative: every input of a live equation is live (no per-input pruning
        # through sub-jaxprs), so at worst some dead code feeding a call is still counted.
        live.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
    return total


def _eqn_flops(eqn: jcore.JaxprEqn, used: list[bool]) -> int:
    name = eqn.primitive.name
    params = eqn.params
    if name == "dot_general":
        return _dot_general_flops(eqn)
    if name == "conv_general_dilated":
        return _conv_flops(eqn)
    if name == "scan":
        return int(params["length"]) * jaxpr_flops(params["jaxpr"])
    if name == "while":
        trips = _while_trip_count(eqn)
        body, cond = jaxpr_flops(params["body_jaxpr"]), jaxpr_flops(params["cond_jaxpr"])
        if trips is None:
            if body:
                log.warning("count_flops: a while loop has a dynamic trip count; its body "
                            "(%d FLOPs) is counted once", body)
            return body + cond
        return trips * body + (trips + 1) * cond
    if name == "cond":
        # Only one branch runs; the most expensive one bounds the cost.
        return max((jaxpr_flops(b) for b in params["branches"]), default=0)
    for key in _PRIMAL_JAXPR_KEYS:
        sub = params.get(key)
        if isinstance(sub, (jcore.Jaxpr, jcore.ClosedJaxpr)):
            # Call-like primitives (jit, remat, custom_jvp/vjp_call) return exactly their
            # sub-jaxpr's outputs, so the caller's use of them carries over.
            inner = sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub
            return jaxpr_flops(sub, used if len(inner.outvars) == len(used) else None)
    # Any other higher-order primitive: count every sub-jaxpr it holds.
    return sum(jaxpr_flops(sub) for sub in jcore.jaxprs_in_params(params))


def _shape(var) -> tuple[int, ...]:
    return tuple(int(d) for d in var.aval.shape)


def _dot_general_flops(eqn: jcore.JaxprEqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = _shape(eqn.invars[0])
    out = _shape(eqn.outvars[0])
    # |out| = batch * M * N; each output element is a K-long dot product.
    k = math.prod(lhs[d] for d in lhs_contract)
    return 2 * math.prod(out) * k


def _conv_flops(eqn: jcore.JaxprEqn) -> int:
    p = eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    lhs, rhs, out = _shape(eqn.invars[0]), _shape(eqn.invars[1]), _shape(eqn.outvars[0])
    # rhs in-features are already per group (C_in / feature_group_count); with
    # batch_group_count (weight gradients of grouped convs) each output still sums over
    # exactly the kernel's taps x in-features, so one formula covers both.
    in_per_group = rhs[rhs_spec[1]]
    taps = 1
    for i in range(len(lhs_spec) - 2):
        taps *= _spatial_taps(
            in_size=lhs[lhs_spec[i + 2]], kernel=rhs[rhs_spec[i + 2]],
            out_size=out[out_spec[i + 2]], stride=p["window_strides"][i],
            pad_lo=p["padding"][i][0], lhs_dilation=p["lhs_dilation"][i],
            rhs_dilation=p["rhs_dilation"][i])
    return 2 * out[out_spec[0]] * out[out_spec[1]] * in_per_group * taps


def _spatial_taps(*, in_size: int, kernel: int, out_size: int, stride: int, pad_lo: int,
                  lhs_dilation: int, rhs_dilation: int) -> int:
    """Kernel taps summed over the output positions of one spatial dimension.

    Undilated input: every tap (padding included), `out_size * kernel`. Dilated input
    (a transposed convolution): only the taps that read a real input element, because the
    inserted zeros and the transposition's padding are never multiplied in practice.
    """
    if lhs_dilation == 1:
        return out_size * kernel
    # Position of each (output, tap) pair in the dilated input's coordinates.
    q = (np.arange(out_size)[:, None] * stride + np.arange(kernel)[None, :] * rhs_dilation
         - pad_lo)
    real = (q >= 0) & (q <= (in_size - 1) * lhs_dilation) & (q % lhs_dilation == 0)
    return int(real.sum())


def _while_trip_count(eqn: jcore.JaxprEqn) -> int | None:
    """The trip count of a `fori_loop`-shaped while loop with literal bounds, else None.

    Recognises `cond: i < upper` with `i` a carry that starts at a literal and whose body
    adds the literal 1, and `upper` a literal, a literal constant or an unchanged carry
    that starts at a literal.
    """
    p = eqn.params
    cond, body = p["cond_jaxpr"].jaxpr, p["body_jaxpr"].jaxpr
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, init = eqn.invars[:cn], eqn.invars[cn + bn:]
    if len(cond.eqns) != 1 or cond.eqns[0].primitive.name != "lt":
        return None
    counter, bound = cond.eqns[0].invars

    def literal(v) -> int | None:
        if isinstance(v, jcore.Literal) and np.ndim(v.val) == 0:
            return int(v.val)
        return None

    def carry_index(v) -> int | None:
        if isinstance(v, jcore.Literal) or v not in cond.invars:
            return None
        idx = cond.invars.index(v)
        return idx - cn if idx >= cn else None

    k = carry_index(counter)
    if k is None or literal(init[k]) is None:
        return None
    step_ok = any(
        e.primitive.name == "add" and e.outvars[0] is body.outvars[k]
        and body.invars[bn + k] in e.invars and 1 in [literal(a) for a in e.invars]
        for e in body.eqns)
    if not step_ok:
        return None
    upper = literal(bound)
    if upper is None and not isinstance(bound, jcore.Literal) and bound in cond.invars:
        idx = cond.invars.index(bound)
        if idx < cn:
            upper = literal(cond_consts[idx])
        elif body.outvars[idx - cn] is body.invars[bn + idx - cn]:
            upper = literal(init[idx - cn])
    if upper is None:
        return None
    return max(0, upper - literal(init[k]))
