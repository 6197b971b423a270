"""1-Lipschitz activations for i-ResNet residual branches, each with its derivative.

``forward_with_derivative`` returns ``(a(h), a'(h))`` sharing the work, for the hand-written
Jacobian products of ``flows.nn.mlp_jacobian``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn


class _ELUByExp(torch.autograd.Function):
    """``elu(h) = max(h, exp(min(h, 0)) - 1)`` (``e^h - 1 >= h``), its backward ATen's
    ``elu_backward`` from the saved output, ``grad * min(1, elu(h) + 1)``, which is itself
    differentiable (the Neumann gradient's double backward).

    ``F.elu`` computes ``expm1``, which torch's CPU kernels vectorise poorly: on 2 threads of an
    AVX-512 machine, for a ``(64, 32, 4, 4)`` input that requires grad, 305 us against 66 us
    here (interleaved, 9 rounds; ``F.elu`` took 76 us with ``ATEN_CPU_CAPABILITY=avx2``).
    Its absolute error is at most that of ``F.elu`` (4.6e-8 against 6.0e-8 in float32 over
    ``[-20, 20]``); only the relative error of outputs ``|elu(h)| < 1e-3`` is larger.
    """

    generate_vmap_rule = True  # torch.func transforms (the dense Jacobian's vmap and jacfwd)

    @staticmethod
    def forward(h: Tensor) -> Tensor:
        return torch.maximum(h.clamp(max=0).exp_().sub_(1), h)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple[Tensor],
                      output: Tensor) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        return _elu_derivative_times(grad, ctx.saved_tensors[0])

    @staticmethod
    def jvp(ctx: torch.autograd.function.FunctionCtx, tangent: Tensor) -> Tensor:
        return _elu_derivative_times(tangent, ctx.saved_tensors[0])


def _elu_derivative_times(vector: Tensor, out: Tensor) -> Tensor:
    """``elu'(h) * vector`` from ``out = elu(h)`` (ATen's differentiable ``elu_backward``)."""
    return torch.ops.aten.elu_backward(vector, 1.0, 1.0, 1.0, True, out)


def elu(h: Tensor) -> Tensor:
    """``h if h > 0 else exp(h) - 1``, on the CPU by ``exp``, not ``expm1``: eager as
    ``_ELUByExp``; under ``torch.compile`` as ``where(h > 0, h, exp(min(h, 1)) - 1)``, plain ops
    that inductor fuses with the backward it derives (the ``min`` keeps the unused branch's
    ``exp`` finite, so its zero gradient stays zero, and has slope 1 at ``h = 0``). Inductor's
    kernel for ``F.elu`` calls ``expm1`` too: 290 us for a ``(512, 128)`` tensor in the compiled
    i-ResNet 2-D step on 2 AVX-512 threads, against 19-37 us for this form. ``F.elu`` on other
    devices (one kernel) and under ``torch.func`` transforms."""
    if not h.is_cpu:
        return F.elu(h)
    if torch.compiler.is_compiling():
        return torch.where(h > 0, h, torch.exp(torch.clamp(h, max=1.0)) - 1.0)
    # F.elu under torch.func transforms: nested forward mode (jacfwd of jacfwd) would see the
    # Function's jvp as constant in the outer tangent
    if torch._C._functorch.is_functorch_wrapped_tensor(h):
        return F.elu(h)
    return _ELUByExp.apply(h)


class ELU(nn.Module):
    """``elu(h) = h if h > 0 else exp(h) - 1``, 1-Lipschitz; ``elu'(h) = min(1, elu(h) + 1)``."""

    def forward(self, h: Tensor) -> Tensor:
        return elu(h)

    def forward_with_derivative(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return elu_with_derivative(h)


def elu_with_derivative(h: Tensor) -> tuple[Tensor, Tensor]:
    """``(elu(h), elu'(h))``: for h <= 0, ``elu(h) + 1 = exp(h) <= 1``; for h > 0 it is 1."""
    out = elu(h)
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
