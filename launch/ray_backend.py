"""Ray backend: each attempt is a Ray task running `jobs.execute` on some node of the cluster.

`address=None` starts a private Ray on this machine for the sweep's lifetime; otherwise the
driver joins a running cluster (`ray start --head` ...). The sweep root must be on a filesystem
the nodes share: tasks write `ROOT/logs/<job>.<attempt>.log` and the runs' workdirs directly.

Ray tasks belong to their driver: when the driver (this `run`) dies, Ray kills them, and the
job's subprocess dies with its worker (`jobs.child_setup`). So an attempt is alive exactly
while the driver process that submitted it is; that is what `is_active` checks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from launch import jobs as jobs_lib
from launch.jobs import Job

name = "ray"


def is_active(state: dict[str, Any]) -> bool | None:
    if state.get("host") != jobs_lib.hostname():
        return None
    return jobs_lib.pid_alive(state.get("driver_pid"), state.get("driver_start"))


@dataclasses.dataclass(eq=False)
class _Handle:
    ref: Any  # ray.ObjectRef
    log: str


class RayBackend:
    """See the module docstring. `num_cpus`/`num_gpus` are reserved per task; `max_parallel`
    caps the tasks in flight (default: as many as the cluster's resources admit)."""

    name = "ray"
    poll_interval_s = 0.5

    def __init__(self, address: str | None = None, num_cpus: float = 1, num_gpus: float = 0,
                 max_parallel: int | None = None, init_kwargs: dict[str, Any] | None = None):
        import ray

        self.ray = ray
        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        kwargs.update(init_kwargs or {})
        ray.init(address=address or None, **kwargs)
        # Ray's own task retries are off: failures are the scheduler's (logs per attempt).
        self.remote = ray.remote(jobs_lib.execute).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)
        self.capacity = max_parallel or 10 ** 6

    def start(self, items: Sequence[tuple[Job, int, os.PathLike]]) -> list[_Handle]:
        return [_Handle(self.remote.remote(job.name, job.command(), job.cwd, str(log), attempt),
                        str(log)) for job, attempt, log in items]

    def poll(self, handles: Sequence[_Handle]) -> dict[_Handle, int]:
        if not handles:
            return {}
        by_ref = {h.ref: h for h in handles}
        ready, _ = self.ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        finished = {}
        for ref in ready:
            handle = by_ref[ref]
            try:
                finished[handle] = int(self.ray.get(ref))
            except Exception as e:  # the worker died, the task was cancelled, ...
                with open(handle.log, "a", encoding="utf-8") as f:
                    f.write(f"\n# Ray reports a failure of the task: {type(e).__name__}: {e}\n")
                finished[handle] = -1
        return finished

    def info(self, handle: _Handle) -> dict[str, Any]:
        return {"backend_id": handle.ref.task_id().hex()[:16],
                "host": jobs_lib.hostname(), "driver_pid": os.getpid(),
                "driver_start": jobs_lib.process_start_time(os.getpid())}

    def stop(self, handle: _Handle) -> None:
        self.ray.cancel(handle.ref, force=True)

    def close(self) -> None:
        self.ray.shutdown()
