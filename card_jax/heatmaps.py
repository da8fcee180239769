"""Fourier error heat maps of finished runs (paper §2.3, Figure 2).

  python -m card_jax.heatmaps --workdir=DIR [--baseline=DENSE_DIR] [--eps=3,4,6]
      [--examples=1000] [--out=DIR/heatmaps]

Evaluates every realization of the run on its test images perturbed by each Fourier basis
image at each eps (`card_jax.fourier.heatmap`, one compilation), writes `heatmap.npy`
`[R, E, H, W]` and a PNG grid; with `--baseline` also the difference to the baseline run
(computed the same way, or read from its own `heatmaps/heatmap.npy` if present).
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

_WORKDIR = None
_BASELINE = None
_EPS = None
_EXAMPLES = None
_OUT = None
_SEED = None


def _define_flags() -> None:
    """Defined only when run as a program, so importing this module defines no flags."""
    global _WORKDIR, _BASELINE, _EPS, _EXAMPLES, _OUT, _SEED
    _WORKDIR = flags.DEFINE_string("workdir", None, "a finished card_jax run")
    _BASELINE = flags.DEFINE_string("baseline", None, "a finished baseline run (e.g. dense)")
    _EPS = flags.DEFINE_list("eps", ["3", "4", "6"], "perturbation L2 norms")
    _EXAMPLES = flags.DEFINE_integer("examples", 1000, "test images (first N; -1 = all)")
    _OUT = flags.DEFINE_string("out", None, "output folder (default WORKDIR/heatmaps)")
    _SEED = flags.DEFINE_integer("seed", 0, "seed of the random perturbation signs")

log = logging.getLogger("card_jax")
META_FILE = "heatmap.json"  # settings and file name of the saved heat maps


def run_heatmap(workdir, eps, examples: int, seed: int = 0) -> np.ndarray:
    """Error rates `[R, len(eps), H, W]` of every realization of a finished run."""
    from card_jax import export, state as state_lib, steps, train
    from card_jax.fourier import heatmap

    exp, state = export.load_final_state(workdir)
    data = train.load_data(exp.config.data)
    images, labels = data.test_images, data.test_labels
    if examples > len(images):
        raise ValueError(f"--examples={examples} but the test set has {len(images)} images")
    if examples > 0:
        images, labels = images[:examples], labels[:examples]
    R = exp.config.train.realizations

    def predict(x):
        logits = [steps.forward(exp.graphdef, exp.method, *(
            state_lib.index(t, r) for t in (state.params, state.batch_stats,
                                            state.method_state)), x, train=False)[0]
                  for r in range(R)]
        return jnp.stack(logits)

    return heatmap.heatmap(predict, images, labels, tuple(eps), key=jax.random.key(seed))


def heatmaps_for(workdir: pathlib.Path, eps, examples: int, seed: int) -> np.ndarray:
    """A run's heat maps: from its `heatmaps/` folder when computed with the same settings."""
    meta_path = workdir / "heatmaps" / META_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if (meta.get("eps"), meta.get("examples"), meta.get("seed")) == (list(eps), examples,
                                                                         seed):
            return np.load(meta_path.parent / meta["npy"])
    return run_heatmap(workdir, eps, examples, seed)


def main(argv):
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from card_jax.fourier import heatmap

    if not _WORKDIR.value:
        print("error: --workdir is required", file=sys.stderr)
        sys.exit(2)
    workdir = pathlib.Path(_WORKDIR.value)
    eps = [float(e) for e in _EPS.value]
    out = pathlib.Path(_OUT.value) if _OUT.value else workdir / "heatmaps"
    try:
        err = heatmaps_for(workdir, eps, _EXAMPLES.value, _SEED.value)
        baseline = None
        if _BASELINE.value:
            baseline = heatmaps_for(pathlib.Path(_BASELINE.value), eps, _EXAMPLES.value,
                                    _SEED.value)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    config = json.loads((workdir / "config.json").read_text())
    title = f"{config['model']['name']} {config['method']['name']}"
    if config["method"]["name"] != "dense":
        title += f" {config['method']['sparsity']:.0%} {config['method']['scope']}"
    if config["data"].get("augment", "none") != "none":
        title += f" {config['data']['augment']}"
    paths = heatmap.save_heatmaps(err, eps, out, title, baseline)
    (out / META_FILE).write_text(json.dumps(
        {"eps": eps, "examples": _EXAMPLES.value, "seed": _SEED.value,
         "npy": pathlib.Path(paths["npy"]).name}))
    mean = err.reshape((-1,) + err.shape[-3:]).mean(0)
    print(json.dumps({"png": paths["png"], "npy": paths["npy"],
                      "mean_error_per_eps": [float(m.mean()) for m in mean]}))


if __name__ == "__main__":
    from card_jax import entry

    entry.prepare()  # XLA:CPU flags and malloc tunables for this machine (card_jax/entry.py)
    _define_flags()
    app.run(main)
