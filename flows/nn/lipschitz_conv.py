"""Spectral normalisation of convolution operators, and the conv residual branch of i-ResNet.

A convolution is a linear operator on feature maps; its spectral norm is not the norm of the
reshaped kernel. The power iteration here runs on the operator itself, ``v -> conv(v, W)`` and
its adjoint ``u -> conv_transpose(u, W)``, at the layer's input size, so ``sigma(W_hat) <= c``
bounds the Lipschitz constant of the layer as it is applied.

References:
    Behrmann et al., Invertible Residual Networks (2019), sec. 3.1 and App. C,
    https://arxiv.org/abs/1811.00995
    Gouk et al., Regularisation of Neural Networks by Enforcing Lipschitz Continuity (2018),
    https://arxiv.org/abs/1804.04368
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.nn.utils import parametrize

from flows.nn.activations import ACTIVATIONS, elu_with_derivative, lipswish_with_derivative
from flows.nn.compile import CompiledOrEager
from flows.nn.lipschitz import SpectralNormalization, _check_coeff, top_singular_value
from flows.nn.power_series import series_from_products


class ConvSpectralNormalization(SpectralNormalization):
    """``W_hat = W / max(1, sigma_hat / c)`` with ``sigma_hat`` the norm of the conv operator.

    ``u`` has the output's shape ``(1, out, H, W)`` and ``v`` the input's ``(1, in, H, W)``
    (stride 1, ``padding = k // 2``, so both are ``H x W``); the power iteration is
    ``v <- conv_transpose(u) / |.|``, ``u <- conv(v) / |.|`` and ``sigma_hat = |conv(v)|``,
    otherwise exactly ``SpectralNormalization`` (updated in every training forward, converged
    at the first evaluation after training).

    Args:
        weight: the kernel ``(out, in, k, k)``, ``k`` odd.
        input_shape: ``(in, H, W)``, the size of the feature maps the layer is applied to.
        coeff: the target operator norm ``c``, in (0, 1).
        n_power_iterations: power-iteration steps per training-mode evaluation.
        eps: guards the normalisation of ``u, v``.
        power_iteration_tol: ``None``, or continue each training-mode evaluation's power
            iteration until a step moves ``u, v`` by at most it (``SpectralNormalization``).
    """

    def __init__(self, weight: Tensor, input_shape: Sequence[int], coeff: float = 0.9,
                 n_power_iterations: int = 1, eps: float = 1e-12,
                 power_iteration_tol: float | None = None) -> None:
        # no training_svd: the operator's matrix (C H W square) is too large to factor
        self.input_shape = tuple(input_shape)
        self.padding = weight.shape[-1] // 2
        super().__init__(weight, coeff, n_power_iterations, eps, power_iteration_tol)

    def check_weight(self, weight: Tensor) -> None:
        channels = self.input_shape[0]
        if weight.dim() != 4 or weight.shape[-1] % 2 == 0 or weight.shape[1] != channels:
            raise ValueError(
                f"conv spectral normalisation needs a kernel (out, in, k, k) with odd k and "
                f"in = input channels; got kernel {tuple(weight.shape)} for input "
                f"{self.input_shape}"
            )

    @torch.no_grad()
    def initialize_vectors_(self, weight: Tensor) -> None:
        """15 power steps from the random start, as torch's ``spectral_norm``: the operator's
        matrix (``C H W`` square) is too large to factor, and converging the power iteration
        for every convolution of a large model would take long."""
        self.power_iterate_(weight, 15)

    def vector_shapes(self, weight: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
        _, height, width = self.input_shape
        return (1, weight.shape[0], height, width), (1, *self.input_shape)

    def operator(self, weight: Tensor, v: Tensor) -> Tensor:
        return F.conv2d(v, weight, padding=self.padding)

    def operator_adjoint(self, weight: Tensor, u: Tensor) -> Tensor:
        return F.conv_transpose2d(u, weight, padding=self.padding)

    def top_singular(self, weight: Tensor, max_iterations: int, rtol: float
                     ) -> tuple[float, Tensor, Tensor, int]:
        """The operator's top singular value and vectors by power iteration from the current
        ``v`` (``top_singular_value``): its matrix (``C H W`` square) is too large to factor."""
        sigma, u, v, steps, _ = top_singular_value(
            lambda x: self.operator(weight, x), lambda y: self.operator_adjoint(weight, y),
            self.v.double(), self.eps, max_iterations, rtol)
        return sigma, u, v, steps


class LipschitzConvNet(nn.Module):
    """i-ResNet's image branch ``g = conv3x3 -> act -> conv1x1 -> act -> conv3x3``.

    Every convolution's operator norm is normalised to ``c`` at the block's input size and the
    activations are 1-Lipschitz, so ``Lip(g) <= c^3``. Shapes ``(B, C, H, W) -> (B, C, H, W)``.

    Args:
        shape: ``(C, H, W)`` of the inputs.
        hidden_channels: channels of the two hidden feature maps.
        activation: ``"elu"`` or ``"lipswish"`` (smooth, as the log-det gradient needs).
        coeff: operator-norm target ``c`` of each convolution, in (0, 1).
        n_power_iterations: power-iteration steps per training forward.
        power_iteration_tol: ``None``, or continue each training forward's power iteration
            until a step moves ``u, v`` by at most it (``SpectralNormalization``).
        compile: run the training steps' series through ``torch.compile``
            (``forward_with_series_logdet``; eager with a warning if compiling fails).

    References:
        Behrmann et al., Invertible Residual Networks (2019), App. C.3,
        https://arxiv.org/abs/1811.00995
    """

    def __init__(self, shape: Sequence[int], hidden_channels: int = 32,
                 activation: str = "elu", coeff: float = 0.9,
                 n_power_iterations: int = 1, compile: bool = False,
                 power_iteration_tol: float | None = None) -> None:
        super().__init__()
        _check_coeff(coeff)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {sorted(ACTIVATIONS)}")
        channels, height, width = shape
        layers = []
        for size_in, size_out, kernel in ((channels, hidden_channels, 3),
                                          (hidden_channels, hidden_channels, 1),
                                          (hidden_channels, channels, 3)):
            conv = nn.Conv2d(size_in, size_out, kernel, padding=kernel // 2)
            parametrize.register_parametrization(conv, "weight", ConvSpectralNormalization(
                conv.weight, (size_in, height, width), coeff, n_power_iterations,
                power_iteration_tol=power_iteration_tol))
            layers.append(conv)
        self.convs = nn.ModuleList(layers)
        self.activations = nn.ModuleList(ACTIVATIONS[activation]() for _ in range(2))
        self.activation = activation
        self.coeff = coeff
        self.compile = compile

    @property
    def lipschitz_bound(self) -> float:
        """``c^3``, the bound on ``Lip(g)`` once the power iterations have converged."""
        return self.coeff ** len(self.convs)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for conv, act in zip(self.convs[:-1], self.activations, strict=True):
            h = act(conv(h))
        return self.convs[-1](h)

    def forward_with_series_logdet(
        self, x: Tensor, probes: Tensor, num_terms: int, create_graph: bool, gradient: str,
    ) -> tuple[Tensor, Tensor]:
        """``g(x)`` ``(B, C, H, W)`` and the power-series log-det samples ``(P, B)`` for
        ``probes`` ``(P, B, C, H, W)``: ``conv_branch_series`` on the normalised weights (each
        normalised once, as in ``forward``: a training-mode power-iteration step, outside the
        compiled function). With ``compile``, calls that build the gradient's graph
        (``create_graph``, training steps) run it through ``torch.compile``, one graph per
        input shape; the no-grad evaluations (more terms, varying batch sizes) run eagerly."""
        activation_params = ([act.raw_beta for act in self.activations]
                             if self.activation == "lipswish" else [])
        series = (_conv_branch_series_compiled if self.compile and create_graph
                  else conv_branch_series)
        return series(
            x, probes, [conv.weight for conv in self.convs], [conv.bias for conv in self.convs],
            [conv.padding[0] for conv in self.convs], self.activation, activation_params,
            num_terms, create_graph, gradient)


def conv_branch_series(
    x: Tensor, probes: Tensor, weights: list[Tensor], biases: list[Tensor], paddings: list[int],
    activation: str, activation_params: list[Tensor], num_terms: int, create_graph: bool,
    gradient: str,
) -> tuple[Tensor, Tensor]:
    """``g(x)`` and the series samples ``(P, B)`` from hand-written products with
    ``J_g = K_3 S_2 K_2 S_1 K_1`` (``K_l`` the convolutions, ``S_l`` the activations' slopes),
    pure: ``conv_vjp`` and ``conv_jvp`` in ``series_from_products``, which says what
    ``create_graph`` and ``gradient`` (``"neumann"`` or ``"backprop"``) do. ``activation``
    ``"elu"``, or ``"lipswish"`` with ``activation_params`` its two ``raw_beta``."""
    h, slopes = x, []
    for layer, (weight, bias, padding) in enumerate(zip(weights[:-1], biases[:-1], paddings[:-1],
                                                        strict=True)):
        pre = F.conv2d(h, weight, bias, padding=padding)
        if activation == "elu":
            h, slope = elu_with_derivative(pre)
        else:
            h, slope = lipswish_with_derivative(pre, activation_params[layer])
        slopes.append(slope)
    gx = F.conv2d(h, weights[-1], biases[-1], padding=paddings[-1])
    samples = series_from_products(
        probes, weights, slopes, functools.partial(conv_vjp, paddings=paddings),
        functools.partial(conv_jvp, paddings=paddings), num_terms, create_graph, gradient)
    return gx, samples


def conv_vjp(w: Tensor, weights: list[Tensor], slopes: list[Tensor],
             paddings: list[int]) -> Tensor:
    """``w^T J_g = K_1^T (s_1 * K_2^T (s_2 * K_3^T w))`` for ``w`` ``(P, B, C, H, W)``; ``K^T``
    is the transposed convolution (the adjoint of a stride-1, same-size convolution) and the
    slopes ``(B, C_l, H, W)`` broadcast over the ``P`` probes."""
    lead = w.shape[:2]
    w = w.flatten(0, 1)
    for weight, slope, padding in zip(reversed(weights[1:]), reversed(slopes),
                                      reversed(paddings[1:]), strict=True):
        w = _times_slope(F.conv_transpose2d(w, weight, padding=padding), slope, lead)
    return F.conv_transpose2d(w, weights[0], padding=paddings[0]).unflatten(0, lead)


def conv_jvp(v: Tensor, weights: list[Tensor], slopes: list[Tensor],
             paddings: list[int]) -> Tensor:
    """``J_g v = K_3 (s_2 * K_2 (s_1 * K_1 v))`` for ``v`` ``(P, B, C, H, W)``."""
    lead = v.shape[:2]
    t = F.conv2d(v.flatten(0, 1), weights[0], padding=paddings[0])
    for weight, slope, padding in zip(weights[1:], slopes, paddings[1:], strict=True):
        t = F.conv2d(_times_slope(t, slope, lead), weight, padding=padding)
    return t.unflatten(0, lead)


def _times_slope(t: Tensor, slope: Tensor, lead: torch.Size) -> Tensor:
    """``t`` ``(P * B, ...)`` times ``slope`` ``(B, ...)`` for each of the ``P`` probes."""
    return (t.unflatten(0, lead) * slope).flatten(0, 1)


@torch.no_grad()
def conv_operator_norm(normalization: ConvSpectralNormalization, weight: Tensor,
                       max_iterations: int = 2000, rtol: float = 1e-6) -> float:
    """The largest singular value of the conv operator of ``weight``, by power iteration.

    From a fresh random start (seeded, so repeatable), not the layer's own vectors, so it does
    not echo the estimate the layer normalised with; in float64, with ``top_singular_value``'s
    stopping rule.
    """
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(normalization.v.shape, generator=generator, dtype=torch.float64)
    weight = weight.double()
    sigma, *_ = top_singular_value(
        lambda x: normalization.operator(weight, x),
        lambda y: normalization.operator_adjoint(weight, y),
        start.to(weight.device), normalization.eps, max_iterations, rtol)
    return sigma


# Keeping at most half the activations the partitioner would keep by default, and recomputing
# the rest in the backward: a third of the memory a training step adds at 1x28x28 with the
# default budget (README, "Peak memory").
_conv_branch_series_compiled = CompiledOrEager(conv_branch_series, dynamic=False,
                                               activation_memory_budget=0.5)
