"""Exact densities and differential entropies of the toy distributions in :mod:`flows.data.toy`.

The entropy ``H = -E[log p(x)]`` of the generating process is the floor on the expected test
NLL of any model, so ``test NLL - H`` is the part of the NLL a model can still remove.

Densities, all in nats for ``x`` in R^2 (``N(x; c, s^2)`` is the isotropic normal):

- ``checkerboard``: ``-ln 32`` on the 8 closed squares, ``-inf`` elsewhere.
- ``8gaussians``: ``p = 1/8 sum_k N(x; c_k, s^2)``, by logsumexp.
- ``circles``, ``rings``: a ring of radius ``r`` blurred by ``N(0, s^2 I)`` and marginalised over
  the uniform angle: ``p = exp(-(rho^2 + r^2) / (2 s^2)) I0(rho r / s^2) / (2 pi s^2)`` with
  ``rho = |x|``, evaluated as ``-(rho - r)^2 / (2 s^2) + log i0e(rho r / s^2)``.
- ``moons``, ``swissroll``: ``p = int p(t) N(x; c(t), s^2) dt`` over the curve parameter, by
  Gauss-Legendre quadrature (one 80-node rule per moon; 32-node panels of equal arc length on
  the swiss roll), summed in log space.
- ``2spirals``: ``p(x) = (q(x) + q(-x)) / 2``, ``q(x) = int_0^{3 pi} p(n) prod_i g(x_i - m_i(n))
  dn`` with ``p(n) = 2 n / (3 pi)^2``, ``m(n) = n (-cos n, sin n) / 3`` and ``g`` the density
  of ``U(0, w) + N(0, s^2)``: ``g(z) = (Phi(z / s) - Phi((z - w) / s)) / w``. Groups of
  quadrature nodes whose rigorous upper bound is below ``e^-30`` times a kept term are skipped.
- ``pinwheel``: change of variables. With ``y = x / 2 = rho (cos psi, sin psi)`` and the
  features ``f = rho (cos b, sin b)``, ``y = R(-a) f`` holds iff
  ``b - rate exp(rho cos b) = psi + 2 pi k / 5 (mod 2 pi)``;
  ``p(x) = 1/4 * 1/5 sum_k sum_roots p_f(f) / |1 + rate rho sin b exp(rho cos b)|``.
  The left side has at most two turning points in ``b`` (closed-form location of the extremum of
  its derivative), so every root is bracketed on a monotone piece and found by bisection. Roots
  with ``f_0 > 7`` (weight below ``e^-200``) are dropped; only points with ``|x| > 14`` have any.

Against rules with 4 to 16 times as many nodes (and, for the pinwheel, brute-force root search)
the error of ``log p`` is below 1e-8 wherever ``log p > -50`` and below 1e-6 wherever
``log p > -300``; the densities integrate to 1 within 1e-7 on a grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import numpy as np
from scipy import special

from flows.data import toy
from flows.data.toy import check_name, sample_toy

# (entropy, Monte Carlo standard error) in nats: entropy(name, 10**6, seed=0), written by
# benchmarks/toy_entropy.py. A deterministic grid quadrature of -p log p there agrees within
# 1.2 SE for every set.
TOY_ENTROPY: dict[str, tuple[float, float]] = {
    "moons": (2.39366, 0.00075),
    "8gaussians": (2.83067, 0.00097),
    "checkerboard": (math.log(32.0), 0.0),
    "2spirals": (2.64512, 0.00071),
    "rings": (2.62240, 0.00088),
    "pinwheel": (2.31746, 0.00097),
    "circles": (3.26763, 0.00078),
    "swissroll": (2.66938, 0.00077),
}

_LOG_2PI = math.log(2.0 * math.pi)
_CHUNK = 4_000_000  # matrix elements per chunk: 32 MB of float64
_ROWS = 50_000  # points per call of a density: bounds the pinwheel's root arrays to ~100 MB
# Pinwheel roots with radial feature f0 > 7 (N(1, 0.3^2) density < e^-200) are dropped: their
# number grows like exp(f0), and only points with |x| > 14 have any.
_PINWHEEL_MAX_F0 = 7.0


def _chunks(num_rows: int, num_cols: int) -> list[slice]:
    step = max(1, _CHUNK // max(1, num_cols))
    return [slice(i, min(i + step, num_rows)) for i in range(0, num_rows, step)]


def _segment_logsumexp(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``log sum exp`` over consecutive runs of ``values`` of lengths ``counts`` (empty: -inf)."""
    out = np.full(len(counts), -np.inf)
    filled = counts > 0
    if not np.any(filled):
        return out
    starts = (np.cumsum(counts) - counts)[filled]
    peak = np.maximum.reduceat(values, starts)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    total = np.add.reduceat(np.exp(values - np.repeat(peak, counts[filled])), starts)
    out[filled] = peak + np.log(total)
    return out


