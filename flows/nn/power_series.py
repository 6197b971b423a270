"""The power-series log-det of ``I + J_g`` from products with ``J_g``."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

Product = Callable[[Tensor, list[Tensor], list[Tensor]], Tensor]


def power_series(
    probes: Tensor, vjp: Callable[[Tensor], Tensor], surrogate: Callable[[Tensor], Tensor],
    num_terms: int, neumann_gradient: bool,
) -> tuple[Tensor, Tensor | None]:
    """Hutchinson samples ``sum_{k=1}^{n} (-1)^(k+1) v^T J^k v / k``, shape ``(P, B)``.

    ``probes`` ``v``: ``(P, B, *event)``; ``vjp(w)`` is ``w^T J`` for ``w`` of that shape
    (differentiable or not: the caller's choice). With ``neumann_gradient`` the surrogate
    ``s = w^T J v``, ``w^T = sum_{k=0}^{n-1} (-1)^k v^T J^k`` held constant, is
    ``surrogate(w)`` ``(P, B)``, differentiable, and is returned for the caller to take the
    gradient from (its expectation is the truncated series' gradient, Residual Flows'
    Neumann estimator); its value ``sum_{k=1}^{n} (-1)^(k+1) v^T J^k v`` less the first
    ``n - 1`` terms is the ``n``-th, so only ``n - 1`` products are taken. Without it the
    ``n`` products give every term and the surrogate is ``None``.
    """
    w, neumann = probes, probes
    estimate = probes.new_zeros(probes.shape[:2])
    alternating = probes.new_zeros(probes.shape[:2])  # sum_k (-1)^(k+1) v^T J^k v
    for k in range(1, num_terms + (0 if neumann_gradient else 1)):
        w = vjp(w)
        trace_k = per_sample_dot(w, probes)
        estimate = estimate + ((-1) ** (k + 1) / k) * trace_k
        if neumann_gradient:
            alternating = alternating + (-1) ** (k + 1) * trace_k
            neumann = neumann + (-1) ** k * w
    if not neumann_gradient:
        return estimate, None
    value = surrogate(neumann)
    return estimate + (value.detach() - alternating) / num_terms, value


def per_sample_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum`` over the event dims of ``a * b``, both ``(P, B, *event)``: ``(P, B)``."""
    return (a * b).flatten(2).sum(-1)


def series_from_products(
    probes: Tensor, weights: list[Tensor], slopes: list[Tensor], vjp: Product, jvp: Product,
    num_terms: int, create_graph: bool, gradient: str,
) -> Tensor:
    """``power_series`` by hand-written products with ``J = J_g(x)``, given by a net's
    ``weights`` and activation ``slopes`` at ``x``: ``vjp(w, weights, slopes)`` is ``w^T J``
    and ``jvp(v, weights, slopes)`` is ``J v``. Without ``create_graph`` the samples carry
    no graph. With it, ``gradient="backprop"`` differentiates through all ``n`` products;
    ``"neumann"`` returns the same values with the derivative of the surrogate ``w^T (J v)``
    (one differentiable JVP); the products then run on detached weights and slopes and keep
    nothing for the backward pass: memory independent of ``n``.
    """
    if create_graph and gradient not in ("neumann", "backprop"):
        raise ValueError(f"hand-written Jacobian products differentiate the series by "
                         f"gradient='neumann' or 'backprop', got {gradient!r}")
    backprop = create_graph and gradient == "backprop"
    chain_weights = weights if backprop else [w.detach() for w in weights]
    chain_slopes = slopes if backprop else [s.detach() for s in slopes]
    estimate, surrogate = power_series(
        probes, lambda w: vjp(w, chain_weights, chain_slopes),
        lambda w: per_sample_dot(w, jvp(probes, weights, slopes)), num_terms,
        create_graph and gradient == "neumann")
    return estimate if surrogate is None else estimate + (surrogate - surrogate.detach())
