"""Real MNIST bits/dim from the 10,000-image MNIST test split alone (CPU or GPU).

    python benchmarks/mnist_t10k_bpd.py --source ../shared/data/mnist-t10k \
        [--models glow realnvp] [--steps 2000 1000] [--seeds 0] [--extra trainer=gpu ...]

For machines that hold only MNIST's test split (``t10k-images-idx3-ubyte.gz``, offline). The
split is read with torchvision's own IDX reader, shuffled once (``torch.Generator`` seed
0) and written back as IDX files into a scratch torchvision root: 9,000 images as the
"training" file and the other 1,000 as the "test" file. Each model then trains through its
default command on real MNIST images,

    python -m flows.train data=mnist data.root=<scratch> data.download=false \
        data.num_val=1000 model=<m> trainer.max_steps=<steps> seed=<s>

so 8,000 images train, 1,000 validate (best checkpoint) and 1,000 held-out images give the test
bits/dim (8-bit, 256 levels, uniform dequantisation). ``--steps`` sets each model's step count
(the cosine schedule anneals over it; 0 keeps the config's own); the defaults fit about 5
minutes of 2 CPU threads here. A ``--models`` entry with ``=`` is an override used as it is
(``experiment=iresnet_mnist``); ``--extra`` overrides go to every run (``trainer=gpu``,
``trainer.max_epochs=1``). The device column is what Lightning trained on.
i-ResNet validates every 250 steps and at the last one (20 terms x 1 probe, ~16 s per
1,000 28x28 images here; its diagnostics invert 100 of them, ~20 s).
Far from the papers' budgets (hundreds of GPU epochs over 60,000 images: Real NVP 1.06, Glow
1.05 bpd), this checks the image pipeline end to end on real data. Results go to
``benchmarks/results/mnist_t10k_bpd.md`` and ``.json`` (rows merged by model, seed, steps,
device and overrides).
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import shutil
import struct
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from commands import run_command

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NUM_HELD_OUT = 1000


def read_t10k(source: Path, scratch: Path) -> np.ndarray:
    """The 10,000 test images ``(N, 28, 28)`` ``uint8``, parsed by torchvision's IDX reader
    (``MNIST`` itself refuses a root without the training files)."""
    from torchvision.datasets.mnist import read_image_file

    path = scratch / "t10k-images-idx3-ubyte"
    with gzip.open(source / f"{path.name}.gz", "rb") as packed, open(path, "wb") as out:
        shutil.copyfileobj(packed, out)
    return read_image_file(str(path)).numpy()


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (MNIST's format): magic ``0x0000080<ndim>``, big-endian sizes, raw bytes."""
    header = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_split_root(images: np.ndarray, scratch: Path) -> Path:
    """A torchvision MNIST root whose train file holds 9,000 of the images, test file 1,000."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).numpy()
    test, train = images[order[:NUM_HELD_OUT]], images[order[NUM_HELD_OUT:]]
    raw = scratch / "split" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, split in (("train", train), ("t10k", test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", split)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.zeros(len(split), np.uint8))
    return scratch / "split"


def run(model: str, steps: int, seed: int, root: Path, extra: list[str]) -> dict:
    name = f"t10k-{time.strftime('%Y%m%d-%H%M%S')}-s{seed}"
    arguments = ["data=mnist", model if "=" in model else f"model={model}", f"seed={seed}",
                 *([f"trainer.max_steps={steps}"] if steps else []), "data.download=false",
                 f"data.num_val={NUM_HELD_OUT}", "trainer.enable_progress_bar=false", *extra]
    command = [sys.executable, "-m", "flows.train", *arguments, f"data.root={root}",
               f"name={name}"]
    start = time.perf_counter()
    run_command(command, ROOT)
    total = time.perf_counter() - start
    folder = next((ROOT / "outputs").glob(f"*-mnist/{name}"))
    results = json.loads((folder / "results.json").read_text())
    if results["status"] != "finished" or "val_bpd" not in results:
        sys.exit(f"{folder}: no finished, validated run: {results}")
    device = results.get("device", "cpu")  # results.json records it since 2026-11-24
    return {"model": model, "extra": extra, "seed": seed, "device": device,
            "torch": torch.__version__,
            "steps": results["train_steps"],
            "fit_s": results["wall_s"], "command_s": round(total, 1),
            "val_bpd": results["val_bpd"], "test_bpd": results["test_bpd"],
            "test_bpd_se": results["test_bpd_se"], "num_test": results["num_test"],
            "params": results["num_params"], "run": str(folder.relative_to(ROOT)),
            "command": "python -m flows.train " + " ".join(arguments) + " data.root=<split>",
            "date": date.today().isoformat()}


def write_tables(rows: list[dict]) -> None:
    path = RESULTS / "mnist_t10k_bpd.json"
    kept = json.loads(path.read_text()) if path.exists() else []
    def key(row: dict) -> tuple:
        return (row["model"], row["seed"], row["steps"], row.get("device", "cpu"),
                row.get("extra", []))

    new = {str(key(row)) for row in rows}
    rows = sorted([r for r in kept if str(key(r)) not in new] + rows, key=lambda r: str(key(r)))
    path.write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "# MNIST bits/dim from the test split alone (real images)", "",
        f"`python benchmarks/mnist_t10k_bpd.py` (the split and the command are in its "
        f"docstring): 8,000 training, 1,000 validation and 1,000 held-out test images of "
        f"MNIST's t10k file, 256 levels. CPU rows: {platform.machine()}, 2 cores. Extra "
        f"overrides are listed per row.", "",
        "| model | extra | device | torch | seed | steps | fit s | command s | params | "
        "val bpd | test bpd (SE) | date |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['model']} | {' '.join(r.get('extra', []))} | {r.get('device', 'cpu')} | "
              f"{r.get('torch', '')} | {r['seed']} | {r['steps']} | {r['fit_s']:.0f} | "
              f"{r['command_s']:.0f} | {r['params']:,} | {r['val_bpd']:.3f} | "
              f"{r['test_bpd']:.3f} ({r['test_bpd_se']:.3f}) | {r['date']} |" for r in rows]
    (RESULTS / "mnist_t10k_bpd.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared/data/mnist-t10k",
                        help="folder with t10k-images-idx3-ubyte.gz and the labels file")
    parser.add_argument("--models", nargs="+", default=["glow", "realnvp"])
    parser.add_argument("--steps", nargs="+", type=int, default=[2000, 1000],
                        help="training steps, one per model")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--extra", nargs="*", default=[],
                        help="overrides for every run, e.g. trainer=gpu trainer.max_epochs=1")
    args = parser.parse_args()
    if len(args.steps) != len(args.models):
        parser.error(f"--steps needs one value per model ({len(args.models)})")
    with tempfile.TemporaryDirectory() as scratch:
        root = write_split_root(read_t10k(args.source, Path(scratch)), Path(scratch))
        rows = []
        for model, steps in zip(args.models, args.steps, strict=True):
            for seed in args.seeds:
                rows.append(run(model, steps, seed, root, args.extra))
                print(json.dumps(rows[-1]), flush=True)
    write_tables(rows)


if __name__ == "__main__":
    main()
