"""Two local processes with jax.distributed train one run together (CPU, gloo collectives)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np

from tests.helpers import REPO, SMOKE, cli_env, load_npz, run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_the_same_devices(tmp_path):
    args = [f"--config={SMOKE}", "--config.train.steps=6", "--config.train.checkpoint_every=3",
            "--config.train.strategy=vmap"]
    env = cli_env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "card_jax.main", *args, f"--workdir={tmp_path / 'multi'}",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={i}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert "on 4 device(s)" in outputs[0]

    single_env = cli_env()
    single_env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    single = subprocess.run([sys.executable, "-m", "card_jax.main", *args,
                             f"--workdir={tmp_path / 'single'}"], cwd=REPO, env=single_env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    multi_results = json.loads((tmp_path / "multi" / "results.json").read_text())
    single_results = json.loads((tmp_path / "single" / "results.json").read_text())
    assert multi_results["clean_acc"] == single_results["clean_acc"]
    for name in ("multi", "single"):
        out = run_cli(f"--workdir={tmp_path / name}", f"--out={tmp_path / name}.npz",
                      module="card_jax.export")
        assert out.returncode == 0, out.stderr[-2000:]
    want, got = load_npz(tmp_path / "single.npz"), load_npz(tmp_path / "multi.npz")
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
