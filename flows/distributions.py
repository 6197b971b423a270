"""Base distributions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class StandardNormal(nn.Module):
    """``N(0, I)`` over events of shape ``event_shape``; follows ``.to(device/dtype)``.

    ``log_prob(z) = -|z|^2 / 2 - D/2 log(2 pi)`` summed over the event dims, shape ``(B,)``.
    """

    def __init__(self, event_shape: Sequence[int]) -> None:
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        # Carries device and dtype; not saved in checkpoints.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def num_dims(self) -> int:
        return math.prod(self.event_shape)

    def log_prob(self, z: Tensor) -> Tensor:
        sq = z.pow(2).flatten(1).sum(1)
        return -0.5 * sq - 0.5 * self.num_dims * math.log(2 * math.pi)

    def sample(self, num_samples: int, temperature: float = 1.0) -> Tensor:
        """``z ~ N(0, temperature^2 I)``, shape ``(num_samples, *event_shape)``."""
        shape = (num_samples, *self.event_shape)
        anchor = self._anchor
        return temperature * torch.randn(shape, device=anchor.device, dtype=anchor.dtype)