def _composite_gauss_legendre(edges: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of ``order``-point Gauss-Legendre on each panel ``[e_i, e_{i+1}]``."""
    base_nodes, base_weights = np.polynomial.legendre.leggauss(order)
    lo, hi = edges[:-1, None], edges[1:, None]
    nodes = 0.5 * (lo + hi) + 0.5 * (hi - lo) * base_nodes
    return nodes.ravel(), (0.5 * (hi - lo) * base_weights).ravel()


def _spiral_panels(t_start: float, t_end: float, panel_length: float) -> np.ndarray:
    """Edges in ``t`` of panels of equal arc length (about ``panel_length``) on the spiral.

    The spiral is ``t (cos t, sin t)``, with arc length ``s(t) = (t sqrt(1 + t^2) + asinh t) / 2``.
    """
    t = np.linspace(t_start, t_end, 4097)
    s = 0.5 * (t * np.sqrt(1.0 + t * t) + np.arcsinh(t))
    num_panels = max(1, math.ceil((s[-1] - s[0]) / panel_length))
    return np.interp(np.linspace(s[0], s[-1], num_panels + 1), s, t)


def _log_gaussian_curve(
    x: np.ndarray, points: np.ndarray, log_weights: np.ndarray, std: float
) -> np.ndarray:
    """``log sum_j w_j N(x; points_j, std^2 I)`` for every row of ``x``, shape ``(N,)``.

    Uses ``-|x - p|^2 / (2 s^2) = (x.p - |p|^2 / 2 - |x|^2 / 2) / s^2``: one matrix product.
    """
    out = np.empty(len(x))
    offsets = log_weights - 0.5 * np.sum(points * points, axis=1) / std**2
    scaled = points.T / std**2
    for rows in _chunks(len(x), len(points)):
        terms = x[rows] @ scaled
        terms += offsets
        peak = terms.max(axis=1, keepdims=True)
        terms -= peak
        np.exp(terms, out=terms)
        out[rows] = peak[:, 0] + np.log(terms.sum(axis=1))
    return out - 0.5 * np.sum(x * x, axis=1) / std**2 - np.log(2.0 * np.pi * std**2)


def _log_ring(x: np.ndarray, radius: float, std: float) -> np.ndarray:
    """``log p`` of ``radius (cos u, sin u) + N(0, std^2 I)``, ``u ~ U(0, 2 pi)``, via ``i0e``."""
    rho = np.hypot(x[:, 0], x[:, 1])
    kappa = rho * radius / std**2
    return (
        -0.5 * ((rho - radius) / std) ** 2
        + np.log(special.i0e(kappa))
        - _LOG_2PI
        - 2 * np.log(std)
    )


def _log_ring_mixture(x: np.ndarray, radii: tuple[float, ...], std: float) -> np.ndarray:
    logs = np.stack([_log_ring(x, r, std) for r in radii])
    return special.logsumexp(logs, axis=0) - np.log(len(radii))


def _log_checkerboard(x: np.ndarray) -> np.ndarray:
    """``-ln 32`` on the closed squares ``{(c1, c2) + [0, 1]^2 : c1 + c2 even} * 2`` in [-4, 4]^2.

    Closed squares (a null-set change) keep float32-rounded samples on an edge inside.
    """
    u = x / toy.CHECKERBOARD_SIDE
    inside = np.zeros(len(x), dtype=bool)
    for c1 in (np.floor(u[:, 0]), np.ceil(u[:, 0]) - 1):
        for c2 in (np.floor(u[:, 1]), np.ceil(u[:, 1]) - 1):
            in_range = (c1 >= -2) & (c1 <= 1) & (c2 >= -2) & (c2 <= 1)
            inside |= in_range & ((c1 + c2) % 2 == 0)
    return np.where(inside, -np.log(32.0), -np.inf)


def _log_eight_gaussians(x: np.ndarray) -> np.ndarray:
    angle = np.arange(8) * (np.pi / 4.0)
    centers = toy.GAUSSIANS_RADIUS * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return _log_gaussian_curve(x, centers, np.full(8, -np.log(8.0)), toy.GAUSSIANS_STD)


@cache
def _moons_nodes() -> tuple[np.ndarray, np.ndarray]:
    # One 80-node Gauss-Legendre rule per moon: |error of log p| < 1e-10 where log p > -50.
    t, w = np.polynomial.legendre.leggauss(80)
    t, w = 0.5 * np.pi * (t + 1.0), 0.5 * np.pi * w
    points, log_weights = [], []
    for (cx, cy), shift in zip(toy.MOONS_CENTERS, (0.0, np.pi), strict=True):
        angle = t + shift
        points.append(
            np.stack(
                [cx + toy.MOONS_RADIUS * np.cos(angle), cy + toy.MOONS_RADIUS * np.sin(angle)],
                axis=1,
            )
        )
        log_weights.append(np.log(w / np.pi / 2.0))  # t ~ U(0, pi), moon ~ U{0, 1}
    return np.concatenate(points), np.concatenate(log_weights)


def _log_moons(x: np.ndarray) -> np.ndarray:
    points, log_weights = _moons_nodes()
    return _log_gaussian_curve(x, points, log_weights, toy.MOONS_STD)


@cache
def _swissroll_nodes() -> tuple[np.ndarray, np.ndarray]:
    # 32-node panels of arc length 10 (before /5): |error of log p| < 1e-10 where log p > -50.
    t_start, t_end = toy.SWISSROLL_RANGE
    t, w = _composite_gauss_legendre(_spiral_panels(t_start, t_end, 10.0), 32)
    points = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / toy.SWISSROLL_SCALE
    return points, np.log(w / (t_end - t_start))


def _log_swissroll(x: np.ndarray) -> np.ndarray:
    points, log_weights = _swissroll_nodes()
    return _log_gaussian_curve(x, points, log_weights, toy.SWISSROLL_STD)


def _log_box_gaussian(z: np.ndarray, width: float, std: float) -> np.ndarray:
    """``log g(z)``, ``g`` the density of ``U(0, width) + N(0, std^2)``, stable in both tails.

    ``g(z) = (Phi(b) - Phi(a)) / width``, ``b = z / std``, ``a = b - width / std``; by symmetry
    the pair is mapped to ``hi <= width / (2 std)`` so the difference never cancels badly.
    """
    b = z / std
    a = b - width / std
    flip = a + b > 0
    lo, hi = np.where(flip, -b, a), np.where(flip, -a, b)
    with np.errstate(divide="ignore"):
        out = np.log(special.ndtr(hi) - special.ndtr(lo))
    far = hi < -30.0  # ndtr underflows below -37
    if np.any(far):
        log_hi, log_lo = special.log_ndtr(hi[far]), special.log_ndtr(lo[far])
        out[far] = log_hi + np.log1p(-np.exp(log_lo - log_hi))
    return out - np.log(width)


_SPIRAL_GROUP = 8  # consecutive nodes pruned together


@cache
def _spiral_nodes() -> tuple[np.ndarray, np.ndarray]:
    # 32-node panels of arc length 3 (before /3): |error of log p| < 1e-8 where log p > -50.
    n, w = _composite_gauss_legendre(_spiral_panels(0.0, toy.SPIRALS_TURN, 3.0), 32)
    points = np.stack([-np.cos(n) * n, np.sin(n) * n], axis=1) / toy.SPIRALS_SCALE
    return points, np.log(w * 2.0 * n / toy.SPIRALS_TURN**2)


@cache
def _spiral_groups() -> tuple[np.ndarray, np.ndarray]:
    """``(centre, radius)`` of a ball holding the offset-square centres of each node group."""
    points, _ = _spiral_nodes()
    centers = (points + 0.5 * toy.SPIRALS_OFFSET).reshape(-1, _SPIRAL_GROUP, 2)
    middle = centers.mean(axis=1)
    radius = np.max(np.linalg.norm(centers - middle[:, None], axis=2), axis=1)
    return middle, radius


def _spiral_integrand(x: np.ndarray, points: np.ndarray, log_weights: np.ndarray) -> np.ndarray:
    z = x - points
    width, std = toy.SPIRALS_OFFSET, toy.SPIRALS_STD
    log_g = _log_box_gaussian(z[:, 0], width, std) + _log_box_gaussian(z[:, 1], width, std)
    return log_weights + log_g


def _log_spiral_arm(x: np.ndarray) -> np.ndarray:
    """``log q(x)`` of one arm, skipping node groups bounded below ``e^-30`` of a kept term.

    Bound: ``log g(z) <= -log w - d^2 / (2 s^2)`` with ``d`` the distance from ``z`` to
    ``[0, w]``; the distance from ``x`` to a node's square of offsets is at least
    ``|x - centre of its group| - group radius - w / sqrt 2``. The skipped terms sum to less
    than ``512 e^-30 < 1e-10`` of the kept ones.
    """
    points, log_weights = _spiral_nodes()
    middle, group_radius = _spiral_groups()
    width, std = toy.SPIRALS_OFFSET, toy.SPIRALS_STD
    log_bound = log_weights.max() - 2.0 * np.log(width)
    slack = group_radius + width / math.sqrt(2.0)
    out = np.empty(len(x))
    for rows in _chunks(len(x), len(points)):
        xc = x[rows]
        dist = np.sqrt(np.sum((xc[:, None, :] - middle) ** 2, axis=2))  # (n, groups)
        ref_node = np.argmin(dist, axis=1) * _SPIRAL_GROUP + _SPIRAL_GROUP // 2
        ref = _spiral_integrand(xc, points[ref_node], log_weights[ref_node])
        reach = np.sqrt(2.0 * std**2 * (log_bound - ref + 30.0))
        i, group = np.nonzero(dist - slack <= reach[:, None])
        i = np.repeat(i, _SPIRAL_GROUP)
        j = (group[:, None] * _SPIRAL_GROUP + np.arange(_SPIRAL_GROUP)).ravel()
        values = _spiral_integrand(xc[i], points[j], log_weights[j])
        out[rows] = _segment_logsumexp(values, np.bincount(i, minlength=len(xc)))
    return out


def _log_two_spirals(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(_log_spiral_arm(x), _log_spiral_arm(-x)) - np.log(2.0)


def _bisect(
    fn: Callable[[np.ndarray], np.ndarray], lo: np.ndarray, hi: np.ndarray, steps: int = 48
) -> np.ndarray:
    """Root of ``fn`` on ``[lo, hi]`` elementwise, given ``fn(lo) <= 0 <= fn(hi)``.

    48 halvings of an interval of at most ``2 pi`` leave an error below ``3e-14``.
    """
    lo, hi = lo.copy(), hi.copy()
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        below = fn(mid) < 0
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return 0.5 * (lo + hi)


def _pinwheel_phase(b: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """``Psi(b) = b - rate exp(rho cos b)``: the angle of ``y`` minus ``2 pi k / 5``."""
    return b - toy.PINWHEEL_RATE * np.exp(rho * np.cos(b))


def _pinwheel_slope(b: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """``dPsi/db = 1 + rate rho sin b exp(rho cos b) = det(dy/df)``."""
    return 1.0 + toy.PINWHEEL_RATE * rho * np.sin(b) * np.exp(rho * np.cos(b))


def _pinwheel_pieces(rho: np.ndarray) -> np.ndarray:
    """Ends ``(N, 4)`` of the pieces of ``[0, 2 pi]`` on which ``Psi`` is up, down, up.

    ``sin b exp(rho cos b)`` is positive on ``(0, pi)`` and has a single minimum on ``(pi, 2 pi)``
    at ``cos b = 2 rho / (1 + sqrt(1 + 4 rho^2))``; where the slope is negative there, its two
    zeros are the turning points of ``Psi``, else the middle piece is empty. Ends are clipped to
    ``rho cos b <= _PINWHEEL_MAX_F0``.
    """
    b_min = 2.0 * np.pi - np.arccos(2.0 * rho / (1.0 + np.sqrt(1.0 + 4.0 * rho**2)))
    b1, b2 = b_min.copy(), b_min.copy()
    fold = _pinwheel_slope(b_min, rho) < 0
    if np.any(fold):
        r, bm = rho[fold], b_min[fold]
        b1[fold] = _bisect(lambda b: -_pinwheel_slope(b, r), np.full_like(r, np.pi), bm)
        b2[fold] = _bisect(lambda b: _pinwheel_slope(b, r), bm, np.full_like(r, 2.0 * np.pi))
    cut = np.arccos(np.minimum(1.0, _PINWHEEL_MAX_F0 / np.maximum(rho, 1e-300)))[:, None]
    ends = np.stack([np.zeros_like(rho), b1, b2, np.full_like(rho, 2.0 * np.pi)], axis=1)
    return np.clip(ends, cut, 2.0 * np.pi - cut)


def _pinwheel_roots(rho: np.ndarray, psi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All ``b`` with ``Psi(b) = psi + 2 pi k / 5 + 2 pi m`` for every class ``k``, integer ``m``.

    Returns ``(counts, b)``: roots per point ``(N,)`` and the roots, grouped by point.
    """
    ends = _pinwheel_pieces(rho)
    values = _pinwheel_phase(ends, rho[:, None])
    value_lo = np.minimum(values[:, :-1], values[:, 1:])[:, None, :]  # (N, 1, 3)
    value_hi = np.maximum(values[:, :-1], values[:, 1:])[:, None, :]
    classes = np.arange(toy.PINWHEEL_CLASSES)[None, :, None]
    target = psi[:, None, None] + 2.0 * np.pi * classes / toy.PINWHEEL_CLASSES  # (N, 5, 1)
    # Every target + 2 pi m in [value_lo, value_hi) has exactly one root on the piece.
    m_first = np.ceil((value_lo - target) / (2.0 * np.pi))
    m_stop = np.ceil((value_hi - target) / (2.0 * np.pi))
    count = np.maximum(m_stop - m_first, 0).astype(np.int64)  # (N, 5, 3)
    flat = np.repeat(np.arange(count.size), count.ravel())
    rank = np.arange(len(flat)) - np.repeat(np.cumsum(count) - count.ravel(), count.ravel())
    point, _, piece = np.unravel_index(flat, count.shape)
    target = np.broadcast_to(target, count.shape).ravel()[flat]
    goal = target + 2.0 * np.pi * (m_first.ravel()[flat] + rank)
    r = rho[point]
    orient = np.where(piece == 1, -1.0, 1.0)  # the middle piece decreases
    b = _bisect(
        lambda b: orient * (_pinwheel_phase(b, r) - goal),
        ends[point, piece],
        ends[point, piece + 1],
    )
    return count.reshape(len(rho), -1).sum(axis=1), b


def _log_pinwheel(x: np.ndarray) -> np.ndarray:
    y = x / toy.PINWHEEL_SCALE
    rho = np.hypot(y[:, 0], y[:, 1])
    with np.errstate(over="ignore"):  # exp(rho cos b) for huge rho, only at excluded ends
        counts, b = _pinwheel_roots(rho, np.arctan2(y[:, 1], y[:, 0]))
    r = np.repeat(rho, counts)
    f0, f1 = r * np.cos(b), r * np.sin(b)
    radial, tangential = toy.PINWHEEL_RADIAL_STD, toy.PINWHEEL_TANGENTIAL_STD
    log_terms = (
        -0.5 * ((f0 - 1.0) / radial) ** 2
        - 0.5 * (f1 / tangential) ** 2
        - _LOG_2PI
        - np.log(radial * tangential)
        - np.log(np.abs(_pinwheel_slope(b, r)))
    )
    log_y = _segment_logsumexp(log_terms, counts) - np.log(toy.PINWHEEL_CLASSES)
    return log_y - 2.0 * np.log(toy.PINWHEEL_SCALE)


_LOG_DENSITIES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "moons": _log_moons,
    "8gaussians": _log_eight_gaussians,
    "checkerboard": _log_checkerboard,
    "2spirals": _log_two_spirals,
    "rings": lambda x: _log_ring_mixture(x, toy.RINGS_RADII, toy.RINGS_STD),
    "pinwheel": _log_pinwheel,
    "circles": lambda x: _log_ring_mixture(x, toy.CIRCLES_RADII, toy.CIRCLES_STD),
    "swissroll": _log_swissroll,
}


