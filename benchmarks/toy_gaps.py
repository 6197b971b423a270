"""Gap to the entropy of the defaults, through the real command line.

Runs ``python -m flows.train model=M data=D seed=S`` for every combination asked for, one
at a time (the machine has 2 cores), and writes a table of steps, wall time, test NLL with
its standard error, the data's entropy and the gap to ``benchmarks/results/toy_gaps.md`` (rows
in ``toy_gaps.json``; a new run replaces the row of the same model, data and seed, the
others stay). ``command s`` is the whole command, start-up, compiling and the test pass
included: what the 5-minute budget of a default run is about.

    python benchmarks/toy_gaps.py --models realnvp iresnet --data moons 8gaussians checkerboard
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(model: str, data: str, seed: int, extra: list[str], folder: Path) -> dict:
    run_dir = folder / f"{model}-{data}-{seed}"
    command = [sys.executable, "-m", "flows.train", f"model={model}", f"data={data}",
               f"seed={seed}", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false",
               *extra]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    results = json.loads((run_dir / "results.json").read_text())
    return results | {"command_s": time.perf_counter() - start,
                      "command": " ".join(["python -m flows.train", *command[3:6], *extra])}


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"  # rows from before command_s was timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["realnvp", "iresnet"])
    parser.add_argument("--data", nargs="+", default=["moons", "8gaussians", "checkerboard"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/toy_gaps.md")
    parser.add_argument("--keep", type=Path, default=None, help="keep run folders here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()

    folder = args.keep or Path(tempfile.mkdtemp(prefix="toy_gaps-"))
    store = args.out.with_suffix(".json")
    rows = json.loads(store.read_text()) if store.exists() else []
    for model in args.models:
        for data in args.data:
            for seed in args.seeds:
                r = train(model, data, seed, args.overrides, folder)
                row = {key: r[key] for key in ("model", "data", "seed", "train_steps", "wall_s",
                                               "command_s", "test_nll", "test_nll_se",
                                               "entropy", "gap", "command")}
                row["date"] = date.today().isoformat()
                rows = [old for old in rows
                        if (old["model"], old["data"], old["seed"]) != (model, data, seed)]
                rows.append(row)
                print(row, flush=True)
                store.write_text(json.dumps(rows, indent=1) + "\n")
    rows.sort(key=lambda r: (r["model"], r["data"], r["seed"]))
    lines = ["| model | data | seed | steps | fit s | command s | test NLL (SE) | entropy | gap "
             "| date |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['data']} | {r['seed']} | {r['train_steps']} | "
              f"{r['wall_s']:.0f} | {_seconds(r['command_s'])} | {r['test_nll']:.3f} "
              f"({r['test_nll_se']:.3f}) | {r['entropy']:.3f} | {r['gap']:.3f} | {r['date']} |"
              for r in rows]
    header = ("Gaps to the entropy of the defaults (test NLL minus entropy, nats), "
              "`python -m flows.train model=M data=D seed=S` through `benchmarks/toy_gaps.py`, "
              "one run at a time on 2 CPU cores. fit s: `trainer.fit` (training, validations, "
              "periodic plots, checkpoints); command s: the whole command (start-up, compiling, "
              "the test pass).\n\n"
              f"Latest command: `python benchmarks/toy_gaps.py {' '.join(sys.argv[1:])}`\n\n")
    args.out.write_text(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
