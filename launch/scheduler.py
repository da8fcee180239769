"""Runs a sweep's jobs on a backend in dependency order, and reads a sweep's status back.

The scheduler is one loop in the driver process: start every job whose deps are done while the
backend has room, poll the running ones, retry a failure up to `retries` times, mark the
dependents of a job that failed for good as blocked. All it knows is written to the sweep root
as it happens (`launch.jobs`: done markers, state files, logs), so a driver killed at any point
loses nothing: the next `run` skips what is done and starts the rest again, and card_jax
resumes each interrupted run from its last checkpoint.

A backend (launch.local, launch.slurm, launch.ray_backend) provides:
  name, capacity, poll_interval_s
  start(items) -> handles          items: [(job, attempt, log path)], started together
  poll(handles) -> {handle: code}  the ones that finished, with their exit code
  info(handle) -> dict             what the state file records (pid, host, cluster job id)
  stop(handle)                     cancel one (Ctrl-C of the driver)
  close()
and a module-level `is_active(state) -> bool | None` telling whether the attempt a state file
describes is still alive (None: cannot tell from here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from launch import jobs as jobs_lib
from launch.jobs import Job

DONE, RUNNING, PENDING, FAILED, BLOCKED = "done", "running", "pending", "failed", "blocked"
EXIT_INCOMPLETE, EXIT_BUSY, EXIT_INTERRUPTED = 1, 2, 130

# state-file "backend" -> module with is_active(state)
_BACKEND_MODULES = {"local": "launch.local", "slurm": "launch.slurm", "ray": "launch.ray_backend"}


def is_active(state: dict[str, Any]) -> bool | None:
    """Whether the attempt described by a state file still runs, asked of its backend."""
    module = _BACKEND_MODULES.get(state.get("backend", ""))
    if module is None:
        return None
    return importlib.import_module(module).is_active(state)


def _capacity(n: int) -> str:
    return "no limit on jobs at a time" if n >= 10 ** 6 else f"up to {n} at a time"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return (f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600
            else f"{seconds // 60}:{seconds % 60:02d}")


def _where(backend: str, info: dict[str, Any]) -> str:
    """Where an attempt runs, for people: `pid 123 on host`, `slurm job 45_2`, `ray task ab12`."""
    if info.get("backend_id"):
        return f"{backend} {'task' if backend == 'ray' else 'job'} {info['backend_id']}"
    return f"pid {info.get('pid')} on {info.get('host')}"


@dataclasses.dataclass
class Row:
    """One job's line in a status table."""

    job: Job
    status: str
    detail: str = ""
    attempts: int = 0
    seconds: float | None = None
    logs: list[str] = dataclasses.field(default_factory=list)


def _logs(root: pathlib.Path, name: str, attempts: int) -> list[str]:
    return [str(p) for a in range(1, attempts + 1)
            if (p := jobs_lib.log_path(root, name, a)).exists()]


def job_status(job: Job, state: dict[str, Any] | None, root: pathlib.Path) -> Row:
    """A job's status from the filesystem alone (done marker, state file, liveness check)."""
    attempts = int((state or {}).get("attempt", 0))
    row = Row(job, PENDING, attempts=attempts, logs=_logs(root, job.name, attempts))
    if state and state.get("started_at") and state.get("ended_at"):
        row.seconds = state["ended_at"] - state["started_at"]
    if jobs_lib.is_done(job):
        row.status = DONE
        return row
    if not state:
        return row
    where = _where(state.get("backend", ""), state)
    kind = state.get("status")
    if kind == "running":
        alive = is_active(state)
        if alive:
            row.status, row.detail = RUNNING, where
            row.seconds = time.time() - state.get("started_at", time.time())
        elif alive is None:
            row.detail = f"cannot check {where} from {jobs_lib.hostname()}"
        else:
            row.detail = f"interrupted (attempt {attempts}: {where} is gone); run resumes it"
    elif kind == "failed":
        row.status = FAILED
        row.detail = (f"{state.get('failures', 1)} failure(s), last: {state.get('reason', '?')}"
                      + ("" if state.get("gave_up") else "; retries left"))
    elif kind == "interrupted":
        row.detail = "interrupted; run resumes it"
    elif kind == "succeeded":
        row.detail = "exited 0 but the done marker is missing now"
    return row


def mark_blocked(rows: dict[str, Row]) -> None:
    """Pending jobs with a failed or blocked dependency (rows in dependency order)."""
    for row in rows.values():
        if row.status == PENDING:
            bad = [d for d in row.job.deps if rows[d].status in (FAILED, BLOCKED)]
            if bad:
                row.status, row.detail = BLOCKED, f"needs {', '.join(bad)}"


def sweep_status(jobs: Sequence[Job], root: pathlib.Path) -> dict[str, Row]:
    rows = {job.name: job_status(job, jobs_lib.read_state(root, job.name), root) for job in jobs}
    mark_blocked(rows)
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """A fixed-width table: status, kind, attempts, time, name, detail."""
    width = max([len(r.job.name) for r in rows] + [4])
    lines = [f"{'status':<8} {'kind':<8} {'tries':>5} {'time':>8}  {'job':<{width}}  detail"]
    for r in rows:
        t = _clock(r.seconds) if r.seconds is not None else "-"
        lines.append(f"{r.status:<8} {r.job.kind:<8} {r.attempts:>5} {t:>8}  "
                     f"{r.job.name:<{width}}  {r.detail}".rstrip())
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(rows)} jobs")
    return "\n".join(lines)


