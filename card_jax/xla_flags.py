"""XLA:CPU flags card_jax sets for its processes on CPUs where they were measured (issue 7).

On an x86 CPU without AVX-512 (a 2-core AMD EPYC Milan, AVX2 + FMA), jaxlib 0.10.2's XLA:CPU
hands some convolutions to YNNPACK ("individual_convolution" fusions), and those ran slowly:
in a trace of the embedded default's training step (quarter-width Conv-4, R = 2, one pinned
core) two of them took 168 and 153 ms of an 885 ms step. With
`--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` XLA keeps them as its own
convolutions and the step took 479-515 ms; the full-width Conv-4 step went 1.15 -> 1.07 s and
batched inference was unchanged or faster (benchmarks/README, section 15). Nothing was
measured on AVX-512 CPUs or other architectures, so the flag is added only where it was:
Linux on x86-64 with AVX2 and without AVX-512F, and a jaxlib whose XLA has the flag (an
unknown flag in `XLA_FLAGS` aborts the process).

XLA reads `XLA_FLAGS` when JAX creates its CPU backend, so :func:`apply` must run before the
first computation; entry points call it through :func:`card_jax.entry.prepare`. A flag the
caller already set in `XLA_FLAGS` keeps the caller's value; `CARD_JAX_XLA_FLAGS=0` adds none.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

ENV = "XLA_FLAGS"
OPT_OUT = "CARD_JAX_XLA_FLAGS"  # "0": leave XLA's flags alone
# (flag, value) pairs for x86-64 CPUs with AVX2 and no AVX-512F.
AVX2_ONLY_FLAGS = (("--xla_cpu_experimental_ynn_fusion_type", "-individual_convolution"),)
# jaxlib releases whose XLA:CPU has these flags (checked by hand for each entry).
KNOWN_JAXLIB_PREFIXES = ("0.10.",)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags of the first CPU in `cpuinfo` (empty if it cannot be read)."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _jaxlib_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return ""


def flags_for(features: set[str], machine: str, system: str,
              jaxlib_version: str) -> tuple[tuple[str, str], ...]:
    """The (flag, value) pairs for a CPU with `features` (its /proc/cpuinfo flags)."""
    if (system.startswith("linux") and machine in ("x86_64", "AMD64")
            and "avx2" in features and "avx512f" not in features
            and jaxlib_version.startswith(KNOWN_JAXLIB_PREFIXES)):
        return AVX2_ONLY_FLAGS
    return ()


def flags_here() -> tuple[tuple[str, str], ...]:
    return flags_for(cpu_flags(), platform.machine(), sys.platform, _jaxlib_version())


def tuned_environ(environ: Mapping[str, str],
                  flags: tuple[tuple[str, str], ...] | None = None) -> dict[str, str]:
    """A copy of `environ` whose `XLA_FLAGS` also holds `flags` (default: this machine's);
    a flag the caller set keeps the caller's value; `CARD_JAX_XLA_FLAGS=0` adds nothing."""
    env = dict(environ)
    if env.get(OPT_OUT) == "0":
        return env
    flags = flags_here() if flags is None else flags
    current = env.get(ENV, "")
    present = {token.split("=", 1)[0] for token in current.split()}
    missing = [f"{name}={value}" for name, value in flags if name not in present]
    if missing:
        env[ENV] = " ".join([current, *missing] if current else missing)
    return env


def apply() -> None:
    """Adds this machine's flags to `os.environ` (before JAX creates its backend)."""
    os.environ.update(tuned_environ(os.environ))
