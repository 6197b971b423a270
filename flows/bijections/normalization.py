"""Normalisation layers as bijections: ActNorm and BatchNorm."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flows.core import Bijection


def _broadcast(param: Tensor, x: Tensor) -> Tensor:
    """Shape a per-feature ``(C,)`` parameter to broadcast over ``(B, C, *spatial)``."""
    return param.view(1, -1, *([1] * (x.dim() - 2)))


def _spatial_size(x: Tensor) -> int:
    return math.prod(x.shape[2:])


class ActNorm(Bijection):
    """Per-feature affine normalisation ``z = (x - shift) * exp(-log_scale)`` (Glow).

    Acts on dim 1 of ``(B, C)`` or ``(B, C, *spatial)``; parameters are shared over spatial
    positions, so ``log|det dz/dx| = -H*W * sum_c log_scale_c`` (``H*W = 1`` for vectors).

    Data-dependent initialisation: the first forward in training mode sets ``shift`` and
    ``log_scale`` to the batch mean and log-std per feature, so that batch comes out with
    zero mean and unit variance. The ``initialized`` buffer is saved in checkpoints, so a
    reloaded model is not re-initialised. ``eps`` guards zero-variance features.

    References:
        Kingma & Dhariwal, Glow (2018), https://arxiv.org/abs/1807.03039
    """

    def __init__(self, num_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.shift = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        values = x.transpose(0, 1).flatten(1)
        self.shift.copy_(values.mean(1))
        self.log_scale.copy_(torch.log(values.std(1, unbiased=False) + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not self.initialized:
            self._initialize(x)
        z = (x - _broadcast(self.shift, x)) * _broadcast(torch.exp(-self.log_scale), x)
        logdet = -self.log_scale.sum() * _spatial_size(x)
        return z, logdet.expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x = z * _broadcast(torch.exp(self.log_scale), z) + _broadcast(self.shift, z)
        logdet = self.log_scale.sum() * _spatial_size(z)
        return x, logdet.expand(z.shape[0])
