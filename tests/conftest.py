"""Test setup: CPU only, 4 fake devices so that sharding code paths run on any machine."""

import atexit
import os
import shutil
import tempfile

from card_jax import malloc, xla_flags

# The CLI runs the tests start (and pytest-xdist's workers) get the compile-bound glibc
# malloc tunables (huge pages, per-thread arenas; card_jax/malloc.py) without re-executing
# themselves: the suite compiles far more than it steps, and the training tunables' single
# arena slows XLA's parallel compilation (tests/test_train.py 72 -> 87 s). The opt-out makes
# the entry points a test runs as subprocesses keep these instead of adding the training
# tunables (tests/test_malloc.py runs those in processes of its own). pytest itself is not
# restarted: its output capture already holds stdout/stderr here.
os.environ.update(malloc.tuned_environ(os.environ, malloc.COMPILE_BOUND_TUNABLES))
os.environ.setdefault(malloc.OPT_OUT, "0")
# The XLA:CPU flags the entry points add on this CPU (card_jax/xla_flags.py), so that tests
# compile what the CLI compiles; set before JAX creates its backend.
xla_flags.apply()

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, inherited by the CLI runs the tests start
# (`helpers.cli_env` copies the environment): many tests train the same smoke configs in
# separate processes, and compiling their steps dominates the suite's time on 2 CPUs. A fresh
# directory per session, so nothing carries over between runs (as `launch.sweep` does for a
# sweep); a cache the caller set is kept. pytest-xdist's workers inherit the directory: the
# controller imports this file before it starts them, so they all share one cache.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _cache = tempfile.mkdtemp(prefix="card_jax_test_jax_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()

import pytest  # noqa: E402  (after the environment above is set)


@pytest.fixture
def fast_compile():
    """For tests that check structure, not speed: skip XLA's optimisation passes."""
    import jax

    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
