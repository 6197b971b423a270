"""Gap to the entropy of the defaults, through the real command line.

Runs ``python -m flows.train model=M data=D seed=S`` for every combination asked for, one
at a time (the machine has 2 cores), and writes a table of steps, wall time, test NLL with
its standard error, the data's entropy and the gap to ``benchmarks/results/toy_gaps.md`` (rows
in ``toy_gaps.json``; a new run replaces the row of the same model, data, seed and extra
overrides, the others stay, so a variant's rows sit beside the default's). ``command s``
is the whole command, start-up, compiling and the test pass included: what the 5-minute
budget of a default run is about.

    python benchmarks/toy_gaps.py --models realnvp iresnet --data moons 8gaussians checkerboard
    python benchmarks/toy_gaps.py model.log_scale_clamp=3.0 --models realnvp --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from commands import run_command

ROOT = Path(__file__).resolve().parents[1]


def train(model: str, data: str, seed: int, extra: list[str], folder: Path) -> dict:
    run_dir = folder / f"{model}-{data}-{seed}"
    command = [sys.executable, "-m", "flows.train", f"model={model}", f"data={data}",
               f"seed={seed}", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false",
               *extra]
    start = time.perf_counter()
    run_command(command, ROOT)
    results = json.loads((run_dir / "results.json").read_text())
    return results | {"command_s": time.perf_counter() - start, "overrides": " ".join(extra),
                      "command": " ".join(["python -m flows.train", *command[3:6], *extra])}


def _key(row: dict) -> tuple:
    """A row's identity: model, data, overrides (none in rows from before they were kept), seed."""
    return row["model"], row["data"], row.get("overrides", ""), row["seed"]


def _overrides(row: dict) -> str:
    """The row's overrides, with its note (how a relabelled row was run) in brackets."""
    note = f" ({row['note']})" if row.get("note") else ""
    return row.get("overrides", "") + note


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"  # rows from before command_s was timed


def write_table(rows: list[dict], out: Path, arguments: str) -> None:
    """The Markdown table of every stored row, headed by the toy_gaps arguments last run."""
    rows = sorted(rows, key=_key)
    lines = ["| model | data | overrides | seed | steps | fit s | command s | test NLL (SE) | "
             "entropy | gap | date |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['data']} | {_overrides(r)} | {r['seed']} | "
              f"{r['train_steps']} | "
              f"{r['wall_s']:.0f} | {_seconds(r['command_s'])} | {r['test_nll']:.3f} "
              f"({r['test_nll_se']:.3f}) | {r['entropy']:.3f} | {r['gap']:.3f} | {r['date']} |"
              for r in rows]
    header = ("Gaps to the entropy of the defaults (test NLL minus entropy, nats), "
              "`python -m flows.train model=M data=D seed=S` through `benchmarks/toy_gaps.py`, "
              "one run at a time on 2 CPU cores. fit s: `trainer.fit` (training, validations, "
              "periodic plots, checkpoints); command s: the whole command (start-up, compiling, "
              "the test pass).\n\n"
              f"Latest command: `python benchmarks/toy_gaps.py {arguments}`\n\n")
    out.write_text(header + "\n".join(lines) + "\n")


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
                row = {key: r[key] for key in ("model", "data", "seed", "overrides",
                                               "train_steps", "wall_s", "command_s",
                                               "test_nll", "test_nll_se", "entropy", "gap",
                                               "command")}
                row["date"] = date.today().isoformat()
                rows = [old for old in rows if _key(old) != _key(row)]
                rows.append(row)
                print(row, flush=True)
                store.write_text(json.dumps(rows, indent=1) + "\n")
    write_table(rows, args.out, " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
