"""Learning-rate schedules over the run's training steps: cosine decay to 0, and a linear
warmup before it.

A schedule that takes ``total_steps`` is given the number of training steps the trainer will
run (``build_schedule``): ``trainer.max_steps``, or the steps of ``trainer.max_epochs`` epochs,
whichever ends the run first, so the decay reaches 0 at the last step either way.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler


class ScheduleError(ValueError):
    """A schedule that cannot fit the run (no step or epoch limit, a warmup as long as the
    run); raised when the fit starts, before the first training step."""


NO_RUN_LENGTH = (
    "the learning-rate schedule decays over the run's training steps, but this run has no step "
    "or epoch limit (trainer.max_steps and trainer.max_epochs are -1); set one, or with a time "
    "budget (trainer.max_time) use scheduler=constant")


def cosine(optimizer: Optimizer, total_steps: int) -> CosineAnnealingLR:
    """Cosine decay from the base rate to 0 at ``total_steps``: the rate at 0-based step ``t``
    is ``lr (1 + cos(pi t / total_steps)) / 2``."""
    return CosineAnnealingLR(optimizer, T_max=total_steps)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The factor on the base rate at ``step`` (0-based): ``(step + 1) / warmup_steps`` while
    ``step < warmup_steps``, then ``(1 + cos(pi (step - warmup_steps) / (total_steps -
    warmup_steps))) / 2``, which is 1 at the end of the warmup and 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warmup over ``warmup_steps`` training steps, then cosine decay to 0 at
    ``total_steps`` (``warmup_cosine_factor``), stepped every training step: the papers'
    warmup (Glow: 10 epochs; Residual Flows: 1,000 steps) before flows' default decay."""
    if warmup_steps < 1 or total_steps <= warmup_steps:
        raise ScheduleError(
            f"need 1 <= warmup_steps < total_steps, got warmup_steps={warmup_steps} for a run "
            f"of {total_steps} training steps; lower warmup_steps or lengthen the run "
            f"(trainer.max_steps, trainer.max_epochs)")
    factor = functools.partial(warmup_cosine_factor, warmup_steps=warmup_steps,
                               total_steps=total_steps)
    return LambdaLR(optimizer, factor)


def takes_total_steps(factory: Callable[..., LRScheduler]) -> bool:
    """Whether ``factory`` (a Hydra ``_partial_``) takes the run's ``total_steps``: it has
    that parameter and the config does not set it (``+scheduler.total_steps=N``, or
    ``OneCycleLR``'s own, is kept)."""
    bound = getattr(factory, "keywords", {})
    return "total_steps" in inspect.signature(factory).parameters and "total_steps" not in bound


def build_schedule(factory: Callable[..., LRScheduler], optimizer: Optimizer,
                   total_steps: float) -> LRScheduler:
    """``factory(optimizer, total_steps=total_steps)`` for a schedule over the run's length,
    ``factory(optimizer)`` for one without (``ConstantLR``, a user's own). ``total_steps`` is
    the trainer's ``estimated_stepping_batches``: infinite when only ``trainer.max_time``
    bounds the run, which a schedule over the run's length cannot use."""
    if not takes_total_steps(factory):
        return factory(optimizer)
    if not math.isfinite(total_steps):
        raise ScheduleError(NO_RUN_LENGTH)
    return factory(optimizer, total_steps=int(total_steps))
