"""Multi-scale image flows built from couplings: Real NVP and Glow.

Both map images ``(B, C, H, W)`` in ``[0, 1]`` to a standard normal latent of the same shape:
``Logit`` first (so the likelihood is a density on pixel values and bits per dimension is one
formula; see ``Logit`` for its support), then scales that squeeze ``(C, H, W) -> (4C, H/2,
W/2)``, transform, factor out half the channels and pass the rest to the next scale, and
unsqueeze back. The factored-out
dimensions are latent coordinates from the scale where they left.
"""

from __future__ import annotations

from collections.abc import Sequence

from flows.bijections.conv import InvertibleConv1x1
from flows.bijections.coupling import (
    AdditiveCoupling,
    AffineCoupling,
    CheckerboardCoupling,
    half_mask,
)
from flows.bijections.elementwise import Logit
from flows.bijections.normalization import ActNorm, BatchNorm
from flows.bijections.reshape import FactorOut, Squeeze, squeezed_shape
from flows.core import Bijection, Compose, Inverse, NormalizingFlow
from flows.distributions import StandardNormal
from flows.nn.conv import ConvResNet


def image_shape(shape: Sequence[int], model: str) -> tuple[int, int, int]:
    """``shape`` as ``(C, H, W)``; a ``ValueError`` says what the model expects."""
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            f"{model} models images of shape (channels, height, width), got shape "
            f"{tuple(shape)}; for vector data use model=realnvp or model=iresnet"
        )
    return tuple(int(s) for s in shape)


def channel_coupling(channels: int, parity: int, hidden_channels: int, num_blocks: int,
                     additive: bool, log_scale_clamp: float) -> Bijection:
    """An affine (or additive) coupling of one half of the channels on the other."""
    mask = half_mask(channels) if parity % 2 == 0 else ~half_mask(channels)
    num_a = int(mask.sum())
    num_b = channels - num_a
    net = ConvResNet(num_a, (1 if additive else 2) * num_b, hidden_channels, num_blocks)
    if additive:
        return AdditiveCoupling(channels, mask, conditioner=net)
    return AffineCoupling(channels, mask, log_scale_clamp=log_scale_clamp, conditioner=net)


