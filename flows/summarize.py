"""Collect runs into one table: ``python -m flows.summarize dir=outputs/multirun/<time>``.

Finds every ``results.json`` under ``dir`` (a Hydra multirun folder, or ``outputs/``), writes
``summary.csv`` (one row per run) and ``summary.md`` (the same, plus the mean and standard
deviation over seeds of each model x data x settings) into ``dir``, and prints the Markdown.
A run's settings are its command-line overrides (``.hydra/overrides.yaml``) other than model,
data, seed, name and ckpt_path: runs that differ in anything else are not averaged together.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import statistics
from collections import defaultdict
from pathlib import Path

import hydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from flows.cli import user_errors

log = logging.getLogger("flows")

COLUMNS = ("run", "model", "data", "seed", "status", "train_steps", "test_nll", "test_nll_se",
           "test_bpd", "gap", "wall_s", "settings")
# Overrides that pick or name a run rather than set it up: not part of its settings.
NOT_SETTINGS = ("model", "data", "seed", "name", "ckpt_path")


def settings(run: Path) -> str:
    """The run's overrides (``.hydra/overrides.yaml``) that set it up, as Hydra parses them
    (``=False`` and ``=false``, ``1e-3`` and ``0.001`` read alike), sorted, one string."""
    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    parsed = OverridesParser.create().parse_overrides([str(o) for o in OmegaConf.load(path)])
    return " ".join(sorted(
        override.get_key_element() if override.is_delete() else
        f"{override.get_key_element()}={override.get_value_element_as_str()}"
        for override in parsed
        if override.key_or_group not in NOT_SETTINGS and
        not override.key_or_group.startswith("hydra.")))


def _natural(path: Path) -> list:
    """Sort key: ``2-realnvp-moons`` before ``10-realnvp-moons``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def read_results(path: Path) -> dict:
    """A run's ``results.json``, or a ``ValueError`` naming the file."""
    try:
        results = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); fix or remove it") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path} holds a {type(results).__name__}, not a run's results "
                         f"(a JSON object); fix or remove it")
    return results


def collect(folder: Path) -> list[dict]:
    """One row per ``results.json`` under ``folder``, sorted by run folder (numbers by
    value)."""
    if not folder.is_dir():
        raise NotADirectoryError(f"dir={folder} is not a folder; give a multirun folder")
    rows = []
    for path in sorted(folder.rglob("results.json"), key=_natural):
        results = read_results(path)
        rows.append({"run": str(path.parent.relative_to(folder)) or ".",
                     **{key: results.get(key) for key in COLUMNS[1:-1]},
                     "settings": settings(path.parent)})
    if not rows:
        raise FileNotFoundError(f"no results.json under {folder}")
    return rows


def _cell(value: object) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _mean_and_sd(values: list[float]) -> str:
    if not values:
        return " | "
    spread = f"{statistics.stdev(values):.4f}" if len(values) > 1 else ""  # one run: none
    return f"{statistics.fmean(values):.4f} | {spread}"


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["test_nll"] is not None:
            groups[(row["model"], row["data"], row["settings"])].append(row)
    lines += ["", "| model | data | runs | test NLL mean | sd over runs | test bpd mean | "
              "sd over runs | settings |", "|---|---|---|---|---|---|---|---|"]
    for (model, data, setup), group in sorted(groups.items()):
        nll = [row["test_nll"] for row in group]
        bpd = [row["test_bpd"] for row in group if row["test_bpd"] is not None]
        lines.append(f"| {model} | {data} | {len(group)} | {_mean_and_sd(nll)} | "
                     f"{_mean_and_sd(bpd)} | {setup} |")
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
