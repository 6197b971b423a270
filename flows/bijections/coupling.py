"""Coupling layers (NICE, Real NVP) and their masks.

A coupling layer splits the features of ``x`` of shape ``(B, D)`` by a binary mask into a
conditioning part ``x_a`` (mask 1), copied unchanged, and a transformed part ``x_b`` (mask 0),
mapped elementwise with parameters computed from ``x_a`` by a conditioner network. Its Jacobian
is block triangular, so the log-det only involves the elementwise map of ``x_b``.

The halves are gathered with stored index buffers and the output is reassembled with one
``index_copy`` (for a mask of two contiguous blocks, split as views and joined by one ``cat``),
so the conditioner sees only ``|a|`` inputs and emits only what ``x_b`` needs, rather than
masking full-size tensors through the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flows.core import Bijection
from flows.nn.mlp import MLP


def alternating_mask(features: int, parity: int = 0) -> Tensor:
    """Boolean mask of shape ``(features,)``, true where ``i % 2 == parity``.

    Parities 0 and 1 alternate which half is transformed; for ``features = 2`` they give
    ``[1, 0]`` and ``[0, 1]``.
    """
    return torch.arange(features) % 2 == parity % 2


def half_mask(features: int) -> Tensor:
    """Boolean mask of shape ``(features,)``, true on the first ``features // 2`` features.

    Used with a permutation between couplings (NICE's ordering); alternating masks need none.
    """
    return torch.arange(features) < features // 2


def soft_clamp(x: Tensor, bound: float) -> Tensor:
    """``bound * tanh(x / bound)``: slope 1 at 0, smoothly bounded in ``(-bound, bound)``.

    Keeps affine log-scales finite so ``exp(s)`` cannot overflow during training, while the
    gradient still flows for large ``x`` (unlike a hard clamp).

    References:
        Ardizzone et al., Guided Image Generation with Conditional Invertible Neural Networks
        (2019), https://arxiv.org/abs/1907.02392 (soft clamping of coupling scales)
    """
    return bound * torch.tanh(x / bound)


class Coupling(Bijection):
    """Shared machinery of coupling layers: split by mask, condition, transform, reassemble.

    ``z_a = x_a`` and ``z_b = g(x_b; theta(x_a))`` for an elementwise invertible ``g`` given by
    subclasses through ``_transform`` and ``_inverse_transform``; ``theta`` is an ``MLP`` with
    ``params_per_feature * |b|`` outputs and a zero-initialised last layer, so a subclass whose
    ``g`` is the identity at ``theta = 0`` starts as the identity map.

    Args:
        features: ``D``, the size of dim 1 of the inputs ``(B, D)``.
        mask: ``(D,)`` booleans, true for the conditioning features; needs at least one true and
            one false entry. ``None`` is ``alternating_mask(features, 0)``.
        params_per_feature: how many conditioner outputs each transformed feature takes.
        hidden_features: width of the conditioner's hidden layers.
        num_hidden: number of hidden layers of the conditioner.
        activation: the conditioner's nonlinearity class.
        conditioner: a network to use instead of the MLP, mapping ``(B, |a|, *spatial)`` to
            ``(B, params_per_feature * |b|, *spatial)`` (for images: channel-wise coupling
            with a convolutional conditioner); it should output 0 at initialisation. When given,
            ``hidden_features``, ``num_hidden`` and ``activation`` are not used.
    """

    def __init__(
        self,
        features: int,
        mask: Tensor | Sequence[bool] | None,
        params_per_feature: int,
        hidden_features: int = 128,
        num_hidden: int = 2,
        activation: type[nn.Module] = nn.ReLU,
        conditioner: nn.Module | None = None,
    ) -> None:
        super().__init__()
        mask = alternating_mask(features) if mask is None else torch.as_tensor(mask).bool()
        if mask.shape != (features,) or mask.all() or not mask.any():
            raise ValueError(
                f"a coupling mask must have shape ({features},) with at least one true "
                f"(conditioning) and one false (transformed) entry; got {mask.tolist()}. "
                f"Use alternating_mask(features, parity) or half_mask(features)"
            )
        self.register_buffer("index_a", mask.nonzero().squeeze(1))
        self.register_buffer("index_b", (~mask).nonzero().squeeze(1))
        # a mask of two blocks (half_mask, any mask of 2 features) splits by views and joins by
        # one cat: no gathers, no scatter-add in the gradient; ``None`` for any other mask
        self.a_first = bool(mask[0]) if int((mask[1:] != mask[:-1]).sum()) == 1 else None
        self.conditioner = conditioner if conditioner is not None else MLP(
            in_features=len(self.index_a),
            out_features=params_per_feature * len(self.index_b),
            hidden_features=hidden_features,
            num_hidden=num_hidden,
            activation=activation,
            zero_init_last=True,
        )

    def _transform(self, x_b: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``(z_b, log|det dz_b/dx_b|)`` from ``x_b (B, |b|)`` and ``params (B, k|b|)``."""
        raise NotImplementedError

    def _inverse_transform(self, z_b: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_b, log|det dx_b/dz_b|)``: the inverse of ``_transform`` at the same params."""
        raise NotImplementedError

    def _couple(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        if self.a_first is None:
            x_a, x_b = x.index_select(1, self.index_a), x.index_select(1, self.index_b)
        else:
            sizes = [len(self.index_a), len(self.index_b)]
            first, second = x.split(sizes if self.a_first else sizes[::-1], dim=1)
            x_a, x_b = (first, second) if self.a_first else (second, first)
        transform = self._inverse_transform if inverse else self._transform
        y_b, logdet = transform(x_b, self.conditioner(x_a))
        if self.a_first is None:
            return x.index_copy(1, self.index_b, y_b), logdet
        return torch.cat([x_a, y_b] if self.a_first else [y_b, x_a], dim=1), logdet

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._couple(x, inverse=False)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._couple(z, inverse=True)


def checked_log_scale_clamp(log_scale_clamp: float) -> float:
    """``log_scale_clamp`` as a float, or a ValueError unless it is positive and finite."""
    if not 0 < log_scale_clamp < float("inf"):
        raise ValueError(
            f"log_scale_clamp must be a positive finite number, got {log_scale_clamp}; "
            f"values around 2-5 are usual"
        )
    return float(log_scale_clamp)


class AffineCoupling(Coupling):
    """Real NVP affine coupling: ``z_a = x_a``, ``z_b = x_b * exp(s(x_a)) + t(x_a)``.

    One fused conditioner outputs ``(s_raw, t)``; the log-scale is soft-clamped,
    ``s = c * tanh(s_raw / c)`` with ``c = log_scale_clamp``, so ``|s| < c`` whatever the input.
    ``log|det dz/dx| = sum_b s_b`` per sample, shape ``(B,)``; the inverse
    ``x_b = (z_b - t) * exp(-s)`` returns ``-sum_b s_b``. Starts as the identity.

    Args:
        features: ``D``, the size of dim 1 of the inputs ``(B, D)``.
        mask: ``(D,)`` booleans, true for the conditioning features (see ``Coupling``).
        hidden_features: width of the conditioner's hidden layers.
        num_hidden: number of hidden layers of the conditioner.
        log_scale_clamp: ``c > 0``; each layer scales a feature by at most ``exp(+-c)``.
            3 allows a factor of 20 per layer, ample for standardised data.
        activation: the conditioner's nonlinearity class.
        conditioner: a network to use instead of the MLP (see ``Coupling``); with images
            ``(B, C, H, W)`` the mask splits the channels and ``(s, t)`` are its output halves.

    References:
        Dinh, Sohl-Dickstein & Bengio, Density estimation using Real NVP (2017),
        https://arxiv.org/abs/1605.08803
    """

    def __init__(
        self,
        features: int,
        mask: Tensor | Sequence[bool] | None = None,
        hidden_features: int = 128,
        num_hidden: int = 2,
        log_scale_clamp: float = 3.0,
        activation: type[nn.Module] = nn.ReLU,
        conditioner: nn.Module | None = None,
    ) -> None:
        super().__init__(features, mask, 2, hidden_features, num_hidden, activation, conditioner)
        self.log_scale_clamp = checked_log_scale_clamp(log_scale_clamp)

    def _scale_shift(self, params: Tensor) -> tuple[Tensor, Tensor]:
        s_raw, t = params.chunk(2, dim=1)
        return soft_clamp(s_raw, self.log_scale_clamp), t

    def _transform(self, x_b: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(params)
        return x_b * torch.exp(s) + t, s.flatten(1).sum(1)

    def _inverse_transform(self, z_b: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(params)
        return (z_b - t) * torch.exp(-s), -s.flatten(1).sum(1)


class AdditiveCoupling(Coupling):
    """NICE additive coupling: ``z_a = x_a``, ``z_b = x_b + t(x_a)``; volume preserving.

    ``log|det dz/dx| = 0`` exactly (unit-diagonal triangular Jacobian), returned as zeros of
    shape ``(B,)``. The inverse is ``x_b = z_b - t(z_a)``. Starts as the identity.

    Args:
        features: ``D``, the size of dim 1 of the inputs ``(B, D)``.
        mask: ``(D,)`` booleans, true for the conditioning features (see ``Coupling``).
        hidden_features: width of the conditioner's hidden layers.
        num_hidden: number of hidden layers of the conditioner.
        activation: the conditioner's nonlinearity class.
        conditioner: a network to use instead of the MLP (see ``Coupling``).

    References:
        Dinh, Krueger & Bengio, NICE: Non-linear Independent Components Estimation (2015),
        https://arxiv.org/abs/1410.8516
    """

    def __init__(
        self,
        features: int,
        mask: Tensor | Sequence[bool] | None = None,
        hidden_features: int = 128,
        num_hidden: int = 2,
        activation: type[nn.Module] = nn.ReLU,
        conditioner: nn.Module | None = None,
    ) -> None:
        super().__init__(features, mask, 1, hidden_features, num_hidden, activation, conditioner)

    def _transform(self, x_b: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return x_b + params, x_b.new_zeros(x_b.shape[0])

    def _inverse_transform(self, z_b: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return z_b - params, z_b.new_zeros(z_b.shape[0])


def checkerboard_mask(height: int, width: int, parity: int = 0) -> Tensor:
    """Boolean ``(height, width)`` mask, true where ``(i + j) % 2 == parity``."""
    rows = torch.arange(height).unsqueeze(1)
    cols = torch.arange(width).unsqueeze(0)
    return (rows + cols) % 2 == parity % 2


class CheckerboardCoupling(Bijection):
    """Real NVP's spatial checkerboard coupling on images ``(B, C, H, W)``.

    With the checkerboard mask ``m`` (1 on the conditioning pixels, every channel),
    ``(s_raw, t) = net(m * x)`` and, on the other pixels only, ``z = x * exp(s) + t`` with
    ``s = c * tanh(s_raw / c)``; ``z = x`` where ``m = 1``. The Jacobian is triangular, so
    ``log|det dz/dx| = sum_{pixels with m = 0} s``, shape ``(B,)``; the inverse recomputes
    ``(s, t)`` from ``m * z = m * x``. ``additive=True`` fixes ``s = 0`` (volume preserving).
    The network's last layer starts at zero, so the layer starts as the identity.

    Args:
        net: ``(B, C, H, W) -> (B, 2C, H, W)`` (``(B, C, H, W)`` if additive).
        height, width: the spatial size ``H, W`` of the inputs.
        parity: which checkerboard colour conditions (alternate it between layers).
        log_scale_clamp: soft bound ``c`` on the log-scales.
        additive: no scaling, ``z = x + t`` on the transformed pixels.

    References:
        Dinh, Sohl-Dickstein & Bengio, Density estimation using Real NVP (2017), sec. 3.4,
        https://arxiv.org/abs/1605.08803
    """

    def __init__(self, net: nn.Module, height: int, width: int, parity: int = 0,
                 log_scale_clamp: float = 3.0, additive: bool = False) -> None:
        super().__init__()
        self.net = net
        mask = checkerboard_mask(height, width, parity)
        self.register_buffer("mask", mask.to(torch.get_default_dtype()))
        self.log_scale_clamp = checked_log_scale_clamp(log_scale_clamp)
        self.additive = additive

    def _scale_shift(self, x_a: Tensor) -> tuple[Tensor, Tensor]:
        free = 1.0 - self.mask
        params = self.net(x_a)
        if self.additive:
            return torch.zeros_like(params), params * free
        s_raw, t = params.chunk(2, dim=1)
        return soft_clamp(s_raw, self.log_scale_clamp) * free, t * free

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(x * self.mask)
        return x * torch.exp(s) + t, s.flatten(1).sum(1)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(z * self.mask)
        return (z - t) * torch.exp(-s), -s.flatten(1).sum(1)
