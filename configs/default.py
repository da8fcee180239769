"""The embedded default: a Conv-4 (quarter width) on Fashion-MNIST, 2 realizations.

Command:
  python -m card_jax.main --config=configs/default.py --workdir=workdirs/default

Data: Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), padded to 32x32.
Expected: >= 88% clean test accuracy for both realizations (about 90-91%) in a few minutes on
a 2-core CPU.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.get_base_config()
    config.data = common.get_data("fashion_mnist")
    config.data.flip = True
    config.model = common.get_model("conv4", width=0.25)
    config.optim = common.get_optim(lr=0.05, weight_decay=5e-4, schedule="cosine")
    config.train = common.get_train(realizations=2, batch_size=128, epochs=3.0)
    if arg == "smoke":
        config.train.steps = 20
        config.data.train_examples = 2560
        config.data.test_examples = 1000
    return config
