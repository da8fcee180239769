"""Tests for card_jax.checkpoint: round trips, retention, corruption fallback, crashes."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from card_jax.checkpoint import (
    FORMAT_VERSION,
    Checkpointer,
    CheckpointError,
    CorruptCheckpointError,
)

R = 4  # realizations: leading axis of every leaf
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ScaleByAdamState(NamedTuple):
    """Same shape as optax's Adam state: a NamedTuple with an int count."""

    count: Any
    mu: Any
    nu: Any


class EmptyState(NamedTuple):
    """Like optax.EmptyState: a NamedTuple without fields."""


def _state(seed: int) -> dict:
    """Deterministic training-like state: nested dicts, optax-like tuples, int leaves."""
    rng = np.random.default_rng(seed)
    params = {
        "conv1": {
            "kernel": rng.standard_normal((R, 3, 3, 1, 16), dtype=np.float32),
            "bias": rng.standard_normal((R, 16), dtype=np.float32),
        },
        "dense": {"kernel": rng.standard_normal((R, 16, 10), dtype=np.float32)},
    }
    params = jax.tree.map(jnp.asarray, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    return {
        "params": params,
        "opt_state": (
            ScaleByAdamState(count=jnp.full((R,), seed, jnp.int32), mu=params, nu=zeros),
            EmptyState(),
            (),
        ),
        "step": jnp.arange(R, dtype=jnp.int32) + seed,
        "rng": jnp.asarray(rng.integers(0, 2**32, size=(R, 2), dtype=np.uint32)),
        "masks": jnp.asarray(rng.integers(-(2**31), 2**31 - 1, size=(R, 7), dtype=np.int32)),
    }


def _abstract(state: Any) -> Any:
    return jax.eval_shape(lambda: state)


def _assert_bit_identical(actual: Any, expected: Any) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), e in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
        assert isinstance(a, jax.Array), jax.tree_util.keystr(path)
        assert a.dtype == e.dtype and a.shape == e.shape, jax.tree_util.keystr(path)
        assert np.asarray(a).tobytes() == np.asarray(e).tobytes(), jax.tree_util.keystr(path)


def _data_files(step_dir: str) -> list[str]:
    """Orbax array-data files of a checkpoint, largest first."""
    found = []
    for root, _, names in os.walk(os.path.join(step_dir, "state")):
        found += [os.path.join(root, n) for n in names if os.sep + "d" + os.sep in os.path.join(root, n)]
    return sorted(found, key=os.path.getsize, reverse=True)


def _truncate(step_dir: str) -> None:
    path = _data_files(step_dir)[0]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_byte(step_dir: str) -> None:
    path = _data_files(step_dir)[0]
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def test_round_trip_is_bit_identical(tmp_path):
    state = _state(7)
    # Values whose bits a float round trip through text or casting would lose.
    state["params"]["dense"]["kernel"] = (
        state["params"]["dense"]["kernel"].at[0, 0, :3].set(jnp.array([jnp.nan, -0.0, jnp.inf]))
    )
    state["empty"] = jnp.zeros((R, 0), jnp.float32)  # Orbax refuses zero-size arrays
    state["nothing"] = None
    meta = {"config": {"lr": 0.1, "widths": [16, 10]}, "versions": {"jax": jax.__version__}}
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(3, state, meta)

    assert ckpt.steps() == [3]
    restored, restored_meta = ckpt.restore(3, _abstract(state))
    _assert_bit_identical(restored, state)
    assert isinstance(restored["opt_state"][0], ScaleByAdamState)
    assert isinstance(restored["opt_state"][1], EmptyState)
    assert restored["opt_state"][2] == () and restored["nothing"] is None
    assert restored_meta == {**meta, "format_version": FORMAT_VERSION, "step": 3}
    # Restoring again still works: Orbax did not modify checksummed files on read.
    step, again, _ = ckpt.restore_latest(_abstract(state))
    assert step == 3
    _assert_bit_identical(again, state)


