"""Gap to the entropy of the defaults, through the real command line.

Runs ``python -m flows.train model=M data=D seed=S`` for every combination asked for, one
at a time (the machine has 2 cores), and writes a table of steps, wall time, test NLL with
its standard error, the data's entropy and the gap to ``benchmarks/results/toy_gaps.md``.

    python benchmarks/toy_gaps.py --models realnvp iresnet --data moons 8gaussians checkerboard
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(model: str, data: str, seed: int, extra: list[str], folder: Path) -> dict:
    run_dir = folder / f"{model}-{data}-{seed}"
    command = [sys.executable, "-m", "flows.train", f"model={model}", f"data={data}",
               f"seed={seed}", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false",
               *extra]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return json.loads((run_dir / "results.json").read_text())


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
    rows = ["| model | data | seed | steps | wall s | test NLL (SE) | entropy | gap |",
            "|---|---|---|---|---|---|---|---|"]
    for model in args.models:
        for data in args.data:
            for seed in args.seeds:
                r = train(model, data, seed, args.overrides, folder)
                rows.append(
                    f"| {model} | {data} | {seed} | {r['train_steps']} | {r['wall_s']:.0f} | "
                    f"{r['test_nll']:.3f} ({r['test_nll_se']:.3f}) | {r['entropy']:.3f} | "
                    f"{r['gap']:.3f} |"
                )
                print(rows[-1], flush=True)
    header = (f"Command: `python benchmarks/toy_gaps.py {' '.join(sys.argv[1:])}`\n"
              f"(2 CPU cores. wall s: `trainer.fit`, i.e. training, validation, periodic plots "
              f"and checkpoints; the whole command adds start-up and the test pass.)\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
