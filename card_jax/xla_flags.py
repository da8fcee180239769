"""XLA:CPU flags card_jax sets for its processes on CPUs where they were measured (issue 7).

jaxlib 0.10.2's XLA:CPU hands convolutions to YNNPACK ("individual_convolution" fusions), and
on both x86 CPUs measured those ran far below XLA's own (Eigen) convolutions:
- a 2-core AMD EPYC Milan (AVX2 + FMA, no AVX-512): in a trace of the embedded default's
  training step (quarter-width Conv-4, R = 2, one pinned core) two of them took 168 and 153
  ms of an 885 ms step; without them the step took 479-515 ms (benchmarks/README, section 15);
- a 2-core Intel Xeon with AVX-512 and AMX: at batch 128, 32x32, 64 -> 64 channels, the
  forward pass took 86 ms with YNNPACK and 49 without, the weight gradient 342 and 89; the
  full-width Conv-4 training step with XLA's convolutions 0.95 -> 0.50 s (section 16).
`--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` keeps them XLA's own. It is
added on Linux x86-64 with AVX2, for a jaxlib whose XLA has the flag (an unknown flag in
`XLA_FLAGS` aborts the process); other architectures were not measured and get nothing.
`card_jax.models.convolution` asks :func:`ynn_convolutions_disabled` which convolutions it
is up against: its im2col passes were measured against YNNPACK's and only replace those.

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
YNN_FUSION_TYPES = "--xla_cpu_experimental_ynn_fusion_type"
NO_YNN_CONVOLUTIONS = "-individual_convolution"
# (flag, value) pairs for x86-64 CPUs with AVX2 (AVX-512 or not).
X86_FLAGS = ((YNN_FUSION_TYPES, NO_YNN_CONVOLUTIONS),)
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
            and "avx2" in features and jaxlib_version.startswith(KNOWN_JAXLIB_PREFIXES)):
        return X86_FLAGS
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


# Per-computation XLA:CPU options (`jax.jit(..., compiler_options=...)`) for small
# latency-bound computations such as the deck's gate (100 images, ~0.3 ms of work): every op on
# one thread (Eigen's thread pool off; no YNNPACK fusions, which split work over the pool too).
# On the 2-vCPU Xeon each hand-off to the other vCPU cost tens of microseconds, more than the
# op it parallelised: the gate took 509 -> 319 us per batch (benchmarks/README, section 19).
SINGLE_THREAD_OPTIONS = (("xla_cpu_multi_thread_eigen", False),
                         ("xla_cpu_experimental_ynn_fusion_type", ""))


def single_thread_options(backend: str | None = None,
                          jaxlib_version: str | None = None) -> dict[str, object]:
    """`compiler_options` that keep a small computation on one thread: SINGLE_THREAD_OPTIONS
    on the CPU backend of a jaxlib whose XLA has them, else {} (other backends and unchecked
    jaxlibs compile as usual; an unknown option name would fail the compilation).

    Args:
      backend: the platform the computation compiles for (default: JAX's default backend).
      jaxlib_version: default: the installed jaxlib's.
    """
    if backend is None:
        import jax

        backend = jax.default_backend()
    version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
    if backend != "cpu" or not version.startswith(KNOWN_JAXLIB_PREFIXES):
        return {}
    return dict(SINGLE_THREAD_OPTIONS)


def ynn_convolutions_disabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether `XLA_FLAGS` (of `environ`, default `os.environ`) keeps convolutions away from
    YNNPACK: the last `--xla_cpu_experimental_ynn_fusion_type` removes `individual_convolution`.
    """
    value = None
    for token in (os.environ if environ is None else environ).get(ENV, "").split():
        name, _, v = token.partition("=")
        if name == YNN_FUSION_TYPES:
            value = v
    return value is not None and NO_YNN_CONVOLUTIONS in value.split(",")
