"""card_jax.malloc: the glibc tunables for XLA:CPU's buffers and the re-exec that sets them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from card_jax import malloc

ALL = ("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0"
       ":glibc.malloc.trim_threshold=1099511627776")


def test_tuned_environ_adds_the_tunables():
    assert malloc.tuned_environ({"HOME": "/root"}) == {"HOME": "/root", "GLIBC_TUNABLES": ALL}


def test_tuned_environ_keeps_what_the_caller_set():
    env = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"}
    assert malloc.tuned_environ(env)["GLIBC_TUNABLES"] == (
        "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"
        ":glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776")
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"}


def test_tuned_environ_is_idempotent_and_can_be_turned_off():
    once = malloc.tuned_environ({})
    assert malloc.tuned_environ(once) == once
    assert malloc.tuned_environ({"CARD_JAX_GLIBC_TUNABLES": "0"}) == {
        "CARD_JAX_GLIBC_TUNABLES": "0"}


def test_reexec_is_a_no_op_once_tuned(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    monkeypatch.setenv("GLIBC_TUNABLES", ALL)
    malloc.reexec_if_untuned()
    monkeypatch.setenv("CARD_JAX_GLIBC_TUNABLES", "0")
    monkeypatch.delenv("GLIBC_TUNABLES")
    malloc.reexec_if_untuned()
    assert calls == []


@pytest.mark.skipif(not malloc.applies_here(), reason="glibc Linux only")
def test_reexec_restarts_the_same_command_with_the_tunables():
    code = ("import os, sys; from card_jax import malloc; print('start', flush=True); "
            "malloc.reexec_if_untuned(); print(sys.argv[1:], os.environ['GLIBC_TUNABLES'])")
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "CARD_JAX_GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", code, "a", "--b=1"], env=env, check=True,
                         capture_output=True, text=True, cwd=os.path.dirname(
                             os.path.dirname(os.path.abspath(__file__)))).stdout
    # The first process prints "start" and becomes the second, which prints it again.
    assert out.splitlines() == ["start", "start", f"['a', '--b=1'] {ALL}"]


_REUSE = """
import resource, threading
import numpy as np

def second_allocation_faults(out):
    first = np.ones(300 << 18, np.float32)  # 300 MB, every page touched
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = np.ones(300 << 18, np.float32)
    del second
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

out = []
# In a thread of its own, as XLA:CPU's executions run: glibc gives such threads arenas of
# their own unless arena_max=1.
worker = threading.Thread(target=second_allocation_faults, args=(out,))
worker.start()
worker.join()
print(out[0])
"""


@pytest.mark.skipif(not malloc.applies_here(), reason="glibc Linux only")
def test_a_freed_step_sized_buffer_is_reused_without_page_faults():
    """What the tunables are for: a 300 MB buffer allocated again after being freed (XLA:CPU's
    temporary buffer, step after step) comes back from the heap, already mapped."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("GLIBC_TUNABLES", "CARD_JAX_GLIBC_TUNABLES")}

    def faults(env):
        return int(subprocess.run([sys.executable, "-c", _REUSE], env=env, check=True,
                                  capture_output=True, text=True).stdout)

    # Untuned, glibc maps it afresh: >= 150 faults with 2 MB pages, 76,800 with 4 kB ones.
    assert faults(base) >= 100
    assert faults(malloc.tuned_environ(base)) < 16
