"""The compression-method interface: a NamedTuple of pure functions (optax style).

A method never keeps state in Python attributes: its per-realization state (masks, scores,
counters) is a pytree returned by `init` and threaded through training. The factory closes over
static hyper-parameters only. DESIGN §5.2.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

Params = Any       # pytree of arrays
MethodState = Any  # pytree of arrays (masks, scores, counters); () for dense training


class Method(NamedTuple):
    """Pure functions that define how a compression method trains.

    Attributes:
      name: registry name.
      init: (params, key) -> method_state, at step 0.
      apply: (params, method_state) -> params the forward pass sees (e.g. W * mask).
      step: (params, method_state, step) -> method_state, a per-step hook (e.g. GMP schedule).
      post_update: (params, method_state) -> params after the optimizer update (re-masking).
      trainable: 'params' or 'scores': which pytree the optimizer updates.
    """

    name: str
    init: Callable[[Params, jax.Array], MethodState]
    apply: Callable[[Params, MethodState], Params]
    step: Callable[[Params, MethodState, jax.Array], MethodState]
    post_update: Callable[[Params, MethodState], Params]
    trainable: str = "params"


def dense() -> Method:
    """Plain dense training: the baseline every CARD is compared with (SPEC §0)."""
    return Method(
        name="dense",
        init=lambda params, key: (),
        apply=lambda params, state: params,
        step=lambda params, state, step: state,
        post_update=lambda params, state: params,
    )
