"""Crash-safe checkpoints of training-state pytrees, stored with Orbax.

This is the only module of card_jax that imports Orbax. Layout of a checkpoint
directory::

    directory/
      step_00000100/                 one folder per step, 8-digit zero padding
        state/                       Orbax PyTree checkpoint (the array data)
        card_jax_metadata.json       caller metadata + format_version + step
        card_jax_manifest.json       tree description, per-file size + crc32
      step_00000200/
      step_00000300.tmp-4242/        save in progress (or killed): ignored

A save is written into ``step_XXXXXXXX.tmp-<pid>/``, every file and folder is
fsync'ed, the manifest is written last, and only then the folder is renamed to
its final name. Renaming is atomic on POSIX filesystems, so a crash at any
moment leaves either a complete checkpoint or none under a final name. The
manifest records the size and crc32 of every file, so a checkpoint that was
damaged *after* it was written (truncated copy, bit rot, full disk during
rsync) is detected at restore time and :meth:`Checkpointer.restore_latest`
falls back to an older one.

Multi-process use (``jax.distributed``, ``jax.process_count() > 1``):

* Supported: every process calls :meth:`Checkpointer.save` /
  :meth:`Checkpointer.restore` / :meth:`Checkpointer.restore_latest`
  collectively with the same arguments, on a filesystem shared by all hosts
  with atomic ``rename`` (local disk, NFS, Lustre, GPFS). Orbax writes the
  (possibly sharded) array data from every process; only process 0 writes the
  metadata and manifest, renames folders and deletes old checkpoints.
  Abstract leaves should then carry concrete shardings
  (``jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))``);
  leaves without one are restored onto the first local device.
* Not supported: object stores without atomic rename (``gs://``, ``s3://``),
  several independent jobs writing into the same directory at once, typed PRNG
  key arrays (save ``jax.random.key_data(key)`` instead).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "FORMAT_VERSION",
    "ORBAX_VERSION",
    "CheckpointError",
    "CorruptCheckpointError",
    "Checkpointer",
]

FORMAT_VERSION = 1  # bump when the on-disk layout below changes incompatibly
# For run metadata (package versions), so callers need not import Orbax themselves.
ORBAX_VERSION: str = ocp.__version__

logger = logging.getLogger("card_jax.checkpoint")

_STATE_DIR = "state"  # Orbax item folder inside a step folder
_METADATA_FILE = "card_jax_metadata.json"
_MANIFEST_FILE = "card_jax_manifest.json"
_CHUNK = 1 << 22  # 4 MiB reads while checksumming

# Exact names this module creates. Anything else in the directory belongs to
# somebody else and is never touched.
_FINAL_RE = re.compile(r"step_(\d{8,})")
_TMP_RE = re.compile(r"step_(\d{8,})\.tmp-(\d+)")
_DELETING_RE = re.compile(r"step_(\d{8,})\.deleting-(\d+)")
_SUPERSEDED_RE = re.compile(r"step_(\d{8,})\.superseded-(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored: unreadable, incompatible or mismatched."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are missing, truncated or fail their checksum.

    Only this kind of error makes :meth:`Checkpointer.restore_latest` fall
    back to an older checkpoint; a structure mismatch or a newer format is a
    caller problem that an older checkpoint would not fix.
    """


# --------------------------------------------------------------------------
# Small filesystem helpers
# --------------------------------------------------------------------------


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def _parse_final(name: str) -> int | None:
    """Step of a final checkpoint folder name, or None if the name is not ours."""
    m = _FINAL_RE.fullmatch(name)
    if m is None:
        return None
    step = int(m.group(1))
    # "step_000000100" would also parse as 100; accept only our exact spelling
    # so that two names can never map to the same step.
    return step if _step_name(step) == name else None


