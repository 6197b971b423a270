"""Reusable checks of the bijection contract against mathematics, not against the code."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from flows.core import Bijection


@torch.no_grad()
def perturb_(module: nn.Module, scale: float = 0.3, seed: int = 0) -> nn.Module:
    """Add N(0, scale^2) noise to every parameter, in place.

    Zero-initialised couplings have log-det 0 everywhere, which makes a Jacobian test
    vacuous; perturbing moves every layer away from its identity initialisation.
    """
    generator = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
        param.add_(scale * noise.to(param.device))
    return module


def autograd_logdet(fn: callable, x: Tensor) -> Tensor:
    """``log|det d fn(x)_i / d x_i|`` per sample from the full autograd Jacobian.

    ``fn`` maps a batch ``(B, *event)`` to ``(B, *event)`` with independent samples
    (eval mode); returns shape ``(B,)``.
    """
    batch = x.shape[0]
    jac = torch.func.jacrev(lambda inp: fn(inp).flatten(1))(x)  # (B, D, B, *event)
    jac = jac.reshape(batch, -1, batch, jac[0, 0, 0].numel())
    per_sample = torch.stack([jac[i, :, i, :] for i in range(batch)])  # (B, D, D)
    return torch.linalg.slogdet(per_sample).logabsdet


def check_bijection(bijection: Bijection, x: Tensor, atol: float = 1e-6) -> None:
    """Shape, dtype, round trip, inverse log-det and the log-det against autograd (float64).

    Call with a module in eval mode whose parameters were perturbed (``perturb_``).
    """
    bijection = bijection.double().eval()
    x = x.double()
    z, logdet = bijection(x)
    # same batch and dimension (a squeeze rearranges the event shape)
    assert z.shape[0] == x.shape[0] and z[0].numel() == x[0].numel() and z.dtype == x.dtype
    assert logdet.shape == (x.shape[0],)
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all()

    x_back, inverse_logdet = bijection.inverse(z)
    assert inverse_logdet.shape == (x.shape[0],)
    torch.testing.assert_close(x_back, x, atol=atol, rtol=0)
    torch.testing.assert_close(inverse_logdet, -logdet, atol=atol, rtol=0)

    expected = autograd_logdet(lambda inp: bijection(inp)[0], x)
    torch.testing.assert_close(logdet, expected, atol=atol, rtol=1e-6)
    expected_inverse = autograd_logdet(lambda inp: bijection.inverse(inp)[0], z)
    torch.testing.assert_close(inverse_logdet, expected_inverse, atol=atol, rtol=1e-6)


def assert_same_training_results(reference: nn.Module, other: nn.Module, x: Tensor,
                                 seed: int | None = None) -> None:
    """``other`` (e.g. compiled) gives ``reference``'s log p(x), parameter gradients and state.

    Both models must start identical; each computes ``log_prob(x)`` in its current mode and
    its gradients; any ``RuntimeWarning`` (a compile fallback to eager) is an error. With
    ``seed``, the random generator is seeded before each model (the same Hutchinson probes).
    """
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for model in (reference, other):
            if seed is not None:
                torch.manual_seed(seed)
            log_prob = model.log_prob(x)
            grads = torch.autograd.grad(log_prob.sum(), list(model.parameters()))
            results.append((log_prob, grads, model.state_dict()))
    (lp, grads, state), (lp_other, grads_other, state_other) = results
    torch.testing.assert_close(lp_other, lp)
    for got, want in zip(grads_other, grads, strict=True):
        torch.testing.assert_close(got, want)
    for name, value in state.items():  # buffers too: power-iteration vectors, ActNorm flags
        torch.testing.assert_close(state_other[name], value, msg=name)
