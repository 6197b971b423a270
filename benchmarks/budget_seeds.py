"""Is a gap in compare_peers' 60-s NLL signal or noise? The budget run over many seeds.

    python benchmarks/budget_seeds.py --sets checkerboard --seeds 0 1 2 3 4 5 6 7 8 9 \\
        --models "flows compiled" normflows zuko [--schedule constant]
    python benchmarks/budget_seeds.py --sets 8gaussians --models "flows compiled step" \\
        --reference "flows compiled step" --clamps 3 --schedule constant

The ``budget-decay`` protocol of ``compare_peers.py`` (Real NVP 2-D, the same batches and
test points per seed for every library, the learning rate decayed linearly to 0 over the
wall-clock budget, each run paying its own compilation), or with ``--schedule constant`` its
``budget`` protocol (Adam at 1e-3 throughout), for the models and seeds asked for.
Per set: each model's mean and standard deviation over seeds, and its paired difference to
``--reference`` seed by seed (the test points are the same, so the difference is paired): the
mean difference, a 95% t-interval for it, and in how many seeds the reference is better.
``--clamps C ...`` adds flows' compiled step with its log-scale soft clamp at each ``C``
(default 2) to the models, trained right after the default one seed by seed.
Writes ``benchmarks/results/budget_seeds.{json,md}`` (``budget_seeds_constant.*`` for the
constant rate); a run with the same budget, seeds and reference replaces its own sets' rows
and keeps the others.
"""

from __future__ import annotations

import argparse
import json
from datetime import date

import numpy as np
import torch
from compare_peers import RESULTS, budget_builders, budget_section, machine_line, machine_stamp
from peer_models import clamp_variant
from scipy import stats

from flows.data.toy import TOY_DATASETS

SCHEDULES = {"decay": "learning rate decayed linearly to 0", "constant": "learning rate 1e-3"}


def paired(nll: list[float], reference: list[float]) -> dict:
    """Mean of ``nll - reference`` over the seeds where both are finite, its 95% t-interval,
    and the seeds where the reference is lower."""
    diff = np.asarray(nll) - np.asarray(reference)
    diff = diff[np.isfinite(diff)]
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    return {"mean": float(diff.mean()), "ci95": [float(diff.mean() - half),
                                                  float(diff.mean() + half)],
            "reference_better": int((diff > 0).sum()), "seeds": len(diff)}


def model_row(data_name: str, name: str, row: dict, reference: list[float] | None) -> str:
    """One table row: mean and sd of the finite runs (non-finite ones counted), mean steps,
    and with ``reference`` the paired difference to it."""
    nll = np.asarray(row["nll"])
    finite = nll[np.isfinite(nll)]
    failed = len(nll) - len(finite)
    mean = f"{finite.mean():.4f}" + (f" ({failed} NaN)" if failed else "")
    cells = ["", ""]
    if reference is not None:
        vs = paired(row["nll"], reference)
        cells = [f"{vs['mean']:+.4f} ({vs['ci95'][0]:+.4f}, {vs['ci95'][1]:+.4f})",
                 f"{vs['reference_better']} of {vs['seeds']}"]
    return (f"| {data_name} | {name} | {mean} | {finite.std(ddof=1):.4f} | "
            f"{np.mean(row['steps']):,.0f} | {cells[0]} | {cells[1]} |")


def results_stem(schedule: str) -> str:
    """``budget_seeds`` for the decayed rate, ``budget_seeds_<schedule>`` for the others."""
    return "budget_seeds" + ("" if schedule == "decay" else f"_{schedule}")


def write_markdown(report: dict) -> None:
    reference = report["reference"]
    schedule = report["schedule"]
    lines = [f"# {report['budget_s']:.0f}-s test NLL over {len(report['seeds'])} seeds "
             f"({report['date']})", "",
             f"`python benchmarks/budget_seeds.py` (Real NVP 2-D, {report['budget_s']:.0f} s, "
             f"{SCHEDULES[schedule]}; seeds {report['seeds']}). Means and sds "
             f"over the finite runs; differences paired by seed, over the seeds where both "
             f"runs are finite.", "",
             *[f"{data_name}: {machine_line(report, data_name)[0]}"
               for data_name in report["sets"]],
             "",
             f"| set | model | mean NLL | sd | steps | minus {reference} (95% CI) | "
             f"{reference} better |", "|---|---|---|---|---|---|---|"]
    for data_name, models in report["sets"].items():
        for name, row in models.items():
            lines.append(model_row(data_name, name, row, None if name == reference else
                                   models[reference]["nll"]))
    (RESULTS / f"{results_stem(schedule)}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=TOY_DATASETS, default=["checkerboard"])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--models", nargs="+",
                        default=["flows compiled", "normflows", "zuko"])
    parser.add_argument("--reference", default="flows compiled")
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--schedule", choices=list(SCHEDULES), default="decay")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clamps", type=float, nargs="+", default=[],
                        help="flows' compiled step with these log-scale clamps too")
    args = parser.parse_args()
    args.models += [clamp_variant(clamp) for clamp in args.clamps]
    known = set(budget_builders(tuple(args.clamps))["Real NVP 2-D"]())
    unknown = sorted(set(args.models) - known)
    if unknown:  # before the seeds train, not after
        parser.error(f"--models {unknown}: no such candidate; choose from {sorted(known)}")
    if args.reference not in args.models:
        parser.error(f"--reference {args.reference!r} must be one of --models")
    if len(args.seeds) < 2:
        parser.error("give at least 2 seeds: the interval needs a spread")
    torch.set_num_threads(args.threads)
    runs = budget_section(args.budget_s, args.seeds, ["Real NVP 2-D"], args.sets,
                          decay=args.schedule == "decay", models=args.models,
                          clamps=tuple(args.clamps))["Real NVP 2-D"]
    path = RESULTS / f"{results_stem(args.schedule)}.json"
    before = json.loads(path.read_text()) if path.exists() else {}
    protocol = {"budget_s": args.budget_s, "seeds": args.seeds, "reference": args.reference,
                "schedule": args.schedule}
    kept = before if all(before.get(k) == v for k, v in protocol.items()) else {}
    report = {"date": date.today().isoformat(), **protocol,
              "machines": kept.get("machines", {}), "sets": kept.get("sets", {})}
    for data_name in args.sets:
        report["machines"][data_name] = machine_stamp(args.threads, torch.device("cpu"))
        report["sets"][data_name] = {name: runs[name][data_name] for name in args.models}
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report)


if __name__ == "__main__":
    main()
