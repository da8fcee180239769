"""glibc malloc settings for XLA:CPU, applied to card_jax's processes (issue 7).

XLA:CPU allocates each execution's temporary buffer (all intermediate activations of a
training or evaluation step: 93 MB for the embedded default's step) afresh and frees it at the
end. Above glibc's mmap threshold (at most 32 MB by default) every such allocation is a new
`mmap` of zero pages, so the step pays one page fault per 4 kB it touches: 22,700 faults per
embedded training step, 19% of its time spent in the kernel (44 of 236 ms on one core) and 25%
of an evaluation step's. Three glibc tunables remove that:

  glibc.malloc.hugetlb=1               mmap'd chunks ask for transparent huge pages (2 MB
                                       faults instead of 4 kB ones) where the kernel allows it
  glibc.malloc.mmap_threshold=256 MiB  smaller buffers come from malloc's heap and are reused
  glibc.malloc.trim_threshold=1 GiB    freed heap memory is kept for the next step

Measured on one core of the 2-core machine: training step 236-247 -> 195-204 ms, evaluation
of 250 images 129-141 -> 94-105 ms, page faults per step 22,698 -> 214; the numbers computed
are the same (only where memory comes from changes).

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
    ("glibc.malloc.mmap_threshold", str(256 << 20)),
    ("glibc.malloc.trim_threshold", str(1 << 30)),
)
ENV = "GLIBC_TUNABLES"
OPT_OUT = "CARD_JAX_GLIBC_TUNABLES"  # "0": leave the allocator alone


def _set_names(value: str) -> set[str]:
    return {item.split("=", 1)[0] for item in value.split(":") if item}


def tuned_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of `environ` whose `GLIBC_TUNABLES` also holds `TUNABLES`; a tunable the caller
    already set keeps the caller's value, and with `CARD_JAX_GLIBC_TUNABLES=0` nothing is
    added."""
    env = dict(environ)
    if env.get(OPT_OUT) == "0":
        return env
    current = env.get(ENV, "")
    missing = [f"{name}={value}" for name, value in TUNABLES
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
