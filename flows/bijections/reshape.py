"""Shape changes of image flows: squeeze (space to depth) and multi-scale factor-out."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from flows.bijections.coupling import soft_clamp
from flows.core import Bijection


def squeezed_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W) -> (4C, H/2, W/2)``; a ``ValueError`` names an odd spatial size."""
    channels, height, width = shape
    if height % 2 or width % 2:
        raise ValueError(
            f"cannot squeeze images of shape {tuple(shape)}: height and width must be even at "
            f"every scale; use fewer scales (model.num_scales, for Glow model.num_levels) or "
            f"crop/pad the images"
        )
    return 4 * channels, height // 2, width // 2


class Squeeze(Bijection):
    """Space to depth: ``(B, C, H, W) -> (B, 4C, H/2, W/2)``, each 2x2 patch into channels.

    A permutation of the coordinates, so ``log|det| = 0``. ``torch.nn.functional``'s
    ``pixel_unshuffle`` / ``pixel_shuffle`` do the work.

    References:
        Dinh, Sohl-Dickstein & Bengio, Density estimation using Real NVP (2017), sec. 3.6,
        https://arxiv.org/abs/1605.08803
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.pixel_unshuffle(x, 2), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return F.pixel_shuffle(z, 2), z.new_zeros(z.shape[0])


class FactorOut(Bijection):
    """Multi-scale split: half the channels leave the flow here, ``inner`` transforms the rest.

    ``x (B, C, H, W)`` splits into ``x_out`` (the first ``C/2`` channels) and ``x_in``; the
    output is ``cat(z_out, inner(x_in))`` of the same shape, so a flow of factor-outs keeps the
    data's shape and the latent is standard normal over it. Without a prior ``z_out = x_out``
    (Real NVP's factoring out). With ``prior=True`` the factored half gets Glow's learned
    conditional prior ``N(mu(x_in), exp(s(x_in))^2)``, written as the bijection
    ``z_out = (x_out - mu) * exp(-s)`` with ``log|det| = -sum s``; ``(mu, s)`` come from a
    zero-initialised 3x3 convolution of ``x_in`` (``s`` soft-clamped to ``(-3, 3)``), so the
    prior starts as ``N(0, I)``. The log-det adds that of ``inner``.

    Args:
        inner: the flow of the remaining channels, ``(B, C/2, H, W) -> (B, C/2, H, W)``.
        channels: ``C``, even.
        prior: learn the conditional prior of the factored half (Glow's split prior).

    References:
        Dinh, Sohl-Dickstein & Bengio, Density estimation using Real NVP (2017), sec. 3.6;
        Kingma & Dhariwal, Glow (2018), https://arxiv.org/abs/1807.03039
    """

    def __init__(self, inner: Bijection, channels: int, prior: bool = False) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"FactorOut needs an even number of channels, got {channels}")
        self.inner = inner
        self.prior: nn.Conv2d | None = None
        if prior:
            self.prior = nn.Conv2d(channels // 2, channels, 3, padding=1)
            nn.init.zeros_(self.prior.weight)
            nn.init.zeros_(self.prior.bias)

    def _prior(self, x_in: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_scale = self.prior(x_in).chunk(2, dim=1)
        return mean, soft_clamp(log_scale, 3.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_out, x_in = x.chunk(2, dim=1)
        logdet = x.new_zeros(x.shape[0])
        if self.prior is not None:
            mean, log_scale = self._prior(x_in)
            x_out = (x_out - mean) * torch.exp(-log_scale)
            logdet = -log_scale.flatten(1).sum(1)
        z_in, inner_logdet = self.inner(x_in)
        return torch.cat([x_out, z_in], dim=1), logdet + inner_logdet

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z_out, z_in = z.chunk(2, dim=1)
        x_in, logdet = self.inner.inverse(z_in)
        if self.prior is not None:
            mean, log_scale = self._prior(x_in)
            z_out = z_out * torch.exp(log_scale) + mean
            logdet = logdet + log_scale.flatten(1).sum(1)
        return torch.cat([z_out, x_in], dim=1), logdet
