"""glibc malloc settings for XLA:CPU, applied to card_jax's processes (issue 7).

XLA:CPU allocates each execution's temporary buffer (all intermediate activations of a
training or evaluation step: 93 MB for the embedded default's step, 235 MB for a full-width
Conv-4 step at batch 128, 869 MB for four of them at R = 4) afresh and frees it at the end.
By default glibc serves such a buffer with a fresh `mmap` of zero pages (above its mmap
threshold, at most 32 MB, and always above 64 MB in a thread's own arena), so every step
pays a page fault per page it touches and the kernel zeroes the whole buffer again: 22,700
faults per embedded training step, 19% of its time in the kernel (44 of 236 ms on one core).

Four tunables make the buffer come from, and go back to, one reused heap:

  glibc.malloc.arena_max=1             every thread allocates from the main arena (XLA's
                                       worker threads would otherwise get arenas of their
                                       own, which hand anything above 64 MB to mmap)
  glibc.malloc.mmap_max=0              the main arena never uses mmap: large buffers come
                                       from its heap, and are reused by the next step
  glibc.malloc.trim_threshold=1 TiB    freed heap memory is never returned to the system: the
                                       next step takes it again instead of faulting it in (with
                                       4 GiB, a benchmark process that interleaves R = 1, 4 and
                                       8 trimmed its 6 GB heap and refaulted the R = 8 buffer,
                                       867 huge pages, 0.3 s a step)
  glibc.malloc.hugetlb=1               the heap (and any mmap) asks for transparent huge pages
                                       where the kernel allows it (`madvise` mode): fewer TLB
                                       misses in the step's big arrays

An earlier version set `glibc.malloc.mmap_threshold=256 MiB` instead of the first two; glibc
silently ignores a threshold above 32 MiB (half its 64 MiB heap size), so buffers stayed
mmap'd and only `hugetlb` helped (2 MB faults instead of 4 kB ones). Measured on the 2-core
Xeon (benchmarks/README.md, section 17): page faults per full-width Conv-4 step 675 -> 0 at
R = 1 and 1,450 -> 0 at R = 4; the R = 4 step 1.38-2.10 s -> 1.37-1.59 s against R = 1's
0.33-0.39 s. The numbers computed are the same (only where memory comes from changes); the price
is that a process keeps the memory of its largest steps until it exits, which a training
process needs again at its next step anyway, and that XLA's parallel compilation threads
contend for the one arena: the embedded default's compile-bound `:smoke` run took 14.7-14.8 s
against 11.8-12.9, and tests/test_train.py 86-89 s against 72-73 (sys time 8 -> 18 s). Steps
are what a training run spends its time in; the test suite, which compiles hundreds of small
programs and runs a few steps of each, takes `COMPILE_BOUND_TUNABLES` instead (per-thread
arenas, huge pages only: what the earlier version did in effect).

Tunables are read when a process starts, so entry points call :func:`reexec_if_untuned`
first: it replaces the process with the same command line and the tunables added to
`GLIBC_TUNABLES` (a no-op off glibc Linux, when they are already set, or with
`CARD_JAX_GLIBC_TUNABLES=0`). Launchers pass :func:`tuned_environ` to the jobs they start.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLES = (
    ("glibc.malloc.hugetlb", "1"),
    ("glibc.malloc.arena_max", "1"),
    ("glibc.malloc.mmap_max", "0"),
    ("glibc.malloc.trim_threshold", str(1 << 40)),  # 1 TiB: never (more than any machine here)
)
ENV = "GLIBC_TUNABLES"
# For processes that mostly compile (tests/conftest.py): keeps glibc's per-thread arenas.
COMPILE_BOUND_TUNABLES = (("glibc.malloc.hugetlb", "1"),)
OPT_OUT = "CARD_JAX_GLIBC_TUNABLES"  # "0": leave the allocator alone


def _set_names(value: str) -> set[str]:
    return {item.split("=", 1)[0] for item in value.split(":") if item}


def tuned_environ(environ: Mapping[str, str],
                  tunables: tuple[tuple[str, str], ...] = TUNABLES) -> dict[str, str]:
    """A copy of `environ` whose `GLIBC_TUNABLES` also holds `tunables` (default `TUNABLES`);
    a tunable the caller already set keeps the caller's value, and with
    `CARD_JAX_GLIBC_TUNABLES=0` nothing is added."""
    env = dict(environ)
    if env.get(OPT_OUT) == "0":
        return env
    current = env.get(ENV, "")
    missing = [f"{name}={value}" for name, value in tunables
               if name not in _set_names(current)]
    if missing:
        env[ENV] = ":".join([current, *missing] if current else missing)
    return env


def applies_here() -> bool:
    """Whether this is a glibc Linux process, where the tunables mean something."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def reexec_if_untuned() -> None:
    """Replace this process by the same command with `tuned_environ` (see the module doc).

    Call it before anything starts threads or opens files that must not be inherited; the
    process keeps its PID, open descriptors and arguments (`sys.orig_argv`).
    """
    env = tuned_environ(os.environ)
    if env.get(ENV) == os.environ.get(ENV) or not applies_here():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
