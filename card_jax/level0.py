"""Level 0 of FT, LTH and LRR taken from a finished dense run (`method.level0_from`).

The level 0 of these methods (paper §2.1) is dense training with all-ones masks: the same
steps, bit for bit, as the dense baseline of the same config (`Method.dense_level0`; a test
checks the equality). A sweep that trains the baseline anyway need not train it three more
times, so, like open_lth's shared pre-training, a run given the dense run's workdir copies its
final state into `levels/level_0/` instead of training level 0 (for LTH also the rewind
weights), and goes on with level 1. Everything after that, and so every result, is what the
run would have computed alone.

The copy is refused, with the reason, unless the source run is finished, trained `dense`, and
its config equals this run's in everything that shapes training (only `method.*`, `eval.*`
and the logging / checkpointing keys in IGNORED_PREFIXES may differ). The copied checkpoint
records where it came from and the source's training wall time, so `wall_time_s` still counts
the training that produced the result.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax

from card_jax import config_util

log = logging.getLogger("card_jax")

# Config keys that never change what level 0 trains: the method's own keys, the volatile
# evaluation / logging keys, and when checkpoints are kept or evaluated.
IGNORED_PREFIXES = ("method.", *config_util.VOLATILE_PREFIXES, "train.checkpoint_every",
                    "train.keep_checkpoints", "train.eval_every")


class Level0SourceError(ValueError):
    """`method.level0_from` names a run that cannot stand in for this run's level 0."""


def training_differences(source_config: dict, config: dict) -> list[str]:
    """`key: source -> this run` for every difference that changes what level 0 trains
    (plain config dicts; differences under IGNORED_PREFIXES are left out)."""
    return [c for c in config_util.diff(source_config, config)
            if not c.startswith(IGNORED_PREFIXES)]


def check_source(source: pathlib.Path, config: dict, *, config_file: str,
                 results_file: str) -> None:
    """Raises Level0SourceError unless `source` is a finished dense run of the same training.

    Args:
      source: the dense run's workdir.
      config: this run's config as a plain dict (`config_util.to_dict`).
    """
    if not (source / results_file).is_file():
        raise Level0SourceError(
            f"method.level0_from={source}: no {results_file} there, so it is not a finished "
            "run; train it first (in a sweep, make this job depend on it) or leave "
            "method.level0_from empty to train level 0 here")
    saved = config_util.with_added_keys(
        json.loads((source / config_file).read_text(encoding="utf-8")))
    if saved.get("method", {}).get("name") != "dense":
        raise Level0SourceError(
            f"method.level0_from={source} trained method "
            f"{saved.get('method', {}).get('name')!r}; level 0 can only come from a dense run")
    changes = training_differences(saved, config)
    if changes:
        raise Level0SourceError(
            f"method.level0_from={source} trained a different level 0; differences "
            "(source -> this run):\n  " + "\n  ".join(changes))


def source_clean_accuracy(source: pathlib.Path, config: dict, *, config_file: str,
                          results_file: str) -> list[float] | None:
    """The source's clean test accuracy `[R]` if it was evaluated as this run would evaluate
    level 0 (same eval batch size; the state and the eval step are the same), else None."""
    saved = json.loads((source / config_file).read_text(encoding="utf-8"))
    if saved.get("eval", {}).get("batch_size") != config["eval"]["batch_size"]:
        return None
    return json.loads((source / results_file).read_text(encoding="utf-8"))["clean_acc"]


def import_final_state(source_checkpoints: pathlib.Path, directory: pathlib.Path,
                       initial_state: Any, end: int, rewind_step: int | None,
                       metadata: dict, keep: int) -> None:
    """Writes the source's state at step `end` as this run's level-0 checkpoint.

    A no-op when `directory/checkpoints` holds a checkpoint already (an earlier attempt).
    The rewind weights (LTH) are written first, so an interruption between the two writes
    leaves no level-0 checkpoint and the next attempt starts over.

    Args:
      source_checkpoints: the dense run's `checkpoints/` folder.
      directory: this run's level-0 folder (gets `checkpoints/`, and `rewind/` for LTH).
      initial_state: this run's host `[R]` TrainState at step 0; its `method_state` (all-ones
        masks) replaces the dense run's empty one, and its params are the rewind weights
        when `rewind_step` is 0.
      end: level 0's last step (the dense run must have a checkpoint there).
      rewind_step: LTH's rewind point k, or None. k > 0 needs the source's checkpoint at k.
    """
    # Orbax is imported here, not at the top: the sweep launcher imports this module for
    # `training_differences` when it expands a grid, and needs no checkpoints.
    from card_jax import checkpoint as checkpoint_lib

    target = checkpoint_lib.Checkpointer(directory / "checkpoints", keep=keep)
    if target.steps():
        return
    source = checkpoint_lib.Checkpointer(source_checkpoints)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            initial_state._replace(method_state=()))

    def restore(step: int):
        if step not in source.steps():
            raise Level0SourceError(
                f"method.level0_from: {source_checkpoints} has no checkpoint at step {step} "
                f"(it has {source.steps()}); leave method.level0_from empty to train level 0 "
                "here")
        return source.restore(step, abstract)

    if rewind_step is not None:
        rewind = checkpoint_lib.Checkpointer(directory / "rewind", keep=1)
        if not rewind.steps():
            params = initial_state.params if rewind_step == 0 else restore(rewind_step)[0].params
            rewind.save(rewind_step, params, {"rewind_step": rewind_step})
    state, source_meta = restore(end)
    if not (jax.numpy.array_equal(state.seed, initial_state.seed)):
        raise Level0SourceError(f"method.level0_from: realization seeds differ "
                                f"({state.seed} in the source, {initial_state.seed} here)")
    state = state._replace(method_state=initial_state.method_state)
    target.save(end, state, {**metadata, "level": 0,
                             "wall_time_s": float(source_meta.get("wall_time_s", 0.0)),
                             "level0_from": str(source_checkpoints.parent)})
    log.info("level 0: final state (step %d) taken from the dense run %s", end,
             source_checkpoints.parent)
