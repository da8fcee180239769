"""Shared config blocks. Every sub-config maps onto one module of card_jax.

`data` -> card_jax.data, `model` -> card_jax.models, `method` -> card_jax.pruning,
`optim` -> card_jax.optim, `train` -> card_jax.train, `eval` -> card_jax.evaluate.
Epoch-valued options are converted to steps once, in card_jax.train.
"""

from __future__ import annotations

import ml_collections


def get_data(name: str = "fashion_mnist") -> ml_collections.ConfigDict:
    data = ml_collections.ConfigDict()
    data.name = name            # fashion_mnist | cifar10 | cifar100 | tfds:<name> | synthetic
    data.dir = ""               # '' = the source's default location
    data.pad_to = 32            # zero-pad smaller images (Fashion-MNIST 28 -> 32)
    data.crop_padding = 4       # random crop after padding by this many pixels; 0 = off
    data.flip = True            # random horizontal flip
    data.seed = 0               # batch order = f(data.seed, realization seed, epoch, step)
    data.train_examples = -1    # -1 = all; more than exist is an error
    data.test_examples = -1
    data.augment = "none"       # none | augmix | gaussian (train-time, SPEC §8)
    data.jsd = False            # AugMix Jensen-Shannon consistency loss, weight 12 (SPEC §8(a))
    data.synthetic = ml_collections.ConfigDict(
        dict(train_size=512, test_size=256, image_size=32, channels=3, num_classes=10, seed=0)
    )
    return data


def get_model(name: str = "conv4", **kw) -> ml_collections.ConfigDict:
    model = ml_collections.ConfigDict()
    model.name = name
    model.kw = ml_collections.ConfigDict(kw)  # model-specific keyword arguments (width, ...)
    return model


def get_method(name: str = "dense", **overrides) -> ml_collections.ConfigDict:
    """All method options (card_jax.pruning.METHOD_OPTIONS/LOOP_OPTIONS); see the README."""
    from card_jax.pruning import LOOP_OPTIONS, METHOD_OPTIONS

    method = ml_collections.ConfigDict({"name": name, **METHOD_OPTIONS, **LOOP_OPTIONS})
    method.update(overrides)
    return method


def get_optim(**overrides) -> ml_collections.ConfigDict:
    optim = ml_collections.ConfigDict()
    optim.name = "sgd"          # sgd | adamw
    optim.lr = 0.1
    optim.momentum = 0.9
    optim.nesterov = False
    optim.weight_decay = 5e-4   # coupled (PyTorch SGD) for sgd, decoupled for adamw
    optim.schedule = "cosine"   # cosine | step | constant
    optim.warmup_epochs = 0.0
    optim.milestones = (80, 120)  # epochs, for the step schedule (open_lth)
    optim.gamma = 0.1
    optim.update(overrides)
    return optim


def get_train(**overrides) -> ml_collections.ConfigDict:
    train = ml_collections.ConfigDict()
    train.realizations = 2      # R seeds trained together; realization r uses seed + r
    train.batch_size = 128
    train.epochs = 1.0
    train.steps = -1            # > 0 overrides epochs
    train.strategy = "auto"     # how the [R] axis runs: auto | map | vmap
    train.compute_dtype = "float32"  # float32 | bfloat16: forward/backward compute (params,
                                     # optimizer state, BN statistics and the loss stay fp32)
    train.log_every = 50        # steps between metric lines
    train.checkpoint_every = 500  # steps between checkpoints (and one at the end)
    train.keep_checkpoints = 3
    train.eval_every = 0        # steps between test evaluations; 0 = only at the end
    train.progress = "auto"     # auto (bar on a terminal) | bar | log | none
    train.update(overrides)
    return train


def get_eval(**overrides) -> ml_collections.ConfigDict:
    ev = ml_collections.ConfigDict()
    ev.batch_size = 1000
    ev.corruption_dir = ""          # a "-C" folder (CIFAR-10-C layout) to evaluate on; '' = none
    ev.corruption_examples = -1     # first N images of each cell (-1 = all; more is an error)
    ev.extra_corruptions = False    # also the 4 extra corruptions (their files must exist)
    ev.generate_corruptions = False  # write the "-C" set of data.name's test split into
                                     # corruption_dir first if it is incomplete (resumable)
    ev.update(overrides)
    return ev


def get_base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = get_data()
    config.model = get_model("conv4", width=0.25)
    config.method = get_method()
    config.optim = get_optim()
    config.train = get_train()
    config.eval = get_eval()
    return config


def shrink_for_smoke(config: ml_collections.ConfigDict) -> None:
    """Turns a paper config into a seconds-long run with the same structure (tests, CI)."""
    config.data = get_data("synthetic")
    config.data.pad_to = 0
    config.data.synthetic.image_size = 16
    config.data.crop_padding = 2
    config.train.realizations = 2
    config.train.batch_size = 32
    config.train.steps = 24
    config.train.epochs = 1.0
    config.train.log_every = 8
    config.train.checkpoint_every = 24
    config.eval = get_eval(batch_size=128)
    config.optim.milestones = (0.5, 1.0)
    kw = dict(config.model.kw)
    name = config.model.name
    if name.startswith("conv"):
        kw.update(width=0.125, image_size=16)
    elif name.startswith("vgg"):
        kw.update(width=0.0625)
    elif name.startswith("resnet"):
        kw.update(width=4)
    elif name == "resnext29":
        kw.update(width=8, cardinality=2, base_width=2)
    config.model.kw = ml_collections.ConfigDict(kw)
    config.method.warmup_epochs = 0.5
    config.method.levels = 2 if config.method.name in ("lth", "lrr") else config.method.levels
    config.method.finetune_epochs = 0.5
    config.method.rewind_step = min(config.method.rewind_step, 4)