def _fsync_dir(path: str) -> None:
    """Make a directory's entries (new files, renames) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        # Some network filesystems refuse fsync on directories (EINVAL); the
        # data files themselves were already fsync'ed, which is what matters most.
        pass
    finally:
        os.close(fd)


def _write_durable(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _crc32_file(path: str, *, fsync: bool = False) -> tuple[int, int]:
    """Return (size, crc32) of a file, optionally fsync'ing it on the way."""
    crc = 0
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
        if fsync:
            # fsync on a read-only descriptor flushes the file's dirty pages on
            # Linux; Orbax/TensorStore wrote these files and closed them already.
            os.fsync(f.fileno())
    return size, crc


def _pid_is_stale(pid: int) -> bool:
    """True if a leftover folder tagged with ``pid`` cannot belong to a live save."""
    if pid == os.getpid():
        # Saves are synchronous, so a folder of ours found at the start of a
        # save is a leftover of an earlier save that raised.
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists but belongs to another user: leave it alone
    return False


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, jax.Array)):
        return np.asarray(obj).tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"metadata value of type {type(obj).__name__} is not JSON-serialisable")


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _is_primary() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    """Barrier across processes; free in the single-process case."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------
# Tree description and comparison
# --------------------------------------------------------------------------


def _one_level(node: Any) -> tuple[str, list[tuple[str, Any]]] | None:
    """Split a pytree node into (type name, [(key string, child)]); None for a leaf.

    Flattening with ``is_leaf`` true for everything but ``node`` itself yields
    exactly the direct children with their keys, for any registered node type
    (dicts, NamedTuples such as optax states, flax structs, custom nodes).
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    if len(flat) == 1 and flat[0][0] == ():
        return None
    name = "None" if node is None else type(node).__name__
    return name, [(jax.tree_util.keystr(path), child) for path, child in flat]


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype)
    arr = jnp.asarray(leaf)  # python scalars: use jax's dtype rules, like eval_shape
    return tuple(arr.shape), np.dtype(arr.dtype)


def _to_savable(leaf: Any) -> Any:
    """An array Orbax can save, with the shape/dtype that _shape_dtype reports."""
    if isinstance(leaf, (jax.Array, np.ndarray)):
        return leaf
    if hasattr(leaf, "dtype"):  # numpy scalars
        return np.asarray(leaf)
    return np.asarray(jnp.asarray(leaf))


def _describe(node: Any) -> dict:
    """JSON description of a pytree's structure and leaf shapes/dtypes."""
    info = _one_level(node)
    if info is None:
        shape, dtype = _shape_dtype(node)
        return {"shape": list(shape), "dtype": str(dtype)}
    name, kids = info
    return {
        "type": name,
        "keys": [k for k, _ in kids],
        "children": [_describe(child) for _, child in kids],
    }


def _key_display(entry: str) -> str:
    # keystr renders a dict key as "['foo']" and a sequence index as "[0]";
    # messages read better with just 'foo' / 0. Attribute keys stay ".mu".
    return entry[1:-1] if entry.startswith("[") and entry.endswith("]") else entry


def _first_difference(saved: dict, expected: Any, path: str = "") -> str | None:
    """Message naming the first (flatten order) difference, or None if equal."""
    where = f"at {path}" if path else "at the root"
    info = _one_level(expected)
    saved_is_leaf = "shape" in saved
    if info is None:
        shape, dtype = _shape_dtype(expected)
        if not saved_is_leaf:
            return f"{where}: saved tree has a {saved['type']} node where the expected tree has a leaf"
        if tuple(saved["shape"]) != shape:
            return f"{where}: saved shape {tuple(saved['shape'])}, expected {shape}"
        if saved["dtype"] != str(dtype):
            return f"{where}: saved dtype {saved['dtype']}, expected {dtype}"
        return None
    name, kids = info
    if saved_is_leaf:
        return (
            f"{where}: saved tree has a leaf (shape {tuple(saved['shape'])}, dtype "
            f"{saved['dtype']}) where the expected tree has a {name} node"
        )
    if saved["type"] != name:
        return f"{where}: saved node is a {saved['type']}, expected a {name}"
    skeys, ekeys = saved["keys"], [k for k, _ in kids]
    common = 0
    while common < min(len(skeys), len(ekeys)) and skeys[common] == ekeys[common]:
        common += 1
    for i in range(common):
        msg = _first_difference(saved["children"][i], kids[i][1], path + ekeys[i])
        if msg is not None:
            return msg
    if skeys == ekeys:
        return None
    if common < len(skeys) and skeys[common] not in ekeys:
        k = skeys[common]
        return f"at {path + k}: saved tree has key {_key_display(k)} that the expected tree lacks"
    if common < len(ekeys) and ekeys[common] not in skeys:
        k = ekeys[common]
        return f"at {path + k}: expected tree has key {_key_display(k)} that the saved tree lacks"
    return f"{where}: children differ in order: saved {skeys}, expected {ekeys}"


