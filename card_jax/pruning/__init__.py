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


def from_config(method_config, **context: Any) -> Method:
    """Builds the Method named by `config.method.name` with the rest of the block as kwargs.

    Args:
      method_config: mapping with 'name' and the factory's hyper-parameters.
      **context: optional run facts from `CONTEXT_KEYS` (steps_per_epoch, total_steps,
        layer_order), forwarded to the factories that take them; a config value wins.
    """
    name = method_config.name
    if name not in METHODS:
        raise ValueError(f"unknown method.name {name!r}; valid: {', '.join(sorted(METHODS))}")
    kwargs = {k: v for k, v in method_config.items() if k != "name"}
    if "prune_rate" in kwargs:
        raise ValueError("method.prune_rate is not accepted: use sparsity = fraction of weights "
                         "REMOVED (hidden-networks' prune_rate is the fraction kept)")
    unknown_context = set(context) - set(CONTEXT_KEYS)
    if unknown_context:
        raise TypeError(f"unknown context {sorted(unknown_context)}; valid: {CONTEXT_KEYS}")
    accepted = inspect.signature(METHODS[name]).parameters
    for key, value in context.items():
        if key in accepted and kwargs.get(key) is None and value is not None:
            kwargs[key] = value
    return METHODS[name](**kwargs)
