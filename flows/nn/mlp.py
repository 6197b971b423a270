"""A fully connected conditioner network."""

from __future__ import annotations

import torch
from torch import Tensor, nn

THIN = 2  # a linear layer with at most this many inputs or outputs is thin


class ThinLinear(nn.Linear):
    """``nn.Linear`` (``y = x W^T + b``, ``(..., in) -> (..., out)``) for a layer with few
    inputs or outputs, whose matrix product costs far more in kernel overhead than in FLOPs.

    Under ``torch.compile`` the product is written as a broadcast multiply and a sum over the
    ``in`` axis, which the compiler fuses with the elementwise work beside it (bias, activation
    and their backward) instead of calling a matrix-multiply kernel; in eager mode, where that
    form would materialise a ``(..., in, out)`` tensor, it is ``nn.Linear``'s product. Same
    parameters and state dict as ``nn.Linear``. Measured on 2 CPU threads, Real NVP 2-D (8
    couplings 1-128-128-2, batch 512, compiled): the step's matrix-multiply calls fall from 71
    to 24 and the training step from 13.2 to 12.0 ms (interleaved, 9 rounds of 30 steps; 15.1
    to 13.6 ms in another run). With up to 4 features on the thin side (4-, 6-, 8-D data) the
    steps were the same within noise, hence ``THIN = 2``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():
            return super().forward(x)
        if self.in_features <= self.out_features:  # (..., in, 1) * (in, out), sum over in
            y = (x.unsqueeze(-1) * self.weight.t()).sum(-2)
        else:  # (..., 1, in) * (out, in), sum over in
            y = (x.unsqueeze(-2) * self.weight).sum(-1)
        return y if self.bias is None else y + self.bias


class MLP(nn.Sequential):
    """``(Linear -> act) x num_hidden -> Linear``, shape ``(B, in) -> (B, out)``.

    ``num_hidden`` counts hidden layers; ``num_hidden = 0`` is a single affine map.
    With ``zero_init_last`` the output layer's weight and bias start at zero, so the network
    outputs 0 for every input: a coupling conditioned on it starts as the identity, which keeps
    a deep flow well conditioned at initialisation (Glow, Kingma & Dhariwal 2018, sec. 3.3).
    Layers with at most ``THIN`` inputs or outputs (the first and last of a 2-D coupling's
    conditioner) are ``ThinLinear``, fused by ``torch.compile`` rather than multiplied.

    Args:
        in_features: input size.
        out_features: output size.
        hidden_features: width of every hidden layer.
        num_hidden: number of hidden layers.
        activation: the nonlinearity's class, instantiated once per hidden layer.
        zero_init_last: zero the output layer's weight and bias.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_features: int = 128,
        num_hidden: int = 2,
        activation: type[nn.Module] = nn.ReLU,
        zero_init_last: bool = False,
    ) -> None:
        if min(in_features, out_features, hidden_features) < 1 or num_hidden < 0:
            raise ValueError(
                f"MLP needs in_features, out_features, hidden_features >= 1 and num_hidden >= 0; "
                f"got {in_features}, {out_features}, {hidden_features} and {num_hidden}"
            )
        sizes = [in_features] + [hidden_features] * num_hidden

        def linear(size_in: int, size_out: int) -> nn.Linear:
            thin = min(size_in, size_out) <= THIN
            return (ThinLinear if thin else nn.Linear)(size_in, size_out)

        layers: list[nn.Module] = []
        for size_in, size_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [linear(size_in, size_out), activation()]
        last = linear(sizes[-1], out_features)
        if zero_init_last:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        super().__init__(*layers, last)
