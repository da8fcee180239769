"""The slurm backend on a real (one-node, localhost) Slurm cluster, through submitit.

`launch.testing_slurm` installs Debian's slurm-wlm and munge when missing (root + apt only),
starts munged, slurmctld and slurmd in a private folder and stops them afterwards, even when a
test fails. Without root/apt, or when the daemons cannot start here, the tests are skipped with
the exact reason.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from launch import testing_slurm
from tests.helpers import REPO, cli_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the test cluster is Linux-only")

GRIDS = '''
from launch import grids
from launch.testing import marker_job as py


def train_then_read(opts):
    """A smoke training and a job that needs its results."""
    run = grids.main_job(opts, "train", "smoke", "configs/smoke.py",
                         ["--config.train.progress=log"])
    read = py(opts, "read", f"import json; print(json.load(open({run.done[0]!r}))['clean_acc'])",
              [run.name])
    return [run, read]


def wave(opts):
    """Two jobs ready together (one array with --array), then a slow one after both."""
    return [py(opts, "a", "print('a')"), py(opts, "b", "print('b')"),
            py(opts, "slow", "time.sleep(10)", ["a", "b"])]
'''


@pytest.fixture(scope="module")
def slurm_env():
    pytest.importorskip("submitit")
    reason = testing_slurm.ensure_installed()
    if reason:
        pytest.skip(reason)
    cluster = testing_slurm.LocalSlurm()
    try:
        env = cluster.start()
    except testing_slurm.SlurmStartError as e:
        pytest.skip(f"Slurm cannot run in this environment: {e}")
    try:
        yield env
    finally:
        cluster.stop()


@pytest.fixture
def sweep(slurm_env, tmp_path):
    (tmp_path / "slurmgrids.py").write_text(GRIDS)
    env = cli_env()
    env["SLURM_CONF"] = slurm_env["SLURM_CONF"]
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    root = tmp_path / "root"

    def run(*args, background=False):
        command = [sys.executable, "-m", "launch.sweep", *args, f"--root={root}"]
        if background:
            return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=240)

    run.root, run.env = root, env
    return run


SLURM = ("--backend=slurm", "--slurm_poll=0.5", "--time=10")


def _state(root: pathlib.Path, name: str) -> dict:
    return json.loads((root / ".sweep" / f"{name}.json").read_text())


def _scontrol_state(env, job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True,
                         text=True, timeout=30).stdout
    return next(w.split("=", 1)[1] for w in out.split() if w.startswith("JobState="))


@pytest.mark.slow
def test_sweep_runs_on_slurm_through_submitit(sweep):
    result = sweep("run", "slurmgrids:train_then_read", *SLURM)
    assert result.returncode == 0, result.stdout + result.stderr
    root = sweep.root
    states = {p.stem: json.loads(p.read_text()) for p in (root / ".sweep").glob("*.json")
              if p.stem != "sweep"}
    train = next(n for n in states if n.startswith("smoke-"))
    assert (root / "runs" / train / "results.json").exists()
    assert (root / "out" / "read.done").exists()
    assert "done: clean test accuracy" in (root / "logs" / f"{train}.1.log").read_text()
    import submitit

    for name, state in states.items():
        assert state["backend"] == "slurm" and state["status"] == "succeeded"
        job_id = state["backend_id"]
        assert _scontrol_state(sweep.env, job_id) == "COMPLETED"
        # submitit's own record of the call: the job's exit code is its result
        job = submitit.SlurmJob(folder=state["submitit_folder"], job_id=job_id)
        assert job.paths.result_pickle.exists() and job.result() == 0
    assert int(states["read"]["backend_id"]) > int(states[train]["backend_id"])  # after it
    status = sweep("status", "slurmgrids:train_then_read")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "2 done of 2 jobs" in status.stdout


@pytest.mark.slow
def test_job_arrays_and_a_killed_driver(sweep):
    """--array submits a dependency wave as one array; a driver killed while a Slurm job runs
    leaves it running (status says so, from squeue), and the next run watches it instead of
    submitting it again."""
    root = sweep.root
    proc = sweep("run", "slurmgrids:wave", *SLURM, "--array", background=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            path = root / ".sweep" / "slow.json"
            if path.exists() and _state(root, "slow").get("status") == "running":
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the slow job never started")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    a, b = _state(root, "a")["backend_id"], _state(root, "b")["backend_id"]
    assert a.split("_")[0] == b.split("_")[0] and {a[-2:], b[-2:]} == {"_0", "_1"}
    status = sweep("status", "slurmgrids:wave")
    slow_id = _state(root, "slow")["backend_id"]
    assert f"slurm job {slow_id}" in status.stdout
    assert [ln.split()[0] for ln in status.stdout.splitlines()[1:4]] == ["done", "done",
                                                                          "running"]
    again = sweep("run", "slurmgrids:wave", *SLURM)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "watching" in again.stdout and " start " not in again.stdout
    assert _state(root, "slow")["attempt"] == 1 and _state(root, "slow")["status"] == "succeeded"
    assert (root / "out" / "slow.done").exists()
    assert _scontrol_state(sweep.env, slow_id) == "COMPLETED"
