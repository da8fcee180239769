"""Seconds-long end-to-end run on synthetic data, used by tests and CI.

Command:
  python -m card_jax.main --config=configs/smoke.py --workdir=/tmp/smoke
Expected: finishes in ~10 s on a 2-core CPU; the synthetic classes are separable, so accuracy
rises well above chance (10%) within its 30 steps.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.get_base_config()
    config.data = common.get_data("synthetic")
    config.data.synthetic.image_size = 16
    config.data.crop_padding = 2
    config.data.pad_to = 0
    config.model = common.get_model("conv2", width=0.125, image_size=16)
    config.optim = common.get_optim(lr=0.02, weight_decay=5e-4)
    config.train = common.get_train(
        realizations=2, batch_size=32, steps=30, log_every=10, checkpoint_every=10
    )
    config.eval = common.get_eval(batch_size=128)
    # Short enough for 30 steps: the global EP/BP warm-up ends after one 16-step epoch and
    # LTH/LRR reach their sparsity in 2 pruning levels.
    config.method = common.get_method("dense", warmup_epochs=0.5, levels=2)
    del arg
    return config
