"""Digits bits/dim after a fixed wall-clock budget of CPU training, flows beside normflows.

    python benchmarks/digits_bpd.py --minutes 5 --seeds 0 [--models realnvp glow iresnet]
        [--peer]   # also normflows' Glow (pip install -e ".[bench]"; only for benchmarks)

Each flows model trains through its default command, ``python -m flows.train data=digits
model=<m>``, with ``trainer.max_time=<budget>`` as a cap (the defaults' step counts fit in 5
minutes here); the test bits/dim is that of the best checkpoint by validation NLL over the 297
test images (``results.json``). normflows' Glow
(2 levels x 8 GlowBlocks, 64 hidden channels, the size of its Glow example, unconditional,
learned diagonal Gaussian bases) trains in this process for the same budget on the same
training images and dequantisation scheme, validates every 250 steps and reports the test
bits/dim of its best validation state. Results go to ``benchmarks/results/digits_bpd.md`` and
``.json``; rows of earlier runs stay unless the same library, model, seed and budget
(``--minutes``) run again (the step times of one run are interleaved only among the models it
runs). Run with nothing else on the machine: it measures what a wall-clock budget buys.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
from commands import run_command
from peer_models import flows_image_model, normflows_glow

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run_flows(model: str, seed: int, minutes: float) -> dict:
    name = f"bench-{time.strftime('%Y%m%d-%H%M%S')}-s{seed}"
    budget = int(round(60 * minutes))
    max_time = f"00:{budget // 3600:02d}:{budget // 60 % 60:02d}:{budget % 60:02d}"
    command = [sys.executable, "-m", "flows.train", "data=digits", f"model={model}",
               f"seed={seed}", f"name={name}",
               f"++trainer.max_time={max_time}", "trainer.enable_progress_bar=false"]
    start = time.perf_counter()
    run_command(command, ROOT)
    total = time.perf_counter() - start
    run = ROOT / "outputs" / f"{model}-digits" / name
    results = json.loads((run / "results.json").read_text())
    evaluation = {}
    if model == "iresnet":  # the stated-accuracy estimate: bias < 1e-4, Monte Carlo SE < 1e-3
        out = run / "evaluation" / "benchmark.json"
        run_command([sys.executable, "-m", "flows.evaluate", f"ckpt={run}", f"out={out}"], ROOT)
        evaluation = json.loads(out.read_text())
        results.update(test_bpd=evaluation["bpd"], test_bpd_se=evaluation["bpd_se"])
        evaluation = {"series_estimate": evaluation["series_estimate"]}
    return evaluation | {
            "library": "flows", "model": model, "seed": seed, "steps": results["train_steps"],
            "fit_s": results["wall_s"], "command_s": round(total, 1),
            "ms_per_step": 1000 * results["wall_s"] / results["train_steps"],
            "test_bpd": results["test_bpd"], "test_bpd_se": results["test_bpd_se"],
            "params": results["num_params"], "run": str(run.relative_to(ROOT)),
            "command": "python -m flows.train " + " ".join(command[3:])}


def run_normflows(seed: int, minutes: float) -> dict:
    from flows.data.datamodules import ImageDataModule
    from flows.data.images import dequantize
    from flows.metrics import bits_per_dim

    data = ImageDataModule("digits", [1, 8, 8], num_val=150, seed=seed)
    data.setup()
    torch.manual_seed(seed)
    model = normflows_glow((1, 8, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    train, levels = data.splits["train"], data.num_levels
    dims = 64

    def bpd(split: str) -> float:
        model.eval()
        with torch.no_grad():
            nll = -model.log_prob(data.splits[split], None).mean().item()
        value = bits_per_dim(nll, dims, levels)
        model.train()
        return value

    generator = torch.Generator().manual_seed(seed)
    best = (math.inf, None)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 60 * minutes:
        batch = train[torch.randint(len(train), (64,), generator=generator)]
        loss = -model.log_prob(dequantize(batch, levels, generator), None).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        if steps % 250 == 0:
            value = bpd("val")
            if value < best[0]:
                best = (value, {k: v.clone() for k, v in model.state_dict().items()})
    fit = time.perf_counter() - start
    final = bpd("test")
    if best[1] is not None:
        model.load_state_dict(best[1])
    return {"library": "normflows", "model": "Glow 2x8, 64 ch", "seed": seed, "steps": steps,
            "fit_s": round(fit, 1), "ms_per_step": 1000 * fit / steps,
            "test_bpd": bpd("test"), "final_test_bpd": final,
            "params": sum(p.numel() for p in model.parameters())}


def histogram_bpd() -> float:
    """Test bpd of independent per-pixel histograms of the training levels (add-1/2 counts):
    the baseline that any model of pixel dependencies must beat."""
    from flows.data.datamodules import ImageDataModule

    data = ImageDataModule("digits", [1, 8, 8], num_val=150)
    data.setup()
    levels = data.num_levels
    train = data.splits["train"].long().flatten(1)
    test = torch.floor(data.splits["test"] * levels).long().flatten(1)
    pixels = torch.arange(train.shape[1])
    counts = torch.stack([torch.bincount(column, minlength=levels) for column in train.T])
    probs = (counts + 0.5) / (counts + 0.5).sum(1, keepdim=True)
    return float(-torch.log2(probs[pixels, test]).mean())


def step_times(models: dict[str, torch.nn.Module], peer: set[str], rounds: int = 7,
               steps: int = 10) -> dict[str, float]:
    """Median ms per training step (forward, backward, Adam), models interleaved per round."""
    from flows.data.datamodules import ImageDataModule
    from flows.data.images import dequantize

    data = ImageDataModule("digits", [1, 8, 8], num_val=150)
    data.setup()
    generator = torch.Generator().manual_seed(0)
    batches = [dequantize(data.splits["train"][torch.randint(1350, (64,), generator=generator)],
                          17, generator) for _ in range(steps)]
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-4) for name, m in models.items()}

    def run(name: str) -> float:
        model = models[name]
        start = time.perf_counter()
        for batch in batches:
            log_prob = model.log_prob(batch, None) if name in peer else model.log_prob(batch)
            loss = -log_prob.mean()
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
        return 1000 * (time.perf_counter() - start) / steps

    for name in models:  # warm-up (and ActNorm's data-dependent initialisation)
        run(name)
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name in models:
            times[name].append(run(name))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def write(rows: list[dict], args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "digits_bpd.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# Digits bits/dim after a wall-clock budget of training",
        "",
        f"{date.today()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}. "
        f"Latest run: `python benchmarks/digits_bpd.py --minutes {args.minutes} --seeds "
        f"{' '.join(map(str, args.seeds))} --models {' '.join(args.models)}"
        f"{' --peer' if args.peer else ''}` (rows of earlier runs kept). 1,350 training, "
        f"150 validation, 297 test images, 17 levels; test bits/dim of the best checkpoint "
        f"by validation NLL (standard error over test images in brackets).",
        "",
        "| library | model | seed | minutes | params | steps | ms/step (fit) | ms/step (step) | "
        "test bpd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "ms_per_step" not in r:
            continue
        se = f" ({r['test_bpd_se']:.3f})" if "test_bpd_se" in r else ""
        extra = f", final {r['final_test_bpd']:.3f}" if "final_test_bpd" in r else ""
        pure = f"{r['step_ms']:.1f}" if "step_ms" in r else ""
        lines.append(f"| {r['library']} | {r['model']} | {r['seed']} | {r['minutes']:g} | "
                     f"{r['params']:,} | "
                     f"{r['steps']} | {r['ms_per_step']:.1f} | {pure} | "
                     f"{r['test_bpd']:.3f}{se}{extra} |")
    for r in rows:
        if "series_estimate" in r:
            e = r["series_estimate"]
            lines.append(f"\ni-ResNet seed {r['seed']}, test bpd by `flows.evaluate`: "
                         f"{e['num_terms']} series terms "
                         f"(truncation bias <= {e['truncation_bias_bound']:.1e} bits/dim), "
                         f"{e['passes']} passes of {e['probes_per_pass']} Hutchinson probes "
                         f"(Monte Carlo standard error {e['monte_carlo_se']:.1e} bits/dim).")
    lines.append(f"\nPer-pixel histograms of the training levels (add-1/2 counts): "
                 f"{histogram_bpd():.3f} test bpd.")
    lines += ["", "ms/step (fit): the whole fit time over the steps, validations and "
              "checkpoints included. ms/step (step): forward, backward and Adam step alone, "
              "batch 64, median of 7 rounds of 10 steps with every model interleaved in one "
              "process (`step_times`).", ""]
    lines += [f"- `{r['command']}`" for r in rows if "command" in r]
    (RESULTS / "digits_bpd.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--models", nargs="+", default=["realnvp", "glow", "iresnet"])
    parser.add_argument("--peer", action="store_true", help="also train normflows' Glow")
    args = parser.parse_args()
    models = {name: flows_image_model(name, "digits") for name in args.models}
    if args.peer:
        models["normflows"] = normflows_glow((1, 8, 8))
    step_ms = step_times(models, peer={"normflows"})
    print("ms per step:", step_ms, flush=True)
    path = RESULTS / "digits_bpd.json"
    rows = json.loads(path.read_text()) if path.exists() else []

    def add(row: dict) -> None:
        """Replace the stored row of the same library, model, seed and budget (a re-run)."""
        row = row | {"minutes": args.minutes}

        def key(r: dict) -> tuple:
            return r["library"], r["model"], r["seed"], r["minutes"]

        rows[:] = [r for r in rows if key(r) != key(row)] + [row]
        print(row, flush=True)
        write(sorted(rows, key=lambda r: r["seed"]), args)

    for seed in args.seeds:
        for model in args.models:
            add(run_flows(model, seed, args.minutes) | {"step_ms": step_ms[model]})
        if args.peer:
            add(run_normflows(seed, args.minutes) | {"step_ms": step_ms["normflows"]})


if __name__ == "__main__":
    main()
