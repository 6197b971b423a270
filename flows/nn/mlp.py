"""A fully connected conditioner network."""

from __future__ import annotations

from torch import nn


class MLP(nn.Sequential):
    """``(Linear -> act) x num_hidden -> Linear``, shape ``(B, in) -> (B, out)``.

    ``num_hidden`` counts hidden layers; ``num_hidden = 0`` is a single affine map.
    With ``zero_init_last`` the output layer's weight and bias start at zero, so the network
    outputs 0 for every input: a coupling conditioned on it starts as the identity, which keeps
    a deep flow well conditioned at initialisation (Glow, Kingma & Dhariwal 2018, sec. 3.3).

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
        layers: list[nn.Module] = []
        for size_in, size_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(size_in, size_out), activation()]
        last = nn.Linear(sizes[-1], out_features)
        if zero_init_last:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        super().__init__(*layers, last)
