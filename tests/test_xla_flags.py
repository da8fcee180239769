"""card_jax.xla_flags: which XLA:CPU flags a machine gets, and that XLA accepts them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from card_jax import xla_flags

YNN = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
AVX2 = {"sse2", "avx", "avx2", "fma"}


def test_flags_only_for_avx2_on_linux_x86_with_a_known_jaxlib():
    x86 = xla_flags.X86_FLAGS
    assert xla_flags.flags_for(AVX2, "x86_64", "linux", "0.10.2") == x86
    assert xla_flags.flags_for(AVX2 | {"avx512f", "amx_tile"}, "x86_64", "linux", "0.10.2") == x86
    assert xla_flags.flags_for({"sse2", "avx"}, "x86_64", "linux", "0.10.2") == ()
    assert xla_flags.flags_for(AVX2, "aarch64", "linux", "0.10.2") == ()
    assert xla_flags.flags_for(AVX2, "x86_64", "darwin", "0.10.2") == ()
    assert xla_flags.flags_for(AVX2, "x86_64", "linux", "0.11.0") == ()
    assert xla_flags.flags_for(AVX2, "x86_64", "linux", "") == ()


def test_cpu_flags_reads_the_first_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n"
                    "processor\t: 1\nflags\t\t: fpu avx512f\n")
    assert xla_flags.cpu_flags(str(info)) == {"fpu", "sse2", "avx2", "fma"}
    assert xla_flags.cpu_flags(str(tmp_path / "missing")) == set()


def test_tuned_environ_appends_keeps_the_callers_value_and_can_be_turned_off():
    flags = xla_flags.X86_FLAGS
    assert xla_flags.tuned_environ({"HOME": "/root"}, flags) == {"HOME": "/root",
                                                                 "XLA_FLAGS": YNN}
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert xla_flags.tuned_environ(env, flags)["XLA_FLAGS"] == (
        "--xla_force_host_platform_device_count=4 " + YNN)
    assert env == {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}  # not mutated
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"}
    assert xla_flags.tuned_environ(mine, flags) == mine
    once = xla_flags.tuned_environ({}, flags)
    assert xla_flags.tuned_environ(once, flags) == once
    assert xla_flags.tuned_environ({"CARD_JAX_XLA_FLAGS": "0"}, flags) == {
        "CARD_JAX_XLA_FLAGS": "0"}
    assert xla_flags.tuned_environ({}, ()) == {}


@pytest.mark.skipif(not xla_flags._jaxlib_version().startswith(xla_flags.KNOWN_JAXLIB_PREFIXES),
                    reason="the flags are only added for the jaxlib releases listed")
def test_the_installed_xla_accepts_the_flags():
    """XLA aborts on a flag it does not know: this jaxlib must know every one we may add."""
    env = {"XLA_FLAGS": " ".join(f"{n}={v}" for n, v in xla_flags.X86_FLAGS),
           "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    code = ("import jax, jax.numpy as jnp; x = jnp.ones((1, 8, 8, 2));"
            "w = jnp.ones((3, 3, 2, 4));"
            "y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',"
            " dimension_numbers=('NHWC', 'HWIO', 'NHWC')); print(float(y[0, 4, 4, 0]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "18.0"


def test_entry_points_add_this_machines_flags():
    code = ("import os; from card_jax import entry; entry.prepare();"
            " print(os.environ.get('XLA_FLAGS', ''))")
    env = {"PATH": "/usr/bin:/bin", "CARD_JAX_GLIBC_TUNABLES": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == xla_flags.tuned_environ({}).get("XLA_FLAGS", "")


def test_ynn_convolutions_disabled_reads_the_last_fusion_type_flag():
    assert xla_flags.ynn_convolutions_disabled({"XLA_FLAGS": YNN})
    assert xla_flags.ynn_convolutions_disabled(
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
                      "--xla_cpu_experimental_ynn_fusion_type=-dot,-individual_convolution"})
    assert not xla_flags.ynn_convolutions_disabled({})
    assert not xla_flags.ynn_convolutions_disabled({"XLA_FLAGS": "--xla_cpu_use_onednn=true"})
    assert not xla_flags.ynn_convolutions_disabled(
        {"XLA_FLAGS": YNN + " --xla_cpu_experimental_ynn_fusion_type=individual_dot"})
    assert not xla_flags.ynn_convolutions_disabled(
        {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"})


def test_single_thread_options_only_for_cpu_with_a_known_jaxlib():
    one_thread = {"xla_cpu_multi_thread_eigen": False, "xla_cpu_experimental_ynn_fusion_type": ""}
    assert xla_flags.single_thread_options("cpu", "0.10.2") == one_thread
    assert xla_flags.single_thread_options("gpu", "0.10.2") == {}
    assert xla_flags.single_thread_options("tpu", "0.10.2") == {}
    assert xla_flags.single_thread_options("cpu", "0.11.0") == {}


@pytest.mark.skipif(not xla_flags._jaxlib_version().startswith(xla_flags.KNOWN_JAXLIB_PREFIXES),
                    reason="the options are only given for the jaxlib releases listed")
def test_the_installed_xla_compiles_with_the_single_thread_options():
    """The options are accepted per computation and take the matmul away from YNNPACK (whose
    fusions split work over XLA's thread pool), without changing its result."""
    import jax
    import numpy as np

    a = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096

    def product(x):
        return x @ x

    default = jax.jit(product).lower(a).compile()
    single = jax.jit(product, compiler_options=xla_flags.single_thread_options("cpu")
                     ).lower(a).compile()
    assert "__ynn_fusion" in default.as_text()
    assert "__ynn_fusion" not in single.as_text()
    np.testing.assert_allclose(np.asarray(single(a)), np.asarray(default(a)), rtol=1e-6)
