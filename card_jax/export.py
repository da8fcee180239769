"""Exports a finished run's effective parameters.

    python -m card_jax.export --workdir=DIR --out=F.npz
    python -m card_jax.export --workdir=DIR --packed --out='card_r{r}.cardpack' \
        [--value_dtype=float32|float16] [--realization=K]

Default (.npz): each realization's parameters as the forward pass sees them (after
masking/binarisation by the compression method) go into one `.npz`, keyed `r<i>/<tree path>`
(e.g. `r0/conv1/kernel`), together with `r<i>/batch_stats/...`.

--packed: one compact `card_jax.packing` file PER REALIZATION (a CARD is the unit that decks
combine and that the paper's memory numbers count). `--out` must contain `{r}`, replaced by the
realization index, unless only one realization is written (a run with R = 1, or
--realization=K). Each file is self-describing (config and dataset info included), so
`load_packed(path).predict(x)` needs nothing but the file. Prints each file's size and its
ratio to the information bound.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx

from card_jax import config_util, steps
from card_jax import state as state_lib

_WORKDIR = None
_OUT = None
_PACKED = None
_VALUE_DTYPE = None
_REALIZATION = None


def _define_flags() -> None:
    """Defined only when run as a program, so importing this module defines no flags."""
    global _WORKDIR, _OUT, _PACKED, _VALUE_DTYPE, _REALIZATION
    _WORKDIR = flags.DEFINE_string("workdir", None, "a finished card_jax run directory")
    _OUT = flags.DEFINE_string("out", None, "output path (.npz; with --packed, may contain {r})")
    _PACKED = flags.DEFINE_bool("packed", False, "write compact card_jax.packing files")
    _VALUE_DTYPE = flags.DEFINE_enum("value_dtype", "float32", ["float32", "float16"],
                                     "--packed: storage of full-precision values")
    _REALIZATION = flags.DEFINE_integer("realization", -1,
                                        "--packed: only this realization (-1 = all)")


def flatten_named(tree, prefix: str) -> dict[str, np.ndarray]:
    """{'prefix/a/b': array} for every leaf of a nested dict pytree."""
    from card_jax.pruning.masks import path_str

    return {f"{prefix}/{path_str(path)}": np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_final_state(workdir: str | pathlib.Path):
    """(experiment, restored `[R]` state) of the newest checkpoint in a workdir."""
    from card_jax import checkpoint as checkpoint_lib
    from card_jax import run, train

    workdir = pathlib.Path(workdir)
    config_path = workdir / run.CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: is {workdir} a card_jax workdir?")
    config = ml_collections.ConfigDict(
        config_util.with_added_keys(json.loads(config_path.read_text(encoding="utf-8"))))
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


def _dataset_info(workdir: str | pathlib.Path) -> dict:
    """The dataset info results.json recorded (the placeholder dataset has no test split)."""
    from card_jax import run

    results = pathlib.Path(workdir) / run.RESULTS_FILE
    return json.loads(results.read_text(encoding="utf-8"))["dataset"]


def packed_cards(workdir: str | pathlib.Path, value_dtype: str = "float32") -> list[bytes]:
    """The packed file (bytes) of every realization of a finished run."""
    from card_jax import packing

    exp, state = load_final_state(workdir)
    return packing.pack_state(exp, state, value_dtype=value_dtype,
                              dataset_info=_dataset_info(workdir))


def packed_bytes(workdir: str | pathlib.Path, value_dtype: str = "float32") -> list[int]:
    """Size in bytes of each realization's packed file."""
    return [len(b) for b in packed_cards(workdir, value_dtype)]


