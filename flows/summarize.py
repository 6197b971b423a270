"""Collect runs into one table: ``python -m flows.summarize dir=outputs/multirun/<time>``.

Finds every ``results.json`` under ``dir`` (a Hydra multirun folder, or ``outputs/``), writes
``summary.csv`` (one row per run) and ``summary.md`` (the same, plus the mean and standard
deviation over seeds of each model x data) into ``dir``, and prints the Markdown.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from collections import defaultdict
from pathlib import Path

import hydra
from omegaconf import DictConfig

from flows.cli import user_errors

log = logging.getLogger("flows")

COLUMNS = ("run", "model", "data", "seed", "status", "train_steps", "test_nll", "test_nll_se",
           "gap", "wall_s")


def collect(folder: Path) -> list[dict]:
    """One row per ``results.json`` under ``folder``, sorted by run folder."""
    if not folder.is_dir():
        raise NotADirectoryError(f"dir={folder} is not a folder; give a multirun folder")
    rows = []
    for path in sorted(folder.rglob("results.json")):
        results = json.loads(path.read_text())
        rows.append({"run": str(path.parent.relative_to(folder)) or ".",
                     **{key: results.get(key) for key in COLUMNS[1:]}})
    if not rows:
        raise FileNotFoundError(f"no results.json under {folder}")
    return rows


def _cell(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        if row["test_nll"] is not None:
            groups[(row["model"], row["data"])].append(row["test_nll"])
    lines += ["", "| model | data | runs | test NLL mean | sd over runs |",
              "|---|---|---|---|---|"]
    for (model, data), values in sorted(groups.items()):
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        lines.append(f"| {model} | {data} | {len(values)} | {statistics.fmean(values):.4f} | "
                     f"{spread:.4f} |")
    return "\n".join(lines) + "\n"


def summarize(folder: Path) -> str:
    rows = collect(folder)
    with open(folder / "summary.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    (folder / "summary.md").write_text(table)
    return table


@hydra.main(version_base="1.3", config_path="../conf", config_name="summarize")
def main(cfg: DictConfig) -> None:
    with user_errors():
        print(summarize(Path(cfg.dir)), end="")


if __name__ == "__main__":
    main()
