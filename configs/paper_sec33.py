"""Section 3.3 of the paper: CARDs of large models with augmentation, CIFAR-10/100 (Figure 4).

One run per (dataset, model, augmentation, method, sparsity); 3 realizations each (SPEC §0.3):

  python -m card_jax.main --config=configs/paper_sec33.py:DATASET,MODEL,AUG,METHOD,SPARSITY \\
      --config.data.dir=/path/to/cifar --workdir=runs/sec33/...

  DATASET   cifar10 | cifar100 (CIFAR-100: wrn18_2 with lth, lrr, ep, bp only)
  MODEL     resnet18 (width 64) | wrn18_2 (ResNet-18 width 128, the paper's "WideResNet-18-2")
            | resnet50 | resnext29
  AUG       clean | augmix | gaussian
  METHOD    dense | lth | lrr | ep | ep_layerwise | bp | bp_layerwise; `dense_openlth`: dense
            training with the LTH/LRR recipe below, the level 0 that lth and lrr share (the
            sweep trains it once per model and augmentation and passes it to those runs as
            `method.level0_from`)
  SPARSITY  0.9 | 0.95 (ignored for dense)
  Append `,smoke` for a seconds-long run on synthetic data with the same structure.

Expected (SPEC §12): a single LRR wrn18_2 CARD at 95% sparsity with AugMix reaches about
96.7% CIFAR-10 / 90.9-91.2% CIFAR-10-C with 8.93 MB (vs 178.6 MB dense); binary (BP) CARDs at
95% need 0.279 MB; CIFAR-100 LRR single ~78.4% / 66.5%. Decks of these CARDs give the paper's
headline 96.8% / 92.75% (configs/deck.py).

Hyper-parameters: EP/BP and dense follow biprop's ResNet-18 setup (SGD 0.1, cosine, 100 epochs,
batch 256, wd 5e-4; non-affine BN for EP/BP, SPEC §3(b)); LTH/LRR follow open_lth (lr 0.1,
x0.1 at 80/120, 160 epochs, batch 128, wd 1e-4). Cost: a wrn18_2 CIFAR epoch is ~30 CPU-minutes
on 2 cores, ~20 GPU-seconds on an H100; LRR at 95% trains 14 levels.
"""

from __future__ import annotations

import ml_collections

from configs import common

MODELS = {"resnet18": ("resnet18", 64), "wrn18_2": ("resnet18", 128),
          "resnet50": ("resnet50", 64), "resnext29": ("resnext29", 64)}
AUGMENTATIONS = ("clean", "augmix", "gaussian")
METHODS = ("dense", "lth", "lrr", "ep", "ep_layerwise", "bp", "bp_layerwise")
SPARSITIES = (0.9, 0.95)
CIFAR100_METHODS = ("dense", "lth", "lrr", "ep", "bp")
# Dense training with the LTH/LRR recipe: bit for bit their level 0
# (`pruning.Method.dense_level0`), so one such run can stand in for theirs.
LEVEL0_SOURCE = "dense_openlth"


def parse_arg(arg: str | None):
    defaults = ["cifar10", "wrn18_2", "augmix", "lrr", "0.95"]
    parts = [p for p in (arg or "").split(",") if p]
    smoke = "smoke" in parts
    parts = [p for p in parts if p != "smoke"]
    dataset, model, aug, method, sparsity = (parts + defaults[len(parts):])[:5]
    if dataset not in ("cifar10", "cifar100"):
        raise ValueError(f"dataset {dataset!r}: use cifar10 or cifar100")
    if model not in MODELS:
        raise ValueError(f"model {model!r} not in {tuple(MODELS)}")
    if aug not in AUGMENTATIONS:
        raise ValueError(f"augmentation {aug!r} not in {AUGMENTATIONS}")
    if method not in METHODS + (LEVEL0_SOURCE,):
        raise ValueError(f"method {method!r} not in {METHODS + (LEVEL0_SOURCE,)}")
    if dataset == "cifar100" and (model != "wrn18_2" or
                                  method not in CIFAR100_METHODS + (LEVEL0_SOURCE,)):
        raise ValueError("the paper's CIFAR-100 runs use wrn18_2 with lth, lrr, ep or bp only")
    return dataset, model, aug, method, float(sparsity), smoke


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    dataset, model, aug, method, sparsity, smoke = parse_arg(arg)
    name, _, scope = ("dense", "", "") if method == LEVEL0_SOURCE else method.partition("_")
    arch, width = MODELS[model]
    config = common.get_base_config()
    config.data = common.get_data(dataset)
    config.data.pad_to = 0
    config.data.augment = {"clean": "none"}.get(aug, aug)
    bn_affine = name not in ("ep", "bp")
    config.model = common.get_model(arch, width=width, bn_affine=bn_affine)
    config.method = common.get_method(name, sparsity=sparsity, scope=scope or "global")
    config.train = common.get_train(realizations=3, log_every=100, checkpoint_every=1000)
    if name in ("lth", "lrr") or method == LEVEL0_SOURCE:
        config.optim = common.get_optim(lr=0.1, weight_decay=1e-4, schedule="step",
                                        milestones=(80, 120))
        config.train.batch_size, config.train.epochs = 128, 160.0
    else:
        config.optim = common.get_optim(lr=0.1, weight_decay=5e-4, schedule="cosine")
        config.train.batch_size, config.train.epochs = 256, 100.0
    if smoke:
        common.shrink_for_smoke(config)
    return config