class MultiScaleRealNVP(NormalizingFlow):
    """Real NVP for images (Dinh et al. 2017, sec. 3.6 and 4.1).

    Each scale but the last: ``num_couplings`` checkerboard couplings, squeeze,
    ``num_couplings`` channel-wise couplings (alternating halves), factor out half the
    channels; the last scale: ``num_couplings + 1`` checkerboard couplings. Conditioners are
    ResNets (``ConvResNet`` with ``num_blocks`` residual units of ``hidden_channels``);
    optional ActNorm or BatchNorm after every coupling. ``log p(x) = log N(z; 0, I) +`` the
    sum of every layer's log-det, the logit's included.

    Args:
        shape: ``(C, H, W)`` of the data (from the data config).
        num_scales: number of scales; ``H`` and ``W`` must be divisible by ``2^(num_scales-1)``.
        num_couplings: couplings of each kind per scale (Real NVP: 3).
        hidden_channels: conditioner width.
        num_blocks: residual units per conditioner.
        log_scale_clamp: soft bound on every log-scale.
        normalization: ``"actnorm"``, ``"batchnorm"`` or ``None`` after each coupling.
        alpha: the logit transform's ``alpha``.

    References:
        Dinh, Sohl-Dickstein & Bengio, Density estimation using Real NVP (2017),
        https://arxiv.org/abs/1605.08803
    """

    def __init__(self, shape: Sequence[int], num_scales: int = 2, num_couplings: int = 3,
                 hidden_channels: int = 64, num_blocks: int = 2, log_scale_clamp: float = 3.0,
                 normalization: str | None = "actnorm", alpha: float = 0.05) -> None:
        shape = image_shape(shape, "MultiScaleRealNVP")
        if num_scales < 1 or num_couplings < 1:
            raise ValueError(f"need num_scales >= 1 and num_couplings >= 1, got {num_scales} "
                             f"and {num_couplings}")
        norms = {"actnorm": ActNorm, "batchnorm": BatchNorm, None: None}
        if normalization not in norms:
            raise ValueError(f"normalization must be one of {list(norms)}, got {normalization!r}")
        self.norm = norms[normalization]
        self.hidden_channels = hidden_channels
        self.num_blocks = num_blocks
        self.log_scale_clamp = log_scale_clamp
        body = self._scale(shape, num_scales, num_couplings)
        super().__init__(Compose(Logit(alpha), body), StandardNormal(shape))

    def _normed(self, layer: Bijection, channels: int) -> list[Bijection]:
        return [layer] if self.norm is None else [layer, self.norm(channels)]

    def _checkerboard(self, shape: tuple[int, int, int], count: int) -> list[Bijection]:
        channels, height, width = shape
        layers: list[Bijection] = []
        for parity in range(count):
            net = ConvResNet(channels, 2 * channels, self.hidden_channels, self.num_blocks)
            layers += self._normed(
                CheckerboardCoupling(net, height, width, parity, self.log_scale_clamp), channels)
        return layers

    def _scale(self, shape: tuple[int, int, int], num_scales: int,
               num_couplings: int) -> Bijection:
        if num_scales == 1:
            return Compose(*self._checkerboard(shape, num_couplings + 1))
        squeezed = squeezed_shape(shape)
        channels = squeezed[0]
        layers = self._checkerboard(shape, num_couplings) + [Squeeze()]
        for parity in range(num_couplings):
            layers += self._normed(channel_coupling(
                channels, parity, self.hidden_channels, self.num_blocks, False,
                self.log_scale_clamp), channels)
        inner = self._scale((channels // 2, *squeezed[1:]), num_scales - 1, num_couplings)
        return Compose(*layers, FactorOut(inner, channels), Inverse(Squeeze()))


class Glow(NormalizingFlow):
    """Glow (Kingma & Dhariwal 2018): multi-scale steps of ActNorm, 1x1 conv and coupling.

    Each level: squeeze, ``num_steps`` steps of ``ActNorm -> InvertibleConv1x1 -> coupling``
    (affine or additive, channel-wise, conditioner conv3x3-relu-conv1x1-relu-zero conv3x3 of
    ``hidden_channels``), then (all levels but the last) factor out half the channels, with
    Glow's learned conditional prior when ``split_prior``. Data-dependent ActNorm init on the
    first training batch.

    Args:
        shape: ``(C, H, W)`` of the data; ``H, W`` divisible by ``2^num_levels``.
        num_levels: ``L``, the number of levels (Glow CIFAR-10: 3).
        num_steps: ``K``, flow steps per level (Glow CIFAR-10: 32).
        hidden_channels: conditioner width (Glow: 512).
        coupling: ``"affine"`` or ``"additive"``.
        split_prior: learned prior for the factored-out half (else standard normal).
        log_scale_clamp: soft bound on affine log-scales.
        alpha: the logit transform's ``alpha``.

    References:
        Kingma & Dhariwal, Glow: Generative Flow with Invertible 1x1 Convolutions (2018),
        https://arxiv.org/abs/1807.03039
    """

    def __init__(self, shape: Sequence[int], num_levels: int = 2, num_steps: int = 8,
                 hidden_channels: int = 64, coupling: str = "affine", split_prior: bool = True,
                 log_scale_clamp: float = 3.0, alpha: float = 0.05) -> None:
        shape = image_shape(shape, "Glow")
        if num_levels < 1 or num_steps < 1:
            raise ValueError(f"need num_levels >= 1 and num_steps >= 1, got {num_levels} and "
                             f"{num_steps}")
        if coupling not in ("affine", "additive"):
            raise ValueError(f"coupling must be 'affine' or 'additive', got {coupling!r}")
        self.num_steps = num_steps
        self.hidden_channels = hidden_channels
        self.additive = coupling == "additive"
        self.split_prior = split_prior
        self.log_scale_clamp = log_scale_clamp
        body = self._level(shape, num_levels)
        super().__init__(Compose(Logit(alpha), body), StandardNormal(shape))

    def _level(self, shape: tuple[int, int, int], num_levels: int) -> Bijection:
        squeezed = squeezed_shape(shape)
        channels = squeezed[0]
        layers: list[Bijection] = [Squeeze()]
        for step in range(self.num_steps):
            layers += [ActNorm(channels), InvertibleConv1x1(channels),
                       channel_coupling(channels, step, self.hidden_channels, 0, self.additive,
                                        self.log_scale_clamp)]
        if num_levels > 1:
            inner = self._level((channels // 2, *squeezed[1:]), num_levels - 1)
            layers.append(FactorOut(inner, channels, prior=self.split_prior))
        return Compose(*layers, Inverse(Squeeze()))

