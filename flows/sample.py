"""Draw samples: ``python -m flows.sample ckpt=<run folder or .ckpt> n=1000 temperature=0.8``.

Decodes ``z ~ N(0, temperature^2 I)`` through the inverse and writes the samples as
``.npy`` and ``.pt`` files and a PNG: for 2-D data the samples beside the data, for
images a grid.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import matplotlib.pyplot as plt
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from flows.cli import check_settings, positive, user_errors, whole
from flows.plots import image_grid, plot_image_grids, plot_samples
from flows.runs import load_trained, use_tf32

log = logging.getLogger("flows")


SETTINGS = {
    "n": whole(1, "give the number of samples, a whole number >= 1"),
    "temperature": positive("give a finite number > 0 (1: the model's density; below 1 "
                            "sharper)"),
    "seed": whole(0, "give a whole number >= 0"),
}


def sample(cfg: DictConfig) -> Path:
    check_settings(cfg, SETTINGS)
    use_tf32(cfg.get("tf32", False))
    flow, run_cfg, run, checkpoint = load_trained(cfg.ckpt, cfg.device)
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        samples = flow.sample(cfg.n, cfg.temperature).cpu()
    figure = None  # drawn before any file is written: a failure here writes nothing
    if len(flow.event_shape) == 3:
        figure = plot_image_grids({f"{cfg.n} samples, T = {cfg.temperature}": image_grid(
            samples, nrow=max(1, int(cfg.n ** 0.5)))})
    elif flow.event_shape == (2,):
        try:
            datamodule = instantiate(run_cfg.data)
            datamodule.setup()
        except (OSError, ValueError) as error:  # e.g. data=file whose file has moved
            log.warning("no plot: the run's data cannot be loaded to draw the samples over "
                        "(%s); the samples are written", error)
        else:
            data = datamodule.splits["val"][: max(cfg.n, 2000)].numpy()
            figure = plot_samples(data, samples.numpy(), title=f"samples, T={cfg.temperature}")
    out = Path(cfg.out) if cfg.out else run / "samples"
    out.mkdir(parents=True, exist_ok=True)
    # The name holds dots (nll=2.906, T0.8): suffixes are appended, never swapped.
    stem = out / f"{checkpoint.stem}-n{cfg.n}-T{cfg.temperature}-seed{cfg.seed}"
    suffixes = ["npy", "pt"]
    np.save(f"{stem}.npy", samples.numpy())
    torch.save(samples, f"{stem}.pt")
    if figure is not None:
        figure.savefig(f"{stem}.png", dpi=110)
        plt.close(figure)
        suffixes.append("png")
    log.info("%d samples at T=%s -> %s.{%s}", cfg.n, cfg.temperature, stem, ",".join(suffixes))
    return stem


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    with user_errors():
        sample(cfg)


if __name__ == "__main__":
    main()