def test_restore_uses_requested_sharding(tmp_path):
    mesh = jax.make_mesh((R,), ("r",))
    sharding = NamedSharding(mesh, PartitionSpec("r"))
    state = jax.device_put({"w": jnp.arange(R * 6, dtype=jnp.float32).reshape(R, 6)}, sharding)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, state, {})
    abstract = {"w": jax.ShapeDtypeStruct((R, 6), jnp.float32, sharding=sharding)}
    restored, _ = ckpt.restore(1, abstract)
    assert restored["w"].sharding == sharding
    _assert_bit_identical(restored, state)


def test_keep_prunes_only_our_checkpoints(tmp_path):
    (tmp_path / "notes.txt").write_text("user notes")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.bin").write_bytes(b"\x00\x01")
    (tmp_path / "step_00000000").mkdir()  # looks like ours, but has no card_jax manifest
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (10, 20, 30, 40):
        ckpt.save(step, _state(step), {"step_seed": step})

    assert ckpt.steps() == [30, 40]
    assert sorted(os.listdir(tmp_path)) == [
        "notes.txt",
        "other",
        "step_00000000",
        "step_00000030",
        "step_00000040",
    ]
    assert (tmp_path / "notes.txt").read_text() == "user notes"
    assert (tmp_path / "other" / "data.bin").read_bytes() == b"\x00\x01"


def test_saving_an_existing_step_replaces_it(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(5, _state(1), {"run": "a"})
    ckpt.save(5, _state(2), {"run": "b"})
    assert sorted(os.listdir(tmp_path)) == ["step_00000005"]
    restored, meta = ckpt.restore(5, _abstract(_state(2)))
    _assert_bit_identical(restored, _state(2))
    assert meta["run"] == "b"


@pytest.mark.parametrize("damage", [_truncate, _flip_byte])
def test_corrupt_newest_falls_back_to_previous(tmp_path, caplog, damage):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, _state(1), {})
    ckpt.save(2, _state(2), {})
    damage(str(tmp_path / "step_00000002"))

    with caplog.at_level(logging.WARNING, logger="card_jax.checkpoint"):
        step, restored, meta = ckpt.restore_latest(_abstract(_state(1)))

    assert step == 1 and meta["step"] == 1
    _assert_bit_identical(restored, _state(1))
    warnings = [r for r in caplog.records if r.name == "card_jax.checkpoint" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "step 2" in warnings[0].getMessage() and "step_00000002" in warnings[0].getMessage()
    assert (tmp_path / "step_00000002").is_dir()  # left for inspection
    with pytest.raises(CorruptCheckpointError):
        ckpt.restore(2, _abstract(_state(2)))


def test_all_corrupt_raises(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, _state(1), {})
    ckpt.save(2, _state(2), {})
    _truncate(str(tmp_path / "step_00000001"))
    (tmp_path / "step_00000002" / "card_jax_metadata.json").write_text("{}")

    with caplog.at_level(logging.WARNING, logger="card_jax.checkpoint"):
        with pytest.raises(CheckpointError, match="all 2 checkpoints") as info:
            ckpt.restore_latest(_abstract(_state(1)))
    assert "step 1" in str(info.value) and "step 2" in str(info.value)
    assert ckpt.steps() == [1, 2]


def test_no_checkpoint_returns_none(tmp_path):
    assert Checkpointer(tmp_path / "missing").restore_latest(_abstract(_state(0))) is None
    assert Checkpointer(tmp_path).steps() == []


def test_structure_mismatch_names_first_differing_path(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, _state(1), {})

    wider = _abstract(_state(1))
    wider["params"]["conv1"]["kernel"] = jax.ShapeDtypeStruct((R, 3, 3, 1, 32), jnp.float32)
    with pytest.raises(CheckpointError) as info:
        ckpt.restore(1, wider)
    assert "at ['params']['conv1']['kernel']: saved shape (4, 3, 3, 1, 16), expected (4, 3, 3, 1, 32)" in str(
        info.value
    )

    missing_in_saved = _abstract(_state(1))
    missing_in_saved["params"]["conv2"] = {"kernel": jax.ShapeDtypeStruct((R, 3), jnp.float32)}
    with pytest.raises(CheckpointError, match=r"at \['params'\]\['conv2'\]: expected tree has key 'conv2'"):
        ckpt.restore(1, missing_in_saved)

    extra_in_saved = _abstract(_state(1))
    del extra_in_saved["masks"]
    with pytest.raises(CheckpointError, match=r"at \['masks'\]: saved tree has key 'masks' that the expected"):
        ckpt.restore(1, extra_in_saved)

    retyped = _abstract(_state(1))
    retyped["step"] = jax.ShapeDtypeStruct((R,), jnp.float32)
    with caplog.at_level(logging.WARNING, logger="card_jax.checkpoint"):
        # A mismatch is the caller's problem: no fallback to older checkpoints.
        with pytest.raises(CheckpointError, match=r"at \['step'\]: saved dtype int32, expected float32"):
            ckpt.restore_latest(retyped)
    assert not [r for r in caplog.records if r.name == "card_jax.checkpoint"]


def test_newer_format_version_is_rejected(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, _state(1), {})
    manifest_path = tmp_path / "step_00000001" / "card_jax_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["manifest_crc32"]
    manifest["format_version"] = FORMAT_VERSION + 1
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    manifest["manifest_crc32"] = zlib.crc32(body)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="newer") as info:
        ckpt.restore_latest(_abstract(_state(1)))
    assert not isinstance(info.value, CorruptCheckpointError)


