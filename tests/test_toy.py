"""Toy samplers and their exact densities, checked against mathematics and against each other."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flows.data.entropy import TOY_ENTROPY, entropy, log_density
from flows.data.toy import TOY_DATASETS, sample_toy

NUM_SAMPLES = 100_000

# E|x|^2 from the definitions (flows/data/toy.py docstring), derived by hand:
# moons: mean of the two moons' E|2c + o|^2 plus 2 * 0.2^2 = 5.42 - 4/pi;
# 2spirals: (E n^2 + E[n (sin n - cos n)] / 2 + 1/6) / 9 + 2 * 0.1^2 with p(n) = 2n / N^2,
# N = 3 pi, E n^2 = N^2 / 2, E[n (sin n - cos n)] = 2 (N^2 - 4 + 2N) / N^2;
# swissroll: (E t^2 + 2) / 25 with E t^2 = (b^3 - a^3) / (3 (b - a)) = 9.75 pi^2.
_N = 3 * math.pi
SECOND_MOMENT = {
    "moons": 5.42 - 4 / math.pi,
    "8gaussians": (16 + 2 * 0.25) / 1.414**2,
    "checkerboard": 2 * 64 / 12,
    "2spirals": (_N**2 / 2 + 1 - 4 / _N**2 + 2 / _N + 1 / 6) / 9 + 2 * 0.01,
    "rings": (9 + 2.25**2 + 1.5**2 + 0.75**2) / 4 + 2 * 0.08**2,
    "pinwheel": 4 * (1 + 0.3**2 + 0.1**2),
    "circles": (9 + 1.5**2) / 2 + 2 * 0.24**2,
    "swissroll": (9.75 * math.pi**2 + 2) / 25,
}


@pytest.fixture(scope="module", params=TOY_DATASETS)
def dataset(request: pytest.FixtureRequest) -> tuple[str, np.ndarray]:
    name = request.param
    return name, sample_toy(name, NUM_SAMPLES, np.random.default_rng(12345))


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_exact_count_and_dtype(name):
    for num_samples in (0, 1, 7, 1001):
        x = sample_toy(name, num_samples, np.random.default_rng(0))
        assert x.shape == (num_samples, 2)
        assert x.dtype == np.float32


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_reproducible_per_seed(name):
    a = sample_toy(name, 500, np.random.default_rng(7))
    b = sample_toy(name, 500, np.random.default_rng(7))
    c = sample_toy(name, 500, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_global_numpy_state_untouched():
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    for name in TOY_DATASETS:
        sample_toy(name, 100, np.random.default_rng(0))
    np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_unknown_name_lists_valid_names():
    for call in (
        lambda: sample_toy("spiral", 10, np.random.default_rng(0)),
        lambda: log_density("spiral", np.zeros((1, 2))),
        lambda: entropy("spiral"),
    ):
        with pytest.raises(ValueError, match="spiral") as info:
            call()
        assert all(name in str(info.value) for name in TOY_DATASETS)


def test_second_moment_matches_definition(dataset):
    name, x = dataset
    sq = np.sum(x.astype(np.float64) ** 2, axis=1)
    se = sq.std() / math.sqrt(len(sq))
    assert abs(sq.mean() - SECOND_MOMENT[name]) < 5 * se


def test_moons_mean():
    x = sample_toy("moons", NUM_SAMPLES, np.random.default_rng(3)).astype(np.float64)
    se = x.std(axis=0) / math.sqrt(len(x))
    # Outer E c = (0, 2/pi), inner (1, 1/2 - 2/pi): mean (1/2, 1/4), * 2 + (-1, -0.2) = (0, 0.3).
    assert np.all(np.abs(x.mean(axis=0) - np.array([0.0, 0.3])) < 5 * se)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_density_integrates_to_one(name):
    # Midpoint rule, h = 1/16: cell edges fall on the checkerboard's square edges (exact there);
    # for the smooth densities (noise std >= 0.08) the rule is spectrally accurate (error ~1e-7).
    h = 1.0 / 16.0
    grid = np.arange(-6 + h / 2, 6, h)
    xx, yy = np.meshgrid(grid, grid, indexing="ij")
    total = np.exp(log_density(name, np.stack([xx.ravel(), yy.ravel()], axis=1))).sum() * h * h
    assert abs(total - 1.0) < (1e-12 if name == "checkerboard" else 1e-5)


def test_mean_log_density_matches_entropy_table(dataset):
    name, x = dataset
    log_p = log_density(name, x[:20_000])
    assert np.all(np.isfinite(log_p))
    value, table_se = TOY_ENTROPY[name]
    se = log_p.std() / math.sqrt(len(log_p))
    assert abs(-log_p.mean() - value) < 4 * math.hypot(se, table_se) + 1e-12


@pytest.mark.parametrize("name", [n for n in TOY_DATASETS if n != "checkerboard"])
def test_score_identity(name):
    """``E_p[lap log p + |grad log p|^2] = int lap p = 0``: first-order sensitive to any mismatch.

    A 5% error in the moons' noise std moves the mean by about 11 standard errors. Derivatives by
    central differences with h = 1e-3 (log p is accurate to 1e-8, so the error is below 1e-2).
    Checkerboard is piecewise constant (the identity holds trivially): not a smooth density.
    """
    x = sample_toy(name, NUM_SAMPLES, np.random.default_rng(12345))
    h = 1e-3
    shifts = np.array([[0, 0], [h, 0], [-h, 0], [0, h], [0, -h]])
    points = (x[:20_000].astype(np.float64)[None] + shifts[:, None]).reshape(-1, 2)
    v = log_density(name, points).reshape(5, -1)
    grad_sq = ((v[1] - v[2]) / (2 * h)) ** 2 + ((v[3] - v[4]) / (2 * h)) ** 2
    laplacian = (v[1] + v[2] + v[3] + v[4] - 4 * v[0]) / h**2
    stat = laplacian + grad_sq
    assert abs(stat.mean()) < 5 * stat.std() / math.sqrt(len(stat))


def test_checkerboard_entropy_exact():
    assert entropy("checkerboard") == (math.log(32.0), 0.0)
    assert TOY_ENTROPY["checkerboard"] == (math.log(32.0), 0.0)
    x = sample_toy("checkerboard", NUM_SAMPLES, np.random.default_rng(1))
    np.testing.assert_array_equal(log_density("checkerboard", x), -math.log(32.0))  # float32 too
    outside = np.array([[-3.0, -1.0], [1.0, -1.0], [4.5, 0.5], [0.0, -4.01]])  # empty squares
    np.testing.assert_array_equal(log_density("checkerboard", outside), -np.inf)


def test_cell_probabilities_match_density(dataset):
    """Fractions of samples in 64 unit cells of [-4, 4]^2 against the integral of exp(log p).

    The integral uses 20 x 20 Gauss-Legendre nodes per cell (error < 1e-6); the tolerance is 5
    binomial standard errors per cell.
    """
    name, x = dataset
    base_nodes, base_weights = np.polynomial.legendre.leggauss(10)
    left = np.linspace(-4.0, 3.5, 16)[:, None]  # 2 panels of width 1/2 per cell
    nodes = (left + 0.25 * (base_nodes + 1.0)).ravel()
    weights = np.tile(0.25 * base_weights, 16)
    xx, yy = np.meshgrid(nodes, nodes, indexing="ij")
    density = np.exp(log_density(name, np.stack([xx.ravel(), yy.ravel()], axis=1)))
    mass = (density.reshape(xx.shape) * np.outer(weights, weights)).reshape(8, 20, 8, 20)
    prob = mass.sum(axis=(1, 3))
    counts, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=8, range=[[-4, 4], [-4, 4]])
    freq = counts / len(x)
    tolerance = 5 * np.sqrt(prob * (1 - prob) / len(x)) + 1e-6
    assert np.all(np.abs(freq - prob) <= tolerance), np.max(np.abs(freq - prob) / tolerance)