def log_density(name: str, x: np.ndarray) -> np.ndarray:
    """Exact ``log p(x)`` in nats of the toy distribution ``name``.

    Args:
        name: one of :data:`flows.data.toy.TOY_DATASETS`.
        x: points of shape ``(N, 2)``, any float dtype (computed in float64).

    Returns:
        float64 array of shape ``(N,)``; ``-inf`` where the density is 0.
    """
    check_name(name)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape (N, 2), got {x.shape}")
    fn = _LOG_DENSITIES[name]
    return np.concatenate([np.empty(0)] + [fn(x[i : i + _ROWS]) for i in range(0, len(x), _ROWS)])


def entropy(name: str, num_samples: int = 200_000, seed: int = 0) -> tuple[float, float]:
    """Differential entropy ``H = -E[log p(x)]`` in nats and its Monte Carlo standard error.

    ``H`` is estimated by the mean of ``-log p`` over ``num_samples`` draws of
    :func:`flows.data.toy.sample_toy` with ``numpy.random.default_rng(seed)``; the standard error
    is ``std(log p) / sqrt(num_samples)``. ``checkerboard`` is exact: ``(ln 32, 0)``.
    """
    check_name(name)
    if name == "checkerboard":  # uniform on area 32
        return math.log(32.0), 0.0
    x = sample_toy(name, num_samples, np.random.default_rng(seed))
    log_p = log_density(name, x)
    return float(-log_p.mean()), float(log_p.std(ddof=1) / math.sqrt(num_samples))
