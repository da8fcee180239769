"""The embedded default: a quarter-width Conv-4 on Fashion-MNIST, 2 realizations, 2 epochs.

Command:
  python -m card_jax.main --config=configs/default.py --workdir=workdirs/default

Data: Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), zero-padded to
32x32. No crop/flip augmentation: in two epochs it only slows convergence.
Expected (measured on a 2-core CPU): clean test accuracy 0.902 / 0.907 for the two
realizations, about 200 s of training on a quiet machine (4.6 steps/s of R=2 at batch 128).
`:smoke` trains 20 steps on 2,560 examples in about 15 s.

Robustness (paper §3): `:augmix` or `:gaussian` train with that augmentation and evaluate on
Fashion-MNIST-C, generated on first use into workdirs/fashion_mnist_c (19 corruptions x 5
severities in the CIFAR-10-C layout, about a minute); results.json then holds the 15x5
corruption table, the 4 extras and calibration errors.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.get_base_config()
    config.data = common.get_data("fashion_mnist")
    config.data.crop_padding = 0
    config.data.flip = False
    config.model = common.get_model("conv4", width=0.25)
    # A short linear warm-up: without BatchNorm, a Conv-4 at lr 0.05 can die in its first
    # steps (all-zero ReLUs, loss stuck at ln 10); seen for one seed with Gaussian noise.
    config.optim = common.get_optim(lr=0.05, weight_decay=5e-4, schedule="cosine",
                                    warmup_epochs=0.1)
    # For --config.method.name=...: the global EP/BP warm-up takes the first of the 2 epochs;
    # LTH/LRR reach their sparsity in 2 pruning levels (3 trainings).
    config.method = common.get_method("dense", sparsity=0.8, warmup_epochs=1.0, levels=2)
    config.train = common.get_train(realizations=2, batch_size=128, epochs=2.0, log_every=100)
    # Evaluation batches of 250 keep this model's 32x32 activations in a CPU's caches: 189 us
    # per image on one core against 266 at 1000 (benchmarks/README.md, section 10). The clean
    # set (10,000) and the 500-image "-C" cells split into whole batches.
    config.eval.batch_size = 250
    if arg in ("augmix", "gaussian"):
        config.data.augment = arg
        config.eval.corruption_dir = "workdirs/fashion_mnist_c"
        config.eval.generate_corruptions = True
        config.eval.extra_corruptions = True
    elif arg == "smoke":
        config.train.steps = 20
        config.train.log_every = 10
        config.data.train_examples = 2560
        config.data.test_examples = 1000
    elif arg:
        raise ValueError("configs/default.py takes no argument or one of :smoke, :augmix, "
                         f":gaussian; got {arg!r}")
    return config
