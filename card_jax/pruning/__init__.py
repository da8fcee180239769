"""Compression methods as pure pytree transforms. `METHODS` is a plain registry dict.

Methods of the "Winning Hand" sweep (SPEC §0): ft, gmp, lth, lrr (magnitude.py), ep
(edgepopup.py), bp (biprop.py), plus the dense baseline. Every factory takes `sparsity`
(fraction of prunable weights REMOVED) and `scope` ('global' | 'layerwise').
"""

from __future__ import annotations

import inspect
from typing import Any

from card_jax.pruning import biprop, edgepopup, magnitude
from card_jax.pruning.base import Method, current_mask, dense, get_trainable, set_trainable

__all__ = ["METHODS", "Method", "current_mask", "from_config", "get_trainable",
           "set_trainable"]

METHODS = {
    "dense": dense,
    "ft": magnitude.fine_tuning,
    "gmp": magnitude.gmp,
    "lth": magnitude.lth,
    "lrr": magnitude.lrr,
    "ep": edgepopup.edge_popup,
    "bp": biprop.biprop,
}

# Facts about the run, not hyper-parameters, that some factories need; `from_config` passes
# each only to factories whose signature names it.
CONTEXT_KEYS = ("steps_per_epoch", "total_steps", "layer_order")

# Every option of `config.method` with its default (configs/common.py builds the block from
# this). A factory receives the options its signature names; setting an option that the chosen
# method does not use is an error, never silently ignored.
METHOD_OPTIONS = dict(
    sparsity=0.8,              # fraction of prunable weights REMOVED (all methods but dense)
    scope="global",            # global | layerwise
    prune_first_layer=True,    # False keeps the first conv dense
    prune_last_layer=True,     # False keeps the classifier dense
    rewind_step=0,             # lth: rewind point k in steps (0 = original LTH)
    level_mode="exact",        # lth/lrr: exact (lands on sparsity) | geometric (1 - 0.8^L)
    levels=-1,                 # lth/lrr: number of pruning levels (-1 = from level_mode)
    level_fraction=0.2,        # lth/lrr geometric mode: fraction of remaining weights per level
    initial_sparsity=0.0,      # gmp: s_i
    start_fraction=0.1,        # gmp: pruning starts at this fraction of training
    end_fraction=0.75,         # gmp: and reaches `sparsity` here
    frequency=100,             # gmp: steps between mask updates
    init="",                   # ep/bp weight init ('' = the method's default)
    scale_fan=False,           # ep/bp: scale the init by the kept fan-in
    warmup_epochs=10.0,        # ep/bp global: sparsity warm-up from 50% (SPEC §3(a))
)
# Options the level loop reads itself (card_jax.run), never passed to factories.
LOOP_OPTIONS = dict(
    finetune_epochs=-1.0,      # ft: length of the fine-tuning level (-1 = train.epochs / 4)
    finetune_lr=-1.0,          # ft: its constant LR (-1 = optim.lr / 100)
    bn_recalibration_batches=0,  # ep/bp: re-estimate BN statistics on N train batches at the end
)
_UNSET = {"levels": -1, "init": ""}  # option values that mean "the factory's default"


def from_config(method_config, **context: Any) -> Method:
    """Builds the Method named by `config.method.name` from the options it uses.

    Args:
      method_config: mapping with 'name' and options from METHOD_OPTIONS / LOOP_OPTIONS.
      **context: optional run facts from `CONTEXT_KEYS` (steps_per_epoch, total_steps,
        layer_order), forwarded to the factories that take them.

    Raises:
      ValueError: unknown method, `prune_rate`, or an option set to a non-default value that
        the chosen method does not use.
    """
    name = method_config["name"]
    if name not in METHODS:
        raise ValueError(f"unknown method.name {name!r}; valid: {', '.join(sorted(METHODS))}")
    options = {k: v for k, v in dict(method_config).items() if k != "name"}
    if "prune_rate" in options:
        raise ValueError("method.prune_rate is not accepted: use sparsity = fraction of weights "
                         "REMOVED (hidden-networks' prune_rate is the fraction kept)")
    unknown_context = set(context) - set(CONTEXT_KEYS)
    if unknown_context:
        raise TypeError(f"unknown context {sorted(unknown_context)}; valid: {CONTEXT_KEYS}")
    accepted = inspect.signature(METHODS[name]).parameters
    loop_uses = {"ft": {"finetune_epochs", "finetune_lr"},
                 "ep": {"bn_recalibration_batches"}, "bp": {"bn_recalibration_batches"}}
    kwargs = {}
    for key, value in options.items():
        default = {**METHOD_OPTIONS, **LOOP_OPTIONS}.get(key)
        if key in accepted:
            if _UNSET.get(key, object()) != value:
                kwargs[key] = value
        elif key in LOOP_OPTIONS and key in loop_uses.get(name, ()):
            continue
        elif key in METHOD_OPTIONS or key in LOOP_OPTIONS:
            if value != default:
                raise ValueError(f"method.{key}={value!r} is not used by method {name!r}; "
                                 f"it takes: {', '.join(sorted(set(accepted) - set(CONTEXT_KEYS)))}")
        else:
            raise ValueError(f"unknown method option {key!r}")
    for key, value in context.items():
        if key in accepted and value is not None:
            kwargs.setdefault(key, value)
    return METHODS[name](**kwargs)
