"""Glow's invertible 1x1 convolution, LU-parametrised."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from flows.core import Bijection


class InvertibleConv1x1(Bijection):
    """``z[:, :, i, j] = W x[:, :, i, j]`` at every pixel, ``W = P L (U + diag(sign * exp(s)))``.

    ``P`` is a fixed permutation, ``L`` unit lower triangular, ``U`` strictly upper triangular
    and ``sign * exp(s)`` the diagonal, so ``log|det W| = sum s`` costs ``O(C)`` and ``W``
    stays invertible. ``log|det dz/dx| = H * W * sum s`` (``H * W = 1`` for vectors ``(B, C)``),
    shape ``(B,)``; the inverse applies ``W^{-1}``. Initialised from a random rotation
    (``det = +-1``, log-det 0), drawn from torch's global generator.

    References:
        Kingma & Dhariwal, Glow (2018), sec. 3.2, https://arxiv.org/abs/1807.03039
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        rotation, _ = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
        permutation, lower, upper = torch.linalg.lu(rotation)
        diagonal = torch.diagonal(upper)
        dtype = torch.get_default_dtype()  # computed in float64, stored like every other layer
        self.register_buffer("permutation", permutation.to(dtype))
        self.register_buffer("sign", torch.sign(diagonal).to(dtype))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower.to(dtype))
        self.upper = nn.Parameter(torch.triu(upper, 1).to(dtype))
        self.log_scale = nn.Parameter(torch.log(torch.abs(diagonal)).to(dtype))

    def weight(self) -> Tensor:
        """``W = P L U'``, shape ``(C, C)``."""
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        diagonal = torch.diag(self.sign * torch.exp(self.log_scale))
        upper = self.upper * self.lower_mask.t() + diagonal
        return self.permutation @ lower @ upper

    def _multiply(self, x: Tensor, weight: Tensor) -> Tensor:
        if x.dim() == 2:
            return F.linear(x, weight)
        return F.conv2d(x, weight.view(*weight.shape, 1, 1))

    def _logdet(self, x: Tensor) -> Tensor:
        pixels = x[0, 0].numel()
        return (self.log_scale.sum() * pixels).expand(x.shape[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._multiply(x, self.weight()), self._logdet(x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._multiply(z, torch.linalg.inv(self.weight())), -self._logdet(z)
