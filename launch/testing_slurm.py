"""A throw-away one-node Slurm cluster on localhost, for tests and for trying the slurm backend.

    cluster = LocalSlurm()          # a private folder under /tmp
    env = cluster.start()           # munged, slurmctld, slurmd; waits until the node is idle
    ... run sbatch/squeue/submitit with env (SLURM_CONF points at the private slurm.conf) ...
    cluster.stop()                  # cancels every job, stops the daemons, removes the folder

Everything lives in the private folder: munge key and socket, slurm.conf, state, spool, logs,
and the daemons run in the foreground as our children, so nothing system-wide is touched
besides installing the packages (`ensure_installed`: Debian's slurm-wlm and munge, only as root
with apt). Process tracking is `proctrack/linuxproc` and `task/none`, so no cgroup setup is
needed (containers rarely allow it). There is no accounting database (slurmdbd), hence no
`sacct`: job states come from `squeue` / `scontrol show job`.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time

PACKAGES = ("slurm-wlm", "munge")
_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol")


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/usr/bin") if (p := pathlib.Path(d) / name).exists()),
        None)


def ensure_installed(timeout_s: float = 300) -> str | None:
    """Installs slurm-wlm and munge with apt if missing; returns why not, or None when ready."""
    if all(_which(b) for b in _BINARIES):
        return None
    if os.geteuid() != 0:
        return ("Slurm is not installed and installing it needs root "
                "(apt-get install slurm-wlm munge)")
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install slurm-wlm and munge"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    out = None
    for command in (install, ["apt-get", "update"], install):  # stale lists: update, retry
        try:
            out = subprocess.run(command, capture_output=True, text=True, env=env,
                                 timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"{' '.join(command)} took more than {timeout_s:.0f}s"
        if command is install and out.returncode == 0:
            break
    if out is None or out.returncode != 0 or not all(_which(b) for b in _BINARIES):
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:] if out else []
        return f"apt-get install {' '.join(PACKAGES)} failed: {' | '.join(tail)}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 1024


class SlurmStartError(RuntimeError):
    """A daemon did not come up; the message quotes its log."""


class LocalSlurm:
    """See the module docstring."""

    def __init__(self, folder: str | os.PathLike | None = None, cpus: int | None = None):
        # Short path: the munge socket's full name must fit a sockaddr_un (108 bytes).
        self.folder = pathlib.Path(folder or tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
        self.cpus = cpus or os.cpu_count() or 1
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.folder / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_config(self) -> None:
        f = self.folder
        for sub in ("state", "spool", "log"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        key = f / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        memory = max(256, int(_memory_mb() * 0.8))
        self.conf.write_text(f"""\
ClusterName=cardtest
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={f}/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd.pid
SlurmctldLogFile={f}/log/slurmctld.log
SlurmdLogFile={f}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""", encoding="utf-8")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.folder / "log" / f"{name}.out", "w", encoding="utf-8")
        try:
            self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL,
                                                start_new_session=True)
        finally:
            log.close()

    def _log_tail(self, name: str) -> str:
        text = ""
        for path in (self.folder / "log").glob(f"{name}*"):
            text += path.read_text(errors="replace")[-1500:]
        return text.strip() or "(no log)"

    def _wait(self, what: str, check, timeout_s: float, daemon: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            proc = self.procs.get(daemon)
            if proc is not None and proc.poll() is not None:
                raise SlurmStartError(f"{daemon} exited with code {proc.returncode} before "
                                      f"{what}: {self._log_tail(daemon)}")
            time.sleep(0.2)
        raise SlurmStartError(f"timed out after {timeout_s:.0f}s waiting for {what}: "
                              f"{self._log_tail(daemon)}")

    def _sinfo_state(self) -> str:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env,
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() if out.returncode == 0 else ""

    def start(self, timeout_s: float = 60) -> dict[str, str]:
        """Starts the three daemons; returns the environment for Slurm clients."""
        self._write_config()
        f = self.folder
        try:
            self._spawn("munged", [_which("munged"), "--foreground", "--force",
                                   f"--socket={f}/munge.sock", f"--key-file={f}/munge.key",
                                   f"--log-file={f}/log/munged.log",
                                   f"--pid-file={f}/munged.pid", f"--seed-file={f}/munged.seed"])
            self._wait("the munge socket", (f / "munge.sock").exists, timeout_s, "munged")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait("slurmctld", lambda: subprocess.run(
                ["scontrol", "ping"], env=self.env, capture_output=True, text=True,
                timeout=30).stdout.count("UP") > 0, timeout_s, "slurmctld")
            self._spawn("slurmd", [_which("slurmd"), "-D", "-N", "localhost", "-f",
                                   str(self.conf)])
            self._wait("the node to be idle", lambda: self._sinfo_state() == "idle", timeout_s,
                       "slurmd")
        except BaseException:
            self.stop()
            raise
        return self.env

    def stop(self, remove: bool = True) -> None:
        """Cancels all jobs (slurmstepd outlives slurmd otherwise), stops the daemons."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True,
                           timeout=30)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                out = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True,
                                     text=True, timeout=30)
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        if remove:
            shutil.rmtree(self.folder, ignore_errors=True)
