"""The compression-method interface: a NamedTuple of pure functions (optax style).

A method never keeps state in Python attributes: its per-realization state (masks, scores,
counters) is a pytree returned by `init` and threaded through training. The factory closes over
static hyper-parameters only. DESIGN §5.2.

How the training loop drives a Method (one realization; the loop vmaps/jits these):

  params = method.init_params(params, key)          # once, on the freshly built model
  ms = method.init(params, key)                     # once
  params = method.post_update(params, ms)           # once (masks the initial weights)
  rewind = None
  for level in range(method.levels):
      if level > 0:
          params, ms = method.prune(params, ms, rewind, level)   # static int level
          step = method.level_start_step             # LR schedule AND step counter restart
          opt_state = tx.init(trainable(params, ms))  # fresh optimizer at every level
      while step < total_steps:
          if level == 0 and step == method.rewind_step: rewind = params   # before the update
          eff = method.apply(params, ms)             # forward; grads w.r.t. the trainable tree
          params/ms.scores <- optax update (see `get_trainable` / `set_trainable`)
          ms = method.step(params, ms, step + 1)      # schedule hook (GMP / warm-up)
          params = method.post_update(params, ms)    # re-mask AFTER the hook (see below)
          step += 1

Ordering of `step` and `post_update`: call `step` first, then `post_update` with the NEW state,
so a mask changed by the hook (GMP) zeroes its newly pruned weights in the same step. With the
opposite order the forward pass is still exact (`apply` masks), but raw params hold the
newly pruned values for one step.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Params = Any       # pytree of arrays
MethodState = Any  # pytree of arrays (masks, scores, counters); () for dense training


class Method(NamedTuple):
    """Pure functions (and static facts) that define how a compression method trains.

    Attributes:
      name: registry name.
      init: (params, key) -> method_state, at step 0 of level 0.
      apply: (params, method_state) -> params the forward pass sees (W * mask, α sign(W) m,
        with straight-through gradients to scores for trainable='scores'). Used for training,
        evaluation and export alike.
      step: (params, method_state, step) -> method_state, called after every optimizer update
        with `step` = optimizer steps completed (GMP mask events, global EP/BP warm-up).
      post_update: (params, method_state) -> params, called after every optimizer update (and
        once after init): zeroes pruned weights exactly. Sufficient on its own for exact zeros
        with SGD+momentum, weight decay and AdamW: those optimizers are per-coordinate, so the
        stale momentum of a pruned coordinate never reaches a surviving one, and the pruned
        value is reset to 0 every step. `masks.reset_pruned_optimizer_state` is optional hygiene.
      trainable: 'params' (optimizer updates params) or 'scores' (optimizer updates
        `method_state.scores`; params stay frozen; see `get_trainable`).
      init_params: (params, key) -> params, called ONCE on the freshly initialised model before
        `init` (edge-popup/biprop replace the kernels by signed Kaiming constants). Identity for
        methods that train the model's own initialisation.
      prune: (params, method_state, rewind_params, level) -> (params, method_state), called at
        the start of every level >= 1 with the params at the end of the previous level.
        `rewind_params` is the snapshot taken at `rewind_step` of level 0 (None if the method
        has no rewind_step). `level` is a static Python int.
      mask: (params, method_state) -> bool mask in the params structure (ones on non-prunable
        leaves): what is pruned right now. For reports, memory and invariant checks.
      levels: number of training runs; 1 for dense/GMP/EP/BP, 2 for FT (dense, fine-tune),
        1 + #pruning levels for LTH/LRR.
      rewind_step: level-0 step count at which the loop snapshots params (before the update of
        that step; 0 = the initial weights) to pass to `prune`; None = no snapshot needed.
      level_start_step: step counter (hence LR schedule and data order) at which every level
        >= 1 starts: k for LTH (resume the schedule at the rewind point), 0 for LRR and FT.
      binary: effective prunable weights take one magnitude per layer (EP signed-constant, BP),
        so memory counts 1 bit per surviving weight (SPEC §9).
      dense_level0: level 0 trains exactly as `dense` does (all-ones masks, no step hook), so a
        finished dense run of the same config can stand in for it (`method.level0_from`).
    """

    name: str
    init: Callable[[Params, jax.Array], MethodState]
    apply: Callable[[Params, MethodState], Params]
    step: Callable[[Params, MethodState, jax.Array], MethodState]
    post_update: Callable[[Params, MethodState], Params]
    trainable: str = "params"
    init_params: Callable[[Params, jax.Array], Params] = lambda params, key: params
    prune: Callable[[Params, MethodState, Any, int], tuple[Params, MethodState]] = (
        lambda params, state, rewind_params, level: (params, state))
    mask: Callable[[Params, MethodState], Any] | None = None
    levels: int = 1
    rewind_step: int | None = None
    level_start_step: int = 0
    binary: bool = False
    dense_level0: bool = False


def get_trainable(method: Method, params: Params, method_state: MethodState) -> Any:
    """The pytree the optimizer updates: params, or method_state.scores for trainable='scores'."""
    return params if method.trainable == "params" else method_state.scores


def set_trainable(method: Method, params: Params, method_state: MethodState,
                  value: Any) -> tuple[Params, MethodState]:
    """(params, method_state) with the trainable pytree replaced by `value`."""
    if method.trainable == "params":
        return value, method_state
    return params, method_state._replace(scores=value)


def current_mask(method: Method, params: Params, method_state: MethodState) -> Any:
    """`method.mask(...)`, or all-ones for methods without one (dense)."""
    if method.mask is None:
        return jax.tree.map(lambda x: jnp.ones(x.shape, bool), params)
    return method.mask(params, method_state)


def dense() -> Method:
    """Plain dense training: the baseline every CARD is compared with (SPEC §0)."""
    return Method(
        name="dense",
        init=lambda params, key: (),
        apply=lambda params, state: params,
        step=lambda params, state, step: state,
        post_update=lambda params, state: params,
    )
