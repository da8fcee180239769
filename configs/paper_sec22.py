"""Section 2.2 of the paper: model x sparsity x method on CIFAR-10 (Figure 1).

One run per (model, method, sparsity); 5 realizations each (SPEC §0.1, §10):

  python -m card_jax.main --config=configs/paper_sec22.py:MODEL,METHOD,SPARSITY \\
      --config.data.dir=/path/to/cifar --workdir=runs/sec22/MODEL_METHOD_SPARSITY

  MODEL     conv2 | conv4 | conv6 | conv8 | vgg19  (Conv8 and VGG19 are certain; the other three
            of the paper's five are [unverified], SPEC §10)
  METHOD    dense | ft | gmp | lth | lrr | ep | bp  (global pruning; `ep_layerwise`,
            `bp_layerwise` for App. C.1); `dense_openlth`: dense training with open_lth's
            recipe below, the level 0 that ft, lth and lrr share (the sec22 sweep trains it
            once per model and passes it to those 15 runs as `method.level0_from`)
  SPARSITY  0.5 | 0.6 | 0.8 | 0.9 | 0.95  (ignored for dense)
  Append `,smoke` for a seconds-long run on synthetic data with the same structure.

Expected (paper Figure 1, relative to the dense baseline, CIFAR-10 / CIFAR-10-C): LRR and LTH
CARDs match or beat dense clean accuracy up to 90-95% sparsity and improve CIFAR-10-C accuracy
by ~1-2 points; EP/BP are within ~1-2 points clean and typically more robust; FT and GMP lose
robustness at high sparsity. Only the figure has the numbers (SPEC §12).

Hyper-parameters (SPEC §2(b), §3(b), §4(b), §5(b)): EP/BP and the dense Conv baselines follow
hidden-networks/biprop (SGD momentum 0.9, cosine, 100 epochs, batch 128, wd 1e-4; lr 0.1, dense
Conv lr 0.01); LTH/LRR/FT/GMP follow open_lth (lr 0.1, x0.1 at epochs 80/120, 160 epochs,
wd 1e-4; FT fine-tunes 40 epochs at lr 1e-3 [unverified]). Cost: a Conv8 CIFAR-10 epoch is
~1 GPU-minute; LRR at 95% trains 14 levels (SPEC §4(a)).
"""

from __future__ import annotations

import ml_collections

from configs import common

MODELS = ("conv2", "conv4", "conv6", "conv8", "vgg19")
METHODS = ("dense", "ft", "gmp", "lth", "lrr", "ep", "bp", "ep_layerwise", "bp_layerwise")
SPARSITIES = (0.5, 0.6, 0.8, 0.9, 0.95)
# Dense training with open_lth's recipe: bit for bit the level 0 of ft, lth and lrr
# (`pruning.Method.dense_level0`), so one such run per model can stand in for theirs.
LEVEL0_SOURCE = "dense_openlth"


def parse_arg(arg: str | None) -> tuple[str, str, float, bool]:
    parts = [p for p in (arg or "conv8,lrr,0.8").split(",") if p]
    smoke = "smoke" in parts
    parts = [p for p in parts if p != "smoke"]
    model, method, sparsity = (parts + ["conv8", "lrr", "0.8"][len(parts):])[:3]
    if model not in MODELS:
        raise ValueError(f"model {model!r} not in the Section 2.2 grid {MODELS}")
    if method not in METHODS + (LEVEL0_SOURCE,):
        raise ValueError(f"method {method!r} not in {METHODS + (LEVEL0_SOURCE,)}")
    return model, method, float(sparsity), smoke


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    model, method, sparsity, smoke = parse_arg(arg)
    name, _, scope = ("dense", "", "") if method == LEVEL0_SOURCE else method.partition("_")
    config = common.get_base_config()
    config.train = common.get_train(realizations=5, batch_size=128, log_every=100,
                                    checkpoint_every=1000)
    config.data = common.get_data("cifar10")
    config.data.pad_to = 0
    config.model = common.get_model(model) if model != "vgg19" else common.get_model(
        "vgg19", bn_affine=True)
    config.method = common.get_method(name, sparsity=sparsity, scope=scope or "global")
    if name in ("ep", "bp"):
        config.model.kw = ml_collections.ConfigDict(
            dict(config.model.kw, **({"bn_affine": False} if model == "vgg19" else {})))
        config.optim = common.get_optim(lr=0.1, weight_decay=1e-4, schedule="cosine")
        config.train.epochs = 100.0
    elif method == "dense":
        config.optim = common.get_optim(lr=0.01 if model.startswith("conv") else 0.1,
                                        weight_decay=1e-4, schedule="cosine")
        config.train.epochs = 100.0
    else:  # ft, gmp, lth, lrr and LEVEL0_SOURCE: open_lth's training
        config.optim = common.get_optim(lr=0.1, weight_decay=1e-4, schedule="step",
                                        milestones=(80, 120), gamma=0.1)
        config.train.epochs = 160.0
        config.method.finetune_epochs = 40.0
        config.method.finetune_lr = 1e-3
    if smoke:
        common.shrink_for_smoke(config)
    return config
