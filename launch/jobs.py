"""Jobs of a sweep: what to run, where its output goes, when it is done, what it waits for.

A sweep is a list of `Job`s. Everything the launcher knows about a job's progress lives in the
filesystem under the sweep's ROOT, so any process (a second `status`, a re-run after a crash,
a Slurm node) reaches the same answer:

* the job's **done marker** (e.g. `W/results.json`, which card_jax writes last): done;
* `ROOT/.sweep/<job>.json`: the state of its latest attempt (who runs it, which attempt, how
  many failures), written atomically by the driver;
* `ROOT/logs/<job>.<attempt>.log`: stdout and stderr of every attempt, never overwritten.

This module imports neither JAX nor any cluster library: `list` and `status` stay instant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

KINDS = ("train", "corrupt", "deck", "heatmap", "report", "command")
# The repository root: config paths in job command lines (`configs/default.py`) are relative
# to it, so every job runs there.
REPO = pathlib.Path(__file__).resolve().parent.parent
STATE_DIR = ".sweep"
LOG_DIR = "logs"
# Placeholders that keep names independent of where the sweep root and the checkout live.
_ROOT_TOKEN, _REPO_TOKEN = "$ROOT", "$REPO"


@dataclasses.dataclass(frozen=True)
class Job:
    """One command of a sweep.

    Attributes:
      name: unique and stable: a readable prefix and a hash of what the job computes.
      kind: one of KINDS; decides nothing at run time except the done check's details.
      argv: arguments after the Python executable (`["-m", "card_jax.main", ...]`).
      workdir: the folder the job writes (for `corrupt`, the "-C" folder; for `report`, its
        output folder).
      done: files that must all exist for the job to count as done.
      deps: names of the jobs that must be done first.
      cwd: where the command runs (the repository, so relative config paths resolve).
      done_json: for a done file that is JSON, key/value pairs it must hold (e.g. a heat map
        made with other settings is not this job's output).
    """

    name: str
    kind: str
    argv: tuple[str, ...]
    workdir: str
    done: tuple[str, ...]
    deps: tuple[str, ...] = ()
    cwd: str = str(REPO)
    done_json: tuple[tuple[str, str, Any], ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"job {self.name}: kind {self.kind!r} not in {KINDS}")
        if not self.done:
            raise ValueError(f"job {self.name}: needs at least one done file")

    def command(self) -> list[str]:
        """The full command line, run with this interpreter."""
        return [sys.executable, *self.argv]

    def shell_line(self) -> str:
        return shlex.join(["python", *self.argv])


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------


def _normalise(value: Any, root: str) -> Any:
    """Replaces the sweep root and the checkout by placeholders, recursively."""
    if isinstance(value, str):
        out = value.replace(root, _ROOT_TOKEN) if root else value
        return out.replace(str(REPO), _REPO_TOKEN)
    if isinstance(value, Mapping):
        return {str(k): _normalise(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v, root) for v in value]
    return value


def stable_name(prefix: str, identity: Any, root: str | os.PathLike = "") -> str:
    """`prefix-<8 hex>`, the hash taken over `identity` (a resolved config, a command line).

    Only the job's own identity enters the hash, so adding a grid point never renames another
    job, and any change to what a job computes gives it a new name (and so a new workdir: card_jax
    refuses to resume a workdir with a different config). Paths under `root` and the checkout
    are hashed relative to them, so a moved sweep keeps its names.
    """
    canonical = json.dumps(_normalise(identity, str(root)), sort_keys=True,
                           separators=(",", ":"), default=str)
    digest = hashlib.sha1(canonical.encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in prefix)
    return f"{safe}-{digest}"


# ----------------------------------------------------------------------------------------------
# Done detection and ordering
# ----------------------------------------------------------------------------------------------


def is_done(job: Job) -> bool:
    """True when every done file exists (and the JSON one holds the expected values)."""
    for path in job.done:
        if not os.path.exists(path):
            return False
    for path, key, expected in job.done_json:
        try:
            with open(path, encoding="utf-8") as f:
                if json.load(f).get(key) != expected:
                    return False
        except (OSError, ValueError, AttributeError):
            return False
    return True


def check_graph(jobs: Sequence[Job]) -> list[Job]:
    """Jobs in an order where each comes after its deps; refuses duplicates, unknown deps and
    cycles with the names involved."""
    by_name: dict[str, Job] = {}
    for job in jobs:
        if job.name in by_name:
            raise ValueError(f"two jobs are named {job.name!r}: a grid must not repeat a point")
        by_name[job.name] = job
    for job in jobs:
        missing = [d for d in job.deps if d not in by_name]
        if missing:
            raise ValueError(f"job {job.name} depends on unknown job(s): {', '.join(missing)}")
    order: list[Job] = []
    mark: dict[str, int] = {}  # 1 = on the current path, 2 = placed

    def visit(name: str, path: list[str]) -> None:
        if mark.get(name) == 2:
            return
        if mark.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            raise ValueError(f"dependency cycle: {' -> '.join(cycle)}")
        mark[name] = 1
        for dep in by_name[name].deps:
            visit(dep, path + [name])
        mark[name] = 2
        order.append(by_name[name])

    for job in jobs:  # the grid's own order, adjusted only where deps require it
        visit(job.name, [])
    return order


# ----------------------------------------------------------------------------------------------
# State files and logs
# ----------------------------------------------------------------------------------------------


def state_path(root: str | os.PathLike, name: str) -> pathlib.Path:
    return pathlib.Path(root) / STATE_DIR / f"{name}.json"


def log_path(root: str | os.PathLike, name: str, attempt: int) -> pathlib.Path:
    return pathlib.Path(root) / LOG_DIR / f"{name}.{attempt}.log"


def read_state(root: str | os.PathLike, name: str) -> dict[str, Any] | None:
    try:
        return json.loads(state_path(root, name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # a torn write cannot happen (atomic replace); a hand-edited file can


def write_state(root: str | os.PathLike, name: str, state: Mapping[str, Any]) -> None:
    """Atomic (write + rename), so a reader never sees half a file, even after kill -9."""
    path = state_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(state), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def hostname() -> str:
    return socket.gethostname()


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux /proc), to tell a pid from a reused one."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else fields[19]  # zombies are dead already
    except (OSError, IndexError):
        return None


def pid_alive(pid: int | None, start_time: str | None = None) -> bool:
    """Whether `pid` runs on this host and (when given) is the process that started then."""
    if not pid:
        return False
    if os.path.exists("/proc/self/stat"):
        now = process_start_time(pid)
        return now is not None and (start_time is None or now == start_time)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------
# Running one attempt (used by every backend, locally or on a cluster node)
# ----------------------------------------------------------------------------------------------


def child_setup(cpus: Sequence[int] | None = None):
    """A `preexec_fn` for job processes.

    The child gets its own process group, so stopping it (Ctrl-C of the sweep, a retry) can
    signal everything it started; and it asks the kernel for SIGKILL when its parent dies, so
    a sweep killed with `kill -9` leaves no orphan training behind that would keep writing
    into a workdir the next `run` resumes.
    """
    parent = os.getpid()

    def setup() -> None:
        os.setpgid(0, 0)
        if sys.platform.startswith("linux"):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


def log_header(job_name: str, attempt: int, argv: Sequence[str], cwd: str) -> str:
    return (f"# sweep job {job_name}, attempt {attempt}, host {hostname()}, "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n# cwd {cwd}\n# {shlex.join(argv)}\n")


def execute(job_name: str, argv: Sequence[str], cwd: str, log: str, attempt: int,
            env: Mapping[str, str] | None = None) -> int:
    """Runs one attempt to completion; stdout/stderr to `log`; returns the exit code.

    This is the function the Slurm and Ray backends ship to their workers: it needs only the
    standard library and this package.
    """
    pathlib.Path(log).parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    full_env.update(env or {})
    start = time.monotonic()
    with open(log, "a", encoding="utf-8") as out:
        out.write(log_header(job_name, attempt, argv, cwd))
        out.flush()
        proc = subprocess.Popen(list(argv), cwd=cwd, env=full_env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=child_setup())
        try:
            code = proc.wait()
        except BaseException:
            terminate_group(proc)
            raise
    append_footer(log, code, time.monotonic() - start)
    return code


def append_footer(log: str | os.PathLike, code: int, seconds: float) -> None:
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n# exit code {code} after {seconds:.1f}s\n")


def terminate_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the child's process group, SIGKILL after `grace_s` if it is still there."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def describe(jobs: Iterable[Job]) -> str:
    """The `list` output: one block per job."""
    lines = []
    for job in jobs:
        lines.append(f"{job.name}  [{job.kind}]")
        if job.deps:
            lines.append(f"  after: {', '.join(job.deps)}")
        lines.append(f"  done:  {', '.join(job.done) if len(job.done) < 4 else job.done[-1]}"
                     + (f" (+{len(job.done) - 1} more)" if len(job.done) >= 4 else ""))
        lines.append(f"  $ {job.shell_line()}")
    return "\n".join(lines)
