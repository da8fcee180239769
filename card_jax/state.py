"""Training state with a leading realization axis, and the bridge to Flax NNX modules.

Models are defined with Flax NNX and left straight away (DESIGN decision 2): parameters and
batch statistics travel as plain nested dicts with string keys, which Orbax, `jax.tree.*` and
the pruning code handle without knowing about NNX.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import nnx


class TrainState(NamedTuple):
    """Everything needed to continue training. In the loop every leaf has a leading `[R]` axis.

    Attributes:
      params: model parameters (plain dict).
      batch_stats: BatchNorm running statistics (plain dict, possibly empty).
      opt_state: optax state of the trainable pytree.
      method_state: the compression method's state (masks, scores; () for dense).
      step: int32 `[]`, optimizer steps taken.
      seed: int32 `[]`, this realization's seed; every random stream derives from it.
      first_bad_step: int32 `[]`, first step whose loss was not finite, -1 while all were.
    """

    params: Any
    batch_stats: Any
    opt_state: Any
    method_state: Any
    step: jax.Array
    seed: jax.Array
    first_bad_step: jax.Array


# Independent random streams of one realization, derived with fold_in(key(seed), STREAM).
INIT_STREAM, AUGMENT_STREAM, METHOD_STREAM = 0, 1, 2


def _str_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _graph_keys(tree: Any) -> Any:
    # nnx lists index their children with ints; plain dicts here always use strings.
    if isinstance(tree, dict):
        return {(int(k) if k.isdigit() else k): _graph_keys(v) for k, v in tree.items()}
    return tree


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, params, batch_stats); refuses models holding other variable types."""
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    if jax.tree.leaves(rest):
        raise TypeError(f"model holds variables other than Param/BatchStat: {rest}")
    return (graphdef, _str_keys(nnx.to_pure_dict(params)),
            _str_keys(nnx.to_pure_dict(batch_stats)))


def merge_model(graphdef: nnx.GraphDef, params: dict, batch_stats: dict) -> nnx.Module:
    """The module for `params`/`batch_stats`; cheap inside jit (trace time only)."""
    return nnx.merge(graphdef, nnx.State(_graph_keys(params)), nnx.State(_graph_keys(batch_stats)))


def batch_stats_of(model: nnx.Module) -> dict:
    return _str_keys(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))


def stack(trees: list) -> Any:
    """Stacks per-realization pytrees along a new leading `[R]` axis."""
    return jax.tree.map(lambda *xs: jax.numpy.stack(xs), *trees)


def index(tree: Any, r: int) -> Any:
    """Realization `r` of an `[R]`-stacked pytree."""
    return jax.tree.map(lambda x: x[r], tree)
