"""Health checks of a flow: invertibility, contractivity of residual blocks, saturated scales."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flows.bijections.coupling import AffineCoupling, CheckerboardCoupling, soft_clamp
from flows.bijections.residual import ResidualBlock
from flows.core import NormalizingFlow
from flows.nn.lipschitz_conv import conv_operator_norm


@torch.no_grad()
def reconstruction_error(flow: NormalizingFlow, x: Tensor) -> float:
    """``max |f^{-1}(f(x)) - x|``: zero up to rounding for an exact inverse."""
    z, _ = flow(x)
    x_back, _ = flow.transform.inverse(z)
    return float((x_back - x).abs().max())


@torch.no_grad()
def residual_lipschitz_bounds(flow: nn.Module) -> dict[str, float]:
    """For every ``ResidualBlock``: ``prod_l sigma(W_hat_l)``, an upper bound on ``Lip(g)``.

    Each ``sigma`` is the largest singular value of the normalised weight the block uses now:
    exact for linear layers (``torch.linalg.matrix_norm(ord=2)``), and for convolutions the
    norm of the conv operator at the layer's input size, by power iteration run to a relative
    tolerance of 1e-6 (``conv_operator_norm``). A bound ``>= 1`` means the block may not be
    invertible and its log-det series may diverge: the likelihood is not valid. Activations
    are 1-Lipschitz. Keys are module names.
    """
    was_training = flow.training
    flow.eval()  # read the weights without a power-iteration update
    bounds = {}
    for name, module in flow.named_modules():
        if isinstance(module, ResidualBlock):
            bounds[name] = math.prod(_layer_norm(m) for m in module.net.modules()
                                     if isinstance(m, nn.Linear | nn.Conv2d))
    flow.train(was_training)
    return bounds


def _layer_norm(layer: nn.Linear | nn.Conv2d) -> float:
    """``sigma`` of the layer's weight in use; NaN for a weight with a NaN or infinite element
    (the SVD refuses one), so the block's bound reads NaN rather than the check failing."""
    if not bool(torch.isfinite(layer.weight).all()):
        return math.nan
    if isinstance(layer, nn.Linear):
        return torch.linalg.matrix_norm(layer.weight, ord=2).item()
    normalization = layer.parametrizations.weight[0]
    return conv_operator_norm(normalization, layer.weight)


@torch.no_grad()
def saturated_scales(flow: nn.Module, x: Tensor, level: float = 0.95) -> dict[str, float]:
    """For every affine coupling: the fraction of log-scales with ``|s| >= level * clamp``.

    A coupling whose scales sit at the soft clamp has lost its gradient there (``tanh`` is
    flat): a sign of a collapsing or exploding layer. Counts every ``AffineCoupling`` scale and
    the transformed pixels of every affine ``CheckerboardCoupling``. Runs ``flow(x)`` once with
    hooks on the conditioner networks.
    """
    fractions: dict[str, float] = {}
    handles = []
    for name, module in flow.named_modules():
        if isinstance(module, AffineCoupling):
            network, free = module.conditioner, None
        elif isinstance(module, CheckerboardCoupling) and not module.additive:
            network, free = module.net, (1.0 - module.mask).bool()
        else:
            continue

        def hook(network: nn.Module, args: tuple, params: Tensor, name: str = name,
                 clamp: float = module.log_scale_clamp, free: Tensor | None = free) -> None:
            saturated = soft_clamp(params.chunk(2, dim=1)[0], clamp).abs() >= level * clamp
            if free is not None:  # only the transformed pixels carry a scale
                saturated = saturated[..., free]
            fractions[name] = float(saturated.float().mean())
        handles.append(network.register_forward_hook(hook))
    try:
        flow(x)
    finally:
        for handle in handles:
            handle.remove()
    return fractions
