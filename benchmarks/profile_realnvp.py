"""Case 1's ceiling: achieved FLOP rate of a Real NVP 2-D training step against the matmul rate.

    python benchmarks/profile_realnvp.py [--threads 2]

The step of ``compare_peers.py`` case 1 (8 affine couplings, conditioners 1-128-128-2, batch
512, fused Adam): its matrix-multiply FLOPs counted from the layer shapes (forward ``2 B n_in
n_out`` per linear; backward twice that, less the input gradient of the first layer, which
nothing needs), the step time eager and compiled, the machine's measured float32 matmul rate at
the step's own shapes and at 2048^3, and ``torch.profiler``'s top operators of the compiled step
(whose thin first and last layers are fused products, not matmul calls: ``ThinLinear``).
Writes ``benchmarks/results/profile_realnvp.md``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from flows.models.realnvp import RealNVP

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, LAYERS = 512, 8
SHAPES = [(1, 128), (128, 128), (128, 2)]  # (n_in, n_out) of each conditioner linear


def matmul_flops_per_step() -> int:
    forward = sum(2 * BATCH * n_in * n_out for n_in, n_out in SHAPES)
    first_input_grad = 2 * BATCH * SHAPES[0][0] * SHAPES[0][1]
    return LAYERS * (3 * forward - first_input_grad)


def step_ms(flow: RealNVP, x: torch.Tensor, rounds: int = 7,
            steps: int = 50) -> tuple[float, Callable[[], None]]:
    """Median ms per training step over rounds, and the step itself."""
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3, fused=True)

    def step() -> None:
        loss = -flow.log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append(1000 * (time.perf_counter() - start) / steps)
    return float(np.median(times)), step


def matmul_gflops(m: int, k: int, n: int, seconds: float = 1.0) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(10):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(BATCH, 2)
    flops = matmul_flops_per_step()
    eager_ms, _ = step_ms(RealNVP(2), x)
    compiled_ms, compiled_step = step_ms(RealNVP(2, compile=True), x)
    rates = {f"{m}x{k} @ {k}x{n}": matmul_gflops(m, k, n)
             for m, k, n in ((BATCH, 128, 128), (BATCH, 1, 128), (BATCH, 128, 2),
                             (2048, 2048, 2048))}
    # the matmuls alone, at their measured rates: the time a step cannot go below in float32
    floor_ms = 1000 * LAYERS * 3 * sum(
        2 * BATCH * n_in * n_out / (rates[f"{BATCH}x{n_in} @ {n_in}x{n_out}"] * 1e9)
        for n_in, n_out in SHAPES)
    wide_ms = 1000 * LAYERS * 3 * 2 * BATCH * 128 * 128 / (rates[f"{BATCH}x128 @ 128x128"] * 1e9)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            compiled_step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                      max_name_column_width=40)
    lines = [
        f"# Real NVP 2-D step (case 1): FLOP rate and profile ({date.today()})", "",
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; "
        f"`python benchmarks/profile_realnvp.py`.", "",
        f"- matmul FLOPs per training step: {flops / 1e6:.0f} M",
        f"- step time: eager {eager_ms:.2f} ms ({flops / eager_ms / 1e6:.0f} GFLOP/s achieved), "
        f"compiled {compiled_ms:.2f} ms ({flops / compiled_ms / 1e6:.0f} GFLOP/s)",
        "- measured float32 matmul rates (GFLOP/s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()),
        f"- the step's matmuls alone at those rates: {floor_ms:.2f} ms "
        f"({100 * floor_ms / eager_ms:.0f}% of the eager step, "
        f"{100 * floor_ms / compiled_ms:.0f}% of the compiled one); the 128x128 products "
        f"alone, all the compiled step still multiplies: {wide_ms:.2f} ms "
        f"({100 * wide_ms / compiled_ms:.0f}% of it)", "",
        "Top operators of 20 compiled steps by self CPU time (`torch.profiler`):", "", "```",
        table, "```", ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "profile_realnvp.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
