"""CARD-Decks: ensembles of CARDs with spectral gating (paper §3.2, SPEC §0 item 4, §1(c)-(e)).

Modules:
  spectral  pure: `spectral_feature(images) -> [N, bins]`, `d_ss`, exact `nearest`
  gate      representatives of each augmentation group (saved in WORKDIR/gate/), the gate
            (brute force on device or scipy cKDTree)
  members   finding and checking members in finished workdirs, stacking their parameters
  predict   pure jitted deck inference over stacked members `[K, ...]` (sharded over devices)
  options   checks of a deck config (configs/deck.py)
  run       build + evaluate + results.json (the `card_jax.main` deck command)

Importing the package imports no JAX; the names below load their module on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SpectrumOptions": "spectral", "spectral_feature": "spectral",
    "radial_spectrum": "spectral", "d_ss": "spectral", "nearest": "spectral",
    "Gate": "gate", "KDTreeSearch": "gate", "representative_features": "gate",
    "Member": "members", "DeckError": "members", "describe": "members", "check": "members",
    "load_stacks": "members", "DeckFn": "predict", "deck_probs": "predict",
    "member_probs": "predict", "build_and_evaluate": "run", "load_deck": "run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"card_jax.deck.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'card_jax.deck' has no attribute {name!r}")
