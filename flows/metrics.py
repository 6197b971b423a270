"""Likelihood metrics: pure functions of per-sample log-densities."""

from __future__ import annotations

import math

from torch import Tensor


def nll_with_standard_error(log_prob: Tensor) -> tuple[float, float]:
    """Mean negative log-likelihood (nats per sample) and its standard error.

    Args:
        log_prob: per-sample ``log p(x)``, shape ``(N,)`` with ``N >= 2``.

    Returns:
        ``(mean(-log p), std(-log p) / sqrt(N))``; the standard error of the mean over
        i.i.d. test points, the uncertainty a reported test NLL carries.
    """
    if log_prob.dim() != 1 or log_prob.numel() < 2:
        shape = tuple(log_prob.shape)
        raise ValueError(f"need a 1-D tensor of at least 2 log-densities, got shape {shape}")
    nll = -log_prob.double()
    return nll.mean().item(), (nll.std() / math.sqrt(nll.numel())).item()
