"""Differential entropies of the 2-D toy distributions: the floor on their expected test NLL.

Recomputes ``H = -E[log p(x)]`` for every toy set by Monte Carlo over 10^6 samples of
``flows.data.toy.sample_toy`` (seed 0) with the exact densities of ``flows.data.entropy``, and
writes ``benchmarks/results/toy_entropy.md`` next to the reference figures of the issue. The
numbers feed ``flows.data.entropy.TOY_ENTROPY``.

Run: ``python benchmarks/toy_entropy.py [num_samples]`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from flows.data.entropy import entropy, log_density
from flows.data.toy import TOY_DATASETS

# The reference figures (nats, standard error); None marks an exact value.
REFERENCE: dict[str, tuple[float, float | None]] = {
    "moons": (2.396, 0.001),
    "8gaussians": (2.835, 0.002),
    "checkerboard": (3.466, None),
    "2spirals": (2.642, 0.004),
    "rings": (2.624, 0.001),
    "pinwheel": (2.306, 0.005),
    "circles": (3.269, 0.001),
    "swissroll": (2.666, 0.004),
}
RESULT = Path(__file__).parent / "results" / "toy_entropy.md"


def grid_entropy(name: str, half_width: float = 7.0, step: float = 1.0 / 32.0) -> float:
    """Deterministic cross-check: ``-sum p log p h^2`` over the midpoints of ``[-7, 7]^2``.

    The midpoint rule is spectrally accurate for these smooth densities (noise std >= 0.08 >>
    h) and exact for the checkerboard, whose square edges fall on cell edges.
    """
    grid = np.arange(-half_width + step / 2, half_width, step)
    xx, yy = np.meshgrid(grid, grid, indexing="ij")
    log_p = log_density(name, np.stack([xx.ravel(), yy.ravel()], axis=1))
    inside = np.isfinite(log_p)
    return float(-np.sum(np.exp(log_p[inside]) * log_p[inside]) * step * step)


def main(num_samples: int = 1_000_000) -> str:
    rows = [
        "| data set | entropy (nats) | SE | reference (issue) | (ours - ref) / SE | s "
        "| grid quadrature | (MC - grid) / SE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    literal = []
    total = time.perf_counter()
    for name in TOY_DATASETS:
        start = time.perf_counter()
        value, se = entropy(name, num_samples=num_samples, seed=0)
        seconds = time.perf_counter() - start
        ref, ref_se = REFERENCE[name]
        ref_text = f"{ref:.3f} ({ref_se:.3f})" if ref_se is not None else f"{ref:.3f} (exact)"
        combined = math.hypot(se, ref_se or 0.0)
        # The reference is rounded to 3 decimals: add its rounding error (uniform, sd 0.0003).
        combined = math.hypot(combined, 0.0005 / math.sqrt(3.0))
        z = (value - ref) / combined
        se_text = f"{se:.4f}" if se > 0 else "exact"
        grid = grid_entropy(name)
        z_grid = (value - grid) / se if se > 0 else 0.0
        rows.append(
            f"| {name} | {value:.4f} | {se_text} | {ref_text} | {z:+.1f} | {seconds:.1f} "
            f"| {grid:.5f} | {z_grid:+.1f} |"
        )
        literal.append(f'    "{name}": ({value:.5f}, {se:.5f}),')
    elapsed = time.perf_counter() - total
    table = "\n".join(rows)
    text = (
        "# Toy-data entropies\n\n"
        f"`python benchmarks/toy_entropy.py`: Monte Carlo `-mean log p(x)` over {num_samples:,} "
        "samples (seed 0) of `flows.data.toy.sample_toy` with the exact densities of "
        "`flows.data.entropy`; checkerboard is `ln 32` exactly. SE is the Monte Carlo standard "
        "error; the difference column divides by the combined SE (ours, the reference's and its "
        "3-decimal rounding). The grid column is an independent deterministic check, "
        "`-sum p log p h^2` over midpoints of [-7, 7]^2 with h = 1/32 (converged to about 1e-7: "
        f"h = 1/16 agrees). Total {elapsed:.0f} s on this machine.\n\n{table}\n\n"
        "For `flows.data.entropy.TOY_ENTROPY`:\n\n```python\n" + "\n".join(literal) + "\n```\n"
    )
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(text)
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("num_samples", type=int, nargs="?", default=1_000_000)
    print(main(parser.parse_args().num_samples))
