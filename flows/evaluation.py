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
                    max_passes: int = 20) -> tuple[Tensor, Tensor]:
    """Average ``log p`` over passes with fresh Hutchinson probes until precise enough.

    Each pass evaluates every point once. After ``min_passes``, stops when the Monte Carlo
    standard error of the mean over points (``probe_standard_error``, times ``se_scale`` to
    convert nats to the reported unit, e.g. bits/dim) is at most ``max_se``, or after
    ``max_passes`` (with a warning that the target was not reached). Returns the per-point
    average ``(N,)`` and every pass's values ``(passes, N)``.
    """
    if not 1 <= min_passes <= max_passes:
        raise ValueError(f"min_passes={min_passes} and max_passes={max_passes}: need "
                         f"1 <= min_passes <= max_passes (2 or more passes give a standard error)")
    values = torch.empty(0, len(points), dtype=torch.float64)
    while len(values) < max_passes:
        one_pass = torch.cat([flow.log_prob(batch.to(device)).double().cpu()
                              for batch in points.split(batch_size)])
        values = torch.cat([values, one_pass[None]])
        se = probe_standard_error(values) * se_scale
        if len(values) >= min_passes and se <= max_se:
            return values.mean(0), values
    warnings.warn(
        f"the Monte Carlo standard error {se:.2g} is still above max_se={max_se:g} after "
        f"max_passes={max_passes} passes; raise max_passes (or the blocks' eval_num_probes) "
        f"for a more precise estimate", RuntimeWarning, stacklevel=2)
    return values.mean(0), values


def probe_standard_error(passes: Tensor) -> float:
    """Monte Carlo standard error of ``mean_i mean_p passes[p, i]`` from the probes' noise.

    ``passes``: ``(P, N)``, point ``i``'s estimate in pass ``p``. Every point draws its own
    probes in every pass, so the ``P * N`` errors are independent and the variance of the mean
    is ``sum_i var_i / (P N^2)``, with ``var_i`` point ``i``'s unbiased variance over the ``P``
    passes. Pooled over ``N`` points, the estimate is precise from ``P = 2`` (about ``N``
    degrees of freedom, where the spread of ``P`` pass means alone would give ``P - 1``).
    ``inf`` for a single pass.
    """
    num_passes, num_points = passes.shape
    if num_passes < 2:
        return math.inf
    return math.sqrt(float(passes.var(dim=0).sum()) / num_passes) / num_points
