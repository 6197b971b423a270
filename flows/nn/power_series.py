"""The power-series log-det of ``I + J_g`` from hand-written products with ``J_g``."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

Product = Callable[[Tensor, list[Tensor], list[Tensor]], Tensor]


def series_from_products(
    probes: Tensor, weights: list[Tensor], slopes: list[Tensor], vjp: Product, jvp: Product,
    num_terms: int, create_graph: bool, gradient: str,
) -> Tensor:
    """Hutchinson samples ``sum_{k=1}^{n} (-1)^(k+1) v^T J^k v / k``, shape ``(P, B)``.

    ``J = J_g(x)`` is given by a net's ``weights`` and activation ``slopes`` at ``x``:
    ``vjp(w, weights, slopes)`` is ``w^T J`` and ``jvp(v, weights, slopes)`` is ``J v``, for
    ``w, v`` shaped like ``probes`` ``(P, B, *event)``. Without ``create_graph`` the samples
    carry no graph. With it, ``gradient="backprop"`` differentiates through all ``n``
    products; ``"neumann"`` returns the same values with the derivative of ``w^T J v``,
    ``w^T = sum_{k=0}^{n-1} (-1)^k v^T J^k`` held constant (the products then run on detached
    weights and slopes and keep nothing for the backward pass: memory independent of ``n``).
    ``w^T J v`` (one differentiable JVP) less the first ``n - 1`` terms is the ``n``-th, so
    the Neumann gradient takes ``n - 1`` VJPs.
    """
    if create_graph and gradient not in ("neumann", "backprop"):
        raise ValueError(f"hand-written Jacobian products differentiate the series by "
                         f"gradient='neumann' or 'backprop', got {gradient!r}")
    backprop = create_graph and gradient == "backprop"
    neumann_gradient = create_graph and gradient == "neumann"
    chain_weights = weights if backprop else [w.detach() for w in weights]
    chain_slopes = slopes if backprop else [s.detach() for s in slopes]
    w, neumann = probes, probes
    estimate = probes.new_zeros(probes.shape[:2])
    alternating = probes.new_zeros(probes.shape[:2])  # sum_k (-1)^(k+1) v^T J^k v
    for k in range(1, num_terms + (0 if neumann_gradient else 1)):
        w = vjp(w, chain_weights, chain_slopes)
        trace_k = (w * probes).flatten(2).sum(-1)
        estimate = estimate + ((-1) ** (k + 1) / k) * trace_k
        if neumann_gradient:
            alternating = alternating + (-1) ** (k + 1) * trace_k
            neumann = neumann + (-1) ** k * w
    if neumann_gradient:
        surrogate = (neumann * jvp(probes, weights, slopes)).flatten(2).sum(-1)
        estimate = estimate + (surrogate.detach() - alternating) / num_terms
        estimate = estimate + (surrogate - surrogate.detach())
    return estimate
