"""1-Lipschitz activations for i-ResNet residual branches, each with its derivative.

``forward_with_derivative`` returns ``(a(h), a'(h))`` sharing the work, for the hand-written
Jacobian products of ``flows.nn.mlp_jacobian``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn


class ELU(nn.Module):
    """``elu(h) = h if h > 0 else exp(h) - 1``, 1-Lipschitz; ``elu'(h) = min(1, elu(h) + 1)``."""

    def forward(self, h: Tensor) -> Tensor:
        return F.elu(h)

    def forward_with_derivative(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return elu_with_derivative(h)


def elu_with_derivative(h: Tensor) -> tuple[Tensor, Tensor]:
    """``(elu(h), elu'(h))``: for h <= 0, ``elu(h) + 1 = exp(h) <= 1``; for h > 0 it is 1."""
    out = F.elu(h)
    return out, torch.clamp(out + 1.0, max=1.0)


class LipSwish(nn.Module):
    """``f(h) = h * sigmoid(beta h) / 1.1`` with learnable ``beta = softplus(raw) > 0``.

    ``max_h |d/dh h sigmoid(beta h)| ~= 1.0998`` for every ``beta``, so dividing by 1.1 makes
    ``f`` 1-Lipschitz. ``f'(h) = s (1 + beta h (1 - s)) / 1.1`` with ``s = sigmoid(beta h)``.
    ``raw`` starts at 0.5 (``beta ~= 0.97``), as in Residual Flows.

    References:
        Chen et al., Residual Flows (2019), https://arxiv.org/abs/1906.02735
    """

    def __init__(self) -> None:
        super().__init__()
        self.raw_beta = nn.Parameter(torch.tensor(0.5))

    def forward(self, h: Tensor) -> Tensor:
        return h * torch.sigmoid(F.softplus(self.raw_beta) * h) / 1.1

    def forward_with_derivative(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return lipswish_with_derivative(h, self.raw_beta)


def lipswish_with_derivative(h: Tensor, raw_beta: Tensor) -> tuple[Tensor, Tensor]:
    """``(f(h), f'(h))`` of ``LipSwish`` sharing ``s = sigmoid(beta h)``, in 6 elementwise ops."""
    bh = F.softplus(raw_beta) * h
    s = torch.sigmoid(bh)
    s_scaled = s / 1.1
    # f' = (s / 1.1) (1 + u) with u = bh (1 - s) = bh - bh s.
    u = torch.addcmul(bh, bh, s, value=-1.0)
    return h * s_scaled, torch.addcmul(s_scaled, s_scaled, u)


ACTIVATIONS: dict[str, type[nn.Module]] = {"elu": ELU, "lipswish": LipSwish}