class PackedModel:
    """A CARD rebuilt from a packed file: `predict(x [B, H, W, C] in [0, 1]) -> logits`.

    Attributes:
      params, batch_stats: the decoded effective parameters (numpy, one realization).
      meta: the file's header (config, dataset, realization, binary, value_dtype, leaves).
      graphdef: the model's NNX graph, built from the recorded config and dataset info.
    """

    def __init__(self, params: dict, batch_stats: dict, meta: dict):
        from card_jax import train

        self.params, self.batch_stats, self.meta = params, batch_stats, meta
        config = ml_collections.ConfigDict(config_util.with_added_keys(meta["config"]))
        dataset = train.placeholder_dataset(meta["dataset"])
        # The graph is what `train.build_experiment(config, dataset).graphdef` holds; building
        # the model abstractly gets it without initialising (and compiling) R models and the
        # method only to throw their weights away.
        model = nnx.eval_shape(lambda: train.build_model(config, dataset, jax.random.key(0)))
        self.graphdef, abstract_params, abstract_stats = state_lib.split_model(model)
        expected = jax.tree.map(lambda a: (a.shape, np.dtype(a.dtype)),
                                (abstract_params, abstract_stats))
        found = jax.tree.map(lambda a: (a.shape, a.dtype), (params, batch_stats))
        if expected != found:
            raise ValueError("the packed arrays do not match the model their config builds")
        self._predict = jax.jit(self._logits)

    def _logits(self, params, batch_stats, x):
        return steps.inference_logits(state_lib.merge_model(self.graphdef, params, batch_stats),
                                      x)

    def model(self):
        """The NNX module with the decoded weights (eval mode is `model(x, train=False)`)."""
        return state_lib.merge_model(self.graphdef, self.params, self.batch_stats)

    def predict(self, x) -> np.ndarray:
        """Logits float32 [B, classes] of images float [B, H, W, C] in [0, 1] (BN in eval
        mode, with the stored running statistics)."""
        return np.asarray(self._predict(self.params, self.batch_stats, jax.numpy.asarray(x)))


def load_packed(path: str | pathlib.Path) -> PackedModel:
    """Reads a packed CARD (`--packed` export or `packing.write_packed`) ready to predict."""
    from card_jax import packing

    return PackedModel(*packing.read_packed(path))


def _packed_realizations(workdir: str) -> list[int]:
    """The realizations --packed writes; checks --out/--realization before any loading."""
    from card_jax import run

    config_path = pathlib.Path(workdir) / run.CONFIG_FILE
    if not config_path.exists():
        return []  # load_final_state reports the missing workdir
    R = json.loads(config_path.read_text(encoding="utf-8"))["train"]["realizations"]
    chosen = list(range(R)) if _REALIZATION.value < 0 else [_REALIZATION.value]
    if any(not 0 <= r < R for r in chosen):
        print(f"error: --realization={_REALIZATION.value} but the run has {R} realization(s)",
              file=sys.stderr)
        sys.exit(2)
    if len(chosen) > 1 and "{r}" not in _OUT.value:
        print(f"error: the run has {R} realizations: put {{r}} in --out (one file per "
              "realization) or pick one with --realization", file=sys.stderr)
        sys.exit(2)
    return chosen


def _write_packed(exp, state, workdir: str, chosen: list[int]) -> None:
    from card_jax import packing

    cards = packing.pack_state(exp, state, value_dtype=_VALUE_DTYPE.value,
                               dataset_info=_dataset_info(workdir), realizations=chosen)
    for r, card in zip(chosen, cards):
        out = pathlib.Path(_OUT.value.replace("{r}", str(r)))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(card)
        info = packing.describe(card)
        print(f"realization {r}: wrote {len(card)} bytes to {out} (header "
              f"{info['header_bytes']} B, kernels {info['kernel_mask_bytes']} B mask + "
              f"{info['kernel_value_bytes']} B values, other {info['other_bytes']} B; "
              f"kernels / information bound = {info['kernel_ratio']:.3f})")


def main(argv):
    del argv
    import logging

    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every read at INFO
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    if not _WORKDIR.value or not _OUT.value:
        print("error: --workdir and --out are required", file=sys.stderr)
        sys.exit(2)
    chosen = _packed_realizations(_WORKDIR.value) if _PACKED.value else []
    try:
        exp, state = load_final_state(_WORKDIR.value)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if _PACKED.value:
        _write_packed(exp, state, _WORKDIR.value, chosen)
        return
    arrays = effective_arrays(exp, state)
    out = pathlib.Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    print(f"wrote {len(arrays)} arrays for {exp.config.train.realizations} realization(s) to {out}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
