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
    level0_from="",            # ft/lth/lrr: workdir of a finished dense run of the same config;
                               # its final state is this run's level 0 (not trained again)
)
_UNSET = {"levels": -1, "init": ""}  # option values that mean "the factory's default"


def options_used(name: str) -> set[str]:
    """The `config.method` options that method `name` reads (factory arguments + loop options)."""
    if name not in METHODS:
        raise ValueError(f"unknown method.name {name!r}; valid: {', '.join(sorted(METHODS))}")
    accepted = set(inspect.signature(METHODS[name]).parameters) - set(CONTEXT_KEYS)
    return (accepted & set(METHOD_OPTIONS)) | _LOOP_USES.get(name, set())


_LOOP_USES = {"ft": {"finetune_epochs", "finetune_lr", "level0_from"},
              "lth": {"level0_from"}, "lrr": {"level0_from"},
              "ep": {"bn_recalibration_batches"}, "bp": {"bn_recalibration_batches"}}


def check_options_used(name: str, keys) -> None:
    """Refuses explicitly set options that method `name` would ignore (e.g. from the CLI).

    Config files may carry defaults for every method family; an option the user names for a
    method that does not read it is a mistake that must not pass silently.
    """
    unused = sorted(set(keys) - options_used(name) - {"name"})
    if unused:
        raise ValueError(f"method.{unused[0]} is not used by method {name!r}; it reads: "
                         f"{', '.join(sorted(options_used(name))) or 'no options'}")


def from_config(method_config, **context: Any) -> Method:
    """Builds the Method named by `config.method.name` from the options it uses.

    Options the method does not read are ignored here (a config file may set defaults for
    several methods); `check_options_used` refuses them when a user names them explicitly.

    Args:
      method_config: mapping with 'name' and options from METHOD_OPTIONS / LOOP_OPTIONS.
      **context: optional run facts from `CONTEXT_KEYS` (steps_per_epoch, total_steps,
        layer_order), forwarded to the factories that take them.
    """
    name = method_config["name"]
    used = options_used(name)
    options = {k: v for k, v in dict(method_config).items() if k != "name"}
    if "prune_rate" in options:
        raise ValueError("method.prune_rate is not accepted: use sparsity = fraction of weights "
                         "REMOVED (hidden-networks' prune_rate is the fraction kept)")
    unknown = set(options) - set(METHOD_OPTIONS) - set(LOOP_OPTIONS)
    if unknown:
        raise ValueError(f"unknown method option(s) {sorted(unknown)}")
    unknown_context = set(context) - set(CONTEXT_KEYS)
    if unknown_context:
        raise TypeError(f"unknown context {sorted(unknown_context)}; valid: {CONTEXT_KEYS}")
    accepted = inspect.signature(METHODS[name]).parameters
    kwargs = {k: v for k, v in options.items()
              if k in used and k in accepted and _UNSET.get(k, object()) != v}
    for key, value in context.items():
        if key in accepted and value is not None:
            kwargs.setdefault(key, value)
    return METHODS[name](**kwargs)
