"""Convolutional conditioner networks for image couplings."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ResidualUnit(nn.Module):
    """``h + conv3x3(relu(conv3x3(relu(h))))``, channels and size preserved."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, h: Tensor) -> Tensor:
        return h + self.body(h)


class ConvResNet(nn.Sequential):
    """``conv3x3 -> num_blocks residual units -> relu -> conv1x1 -> relu -> conv3x3``.

    Shapes ``(B, in_channels, H, W) -> (B, out_channels, H, W)``. The last convolution starts
    at zero, so a coupling conditioned on it starts as the identity (Glow, sec. 3.3). With
    ``num_blocks = 0`` this is Glow's coupling network (3x3, 1x1, zero-initialised 3x3);
    residual units make it Real NVP's ResNet conditioner.

    With ``channels_last`` the weights and the activations inside are stored NHWC (the input
    is converted on the way in, the output returned in the default layout): the same values,
    and oneDNN's convolutions run faster on it (measured on 2 CPU threads, batch 64, Glow
    2x8 with 64 channels: training steps 1.25x faster at 1x28x28, 1.1x at 1x8x8).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        hidden_channels: width of every hidden layer.
        num_blocks: residual units between the first and the 1x1 convolution.
        channels_last: compute in the channels-last memory format.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 64,
                 num_blocks: int = 1, channels_last: bool = True) -> None:
        if min(in_channels, out_channels, hidden_channels) < 1 or num_blocks < 0:
            raise ValueError(
                f"ConvResNet needs channels >= 1 and num_blocks >= 0; got in={in_channels}, "
                f"out={out_channels}, hidden={hidden_channels}, num_blocks={num_blocks}"
            )
        last = nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        super().__init__(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
            *(ResidualUnit(hidden_channels) for _ in range(num_blocks)),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1),
            nn.ReLU(),
            last,
        )
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        if not self.channels_last:
            return super().forward(x)
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()
