"""How the realization axis `[R]` executes: one compiled step for all R seeds.

Strategies (DESIGN: measure, then choose; never make R seeds slower than R runs):
  map   the R single-seed steps unrolled inside one jit: each seed runs the same kernels as a
        single-seed run. A `vmap` over conv weights lowers to grouped (CPU) or batched
        (GPU) convolutions that are slower per seed: on XLA:CPU several times, and on an
        H200 the full-width Conv-4 step at R = 4 took 10.4 ms vmapped against 3.5-4.4 ms
        unrolled (R = 1: 1.0-1.8 ms; benchmarks/README.md, section 17), where the GPU also
        overlaps the independent seeds. So this is the single-device default everywhere.
  vmap  `jax.vmap` over R. With more than one device, R is sharded over the mesh axis 'r' and
        the batch over 'b' (jax.jit + NamedSharding), so each device runs whole seeds.
'auto' picks vmap when several devices are visible (sharded) and map on a single device.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

STRATEGIES = ("auto", "map", "vmap")


def choose_strategy(strategy: str, num_devices: int | None = None,
                    option: str = "train.strategy") -> str:
    """'auto' -> vmap (sharded) with several devices, map on one device of any platform.

    Shared by the realization axis and a deck's member axis (`option` names the config key
    in the error message)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"{option} must be one of {STRATEGIES}, got {strategy!r}")
    if strategy != "auto":
        return strategy
    num_devices = jax.device_count() if num_devices is None else num_devices
    return "vmap" if num_devices > 1 else "map"


def make_mesh(realizations: int) -> jax.sharding.Mesh:
    """A ('r', 'b') mesh over all devices: as many devices on 'r' as divide R, the rest on 'b'."""
    devices = jax.device_count()
    r = math.gcd(realizations, devices)
    return jax.make_mesh((r, devices // r), ("r", "b"), axis_types=(AxisType.Auto,) * 2)


def over_realizations(fn: Callable, strategy: str, num_shared: int) -> Callable:
    """Lifts `fn(state_r, *shared) -> out_r` for one realization to `[R]`-stacked states.

    The first argument carries the realization axis; the `num_shared` arguments after it (the
    dataset on device) are the same for every realization.
    """
    if strategy == "map":
        # Unrolled at trace time rather than lax.map: inside a while loop XLA:CPU runs the
        # convolutions tens of times slower (measured: 4.8 s vs 0.13 s per Conv4 step).
        def mapped(states, *shared):
            count = jax.tree.leaves(states)[0].shape[0]
            outs = [fn(jax.tree.map(lambda x: x[r], states), *shared) for r in range(count)]
            return jax.tree.map(lambda *xs: jax.numpy.stack(xs), *outs)
        return mapped
    if strategy == "vmap":
        return jax.vmap(fn, in_axes=(0,) + (None,) * num_shared, spmd_axis_name="r")
    raise ValueError(f"unknown strategy {strategy!r}")


def realization_sharding(mesh: jax.sharding.Mesh, tree: Any) -> Any:
    """Shards the leading `[R]` axis of every leaf over 'r'."""
    return jax.tree.map(lambda _: NamedSharding(mesh, P("r")), tree)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """For one realization's batch `[B, ...]` inside a vmapped step (vmap adds 'r')."""
    return NamedSharding(mesh, P("b"))


def place(tree: Any, shardings: Any) -> Any:
    """Puts host arrays on devices with the given shardings; works with several processes."""
    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    return jax.tree.map(put, tree, shardings)


def to_host(tree: Any) -> Any:
    """Fetches arrays to numpy, gathering across processes when they are not all local."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(get, tree)
