"""Compression methods as pure pytree transforms. `METHODS` is a plain registry dict."""

from __future__ import annotations

from card_jax.pruning.base import Method, dense

METHODS = {"dense": dense}


def from_config(method_config) -> Method:
    """Builds the Method named by `config.method.name` with the rest of the block as kwargs."""
    name = method_config.name
    if name not in METHODS:
        raise ValueError(f"unknown method.name {name!r}; valid: {', '.join(sorted(METHODS))}")
    kwargs = {k: v for k, v in method_config.items() if k != "name"}
    return METHODS[name](**kwargs)
