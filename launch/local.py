"""Local backend: a bounded pool of subprocesses on this machine.

Each job runs as `python -m ...` in its own process group with SIGKILL on the driver's death
(`jobs.child_setup`): Ctrl-C of the driver stops every job cleanly, and `kill -9` of the driver
takes its jobs with it instead of leaving trainings that keep writing into workdirs.

By default one job runs at a time with every core (`threads_per_job = cpu count`): a JAX CPU
training already uses all cores, and two would only share them. With `threads_per_job=K`
smaller than the machine, `cpu_count // K` jobs run side by side, each pinned to its own K CPUs
(sched_setaffinity; XLA sizes its thread pools from the CPUs a process may use) and with
XLA's Eigen multi-threading off.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from card_jax import malloc
from launch import jobs as jobs_lib
from launch.jobs import Job

name = "local"


def is_active(state: dict[str, Any]) -> bool | None:
    """A local attempt runs while its process (same pid, same start time) exists."""
    if state.get("host") != jobs_lib.hostname():
        return None
    return jobs_lib.pid_alive(state.get("pid"), state.get("pid_start"))


def _allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


@dataclasses.dataclass(eq=False)
class _Handle:
    proc: subprocess.Popen
    log: Any
    slot: int
    started: float


class LocalBackend:
    """See the module docstring. `env` adds variables to every job's environment."""

    name = "local"
    poll_interval_s = 0.2

    def __init__(self, max_parallel: int | None = None, threads_per_job: int | None = None,
                 env: dict[str, str] | None = None):
        self.cpus = _allowed_cpus()
        self.threads = max(1, min(threads_per_job or len(self.cpus), len(self.cpus)))
        self.capacity = max_parallel or max(1, len(self.cpus) // self.threads)
        self.env = dict(env or {})
        self.free_slots = list(range(self.capacity))

    def _job_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        # card_jax's entry points would re-execute themselves to get these (card_jax/malloc.py).
        env = malloc.tuned_environ(env)
        if self.threads < len(self.cpus):
            # The pinning (`_slot_cpus`) is what bounds XLA's pools; without Eigen's own pool a
            # job does not oversubscribe its K CPUs. (An `intra_op_parallelism_threads=K`
            # token, TensorFlow's knob, is not an XLA flag: XLA ignores it, so it is not set.)
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                                + " --xla_cpu_multi_thread_eigen=false").strip()
        return env

    def _slot_cpus(self, slot: int) -> list[int] | None:
        if self.threads >= len(self.cpus):
            return None
        return [self.cpus[(slot * self.threads + i) % len(self.cpus)]
                for i in range(self.threads)]

    def start(self, items: Sequence[tuple[Job, int, os.PathLike]]) -> list[_Handle]:
        handles = []
        for job, attempt, log in items:
            slot = self.free_slots.pop(0)
            os.makedirs(os.path.dirname(log), exist_ok=True)
            out = open(log, "a", encoding="utf-8")  # closed in poll/stop
            command = job.command()
            out.write(jobs_lib.log_header(job.name, attempt, command, job.cwd))
            out.flush()
            proc = subprocess.Popen(command, cwd=job.cwd, env=self._job_env(), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    preexec_fn=jobs_lib.child_setup(self._slot_cpus(slot)))
            handles.append(_Handle(proc, out, slot, time.monotonic()))
        return handles

    def _release(self, handle: _Handle, code: int) -> None:
        handle.log.close()
        jobs_lib.append_footer(handle.log.name, code, time.monotonic() - handle.started)
        self.free_slots.append(handle.slot)

    def poll(self, handles: Sequence[_Handle]) -> dict[_Handle, int]:
        finished = {}
        for handle in handles:
            code = handle.proc.poll()
            if code is not None:
                self._release(handle, code)
                finished[handle] = code
        return finished

    def info(self, handle: _Handle) -> dict[str, Any]:
        return {"pid": handle.proc.pid, "pid_start": jobs_lib.process_start_time(handle.proc.pid),
                "host": jobs_lib.hostname(), "driver_pid": os.getpid()}

    def stop(self, handle: _Handle) -> None:
        jobs_lib.terminate_group(handle.proc)
        self._release(handle, handle.proc.returncode if handle.proc.returncode is not None
                      else -15)

    def close(self) -> None:
        pass
