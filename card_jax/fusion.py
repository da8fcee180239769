"""Fusion boundaries on XLA:CPU: a value computed once, into a buffer of its own.

XLA duplicates cheap elementwise producers into each consumer, and on CPU that can cost more
than it saves: an augmentation recomputed by every op that reads the batch, or a ReLU fused
into the batch/channel transpose of a weight-gradient convolution, which XLA:CPU then emits
as a plain element loop instead of its tiled transpose kernel (benchmarks/README.md, sections
18 and 20). `jax.lax.optimization_barrier` does not help there: XLA:CPU removes barriers
before fusing. A conditional is a boundary fusion does not cross, so :func:`computed_apart`
evaluates the value inside a `lax.cond` whose predicate XLA cannot evaluate at compile time.

Only on CPU (`lax.platform_dependent`): a GPU conditional reads its predicate on the host, a
sync per step, and there fusion is what makes elementwise work cheap.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax import lax


def computed_apart(fn: Callable[[jax.Array], jax.Array], x: jax.Array, predicate: jax.Array,
                   otherwise: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """`fn(x)`, on CPU computed inside `lax.cond(predicate, fn, otherwise, x)`.

    Args:
      predicate: bool scalar known only at run time. Where `otherwise` is given, it must be
        true whenever the step runs (e.g. a step counter >= 0); by default `otherwise` is
        `fn`, and any predicate will do.
      otherwise: the other branch. XLA removes a conditional whose branches both return
        their operand unchanged, so an identity `fn` needs a different `otherwise` (such as
        `jnp.zeros_like`) to keep the boundary.

    Under `vmap` a batched predicate makes JAX turn the cond into a select of the two
    branches, which XLA fuses as before: no boundary there.
    """
    otherwise = fn if otherwise is None else otherwise
    return lax.platform_dependent(
        x, predicate,
        cpu=lambda x, p: lax.cond(p, fn, otherwise, x),
        default=lambda x, p: fn(x))
