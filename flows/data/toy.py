"""2-D toy distributions with the FFJORD / Residual Flows definitions, as i.i.d. samplers.

Each sampler draws ``x`` in R^2 from the generating process of FFJORD's ``lib/toy_data.py``
(Grathwohl et al., 2019), which uses scikit-learn's ``make_moons``, ``make_circles`` and
``make_swiss_roll`` for three of them; their mathematics is re-implemented here in numpy.
Parameters below are those *after* FFJORD's rescaling:

- ``moons``: moon ``m ~ U{0, 1}``, ``t ~ U(0, pi)``; outer ``(cos t, sin t)``, inner
  ``(1 - cos t, 1/2 - sin t)``; ``+ N(0, 0.1^2 I)``; then ``* 2 + (-1, -0.2)`` (noise std 0.2).
- ``8gaussians``: ``k ~ U{0..7}``, ``x = (4 (cos, sin)(k pi / 4) + N(0, 0.5^2 I)) / 1.414``.
- ``checkerboard``: ``x1 ~ U(-2, 2)``, ``x2 = U(0, 1) - 2 Bernoulli(1/2) + (floor(x1) mod 2)``,
  then ``* 2``: uniform on 8 squares of side 2 in ``[-4, 4]^2`` (density 1/32).
- ``2spirals``: ``n = sqrt(U) * 3 pi``, ``d = (-n cos n + U/2, n sin n + U/2)``, sign
  ``s ~ U{-1, 1}``; ``x = s d / 3 + N(0, 0.1^2 I)`` (the second arm negates the offsets too).
- ``rings``: radius ``r ~ U{3, 2.25, 1.5, 0.75}``, angle ``~ U(0, 2 pi)``, ``+ N(0, 0.08^2 I)``
  added after FFJORD's ``* 3``.
- ``pinwheel``: class ``k ~ U{0..4}``, features ``f ~ N((1, 0), diag(0.3, 0.1)^2)``, angle
  ``a = 2 pi k / 5 + 0.25 exp(f_0)``, ``x = 2 f^T R(a)`` with ``R(a) = [[cos, -sin], [sin, cos]]``
  (FFJORD's ``einsum("ti,tij->tj")``, i.e. ``f`` rotated by ``-a``).
- ``circles``: radius ``r ~ U{3, 1.5}``, angle ``~ U(0, 2 pi)``, ``+ N(0, 0.24^2 I)``
  (``make_circles(factor=0.5, noise=0.08) * 3``).
- ``swissroll``: ``t = 1.5 pi (1 + 2 U)``, ``x = ((t cos t, t sin t) + N(0, I)) / 5``
  (``make_swiss_roll(noise=1.0)`` columns ``[0, 2]``).

Differences from FFJORD, all of which keep the distribution and make the samples i.i.d.:
angles that scikit-learn / FFJORD space evenly (``linspace`` in moons, circles, rings) are drawn
uniformly at random; mixture components (moon, circle, ring, arm, class) are drawn per sample with
equal weights instead of fixed counts; every call returns exactly ``num_samples`` rows (FFJORD's
pinwheel returns ``5 * (n // 5)``); every draw comes from the passed ``numpy.random.Generator``
(FFJORD's checkerboard and 2spirals use the global numpy state). i.i.d. samples make the
standard error of a test NLL honest. The exact densities are in :mod:`flows.data.entropy`.

References:
    Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
    Generative Models", https://arxiv.org/abs/1810.01367
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

TOY_DATASETS: tuple[str, ...] = (
    "moons",
    "8gaussians",
    "checkerboard",
    "2spirals",
    "rings",
    "pinwheel",
    "circles",
    "swissroll",
)

# Generating-process parameters in output units (after FFJORD's rescaling); shared with
# flows.data.entropy so the densities cannot drift from the samplers.
MOONS_RADIUS = 2.0
MOONS_CENTERS = ((-1.0, -0.2), (1.0, 0.8))  # outer arc t in (0, pi), inner arc t in (pi, 2 pi)
MOONS_STD = 0.2
GAUSSIANS_SCALE = 1.414  # FFJORD divides by 1.414, not sqrt(2)
GAUSSIANS_RADIUS = 4.0 / GAUSSIANS_SCALE
GAUSSIANS_STD = 0.5 / GAUSSIANS_SCALE
CHECKERBOARD_SIDE = 2.0
SPIRALS_TURN = 3.0 * np.pi  # n = 540 degrees * sqrt(U)
SPIRALS_SCALE = 3.0
SPIRALS_OFFSET = 0.5 / SPIRALS_SCALE  # width of each uniform offset after /3
SPIRALS_STD = 0.1
RINGS_RADII = (3.0, 2.25, 1.5, 0.75)
RINGS_STD = 0.08
PINWHEEL_CLASSES = 5
PINWHEEL_RADIAL_STD = 0.3
PINWHEEL_TANGENTIAL_STD = 0.1
PINWHEEL_RATE = 0.25
PINWHEEL_SCALE = 2.0
CIRCLES_RADII = (3.0, 1.5)
CIRCLES_STD = 0.24
SWISSROLL_RANGE = (1.5 * np.pi, 4.5 * np.pi)
SWISSROLL_SCALE = 5.0
SWISSROLL_STD = 1.0 / SWISSROLL_SCALE


def _ring_mixture(
    radii: tuple[float, ...], std: float, num_samples: int, rng: np.random.Generator
) -> np.ndarray:
    """``r (cos u, sin u) + N(0, std^2 I)``, ``r`` uniform over ``radii``, ``u ~ U(0, 2 pi)``."""
    r = np.asarray(radii)[rng.integers(len(radii), size=num_samples)]
    u = rng.uniform(0.0, 2.0 * np.pi, size=num_samples)
    x = r[:, None] * np.stack([np.cos(u), np.sin(u)], axis=1)
    return x + std * rng.standard_normal((num_samples, 2))


def _moons(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    inner = rng.integers(2, size=num_samples).astype(bool)
    t = rng.uniform(0.0, np.pi, size=num_samples)
    x = np.stack([np.cos(t), np.sin(t)], axis=1)
    x[inner] = 1.0 - x[inner] - np.array([0.0, 0.5])
    x += 0.1 * rng.standard_normal((num_samples, 2))  # make_moons(noise=0.1)
    return x * 2.0 + np.array([-1.0, -0.2])


def _eight_gaussians(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    angle = rng.integers(8, size=num_samples) * (np.pi / 4.0)
    centers = 4.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return (centers + 0.5 * rng.standard_normal((num_samples, 2))) / GAUSSIANS_SCALE


def _checkerboard(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    x1 = rng.uniform(-2.0, 2.0, size=num_samples)
    x2 = rng.uniform(0.0, 1.0, size=num_samples) - 2.0 * rng.integers(2, size=num_samples)
    x2 = x2 + np.floor(x1) % 2
    return np.stack([x1, x2], axis=1) * 2.0


def _two_spirals(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    n = np.sqrt(rng.uniform(size=num_samples)) * SPIRALS_TURN
    offsets = 0.5 * rng.uniform(size=(num_samples, 2))
    arm = np.stack([-np.cos(n) * n, np.sin(n) * n], axis=1) + offsets
    sign = rng.choice(np.array([-1.0, 1.0]), size=num_samples)
    x = sign[:, None] * arm / SPIRALS_SCALE
    return x + SPIRALS_STD * rng.standard_normal((num_samples, 2))


def _rings(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    return _ring_mixture(RINGS_RADII, RINGS_STD, num_samples, rng)


def _pinwheel(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    stds = np.array([PINWHEEL_RADIAL_STD, PINWHEEL_TANGENTIAL_STD])
    features = rng.standard_normal((num_samples, 2)) * stds
    features[:, 0] += 1.0
    labels = rng.integers(PINWHEEL_CLASSES, size=num_samples)
    angles = 2.0 * np.pi * labels / PINWHEEL_CLASSES + PINWHEEL_RATE * np.exp(features[:, 0])
    cos, sin = np.cos(angles), np.sin(angles)
    rotations = np.stack([cos, -sin, sin, cos], axis=1).reshape(-1, 2, 2)
    return PINWHEEL_SCALE * np.einsum("ti,tij->tj", features, rotations)


def _circles(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    return _ring_mixture(CIRCLES_RADII, CIRCLES_STD, num_samples, rng)


def _swissroll(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.uniform(size=num_samples))
    x = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    return (x + rng.standard_normal((num_samples, 2))) / SWISSROLL_SCALE


_SAMPLERS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "moons": _moons,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "2spirals": _two_spirals,
    "rings": _rings,
    "pinwheel": _pinwheel,
    "circles": _circles,
    "swissroll": _swissroll,
}


def check_name(name: str) -> None:
    """Raise ``ValueError`` listing the valid names if ``name`` is not a toy data set."""
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown toy data set {name!r}; valid names: {', '.join(TOY_DATASETS)}")


def sample_toy(name: str, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``num_samples`` i.i.d. points from the toy distribution ``name``.

    Args:
        name: one of :data:`TOY_DATASETS`.
        num_samples: number of rows returned (exactly).
        rng: the only source of randomness.

    Returns:
        ``float32`` array of shape ``(num_samples, 2)``.

    Raises:
        ValueError: for an unknown name or a negative ``num_samples``.
    """
    check_name(name)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return _SAMPLERS[name](int(num_samples), rng).astype(np.float32)
