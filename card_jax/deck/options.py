"""Checks of a deck config (configs/deck.py) that need no member weights.

Used by `card_jax.main.precheck` (before absl parses the flags, so that a bad value fails at
once with exit code 2) and again by `card_jax.deck.run`.
"""

from __future__ import annotations

from card_jax import config_util

SPECTRUM_KEYS = ("grayscale", "spectrum", "reciprocal", "eps")


def is_deck_config(config) -> bool:
    return "deck" in config


def split_list(text: str) -> list[str]:
    return [s.strip() for s in str(text).split(",") if s.strip()]


def groups_of(config) -> list[str]:
    return split_list(config.deck.groups)


def spectrum_dict(config) -> dict:
    return {k: config.deck.spectrum[k] for k in SPECTRUM_KEYS}


def check(config) -> None:
    """Raises config_util.ConfigError naming the first invalid deck or eval option."""
    from card_jax.data.augment import AUGMENTATIONS
    from card_jax.deck.gate import NN_METHODS
    from card_jax.deck.predict import STRATEGIES
    from card_jax.deck.spectral import GRAYSCALE, SPECTRA

    deck = config.deck

    def fail(message: str):
        raise config_util.ConfigError(message)

    if not split_list(deck.members):
        fail("deck.members is empty: give finished card_jax workdirs, e.g. "
             "--config.deck.members=workdirs/augmix,workdirs/gaussian (globs and DIR:r work)")
    groups = groups_of(config)
    if len(groups) < 2:
        fail(f"deck.groups={deck.groups!r}: a gated deck needs at least two groups")
    if len(set(groups)) != len(groups):
        fail(f"deck.groups={deck.groups!r} lists a group twice")
    unknown = [g for g in groups if g not in AUGMENTATIONS]
    if unknown:
        fail(f"deck.groups: unknown augmentation(s) {unknown}; valid: {', '.join(AUGMENTATIONS)}")
    if deck.representatives < 1:
        fail(f"deck.representatives must be >= 1, got {deck.representatives}")
    if deck.gate_batch < 1:
        fail(f"deck.gate_batch must be >= 1, got {deck.gate_batch}")
    if deck.nn not in NN_METHODS:
        fail(f"deck.nn must be one of {NN_METHODS}, got {deck.nn!r}")
    if deck.strategy not in STRATEGIES:
        fail(f"deck.strategy must be one of {STRATEGIES}, got {deck.strategy!r}")
    spectrum = deck.spectrum
    if spectrum.grayscale not in GRAYSCALE:
        fail(f"deck.spectrum.grayscale must be one of {GRAYSCALE}, got {spectrum.grayscale!r}")
    if spectrum.spectrum not in SPECTRA:
        fail(f"deck.spectrum.spectrum must be one of {SPECTRA}, got {spectrum.spectrum!r}")
    if not spectrum.eps > 0:
        fail(f"deck.spectrum.eps must be > 0, got {spectrum.eps!r}")
    if config.eval.batch_size < 1:
        fail(f"eval.batch_size must be >= 1, got {config.eval.batch_size}")
    examples = config.eval.corruption_examples
    if examples != -1 and examples < 1:
        fail(f"eval.corruption_examples must be -1 (all) or >= 1, got {examples}")
