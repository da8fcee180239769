"""card_jax.malloc: the glibc tunables for XLA:CPU's buffers and the re-exec that sets them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from card_jax import malloc

ALL = ("glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=268435456"
       ":glibc.malloc.trim_threshold=1073741824")


def test_tuned_environ_adds_the_tunables():
    assert malloc.tuned_environ({"HOME": "/root"}) == {"HOME": "/root", "GLIBC_TUNABLES": ALL}


def test_tuned_environ_keeps_what_the_caller_set():
    env = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"}
    assert malloc.tuned_environ(env)["GLIBC_TUNABLES"] == (
        "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"
        ":glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824")
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
