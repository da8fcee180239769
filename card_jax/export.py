"""Exports a finished run's effective parameters: `python -m card_jax.export --workdir=DIR --out=F.npz`.

Each realization's parameters as the forward pass sees them (after masking/binarisation by the
compression method) go into one `.npz`, keyed `r<i>/<tree path>` (e.g. `r0/conv1/kernel`),
together with `r<i>/batch_stats/...`.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import ml_collections
import numpy as np
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "a finished card_jax run directory")
_OUT = flags.DEFINE_string("out", None, "output .npz path")


def _path_key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)


def flatten_named(tree, prefix: str) -> dict[str, np.ndarray]:
    """{'prefix/a/b': array} for every leaf of a nested dict pytree."""
    return {f"{prefix}/{_path_key(path)}": np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_final_state(workdir: str | pathlib.Path):
    """(experiment, restored `[R]` state) of the newest checkpoint in a workdir."""
    from card_jax import checkpoint as checkpoint_lib
    from card_jax import run, train

    workdir = pathlib.Path(workdir)
    config_path = workdir / run.CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: is {workdir} a card_jax workdir?")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text(encoding="utf-8")))
    results_path = workdir / run.RESULTS_FILE
    if not results_path.exists():
        raise FileNotFoundError(f"{results_path} not found: the run has not finished")
    info = json.loads(results_path.read_text(encoding="utf-8"))["dataset"]
    exp = train.build_experiment(config, train.placeholder_dataset(info))
    final = run.level_dir(workdir, len(exp.levels) - 1, len(exp.levels)) / "checkpoints"
    restored = checkpoint_lib.Checkpointer(final).restore_latest(train.abstract_of(exp.state))
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {final}")
    _, state, _ = restored
    return exp, state


def effective_arrays(exp, state) -> dict[str, np.ndarray]:
    """Per-realization effective params and batch stats, keyed `r<i>/...`."""
    effective = jax.vmap(exp.method.apply)(state.params, state.method_state)
    arrays = {}
    for r in range(exp.config.train.realizations):
        arrays.update(flatten_named(jax.tree.map(lambda x: x[r], effective), f"r{r}"))
        arrays.update(flatten_named(jax.tree.map(lambda x: x[r], state.batch_stats),
                                    f"r{r}/batch_stats"))
    return arrays


def main(argv):
    del argv
    if not _WORKDIR.value or not _OUT.value:
        print("error: --workdir and --out are required", file=sys.stderr)
        sys.exit(2)
    try:
        exp, state = load_final_state(_WORKDIR.value)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    arrays = effective_arrays(exp, state)
    out = pathlib.Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    print(f"wrote {len(arrays)} arrays for {exp.config.train.realizations} realization(s) to {out}")


if __name__ == "__main__":
    app.run(main)
