"""How far training-mode spectral normalisation trails the weights, and what closing it costs.

In training mode each forward takes ``n_power_iterations`` power-iteration steps from the
vectors the last forward left, so while Adam moves the weights ``sigma_hat`` trails the true
``sigma`` and a normalised weight can exceed ``c``. ``power_iteration_tol`` (like Residual
Flows' ``--sn-tol``) continues until the singular vectors stop moving; ``training_svd`` takes
them from the SVD. This trains the configs' i-ResNets (``conf/``, eagerly, Adam at the config's
rate held constant: no warm-up or decay, the fastest the weights move) on batches of the real
data, all variants of a case in lockstep (one step of each in turn, so the timings share the
machine's state), and after every ``--every``-th training forward measures, for every
normalised weight, ``sigma(W_hat) / c`` with the ``sigma_hat`` that forward used and the exact
``sigma`` (float64 SVD for a matrix, the power iteration from a fixed random start to 1e-6 for
a conv operator), and for every residual block the product of its layers' ``sigma(W_hat)``: the
Lipschitz bound of ``g`` in force (1-Lipschitz activations), which must stay below 1 for the
block to be a contraction.

    python benchmarks/spectral_lag.py --steps 1000
    python benchmarks/spectral_lag.py --cases digits --steps 300 --every 10

Writes ``benchmarks/results/spectral_lag.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from flows.data.images import dequantize, load_digits
from flows.data.toy import sample_toy
from flows.nn.lipschitz import _spectral_parametrizations
from flows.nn.lipschitz_conv import ConvSpectralNormalization, conv_operator_norm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass
class Case:
    """A model config, its data and the variants (model overrides) compared on it."""

    overrides: list[str]
    data: str
    lr: float
    variants: dict[str, list[str]]
    batch_size: int = field(default=0)  # 0: the config's


CASES = {
    "moons": Case(["model=iresnet", "data=moons", "model.compile=false"], "moons", 0.0, {
        "1 step (default)": [],
        "5 steps": ["model.n_power_iterations=5"],
        "tol 1e-3": ["model.power_iteration_tol=1e-3"],
        "svd": ["model.training_svd=true"],
    }),
    # the review's case: c = 0.99 at lr 1e-2, wide LipSwish blocks, heavy-tailed data
    "heavy-tailed": Case(["model=iresnet", "data=moons", "model.compile=false",
                          "model.num_blocks=4", "model.hidden_features=128",
                          "model.activation=lipswish"], "student-t", 1e-2, {
        "1 step (default)": [],
        "5 steps": ["model.n_power_iterations=5"],
        "tol 1e-3": ["model.power_iteration_tol=1e-3"],
        "tol 1e-4": ["model.power_iteration_tol=1e-4"],
        "svd": ["model.training_svd=true"],
    }),
    "digits": Case(["model=iresnet", "data=digits", "model.compile=false"], "digits", 0.0, {
        "5 steps (default)": [],
        "1 step": ["model.n_power_iterations=1"],
        "tol 1e-3": ["model.power_iteration_tol=1e-3"],
    }),
}


def build(overrides: list[str]) -> tuple[torch.nn.Module, float, int]:
    """The flow of the composed config, its learning rate and batch size."""
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(0)
    return instantiate(cfg.model), float(cfg.optim.lr), int(cfg.data.batch_size)


def batches(data: str, batch_size: int, generator: torch.Generator):
    """An endless stream of training batches."""
    if data == "digits":
        levels = load_digits()
        while True:
            index = torch.randint(len(levels), (batch_size,), generator=generator)
            yield dequantize(levels[index], 17, generator)
    rng = np.random.default_rng(0)
    while True:
        if data == "student-t":  # 2 degrees of freedom: infinite variance
            yield torch.from_numpy(rng.standard_t(2.0, (batch_size, 2))).float()
        else:
            yield torch.from_numpy(sample_toy(data, batch_size, rng)).float()


def exact_sigma(normalization: torch.nn.Module, weight: torch.Tensor) -> float:
    if isinstance(normalization, ConvSpectralNormalization):
        return conv_operator_norm(normalization, weight)
    return float(torch.linalg.matrix_norm(weight.double(), 2))


@torch.no_grad()
def measure(flow: torch.nn.Module) -> tuple[list[float], list[float], list[int]]:
    """Every normalised weight's ``sigma(W_hat) / c``, every block's bound, the power steps."""
    ratios, steps, by_block = [], [], {}
    for name, normalization, weight in _spectral_parametrizations(flow):
        scale = max(1.0, float(normalization.sigma(weight)) / normalization.coeff)
        normalised = exact_sigma(normalization, weight) / scale
        ratios.append(normalised / normalization.coeff)
        steps.append(normalization.last_power_iterations)
        block = name.rsplit(".", 3)[0]  # "<block>.net.<linears|convs>.<i>.weight" -> block
        by_block[block] = by_block.get(block, 1.0) * normalised
    return ratios, list(by_block.values()), steps


def run_case(name: str, case: Case, steps: int, every: int) -> list[dict]:
    variants = {}
    for label, extra in case.variants.items():
        flow, lr, batch_size = build(case.overrides + extra)
        lr = case.lr or lr
        variants[label] = {
            "flow": flow.train(), "optimizer": torch.optim.Adam(flow.parameters(), lr=lr),
            "data": batches(case.data, batch_size, torch.Generator().manual_seed(0)),
            "seconds": 0.0, "ratios": [], "bounds": [], "steps": [], "nonfinite": 0, "lr": lr,
            "batch_size": batch_size}
    for step in range(steps):
        for state in variants.values():
            x = next(state["data"])
            start = time.perf_counter()
            loss = -state["flow"].log_prob(x).mean()
            elapsed = time.perf_counter() - start
            if step % every == 0:
                # the weights and vectors this forward used, before the optimizer moves them
                ratios, bounds, power_steps = measure(state["flow"])
                state["ratios"] += ratios
                state["bounds"] += bounds
                state["steps"] += power_steps
            start = time.perf_counter()
            finite = bool(torch.isfinite(loss))
            state["optimizer"].zero_grad()
            if finite:
                loss.backward()
                state["optimizer"].step()
            state["seconds"] += elapsed + time.perf_counter() - start
            state["nonfinite"] += not finite
    base = next(iter(variants.values()))["seconds"]
    rows = []
    for label, state in variants.items():
        ratios = np.array(state["ratios"])
        rows.append({
            "case": name, "variant": label, "lr": state["lr"], "batch": state["batch_size"],
            "max_ratio": float(ratios.max()), "p99_ratio": float(np.quantile(ratios, 0.99)),
            "share_above_1.001": float((ratios > 1.001).mean()),
            "max_block_bound": float(max(state["bounds"])),
            "mean_power_steps": float(np.mean(state["steps"])),
            "ms_per_step": 1000 * state["seconds"] / steps,
            "time_ratio": state["seconds"] / base, "nonfinite_losses": state["nonfinite"],
        })
        print(rows[-1], flush=True)
    return rows


def write(rows: list[dict], command: str) -> None:
    """The rows into ``spectral_lag.json``, replacing the stored rows of the same cases, and
    the table of all stored rows into ``spectral_lag.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "spectral_lag.json"
    cases = {r["case"] for r in rows}
    kept = [r for r in json.loads(store.read_text()) if r["case"] not in cases] \
        if store.exists() else []
    run = {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "command": command}
    rows = kept + [r | run for r in rows]
    store.write_text(json.dumps(rows, indent=1))
    lines = [
        "Each row's run: the date, machine, threads and command in `spectral_lag.json`. Time "
        "ratios compare the variants of one case, run in lockstep.", "",
        "| case | variant | lr | max sigma(W_hat)/c | 99th pct | share > 1.001 | "
        "max block bound | power steps | ms/step | time ratio | non-finite losses |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['variant']} | {r['lr']:g} | {r['max_ratio']:.4f} | "
            f"{r['p99_ratio']:.4f} | {r['share_above_1.001']:.3f} | {r['max_block_bound']:.3f} | "
            f"{r['mean_power_steps']:.1f} | {r['ms_per_step']:.1f} | {r['time_ratio']:.2f} | "
            f"{r['nonfinite_losses']} |")
    (RESULTS / "spectral_lag.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=1, help="measure every n-th step")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.cases:
        rows += run_case(name, CASES[name], args.steps, args.every)
    command = "python " + " ".join(sys.argv)
    write(rows, command)


if __name__ == "__main__":
    main()
