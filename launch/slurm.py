"""Slurm backend through submitit: each attempt is a Slurm job running `jobs.execute`.

The submitted function runs the job's command as a subprocess in the job's cwd and writes its
output to `ROOT/logs/<job>.<attempt>.log`, the same as the local backend, so the sweep root
must be on a filesystem the nodes share. submitit keeps its own files (pickled call, result,
Slurm's stdout/stderr) in `ROOT/.sweep/submitit/<slurm job id>`.

One Slurm job per attempt by default; with `array=True` the jobs that become ready together
(a dependency wave) are submitted as one job array.

Whether an attempt still runs is asked of `squeue`, not `sacct`: sacct needs the accounting
database (slurmdbd), which small clusters and the test cluster do not run. A job that left the
queue without a submitit result (cancelled, timed out, node failure) counts as failed.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
from collections.abc import Sequence
from typing import Any

from launch import jobs as jobs_lib
from launch.jobs import Job

name = "slurm"
# squeue states of a job that has not ended yet.
_ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
           "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}


def queue_states(job_ids: Sequence[str]) -> dict[str, str] | None:
    """`{job id: state}` of the given jobs still known to squeue (array tasks one by one);
    None when squeue cannot be asked."""
    if not job_ids:
        return {}
    bases = sorted({str(j).split("_")[0] for j in job_ids})
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(bases)],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # squeue -j of ids that already left the queue errors on some versions
        if "Invalid job id" in out.stderr:
            return {}
        return None
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def is_active(state: dict[str, Any]) -> bool | None:
    job_id = state.get("backend_id")
    if not job_id:
        return None
    states = queue_states([job_id])
    if states is None:
        return None
    return states.get(str(job_id), "") in _ACTIVE


@dataclasses.dataclass(eq=False)
class _Handle:
    job: Any  # submitit.Job
    name: str
    log: str


class SlurmBackend:
    """See the module docstring; parameters follow submitit's AutoExecutor."""

    name = "slurm"

    def __init__(self, root: pathlib.Path, partition: str | None = None,
                 account: str | None = None, time_min: int = 24 * 60, gpus_per_node: int = 0,
                 cpus_per_task: int | None = None, mem_gb: float | None = None,
                 array: bool = False, max_parallel: int | None = None,
                 poll_interval_s: float = 5.0, extra: dict[str, Any] | None = None):
        import submitit

        self.executor = submitit.AutoExecutor(
            folder=pathlib.Path(root) / jobs_lib.STATE_DIR / "submitit" / "%j", cluster="slurm")
        params: dict[str, Any] = {"timeout_min": time_min, "nodes": 1, "tasks_per_node": 1}
        if gpus_per_node:
            params["gpus_per_node"] = gpus_per_node
        if cpus_per_task:
            params["cpus_per_task"] = cpus_per_task
        if mem_gb:
            params["mem_gb"] = mem_gb
        if partition:
            params["slurm_partition"] = partition
        if account:
            params["slurm_account"] = account
        params.update(extra or {})
        self.executor.update_parameters(**params)
        self.array = array
        self.capacity = max_parallel or 10 ** 6  # Slurm queues the rest itself
        self.poll_interval_s = poll_interval_s

    def start(self, items: Sequence[tuple[Job, int, os.PathLike]]) -> list[_Handle]:
        def call(job: Job, attempt: int, log: os.PathLike):
            return self.executor.submit(jobs_lib.execute, job.name, job.command(), job.cwd,
                                        str(log), attempt)

        if self.array and len(items) > 1:
            self.executor.update_parameters(name="sweep-wave")
            with self.executor.batch():
                submitted = [call(*item) for item in items]
        else:
            submitted = []
            for item in items:
                self.executor.update_parameters(name=item[0].name)
                submitted.append(call(*item))
        return [_Handle(job, item[0].name, str(item[2])) for job, item in zip(submitted, items)]

    def _outcome(self, handle: _Handle) -> int:
        """The exit code from submitit's result file (the job's own, or -1 when submitit's
        wrapper failed; its traceback is appended to the attempt's log)."""
        try:
            return int(handle.job.result())
        except Exception as e:  # submitit.core.utils.FailedJobError and unpickling problems
            with open(handle.log, "a", encoding="utf-8") as f:
                f.write(f"\n# submitit reports a failure of Slurm job {handle.job.job_id}:\n{e}\n")
            return -1

    def poll(self, handles: Sequence[_Handle]) -> dict[_Handle, int]:
        finished = {}
        waiting = []
        for handle in handles:
            if handle.job.paths.result_pickle.exists():
                finished[handle] = self._outcome(handle)
            else:
                waiting.append(handle)
        if not waiting:
            return finished
        states = queue_states([h.job.job_id for h in waiting])
        if states is None:
            return finished  # cannot tell: ask again next time
        for handle in waiting:
            if states.get(str(handle.job.job_id), "") in _ACTIVE:
                continue
            if handle.job.paths.result_pickle.exists():  # finished between the two checks
                finished[handle] = self._outcome(handle)
                continue
            with open(handle.log, "a", encoding="utf-8") as f:
                f.write(f"\n# Slurm job {handle.job.job_id} left the queue without a result "
                        "(cancelled, timed out or its node failed); Slurm's own output: "
                        f"{handle.job.paths.stderr}\n")
            finished[handle] = -1
        return finished

    def info(self, handle: _Handle) -> dict[str, Any]:
        return {"backend_id": str(handle.job.job_id), "host": jobs_lib.hostname(),
                "driver_pid": os.getpid(),
                "submitit_folder": str(handle.job.paths.folder)}

    def stop(self, handle: _Handle) -> None:
        handle.job.cancel(check=False)

    def close(self) -> None:
        pass
