"""Optimizers and learning-rate schedules (optax), built from `config.optim`.

SGD with momentum and coupled weight decay reproduces PyTorch's `torch.optim.SGD`, which all the
reference code bases use (SPEC §2(b), §4(b)); the cosine schedule is the hidden-networks/biprop
one and the step schedule open_lth's (x gamma at each milestone).
"""

from __future__ import annotations

import math

import optax


def make_schedule(
    name: str,
    lr: float,
    total_steps: int,
    steps_per_epoch: int,
    *,
    warmup_epochs: float = 0.0,
    milestones: tuple[float, ...] = (),
    gamma: float = 0.1,
) -> optax.Schedule:
    """Learning rate as a function of the optimizer step count.

    Args:
      name: 'cosine' (0.5 * (1 + cos(pi t / T)) * lr, per step), 'step' (lr * gamma^k after the
        k-th milestone, milestones in epochs) or 'constant'.
      total_steps: T, the length of the full schedule in steps.
      steps_per_epoch: converts epoch-valued milestones and warm-up to steps.
    """
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if name == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
    elif name == "step":
        boundaries = {int(round(m * steps_per_epoch)) - warmup: gamma for m in milestones}
        main = optax.piecewise_constant_schedule(lr, boundaries)
    elif name == "constant":
        main = optax.constant_schedule(lr)
    else:
        raise ValueError(f"unknown optim.schedule {name!r}: use cosine, step or constant")
    if warmup <= 0:
        return main
    ramp = optax.linear_schedule(0.0, lr, warmup)
    return optax.join_schedules([ramp, main], [warmup])


def make_direction(
    name: str,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """The optimizer without its learning rate: the update is `-lr(step) * direction`.

    The training step multiplies by the schedule evaluated at its own step counter, so a level
    of LTH resumes the schedule at the rewind step and LRR restarts it, with a fresh optimizer
    state either way (SPEC §4(a)). For SGD this is exactly PyTorch's rule
    (buf = m * buf + g + wd * w; w -= lr * buf); for AdamW optax's (decay scaled by lr).
    """
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
            optax.trace(decay=momentum, nesterov=nesterov) if momentum else optax.identity(),
        )
    if name == "adamw":
        return optax.chain(optax.scale_by_adam(),
                           optax.add_decayed_weights(weight_decay) if weight_decay
                           else optax.identity())
    raise ValueError(f"unknown optim.name {name!r}: use sgd or adamw")


def make_optimizer(
    name: str,
    schedule: optax.Schedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """A complete optax optimizer: `make_direction` followed by the scheduled learning rate."""
    return optax.chain(
        make_direction(name, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay),
        optax.scale_by_learning_rate(schedule),
    )


def from_config(optim, total_steps: int, steps_per_epoch: int):
    """(direction transform, schedule) for a `config.optim` block; see `make_direction`."""
    if not math.isfinite(optim.lr) or optim.lr <= 0:
        raise ValueError(f"optim.lr must be a positive number, got {optim.lr!r}")
    schedule = make_schedule(
        optim.schedule,
        optim.lr,
        total_steps,
        steps_per_epoch,
        warmup_epochs=optim.warmup_epochs,
        milestones=tuple(optim.milestones),
        gamma=optim.gamma,
    )
    tx = make_direction(
        optim.name,
        momentum=optim.momentum,
        nesterov=optim.nesterov,
        weight_decay=optim.weight_decay,
    )
    return tx, schedule
