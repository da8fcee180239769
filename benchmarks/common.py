"""Helpers shared by the benchmarks: logging, timing, a matmul peak and JSON output.

Benchmarks print exactly one JSON document to stdout (so CI can parse it) and log to stderr.
Timings on shared machines are noisy; `interleave` runs the variants round-robin so that a
burst of load from elsewhere hits every variant alike, and ratios are best taken within one
process, from samples of the same rounds.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

REPO = pathlib.Path(__file__).resolve().parent.parent

log = logging.getLogger("card_jax.benchmarks")


def setup_logging(level: int = logging.INFO) -> None:
    """Logs to stderr only: stdout is reserved for the single JSON result."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds for `fn()` including the device work it dispatched, and its result.

    JAX dispatches asynchronously, so the clock stops only after `jax.block_until_ready`.
    """
    tic = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - tic, out


def fill_defaults(args, defaults: dict[str, Any]) -> None:
    """Sets every argparse option still None to its (mode-dependent) default, in place."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def median_ratio(num: list[float], den: list[float], definition: str,
                 target: float | None = None, comparison: str = ">=",
                 scale: float = 1.0) -> dict[str, Any]:
    """`scale * median(num) / median(den)`, the median of the per-round ratios (paired: it
    cancels slow drifts in machine load), and, with a target, whether it is met."""
    value = scale * median(num) / median(den)
    entry: dict[str, Any] = {
        "value": value,
        "paired_median": median([scale * a / b for a, b in zip(num, den)]),
        "definition": definition,
    }
    if target is not None:
        met = value >= target if comparison == ">=" else value <= target
        entry.update(target=target, comparison=comparison, met=bool(met))
    return entry


def interleave(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Calls each `variants[name]() -> float` (a time or a rate) once per round, round-robin.

    The order is reversed every other round so that no variant always runs right after the
    same neighbour (a slow variant can leave caches or turbo states behind).
    """
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            samples[name].append(variants[name]())
        log.info("round %d/%d: %s", r + 1, rounds,
                 ", ".join(f"{n} {samples[n][-1]:.4g}" for n in names))
    return samples


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def make_matmul_peak(size: int = 2048, dtype=jnp.float32) -> Callable[[], float]:
    """Returns `sample() -> GFLOP/s` of one jitted `size^3` matmul (compiled and warmed up).

    The best of several samples is the practical fp32 peak of this process on this machine,
    the yardstick for a model's achieved throughput.
    """
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (size, size), dtype)
    b = jax.random.normal(kb, (size, size), dtype)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    flops = 2 * size**3

    def sample() -> float:
        seconds, _ = timed(lambda: matmul(a, b))
        return flops / seconds / 1e9

    return sample


def environment() -> dict[str, Any]:
    """What the numbers depend on: versions, backend, device and CPU count."""
    import flax

    device = jax.devices()[0]
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def emit_json(doc: dict[str, Any]) -> None:
    """Prints the one JSON result to stdout (and flushes, for subprocess readers)."""
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()
