"""Case 1's ceiling: achieved FLOP rate of a Real NVP 2-D training step against the matmul rate.

    python benchmarks/profile_realnvp.py [--threads 2]

The step of ``compare_peers.py`` case 1 (8 affine couplings, conditioners 1-128-128-2, batch
512, fused Adam): its matrix-multiply FLOPs counted from the layer shapes (forward ``2 B n_in
n_out`` per linear; backward twice that, less the input gradient of the first layer, which
nothing needs), the step time eager and compiled, the machine's measured float32 matmul rate at
the step's own shapes and at 2048^3, and ``torch.profiler``'s top operators of the fastest
step, ``compile_step``'s one graph (``CompiledAdamStep``: loss, gradient and Adam update;
its thin first and last layers are fused products, not matmul calls: ``ThinLinear``).
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
from compare_peers import machine_line, machine_stamp
from torch.profiler import ProfilerActivity, profile

from flows.compiled_step import CompiledAdamStep
from flows.models.realnvp import RealNVP

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, LAYERS = 512, 8
SHAPES = [(1, 128), (128, 128), (128, 2)]  # (n_in, n_out) of each conditioner linear


def matmul_flops_per_step() -> int:
    forward = sum(2 * BATCH * n_in * n_out for n_in, n_out in SHAPES)
    first_input_grad = 2 * BATCH * SHAPES[0][0] * SHAPES[0][1]
    return LAYERS * (3 * forward - first_input_grad)


def training_step(flow: RealNVP, x: torch.Tensor) -> Callable[[], None]:
    """One forward, backward and fused-Adam step of ``flow`` on ``x``, warmed up."""
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3, fused=True)

    def step() -> None:
        loss = -flow.log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    return step


def compiled_adam_step(flow: RealNVP, x: torch.Tensor) -> Callable[[], None]:
    """The same step by ``flows.compiled_step.CompiledAdamStep`` (``compile_step=true``):
    loss, gradient and Adam update in one compiled graph, warmed up."""
    step = CompiledAdamStep(flow, torch.optim.Adam(flow.parameters(), lr=1e-3, fused=True))
    for _ in range(5):
        step(x)
    return lambda: step(x)


def wide_products() -> Callable[[], None]:
    """The 24 wide products of a step: per coupling the forward ``(B, 128) @ (128, 128)``,
    the input gradient ``(B, 128) @ (128, 128)`` and the weight gradient
    ``(128, B) @ (B, 128)``."""
    h, g, w = torch.randn(BATCH, 128), torch.randn(BATCH, 128), torch.randn(128, 128)

    def products() -> None:
        for _ in range(LAYERS):
            h @ w
            g @ w
            g.t() @ h
    return products


def interleaved_ms(fns: dict[str, Callable[[], None]], rounds: int = 9,
                   reps: int = 30) -> dict[str, float]:
    """Median ms per call over rounds; every function runs once in each round, so a change
    in the machine's speed during the run shifts them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            times[name].append(1000 * (time.perf_counter() - start) / reps)
    return {name: float(np.median(t)) for name, t in times.items()}


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
    machine = machine_stamp(args.threads, torch.device("cpu"))
    flops = matmul_flops_per_step()
    one_graph = compiled_adam_step(RealNVP(2), x)
    ms = interleaved_ms({"eager": training_step(RealNVP(2), x),
                         "compiled": training_step(RealNVP(2, compile=True), x),
                         "one graph": one_graph, "wide": wide_products()})
    eager_ms, compiled_ms, one_ms, wide_ms = (ms[k] for k in ("eager", "compiled",
                                                             "one graph", "wide"))
    rates = {f"{m}x{k} @ {k}x{n}": matmul_gflops(m, k, n)
             for m, k, n in ((BATCH, 128, 128), (BATCH, 1, 128), (BATCH, 128, 2),
                             (2048, 2048, 2048))}
    # the matmuls alone, at their measured rates: the time a step cannot go below in float32
    floor_ms = 1000 * LAYERS * 3 * sum(
        2 * BATCH * n_in * n_out / (rates[f"{BATCH}x{n_in} @ {n_in}x{n_out}"] * 1e9)
        for n_in, n_out in SHAPES)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            one_graph()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                      max_name_column_width=40)
    lines = [
        f"# Real NVP 2-D step (case 1): FLOP rate and profile ({date.today()})", "",
        f"torch {torch.__version__}; `python benchmarks/profile_realnvp.py`.", "",
        machine_line({"machines": {"run": machine}}, "run")[0], "",
        f"- matmul FLOPs per training step: {flops / 1e6:.0f} M",
        f"- step time (eager, compiled transform, compiled step and the 24 wide products "
        f"interleaved, median of 9 rounds of 30): eager {eager_ms:.2f} ms "
        f"({flops / eager_ms / 1e6:.0f} GFLOP/s achieved), compiled transform "
        f"{compiled_ms:.2f} ms ({flops / compiled_ms / 1e6:.0f} GFLOP/s), compiled step "
        f"(`compile_step=true`: one graph with the Adam update) {one_ms:.2f} ms "
        f"({flops / one_ms / 1e6:.0f} GFLOP/s, {one_ms / compiled_ms:.2f} of the compiled "
        f"transform's step)",
        "- measured float32 matmul rates (GFLOP/s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()),
        f"- the step's matmuls alone at those rates: {floor_ms:.2f} ms "
        f"({100 * floor_ms / eager_ms:.0f}% of the eager step, "
        f"{100 * floor_ms / one_ms:.0f}% of the compiled step); the 128x128 products "
        f"alone, all the compiled steps still multiply, timed in the same rounds: "
        f"{wide_ms:.2f} ms ({100 * wide_ms / one_ms:.0f}% of the compiled step)", "",
        "Top operators of 20 compiled steps (`compile_step`) by self CPU time "
        "(`torch.profiler`):", "", "```",
        table, "```", ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "profile_realnvp.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
