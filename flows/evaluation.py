"""Test likelihoods with a stated accuracy, for flows whose log-det is a stochastic series.

An i-ResNet's evaluation log-det ``sum_{k<=n} (-1)^(k+1) tr(J_g^k) / k`` (Hutchinson traces) has
two errors: the truncation bias, bounded through ``|tr(J^k)| <= d Lip(g)^k``, and the probes'
Monte Carlo error, measured by repeating passes over the data with fresh probes. The i-ResNet
paper chose ``n`` so the bias is below 1e-4 bits/dim and added probes until the standard
error was below 1e-3 bits/dim (Behrmann et al. 2019, sec. 5); this module does the same.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from flows.bijections.residual import ResidualBlock
from flows.core import NormalizingFlow


def truncation_bias_bound(lipschitz_bounds: Iterable[float], num_terms: int) -> float:
    """Bound on ``|log det - series_n| / d`` summed over blocks, in nats per dimension.

    For one block with ``Lip(g) <= L < 1`` the dropped terms are ``sum_{k>n} (-1)^(k+1)
    tr(J^k) / k`` and ``|tr(J^k)| <= d L^k``, so the bias per dimension is at most
    ``sum_{k>n} L^k / k <= L^(n+1) / ((n + 1)(1 - L))``. Blocks acting after a factor-out see
    fewer than ``D`` dimensions; counting ``D`` for each keeps the bound conservative.
    """
    bound = 0.0
    for lipschitz in lipschitz_bounds:
        if not 0.0 <= lipschitz < 1.0:
            return math.inf
        bound += lipschitz ** (num_terms + 1) / ((num_terms + 1) * (1.0 - lipschitz))
    return bound


def terms_for_bias(lipschitz_bounds: list[float], max_bias: float, max_terms: int = 500) -> int:
    """The fewest series terms whose ``truncation_bias_bound`` is at most ``max_bias``."""
    for num_terms in range(1, max_terms + 1):
        if truncation_bias_bound(lipschitz_bounds, num_terms) <= max_bias:
            return num_terms
    raise ValueError(
        f"no number of series terms up to {max_terms} bounds the truncation bias by "
        f"{max_bias:g}: the Lipschitz bounds {sorted(lipschitz_bounds)[-3:]} are too close to 1"
    )


def exact_logdet_up_to(flow: NormalizingFlow, max_dims: int) -> None:
    """Let every residual block take the exact log-det on inputs of at most ``max_dims`` dims.

    The exact log-det of a block whose net carries no Jacobian is the ``slogdet`` of its dense
    Jacobian (``dense_jacobian``: ``D`` forward-mode products per sample), with neither
    truncation bias nor probe noise; cheap for the 32- and 64-dimensional blocks of 8x8 images.
    Blocks already exact stay exact.
    """
    for module in flow.modules():
        if isinstance(module, ResidualBlock) and module.logdet != "exact":
            module.logdet = "auto"
            module.exact_max_features = max(module.exact_max_features, max_dims)


def set_eval_terms(flow: NormalizingFlow, num_terms: int) -> None:
    """Use ``num_terms`` power-series terms in every residual block's eval-mode log-det."""
    for module in flow.modules():
        if isinstance(module, ResidualBlock):
            module.eval_num_terms = num_terms


@torch.no_grad()
def log_prob_passes(flow: NormalizingFlow, points: Tensor, batch_size: int, device: torch.device,
                    max_se: float, se_scale: float, min_passes: int = 2,
                    max_passes: int = 20) -> tuple[Tensor, list[float]]:
    """Average ``log p`` over passes with fresh Hutchinson probes until precise enough.

    Each pass evaluates every point once. After ``min_passes``, stops when the Monte Carlo
    standard error of the mean over points, ``std(pass means) / sqrt(passes) * se_scale``
    (``se_scale`` converts nats to the reported unit, e.g. bits/dim), is at most ``max_se``, or
    after ``max_passes`` (with a warning that the target was not reached). Returns the per-point
    average ``(N,)`` and each pass's mean.
    """
    total = torch.zeros(len(points), dtype=torch.float64)
    pass_means: list[float] = []
    while len(pass_means) < max_passes:
        log_prob = torch.cat([flow.log_prob(batch.to(device)).double().cpu()
                              for batch in points.split(batch_size)])
        total += log_prob
        pass_means.append(float(log_prob.mean()))
        if len(pass_means) >= min_passes and monte_carlo_se(pass_means) * se_scale <= max_se:
            return total / len(pass_means), pass_means
    warnings.warn(
        f"the Monte Carlo standard error {monte_carlo_se(pass_means) * se_scale:.2g} is still "
        f"above max_se={max_se:g} after max_passes={max_passes} passes; raise max_passes (or "
        f"the blocks' eval_num_probes) for a more precise estimate", RuntimeWarning, stacklevel=2)
    return total / len(pass_means), pass_means


def monte_carlo_se(pass_means: list[float]) -> float:
    """Standard error of the mean of ``pass_means`` (unbiased std over sqrt of their count)."""
    count = len(pass_means)
    if count < 2:
        return math.inf
    mean = sum(pass_means) / count
    variance = sum((m - mean) ** 2 for m in pass_means) / (count - 1)
    return math.sqrt(variance / count)