def _leaf_descs(desc: dict) -> list[dict]:
    """Leaf descriptions in flatten order (depth first, children in order)."""
    if "shape" in desc:
        return [desc]
    out: list[dict] = []
    for child in desc["children"]:
        out.extend(_leaf_descs(child))
    return out


def _leaf_name(i: int) -> str:
    return f"leaf_{i:06d}"


def _restore_sharding(leaf: Any) -> jax.sharding.Sharding:
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding):
        # eval_shape of sharded inputs gives NamedShardings on an AbstractMesh,
        # which name no devices and cannot place data.
        abstract = isinstance(sharding, jax.sharding.NamedSharding) and isinstance(
            sharding.mesh, jax.sharding.AbstractMesh
        )
        if not abstract:
            return sharding
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


# --------------------------------------------------------------------------
# Checkpointer
# --------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores training-state pytrees under ``directory``.

    One writer per directory. Not thread-safe. See the module docstring for
    the layout, the crash-safety argument and multi-process support.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3):
        """Create a checkpointer; nothing is written until the first save.

        Args:
            directory: folder holding the ``step_XXXXXXXX`` checkpoints.
            keep: how many checkpoints (newest by step) to keep after a save.
        """
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive int, got {keep!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = keep
        # Synchronous Checkpointer: save() returns once Orbax has committed.
        # Compression is off: trained float weights barely compress and zstd
        # would cost CPU time on every save.
        self._orbax = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))

    def __repr__(self) -> str:
        return f"Checkpointer({self.directory!r}, keep={self.keep})"

    def close(self) -> None:
        """Release Orbax's resources (thread pools)."""
        self._orbax.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- listing

    def _path(self, step: int) -> str:
        return os.path.join(self.directory, _step_name(step))

    def steps(self) -> list[int]:
        """Steps of complete checkpoints written by card_jax, ascending.

        A checkpoint counts as complete when its final-named folder holds our
        manifest (written last, before the atomic rename). File contents are
        verified only at restore time, so a listed step may still turn out to
        be corrupt.
        """
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            step = _parse_final(name)
            if step is not None and os.path.isfile(os.path.join(self.directory, name, _MANIFEST_FILE)):
                out.append(step)
        return sorted(out)

    # ------------------------------------------------------------------ save

    def save(self, step: int, state: Any, metadata: Mapping[str, Any]) -> None:
        """Atomically and durably write checkpoint ``step``, then prune old ones.

        A crash at any moment (SIGKILL included) leaves either the complete new
        checkpoint or none: the data goes to ``step_XXXXXXXX.tmp-<pid>/`` and is
        renamed into place after every file is fsync'ed. Returns once the
        checkpoint is durable. Afterwards only the newest ``keep`` checkpoints
        written by card_jax are kept (the one just written always survives);
        other files and folders in the directory are never touched.

        Saving a step that already exists replaces it.

        Args:
            step: non-negative training step.
            state: pytree of arrays (jax or numpy) or python scalars.
            metadata: JSON-serialisable mapping (config, package versions, ...).
                ``format_version`` and ``step`` are added (and override keys of
                the same name).
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        step = int(step)
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a mapping, got {type(metadata).__name__}")
        # Encode everything that can fail on bad input before touching the disk.
        meta = dict(metadata)
        meta["format_version"] = FORMAT_VERSION
        meta["step"] = step
        meta_bytes = json.dumps(meta, sort_keys=True, indent=2, default=_json_default).encode()

        leaves = jax.tree.leaves(state)
        for leaf in leaves:
            dtype = getattr(leaf, "dtype", None)
            if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
                raise TypeError(
                    "typed PRNG key arrays are not supported; save jax.random.key_data(key) instead"
                )
        tree_desc = _describe(state)
        # Orbax refuses zero-size arrays ("Cannot save arrays with zero size");
        # their content is fully described by shape and dtype in the manifest.
        items = {}
        for i, leaf in enumerate(leaves):
            arr = _to_savable(leaf)
            if arr.size:
                items[_leaf_name(i)] = arr

        primary = _is_primary()
        pid = os.getpid()
        if jax.process_count() > 1:
            # The tmp folder name must be identical on every process.
            from jax.experimental import multihost_utils

            pid = int(multihost_utils.broadcast_one_to_all(np.int32(pid)))
        final = self._path(step)
        tmp = f"{final}.tmp-{pid}"

        if primary:
            os.makedirs(self.directory, exist_ok=True)
            self._remove_leftovers()
            if os.path.lexists(tmp):
                shutil.rmtree(tmp)
            os.mkdir(tmp)
        _sync(f"card_jax_ckpt_mkdir_{step}")
        try:
            if items:
                # Orbax writes into its own tmp folder inside ours and renames
                # it to "state" when committed; it blocks until then.
                self._orbax.save(os.path.join(tmp, _STATE_DIR), args=ocp.args.PyTreeSave(items))
            _sync(f"card_jax_ckpt_data_{step}")
            if primary:
                _write_durable(os.path.join(tmp, _METADATA_FILE), meta_bytes)
                self._write_manifest(tmp, step, tree_desc, has_state=bool(items))
                self._publish(tmp, final, step)
                self._prune(step)
        except BaseException:
            if primary:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        _sync(f"card_jax_ckpt_done_{step}")

    def _write_manifest(self, tmp: str, step: int, tree_desc: dict, *, has_state: bool) -> None:
        """fsync every file and folder under ``tmp`` and record sizes/crc32 last."""
        files = {}
        for root, dirs, names in os.walk(tmp, topdown=False):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(root, name)
                rel = os.path.relpath(full, tmp).replace(os.sep, "/")
                size, crc = _crc32_file(full, fsync=True)
                files[rel] = {"size": size, "crc32": crc}
            _fsync_dir(root)
        body = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "created_unix": time.time(),
            "has_state": has_state,
            "tree": tree_desc,
            "files": files,
        }
        # A checksum over the manifest itself catches bit flips that would
        # still parse as JSON.
        manifest = dict(body, manifest_crc32=zlib.crc32(_canonical_json(body)))
        _write_durable(os.path.join(tmp, _MANIFEST_FILE), json.dumps(manifest).encode())
        _fsync_dir(tmp)

    def _publish(self, tmp: str, final: str, step: int) -> None:
        """Rename the finished tmp folder to its final name (the commit point)."""
        superseded = None
        if os.path.lexists(final):
            # rename() cannot replace a non-empty directory, so move the old
            # checkpoint of this step aside first. A crash in between leaves it
            # under a ".superseded-" name that the next save puts back.
            superseded = f"{final}.superseded-{os.getpid()}"
            os.rename(final, superseded)
            logger.warning("Replacing existing checkpoint for step %d in %s", step, self.directory)
        os.rename(tmp, final)
        _fsync_dir(self.directory)
        if superseded is not None:
            shutil.rmtree(superseded, ignore_errors=True)

    def _prune(self, just_saved: int) -> None:
        """Delete all but the newest ``keep`` card_jax checkpoints."""
        steps = self.steps()
        doomed = [s for s in steps[: max(0, len(steps) - self.keep)] if s != just_saved]
        for s in doomed:
            # Rename first so that a crash mid-rmtree never leaves a partly
            # deleted folder under a final name.
            trash = f"{self._path(s)}.deleting-{os.getpid()}"
            os.rename(self._path(s), trash)
            _fsync_dir(self.directory)
            shutil.rmtree(trash, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        """Clean up folders of interrupted saves/deletions (our exact names only)."""
        for name in os.listdir(self.directory):
            full = os.path.join(self.directory, name)
            m = _TMP_RE.fullmatch(name) or _DELETING_RE.fullmatch(name)
            if m is not None:
                if _pid_is_stale(int(m.group(2))):
                    shutil.rmtree(full, ignore_errors=True)
                continue
            m = _SUPERSEDED_RE.fullmatch(name)
            if m is not None and _pid_is_stale(int(m.group(2))):
                final = os.path.join(self.directory, f"step_{m.group(1)}")
                if os.path.lexists(final):
                    shutil.rmtree(full, ignore_errors=True)
                else:
                    # Crash between moving the old checkpoint aside and
                    # publishing the new one: the old one is still complete.
                    os.rename(full, final)
                    _fsync_dir(self.directory)

    # --------------------------------------------------------------- restore

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """Restore the newest readable checkpoint.

        A corrupt newest checkpoint is logged (WARNING, logger
        ``card_jax.checkpoint``) and skipped in favour of the previous one; it
        is left on disk untouched for inspection.

        Returns:
            ``(step, state, metadata)``, or None if there is no checkpoint.

        Raises:
            CheckpointError: every checkpoint is corrupt (the message lists
                them), or the newest readable one does not match
                ``abstract_state`` or has a newer format_version.
        """
        failures = []
        for step in reversed(self.steps()):
            try:
                state, meta = self.restore(step, abstract_state)
            except CorruptCheckpointError as e:
                logger.warning(
                    "Checkpoint step %d (%s) is unreadable, falling back to an older one: %s",
                    step,
                    self._path(step),
                    e,
                )
                failures.append(f"step {step} ({e})")
                continue
            return step, state, meta
        if failures:
            raise CheckpointError(
                f"all {len(failures)} checkpoints in {self.directory} are unreadable: "
                + "; ".join(failures)
            )
        return None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore checkpoint ``step`` into the structure of ``abstract_state``.

        Args:
            step: step to restore.
            abstract_state: pytree of ``jax.ShapeDtypeStruct`` (e.g. from
                ``jax.eval_shape``) or arrays with the expected structure;
                leaves with a concrete ``sharding`` are restored with it.

        Returns:
            ``(state, metadata)``; leaves are jax arrays bit-identical to what
            was saved, with exactly the requested shapes and dtypes.

        Raises:
            CorruptCheckpointError: files missing, truncated or corrupted.
            CheckpointError: no such checkpoint, newer format_version, or the
                saved tree differs (the message names the first differing path).
        """
        path = self._path(int(step))
        manifest_path = os.path.join(path, _MANIFEST_FILE)
        if not os.path.isfile(manifest_path):
            raise CheckpointError(f"no complete checkpoint for step {step} in {self.directory}")
        manifest = self._read_manifest(manifest_path)
        if manifest["step"] != step:
            raise CorruptCheckpointError(f"manifest says step {manifest['step']}, folder says {step}")

        msg = _first_difference(manifest["tree"], abstract_state)
        if msg is not None:
            raise CheckpointError(f"checkpoint step {step} does not match the expected state: {msg}")

        self._verify_files(path, manifest["files"])
        meta = self._read_metadata(os.path.join(path, _METADATA_FILE))

        abstract_leaves, treedef = jax.tree.flatten(abstract_state)
        descs = _leaf_descs(manifest["tree"])
        if len(descs) != len(abstract_leaves):  # cannot happen if the trees matched
            raise CorruptCheckpointError("manifest leaf count disagrees with its tree")
        shardings = [_restore_sharding(leaf) for leaf in abstract_leaves]
        wanted = {}
        for i, (leaf, desc) in enumerate(zip(abstract_leaves, descs)):
            shape, dtype = _shape_dtype(leaf)
            if int(np.prod(shape)) > 0:
                wanted[_leaf_name(i)] = (shape, dtype, shardings[i])
        restored: dict[str, Any] = {}
        if wanted:
            if not manifest["has_state"]:
                raise CorruptCheckpointError("manifest lists arrays but no Orbax state")
            item = {k: jax.ShapeDtypeStruct(s, d, sharding=sh) for k, (s, d, sh) in wanted.items()}
            restore_args = {
                k: ocp.ArrayRestoreArgs(sharding=sh, global_shape=s, dtype=d)
                for k, (s, d, sh) in wanted.items()
            }
            try:
                restored = self._orbax.restore(
                    os.path.join(path, _STATE_DIR),
                    args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args),
                )
            except Exception as e:  # noqa: BLE001 - any Orbax failure means unreadable
                raise CorruptCheckpointError(f"Orbax could not read the arrays: {e!r}") from e

        out = []
        for i, leaf in enumerate(abstract_leaves):
            shape, dtype = _shape_dtype(leaf)
            name = _leaf_name(i)
            if name in wanted:
                arr = restored.get(name)
                if arr is None or tuple(arr.shape) != shape or np.dtype(arr.dtype) != dtype:
                    raise CorruptCheckpointError(f"Orbax returned a wrong array for leaf {i}")
            else:
                arr = jax.device_put(np.zeros(shape, dtype), shardings[i])
            out.append(arr)
        return jax.tree.unflatten(treedef, out), meta

    @staticmethod
    def _read_manifest(manifest_path: str) -> dict:
        try:
            with open(manifest_path, "rb") as f:
                manifest = json.loads(f.read())
            stored_crc = manifest.pop("manifest_crc32")
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            raise CorruptCheckpointError(f"manifest unreadable: {e!r}") from e
        if zlib.crc32(_canonical_json(manifest)) != stored_crc:
            raise CorruptCheckpointError("manifest checksum mismatch")
        # Every future format keeps "format_version" and "manifest_crc32", so
        # the version can be trusted (and compared) only after the checksum.
        version = manifest.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise CorruptCheckpointError(f"manifest has invalid format_version {version!r}")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format_version {version} is newer than this card_jax "
                f"supports ({FORMAT_VERSION}); upgrade card_jax"
            )
        expected_types = {"step": int, "has_state": bool, "tree": dict, "files": dict}
        for key, typ in expected_types.items():
            if not isinstance(manifest.get(key), typ):
                raise CorruptCheckpointError(f"manifest field {key!r} missing or malformed")
        return manifest

    @staticmethod
    def _verify_files(path: str, files: Mapping[str, Mapping[str, int]]) -> None:
        for rel, expected in sorted(files.items()):
            full = os.path.join(path, *rel.split("/"))
            try:
                actual_size = os.path.getsize(full)
                if actual_size != expected["size"]:
                    raise CorruptCheckpointError(
                        f"{rel} has {actual_size} bytes, manifest says {expected['size']}"
                    )
                _, crc = _crc32_file(full)
            except OSError as e:
                raise CorruptCheckpointError(f"{rel} unreadable: {e!r}") from e
            if crc != expected["crc32"]:
                raise CorruptCheckpointError(f"{rel} fails its crc32 checksum")

    @staticmethod
    def _read_metadata(metadata_path: str) -> dict:
        try:
            with open(metadata_path, "rb") as f:
                meta = json.loads(f.read())
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(f"metadata unreadable: {e!r}") from e
        version = meta.get("format_version") if isinstance(meta, dict) else None
        if not isinstance(version, int):
            raise CorruptCheckpointError("metadata lacks format_version")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format_version {version} is newer than this card_jax "
                f"supports ({FORMAT_VERSION}); upgrade card_jax"
            )
        return meta
