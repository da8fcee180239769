"""The ray backend on a private local Ray cluster (started and stopped by the sweep driver).

The sweep runs as a subprocess, so Ray's start-up warnings and threads stay out of pytest
(which turns warnings into errors).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, cli_env

if importlib.util.find_spec("ray") is None:  # not imported here: its start-up stays out
    pytest.skip("ray is not installed (pip install -e \".[test]\")", allow_module_level=True)

GRIDS = '''
from launch.testing import marker_job as py


def tiny(opts):
    return [py(opts, "a", "print('a runs')"), py(opts, "b", "print('b')", ["a"]),
            py(opts, "c", "print('c')", ["a"]),
            py(opts, "bad", "print('bad fails'); sys.exit(7)"),
            py(opts, "after_bad", "print('never')", ["bad", "b"])]
'''


@pytest.mark.slow
def test_sweep_runs_on_a_local_ray_cluster(tmp_path):
    (tmp_path / "raygrids.py").write_text(GRIDS)
    env = cli_env()
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    root = tmp_path / "root"

    def sweep(*args):
        return subprocess.run([sys.executable, "-m", "launch.sweep", *args, f"--root={root}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=240)

    result = sweep("run", "raygrids:tiny", "--backend=ray", "--retries=1", "--num_cpus=1")
    assert result.returncode == 1, result.stdout + result.stderr
    for name in ("a", "b", "c"):
        assert (root / "out" / f"{name}.done").exists()
        state = json.loads((root / ".sweep" / f"{name}.json").read_text())
        assert state["backend"] == "ray" and state["status"] == "succeeded"
        assert state["backend_id"]
    assert "a runs" in (root / "logs" / "a.1.log").read_text()
    bad = json.loads((root / ".sweep" / "bad.json").read_text())
    assert bad["failures"] == 2 and bad["returncode"] == 7
    assert "bad fails" in (root / "logs" / "bad.2.log").read_text()
    assert not (root / "out" / "after_bad.done").exists()
    assert f"{root}/logs/bad.1.log" in result.stdout

    # status reads the root alone; the driver (and with it Ray) is gone: nothing is running
    status = sweep("status", "raygrids:tiny")
    assert status.returncode == 1
    rows = {ln.split()[4]: ln.split()[0] for ln in status.stdout.splitlines()[1:6]}
    assert rows == {"a": "done", "b": "done", "c": "done", "bad": "failed",
                    "after_bad": "blocked"}
