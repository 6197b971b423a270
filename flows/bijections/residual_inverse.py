"""Solvers for ``x + g(x) = z`` in ``x``, the residual block's inverse, with ``Lip(g) <= c < 1``.

- ``fixed_point_solve``: ``x <- z - g(x)`` from ``x = z``, a contraction with rate ``c``
  (Banach): the error after ``k`` steps is ``<= c^k |g(z)| / (1 - c)``. One evaluation of
  ``g`` per step; the steps needed grow like ``1 / log(1 / c)``.
- ``newton_solve``: Newton's method on ``F(x) = x + g(x) - z``,
  ``x <- x - (I + J_g(x))^{-1} F(x)``, from ``x = z``: quadratic convergence near the
  solution whatever ``c``, for one evaluation of ``g`` and its Jacobian ``J_g`` ``(B, D, D)``
  per step (two where samples fall back), so for small ``D``. Safeguarded (below) so that
  it converges from any start.

Both stop when the last step moved every element by at most ``atol + rtol |x|``. In the
2-norm (the elementwise test bounds the step's 2-norm by ``sqrt(D)`` times the tolerance) the
error is then at most ``c / (1 - c)`` times the last step for the fixed point, and
``2 / (1 - c)`` times it for Newton (the singular values of ``I + J_g`` lie in
``[1 - c, 1 + c]``); near the solution Newton's error is far below that (quadratic). Each
fixed-point step reads one boolean on the host; each Newton step a boolean and the indices of
the samples that fall back, which take a second evaluation (and a second boolean: a sample
whose fixed-point step is within the tolerance has converged too).

References:
    Behrmann et al., Invertible Residual Networks (2019), Alg. 1 (the fixed point).
    Nocedal & Wright, Numerical Optimization (2006), ch. 11 (Newton's method for nonlinear
    equations and its safeguards).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def solve_identity_plus(jac: Tensor, rhs: Tensor) -> Tensor:
    """``(I + J)^{-1} r`` per sample for ``J`` ``(B, D, D)`` and ``r`` ``(B, D)``.

    Closed forms for ``D <= 2`` (Cramer's rule: one fused elementwise expression instead of a
    batched LU), ``torch.linalg.solve`` above.
    """
    features = jac.shape[-1]
    if features == 1:
        return rhs / (1.0 + jac[:, 0])
    if features == 2:
        a, b, c, d = jac.flatten(1).unbind(1)
        r1, r2 = rhs.unbind(1)
        det = (1.0 + a) * (1.0 + d) - b * c
        return torch.stack([(1.0 + d) * r1 - b * r2, (1.0 + a) * r2 - c * r1], 1) / det[:, None]
    eye = torch.eye(features, dtype=jac.dtype, device=jac.device)
    return torch.linalg.solve(eye + jac, rhs.unsqueeze(-1)).squeeze(-1)


def _settled(step: Tensor, x: Tensor, atol: float, rtol: float) -> Tensor:
    """Per sample, whether every element moved by at most ``atol + rtol |x|`` and ``x`` is
    finite, ``(B,)`` (an infinite step to an infinite ``x`` passes the bound alone)."""
    return (step.abs() <= atol + rtol * x.abs()).flatten(1).all(1) & ~not_finite(x)


def not_finite(x: Tensor) -> Tensor:
    """Per sample, whether any element is NaN or infinite, ``(B,)``."""
    return ~torch.isfinite(x).flatten(1).all(1)


def fixed_point_solve(g: Callable[[Tensor], Tensor], z: Tensor, atol: float, rtol: float,
                      max_iterations: int) -> tuple[Tensor, int, bool]:
    """``x <- z - g(x)`` from ``x = z``: ``(x, iterations, converged)``.

    A sample whose iterate is not finite (a NaN or infinite ``z``, non-finite weights) stays
    so and stops counting: the others end the iteration, and ``converged`` speaks for them
    (the caller finds the non-finite samples in the result).
    """
    x = z
    for iteration in range(1, max_iterations + 1):
        x_next = z - g(x)
        lost = not_finite(x_next)
        done = bool((_settled(x_next - x, x_next, atol, rtol) | lost).all())  # one host read
        x = x_next
        if done:
            return x, iteration, True
    return x, max_iterations, False


def newton_solve(g_and_jacobian: Callable[[Tensor], tuple[Tensor, Tensor]], z: Tensor,
                 atol: float, rtol: float, max_iterations: int) -> tuple[Tensor, int, bool]:
    """Safeguarded Newton on ``F(x) = x + g(x) - z`` from ``x = z``: ``(x, evaluations,
    converged)``; ``g_and_jacobian(x)`` gives ``g(x)`` (shape of ``x``) and ``J_g(x)``
    ``(B, D, D)`` over the flattened event.

    A sample's Newton point is accepted when its residual ``max |F|`` is at most half the
    smallest it has had, or when its step was already within the tolerance (at rounding
    level the residual stops halving); otherwise the sample takes the fixed-point step
    ``x - F(x)`` from its previous point instead. Accepted points halve that smallest
    residual, which bounds the error (``|x - x*|_2 <= |F(x)|_2 / (1 - c)``), and fixed-point
    steps contract the error by ``c``, so every sample converges; near the solution every
    Newton point is accepted. A sample whose ``z`` or ``g(z)`` is not finite (non-finite
    weights) cannot converge and stops counting from the start (``converged`` speaks for the
    others).
    ``evaluations`` counts the calls of ``g_and_jacobian`` (one that re-evaluates only the
    fallen-back samples counts as one) and is capped by ``max_iterations``; at the cap the
    last points take the fixed-point step, which needs no evaluation (``max_iterations=1``:
    ``z - g(z)``, as ``fixed_point_solve``).
    """
    shape = z.shape
    z = z.flatten(1)

    def residual_and_jacobian(x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        gx, jac = g_and_jacobian(x.view(-1, *shape[1:]))
        return x + gx.flatten(1) - target, jac

    x = z
    residual, jac = residual_and_jacobian(x, z)
    lost = not_finite(residual)  # x = z: a non-finite z or g(z)
    best = residual.abs().amax(1)
    evaluations = 1
    while evaluations < max_iterations:
        step = solve_identity_plus(jac, residual)
        x_newton = x - step
        # a lost sample counts as settled: never rejected, never waited for
        settled = _settled(step, x_newton, atol, rtol) | lost
        if bool(settled.all()):  # host read
            return x_newton.view(shape), evaluations, True
        residual_newton, jac_newton = residual_and_jacobian(x_newton, z)
        evaluations += 1
        size = residual_newton.abs().amax(1)
        # not "size > 0.5 best": a NaN residual (a singular I + J_g, an overflow) is rejected;
        # settled samples sit at rounding level, where the residual no longer halves
        rejected = (~(size <= 0.5 * best) & ~settled).nonzero().squeeze(1)  # host read
        if len(rejected):
            x_fixed = x[rejected] - residual[rejected]  # z - g(x): the contraction's step
            x_newton = x_newton.index_copy(0, rejected, x_fixed)
            # the fixed point's own rule for its step: where Newton's steps keep failing
            settled = settled.index_copy(
                0, rejected, _settled(residual[rejected], x_fixed, atol, rtol))
            if bool(settled.all()):  # host read
                return x_newton.view(shape), evaluations, True
            if evaluations == max_iterations:
                return x_newton.view(shape), evaluations, False
            residual_fixed, jac_fixed = residual_and_jacobian(x_fixed, z[rejected])
            evaluations += 1
            residual_newton = residual_newton.index_copy(0, rejected, residual_fixed)
            jac_newton = jac_newton.index_copy(0, rejected, jac_fixed)
            size = size.index_copy(0, rejected, residual_fixed.abs().amax(1))
        best = torch.minimum(best, size)  # the smallest residual of the points taken
        x, residual, jac = x_newton, residual_newton, jac_newton
    return (x - residual).view(shape), evaluations, False  # a last, free contraction step