def test_leftover_tmp_folders_are_ignored_and_cleaned(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, _state(1), {})
    ckpt.save(2, _state(2), {})
    # A killed save of step 2 that got as far as the manifest but not the rename,
    # from a process (pid 99999999) that no longer exists.
    os.rename(tmp_path / "step_00000002", tmp_path / "step_00000002.tmp-99999999")
    foreign = tmp_path / "step_00000002.tmp-mine"  # not our exact naming
    foreign.mkdir()

    assert ckpt.steps() == [1]
    step, restored, _ = ckpt.restore_latest(_abstract(_state(1)))
    assert step == 1
    _assert_bit_identical(restored, _state(1))

    ckpt.save(3, _state(3), {})
    assert sorted(os.listdir(tmp_path)) == ["step_00000001", "step_00000002.tmp-mine", "step_00000003"]


def test_bad_metadata_leaves_nothing_behind(tmp_path):
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        ckpt.save(1, _state(1), {"fn": print})
    assert not tmp_path.exists() or os.listdir(tmp_path) == []


# ---------------------------------------------------------------- SIGKILL


def _big_state(step: int) -> dict:
    """~20 MB deterministic state for the crash test (also imported by the child)."""
    rng = np.random.default_rng(step)
    return {
        "params": {"w": rng.standard_normal((R, 1024, 1024), dtype=np.float32)},
        "opt_state": (ScaleByAdamState(count=np.full((R,), step, np.int32), mu=(), nu=()),),
        "bits": rng.integers(0, 2**32, size=(R, 256, 1024), dtype=np.uint32),
    }


_CHILD = textwrap.dedent(
    """
    import sys
    from test_checkpoint import _big_state
    from card_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(sys.argv[1], keep=2)
    step = (ckpt.steps() or [0])[-1] + 1
    while True:
        ckpt.save(step, _big_state(step), {"seed": step})
        step += 1
    """
)


def test_sigkill_during_save_leaves_a_complete_checkpoint(tmp_path):
    directory = str(tmp_path / "ckpt")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO_ROOT, os.path.join(REPO_ROOT, "tests")] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    ckpt = Checkpointer(directory, keep=2)
    abstract = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, _big_state(0)))
    delays = random.Random(20240611)
    last = 0
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-c", _CHILD, directory], env=env, cwd=REPO_ROOT)
        try:
            # Wait for one new checkpoint, then kill at a random point of later saves.
            deadline = time.monotonic() + 20
            while (ckpt.steps() or [0])[-1] <= last:
                assert child.poll() is None, "child exited early"
                assert time.monotonic() < deadline, "child made no progress"
                time.sleep(0.01)
            time.sleep(delays.uniform(0.0, 0.4))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()

        # Every checkpoint that looks complete is complete and bit-identical.
        for step in ckpt.steps():
            restored, meta = ckpt.restore(step, abstract)
            assert meta["seed"] == step
            _assert_bit_identical(restored, _big_state(step))
        step, _, _ = ckpt.restore_latest(abstract)
        assert step > last
        last = step
