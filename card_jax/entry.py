"""What every card_jax entry point (CLI, benchmark) does before anything else."""

from __future__ import annotations

from card_jax import malloc, xla_flags


def prepare() -> None:
    """XLA:CPU flags for this CPU (`card_jax/xla_flags.py`), then the glibc malloc tunables
    (`card_jax/malloc.py`), which re-execute the process with both in its environment."""
    xla_flags.apply()
    malloc.reexec_if_untuned()