def failure_listing(rows: Sequence[Row]) -> str:
    bad = [r for r in rows if r.status == FAILED]
    if not bad:
        return ""
    lines = ["failed jobs and their logs:"]
    for r in bad:
        lines.append(f"  {r.job.name}: {r.detail}")
        lines += [f"    {log}" for log in r.logs]
    return "\n".join(lines)


@contextlib.contextmanager
def sweep_lock(root: pathlib.Path) -> Iterator[None]:
    """One driver per sweep root: two would start the same job twice into one workdir."""
    path = root / jobs_lib.STATE_DIR / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise SweepBusyError(f"another driver holds {path} ({f.read().strip()}); wait for it "
                                 "or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {jobs_lib.hostname()}\n")
        f.flush()
        yield


class SweepBusyError(RuntimeError):
    pass


class _Adopted:
    """An attempt started by an earlier driver that is still alive (e.g. a Slurm job still
    queued after its driver was killed): watched until it ends, never started twice."""

    def __init__(self, state: dict[str, Any]):
        self.state = state


class Scheduler:
    """One `run`: see the module docstring."""

    def __init__(self, jobs: Sequence[Job], root: pathlib.Path, backend, retries: int = 1,
                 out: TextIO | None = None, clock: Callable[[], float] = time.time):
        self.jobs = {job.name: job for job in jobs_lib.check_graph(jobs)}
        self.root, self.backend, self.retries = root, backend, retries
        self.out = out or sys.stdout
        self.clock = clock
        self.t0 = clock()
        self.status: dict[str, str] = {}
        self.detail: dict[str, str] = {}
        self.states: dict[str, dict[str, Any]] = {}
        self.running: dict[Any, str] = {}  # handle -> job name
        self.ran: set[str] = set()

    # ------------------------------------------------------------------ bookkeeping
    def _say(self, verb: str, job: Job, text: str = "") -> None:
        self.out.write(f"[{_clock(self.clock() - self.t0):>7}] {verb:<8} {job.kind:<8} "
                       f"{job.name}{'  ' + text if text else ''}\n")
        self.out.flush()

    def _save(self, name: str, **updates: Any) -> None:
        state = self.states.setdefault(name, {"name": name, "kind": self.jobs[name].kind})
        state.update(updates)
        jobs_lib.write_state(self.root, name, state)

    def _initial(self) -> None:
        for name, job in self.jobs.items():
            state = jobs_lib.read_state(self.root, name) or {}
            self.states[name] = state
            if jobs_lib.is_done(job):
                self.status[name] = DONE
            elif state.get("status") == "running" and is_active(state):
                self.status[name] = RUNNING
                self.running[_Adopted(state)] = name
                self.ran.add(name)
            elif state.get("status") == "failed" and state.get("failures", 0) > self.retries:
                self.status[name] = FAILED
                self.detail[name] = f"failed {state['failures']} time(s); use `retry`"
            else:
                self.status[name] = PENDING

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        """Runs until nothing more can start; returns 0 if every job is done."""
        self._initial()
        done_before = sum(s == DONE for s in self.status.values())
        self.out.write(f"sweep: {len(self.jobs)} jobs, {done_before} already done, backend "
                       f"{self.backend.name} ({_capacity(self.backend.capacity)}), "
                       f"root {self.root}\n")
        for handle, name in self.running.items():
            where = _where(handle.state["backend"], handle.state)
            self._say("watching", self.jobs[name], f"attempt {handle.state.get('attempt')} "
                      f"started by an earlier driver ({where})")
        try:
            while True:
                self._collect()
                self._block()
                ready = [n for n, s in self.status.items() if s == PENDING
                         and all(self.status[d] == DONE for d in self.jobs[n].deps)]
                room = self.backend.capacity - len(self.running)
                if ready and room > 0:
                    self._start(ready[:room])
                    continue  # look again at once: a start can fail and block others
                if not self.running:
                    break
                time.sleep(self.backend.poll_interval_s)
        except KeyboardInterrupt:
            self._interrupt()
            self._summary()
            return EXIT_INTERRUPTED
        return self._summary()

    def _start(self, names: list[str]) -> None:
        items = []
        for name in names:
            attempt = int(self.states[name].get("attempt", 0)) + 1
            items.append((self.jobs[name], attempt, jobs_lib.log_path(self.root, name, attempt)))
        try:
            handles = self.backend.start(items)
        except Exception as e:  # e.g. sbatch refused the job (bad partition, no account)
            for job, attempt, log in items:
                os.makedirs(os.path.dirname(log), exist_ok=True)
                with open(log, "a", encoding="utf-8") as f:
                    f.write(f"# {self.backend.name} could not start the job: "
                            f"{type(e).__name__}: {e}\n")
                self._save(job.name, status="running", attempt=attempt, backend=self.backend.name,
                           started_at=time.time(), log=str(log), argv=list(job.argv))
                self._finish(job.name, -1, f"{self.backend.name} could not start it: {e}")
            return
        for (job, attempt, log), handle in zip(items, handles):
            self.running[handle] = job.name
            self.status[job.name] = RUNNING
            self.ran.add(job.name)
            info = self.backend.info(handle)
            self._save(job.name, status="running", attempt=attempt,
                       failures=int(self.states[job.name].get("failures", 0)),
                       backend=self.backend.name, started_at=time.time(), ended_at=None,
                       returncode=None, reason=None, gave_up=False, log=str(log),
                       argv=list(job.argv), cwd=job.cwd, **info)
            self._say("start", job, f"attempt {attempt}, {_where(self.backend.name, info)}, "
                      f"log {log}")

    def _collect(self) -> None:
        if not self.running:
            return
        adopted = [h for h in self.running if isinstance(h, _Adopted)]
        finished = self.backend.poll([h for h in self.running if not isinstance(h, _Adopted)])
        for handle in adopted:
            if not is_active(handle.state):
                finished[handle] = 0 if jobs_lib.is_done(self.jobs[self.running[handle]]) else -1
        for handle, code in finished.items():
            self._finish(self.running.pop(handle), code)

    def _finish(self, name: str, code: int, reason: str = "") -> None:
        job = self.jobs[name]
        state = self.states[name]
        now = time.time()
        took = now - state.get("started_at", now)
        if code == 0 and jobs_lib.is_done(job):
            self.status[name] = DONE
            self._save(name, status="succeeded", ended_at=now, returncode=0, failures=0)
            self._say("done", job, f"in {_clock(took)}")
            return
        if not reason and code != 0:
            reason = f"exit code {code}"
        elif not reason:
            missing = [p for p in job.done if not os.path.exists(p)]
            reason = (f"exit code 0 but {missing[0]} is missing" if missing
                      else "exit code 0 but its output does not match the job's settings")
        failures = int(state.get("failures", 0)) + 1
        gave_up = failures > self.retries
        self._save(name, status="failed", ended_at=now, returncode=code, failures=failures,
                   reason=reason, gave_up=gave_up)
        log = state.get("log", "")
        if gave_up:
            self.status[name] = FAILED
            self.detail[name] = f"{reason} (failed {failures} time(s))"
            self._say("FAILED", job, f"{reason} after {_clock(took)}, giving up; log {log}")
        else:
            self.status[name] = PENDING
            self._say("failed", job, f"{reason} after {_clock(took)}, retrying "
                      f"({failures} of {self.retries} retries used); log {log}")

    def _block(self) -> None:
        for name in self.jobs:  # dependency order, so blocking propagates in one pass
            if self.status[name] == PENDING:
                bad = [d for d in self.jobs[name].deps if self.status[d] in (FAILED, BLOCKED)]
                if bad:
                    self.status[name] = BLOCKED
                    self.detail[name] = f"needs {', '.join(bad)}"
                    self._say("blocked", self.jobs[name], f"needs failed {', '.join(bad)}")

    def _interrupt(self) -> None:
        """Ctrl-C / SIGTERM: stop what runs, record it as interrupted (not a failure)."""
        self.out.write("interrupted: stopping running jobs\n")
        for handle, name in list(self.running.items()):
            if not isinstance(handle, _Adopted):
                with contextlib.suppress(Exception):
                    self.backend.stop(handle)
                self._save(name, status="interrupted", ended_at=time.time())
            self.status[name] = PENDING
            self.detail[name] = "interrupted"
        self.running.clear()

    def _summary(self) -> int:
        rows = []
        for name, job in self.jobs.items():
            state = self.states.get(name, {})
            attempts = int(state.get("attempt", 0))
            row = Row(job, self.status[name], self.detail.get(name, ""), attempts,
                      logs=_logs(self.root, name, attempts))
            if state.get("started_at") and state.get("ended_at"):
                row.seconds = state["ended_at"] - state["started_at"]
            if row.status == DONE and name not in self.ran:
                row.detail = "done before this run"
            rows.append(row)
        self.out.write("\n" + format_table(rows) + "\n")
        listing = failure_listing(rows)
        if listing:
            self.out.write(listing + "\n")
        self.out.write(f"total {_clock(self.clock() - self.t0)}\n")
        self.out.flush()
        return 0 if all(r.status == DONE for r in rows) else EXIT_INCOMPLETE


def reset_failures(jobs: Sequence[Job], root: pathlib.Path) -> list[str]:
    """`retry`: forget the failure count of failed (and interrupted) jobs; attempts, and so
    log numbers, keep counting, so earlier logs stay."""
    reset = []
    for job in jobs:
        state = jobs_lib.read_state(root, job.name)
        if state and state.get("status") in ("failed", "interrupted") and not jobs_lib.is_done(job):
            state.update(failures=0, gave_up=False)
            jobs_lib.write_state(root, job.name, state)
            reset.append(job.name)
    return reset
