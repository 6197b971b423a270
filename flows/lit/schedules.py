"""Learning-rate schedules beyond torch's own: linear warmup, then cosine decay to 0."""

from __future__ import annotations

import functools
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


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
        raise ValueError(f"need 1 <= warmup_steps < total_steps, got warmup_steps="
                         f"{warmup_steps} and total_steps={total_steps}; lower "
                         f"warmup_steps or raise trainer.max_steps")
    factor = functools.partial(warmup_cosine_factor, warmup_steps=warmup_steps,
                               total_steps=total_steps)
    return LambdaLR(optimizer, factor)
