"""Likelihood metrics: pure functions of per-sample log-densities."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def nll_moments(log_prob: Tensor) -> Tensor:
    """``(N, sum(-log p), sum((-log p)^2))`` in float64: additive over batches and ranks."""
    nll = -log_prob.detach().double().flatten()
    return torch.stack([nll.new_tensor(nll.numel()), nll.sum(), nll.square().sum()])


def nll_from_moments(moments: Tensor) -> tuple[float, float]:
    """Mean negative log-likelihood (nats per sample) and its standard error.

    Args:
        moments: ``nll_moments`` summed over any number of batches, ``N >= 2``.

    Returns:
        ``(mean(-log p), std(-log p) / sqrt(N))`` with the unbiased std; the standard error
        of the mean over i.i.d. test points, the uncertainty a reported test NLL carries.
    """
    count, total, total_square = moments.tolist()
    if count < 2:
        raise ValueError(f"need at least 2 log-densities for a standard error, got {count:.0f}")
    mean = total / count
    variance = max(total_square - count * mean * mean, 0.0) / (count - 1)
    return mean, math.sqrt(variance / count)


def nll_with_standard_error(log_prob: Tensor) -> tuple[float, float]:
    """``nll_from_moments`` of one ``(N,)`` tensor of per-sample ``log p(x)``."""
    if log_prob.dim() != 1 or log_prob.numel() < 2:
        shape = tuple(log_prob.shape)
        raise ValueError(f"need a 1-D tensor of at least 2 log-densities, got shape {shape}")
    return nll_from_moments(nll_moments(log_prob))


def bits_per_dim(nll: Tensor | float, num_dims: int, num_levels: int) -> Tensor | float:
    """Bits per dimension of the discrete data from the NLL (nats) of its dequantised density.

    For data ``x = (k + u) / L`` in ``[0, 1)^D``, ``bpd = -(log p(x) - D log L) / (D ln 2)``
    with ``nll = -log p(x)``: the density of ``k + u`` is ``p(x) / L^D``. A uniform density
    (``log p = 0``) gives exactly ``log2 L``. Linear in ``nll``, so it maps means to means and
    standard errors by the factor ``1 / (D ln 2)`` (``bits_per_dim_scale``).
    """
    return (nll + num_dims * math.log(num_levels)) / (num_dims * math.log(2))


def bits_per_dim_scale(num_dims: int) -> float:
    """``d bpd / d nll = 1 / (D ln 2)``: converts a standard error in nats to bits per dim."""
    return 1.0 / (num_dims * math.log(2))
