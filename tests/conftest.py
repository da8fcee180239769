"""Test setup: CPU only, 4 fake devices so that sharding code paths run on any machine."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
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
