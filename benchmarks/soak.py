"""Soak test: a long training run watched from outside for memory growth, checkpoint pile-up
and slowing steps.

Runs ``python -m flows.train`` (default: Real NVP on moons, constant learning rate, a
checkpoint about every minute) for ``--minutes`` and samples every ``--every`` seconds: the
process's resident memory (``/proc/<pid>/status``), the number and total size of the files in
``checkpoints/``, and the training step reached (from the CSV log). Writes a table and a
verdict to ``benchmarks/results/soak.md``.

    python benchmarks/soak.py --minutes 30
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def last_logged_step(run_dir: Path) -> int:
    step = 0
    for path in run_dir.glob("csv/version_*/metrics.csv"):
        with open(path) as file:
            for row in csv.DictReader(file):
                step = max(step, int(row["step"]))
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--every", type=float, default=60.0, help="seconds between samples")
    parser.add_argument("--checkpoint-steps", type=int, default=4000,
                        help="last.ckpt period in steps (about a minute of Real NVP here)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/soak.md")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()

    run_dir = Path(tempfile.mkdtemp(prefix="soak-")) / "run"
    seconds = int(args.minutes * 60)
    command = [sys.executable, "-m", "flows.train", "scheduler=constant", "trainer.max_steps=-1",
               f"+trainer.max_time=00:00:{seconds // 60:02d}:{seconds % 60:02d}",
               f"callbacks.last_checkpoint.every_n_train_steps={args.checkpoint_steps}",
               "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", *args.overrides]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    samples = []
    while process.poll() is None:
        time.sleep(args.every)
        if process.poll() is not None:
            break
        files = list((run_dir / "checkpoints").glob("*.ckpt"))
        samples.append({
            "minute": (time.monotonic() - start) / 60,
            "rss_mb": resident_mb(process.pid),
            "checkpoints": len(files),
            "checkpoint_mb": sum(f.stat().st_size for f in files) / 2**20,
            "step": last_logged_step(run_dir),
        })
        print(samples[-1], flush=True)
    stderr = process.stderr.read() if process.stderr else ""
    if process.returncode != 0:
        raise SystemExit(f"training failed ({process.returncode}):\n{stderr[-3000:]}")

    rows = ["| minute | resident MB | checkpoints | checkpoint MB | step | steps/s since last |",
            "|---|---|---|---|---|---|"]
    rates = []
    for previous, sample in zip([None, *samples], samples, strict=False):
        rate = ""
        if previous is not None:
            seconds_between = (sample["minute"] - previous["minute"]) * 60
            rates.append((sample["step"] - previous["step"]) / seconds_between)
            rate = f"{rates[-1]:.1f}"
        rows.append(f"| {sample['minute']:.1f} | {sample['rss_mb']:.0f} | "
                    f"{sample['checkpoints']} | {sample['checkpoint_mb']:.2f} | "
                    f"{sample['step']} | {rate} |")
    quarter = max(1, len(samples) // 4)
    early, late = samples[1: 1 + quarter] or samples[:1], samples[-quarter:]
    rss_growth = (sum(s["rss_mb"] for s in late) / len(late)
                  - sum(s["rss_mb"] for s in early) / len(early))
    first_rate = sum(rates[:quarter]) / quarter if rates else 0.0
    speed = (f"{(sum(rates[-quarter:]) / len(rates[-quarter:])) / first_rate:.3f}"
             if first_rate > 0 else "not measured (no steps logged in the first quarter; run "
             "longer)")
    verdict = (f"Resident memory, last quarter minus second-to-(quarter+1)th sample: "
               f"{rss_growth:+.1f} MB. Steps per second, last quarter / first quarter: "
               f"{speed}. Checkpoint files at the end: {samples[-1]['checkpoints']} "
               f"({samples[-1]['checkpoint_mb']:.2f} MB), at most "
               f"{max(s['checkpoints'] for s in samples)} at any sample.")
    training = " ".join(command[1:]).replace(str(run_dir), "<run>")
    header = (f"Command: `python benchmarks/soak.py {' '.join(sys.argv[1:])}` "
              f"({time.strftime('%Y-%m-%d')}, 2 CPU cores)\n\nTraining command: "
              f"`python {training}`\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "\n".join(rows) + "\n\n" + verdict + "\n")
    print(verdict)


if __name__ == "__main__":
    main()
