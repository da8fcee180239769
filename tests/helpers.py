"""Shared test utilities: the smoke config and running the CLI in a subprocess."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.py")


def smoke_config(**overrides):
    """configs/smoke.py with `section.key=value` overrides, e.g. train__steps=5."""
    from card_jax import config_util

    config = config_util.load_config_file(SMOKE)
    config_util.set_values(config, {k.replace("__", "."): v for k, v in overrides.items()})
    return config


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.pop("XLA_FLAGS", None)  # one device, like a plain user run
    return env


def run_cli(*args: str, module: str = "card_jax.main", timeout: float = 300,
            **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout, **kw)


def load_npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}
