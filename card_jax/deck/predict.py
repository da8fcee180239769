"""CARD-Deck inference: one jitted function over member parameters stacked on a `[K]` axis.

`DeckFn(graphdef, K)` is `deck(params [K, ...], batch_stats [K, ...], images [B, H, W, C])
-> (mean_probs [B, classes], member_probs [K, B, classes])`: the softmax of
every member and their arithmetic mean (softmax averaging, never logit averaging; SPEC
§1(c), (e)). The domain-agnostic deck calls it on all K members; the domain-adaptive deck on
the stack of the gated group's members only (same shapes for every group, so one
compilation serves all of them).

The member axis runs either
  vmap  jax.vmap over K; with several devices the stack is sharded over a 1-D mesh ('m',)
        (`jax.jit` + `NamedSharding`) and each device evaluates its own members on the
        replicated batch;
  map   unrolled at trace time (K copies of the single-member graph in one jit).
On one CPU device `auto` picks map. Measured (XLA:CPU, 2 shared cores, one batch of 100
images, K = 4 members, median of 7 calls, two sessions; script: map vs vmap `DeckFn`s on the
same stacks):
  conv4 width 0.25, 32x32x1 (embedded default):  map 37-61 ms,  vmap 243-264 ms (4-7x slower)
  conv2 width 0.125, 16x16x3 (smoke):            map 6.8-8.6 ms, vmap 8.7-9.5 ms (1.1-1.3x)
vmap over conv weights lowers to grouped convolutions, which XLA:CPU runs far below the
per-member speed (as for the realization axis, `card_jax.realizations`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from card_jax import realizations, steps
from card_jax import state as state_lib
from card_jax.data import pipeline

STRATEGIES = realizations.STRATEGIES
MEMBER_AXIS = "m"


def member_logits(graphdef, params, batch_stats, x: jax.Array) -> jax.Array:
    """Logits `[B, classes]` of ONE member: effective params (masks/binarisation already
    applied), BatchNorm in eval mode with its running statistics; `x` float `[B, H, W, C]`
    in [0, 1] (the model normalises internally)."""
    return steps.inference_logits(state_lib.merge_model(graphdef, params, batch_stats), x)


def member_probs(graphdef, params, batch_stats, images: jax.Array, strategy: str,
                 spmd_axis_name: str | None = None) -> jax.Array:
    """Softmax outputs `[K, B, classes]` of the K stacked members on one batch.

    Args:
      params, batch_stats: pytrees whose leaves carry a leading member axis `[K, ...]`.
      images: uint8 (scaled by 1/255) or float `[B, H, W, C]` in [0, 1].
      strategy: "map" or "vmap" (see the module docstring).
      spmd_axis_name: with vmap, the mesh axis the member axis is sharded over.
    """
    x = pipeline.to_float(images) if images.dtype == jnp.uint8 else images.astype(jnp.float32)

    def one(p, bs):
        return jax.nn.softmax(member_logits(graphdef, p, bs, x), axis=-1)

    if strategy == "map":
        count = jax.tree.leaves(params)[0].shape[0]
        return jnp.stack([one(state_lib.index(params, k), state_lib.index(batch_stats, k))
                          for k in range(count)])
    if strategy == "vmap":
        return jax.vmap(one, spmd_axis_name=spmd_axis_name)(params, batch_stats)
    raise ValueError(f"unknown strategy {strategy!r}")


def deck_probs(graphdef, params, batch_stats, images, strategy: str
               ) -> tuple[jax.Array, jax.Array]:
    """(mean softmax `[B, classes]`, member softmaxes `[K, B, classes]`) of a stacked deck."""
    probs = member_probs(graphdef, params, batch_stats, images, strategy)
    return probs.mean(0), probs


def member_mesh(num_members: int, devices=None) -> jax.sharding.Mesh | None:
    """A 1-D ('m',) mesh over as many devices as divide K; None when that is one device."""
    devices = list(jax.devices() if devices is None else devices)
    size = math.gcd(num_members, len(devices))
    if size <= 1:
        return None
    return jax.sharding.Mesh(np.asarray(devices[:size]), (MEMBER_AXIS,),
                             axis_types=(AxisType.Auto,))


class DeckFn:
    """The jitted deck inference for stacks of one size K, placed on `mesh` (or one device).

    `fn(params, batch_stats, images) -> (mean_probs [B, classes], member_probs [K, B, C])`;
    `place_members(tree)` puts a `[K, ...]` stack where `fn` expects it (sharded over 'm'),
    `place_batch(x)` a batch (replicated).
    """

    def __init__(self, graphdef, num_members: int, strategy: str = "auto",
                 mesh: jax.sharding.Mesh | None | str = "auto"):
        if mesh == "auto":
            mesh = member_mesh(num_members)
        self.mesh, self.num_members = mesh, num_members
        self.strategy = ("vmap" if mesh is not None else
                         realizations.choose_strategy(strategy, 1, option="deck.strategy"))
        body = functools.partial(deck_probs, graphdef, strategy=self.strategy)
        if mesh is None:
            self.fn = jax.jit(body)
            return
        members = NamedSharding(mesh, P(MEMBER_AXIS))
        replicated = NamedSharding(mesh, P())

        def sharded(params, batch_stats, images):
            # Each device holds K / |mesh| whole members and evaluates them on the
            # replicated batch; the mean over 'm' is the only cross-device reduction.
            probs = member_probs(graphdef, params, batch_stats, images, "vmap",
                                 spmd_axis_name=MEMBER_AXIS)
            return probs.mean(0), probs

        self.fn = jax.jit(sharded, in_shardings=(members, members, replicated),
                          out_shardings=(replicated, members))
        self._members, self._replicated = members, replicated

    def place_members(self, tree: Any) -> Any:
        if self.mesh is None:
            return jax.device_put(tree)
        return jax.device_put(tree, self._members)

    def place_batch(self, x) -> jax.Array:
        if self.mesh is None:
            return jax.device_put(x)
        return jax.device_put(x, self._replicated)

    def __call__(self, params, batch_stats, images) -> tuple[jax.Array, jax.Array]:
        return self.fn(params, batch_stats, images)


def select_members(tree: Any, indices) -> Any:
    """The `[len(indices), ...]` sub-stack of a numpy `[K, ...]` stack (host side)."""
    indices = np.asarray(indices)
    return jax.tree.map(lambda a: np.asarray(a)[indices], tree)
