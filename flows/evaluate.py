"""Test NLL of a trained flow: ``python -m flows.evaluate ckpt=<run folder or .ckpt>``.

Rebuilds the model and data from the run's saved config, computes ``-log p(x)`` over the
whole split in eval mode (exact log-det where the model supports it) and writes the mean,
its standard error and the gap to the data's entropy to JSON.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from flows.cli import user_errors, write_json
from flows.data.entropy import TOY_ENTROPY
from flows.diagnostics import residual_lipschitz_bounds
from flows.metrics import nll_with_standard_error
from flows.runs import load_trained

log = logging.getLogger("flows")


def evaluate(cfg: DictConfig) -> dict:
    flow, run_cfg, run, checkpoint = load_trained(cfg.ckpt, cfg.device)
    bounds = residual_lipschitz_bounds(flow)
    broken = {name: round(bound, 4) for name, bound in bounds.items() if bound >= 1.0}
    if broken and not cfg.force:
        raise ValueError(
            f"{checkpoint}: residual blocks are not contractive (Lipschitz bound >= 1: "
            f"{broken}), so the reported likelihood would not be valid; pass force=true to "
            f"report it anyway"
        )
    device = next(flow.parameters()).device
    datamodule = instantiate(run_cfg.data)
    datamodule.setup()
    if cfg.split not in datamodule.splits:
        raise ValueError(f"split={cfg.split!r}; choose one of {list(datamodule.splits)}")
    points = datamodule.splits[cfg.split]
    with torch.no_grad():
        log_prob = torch.cat([flow.log_prob(batch.to(device)).cpu()
                              for batch in points.split(cfg.batch_size)])
    nll, standard_error = nll_with_standard_error(log_prob)
    result = {"checkpoint": str(checkpoint), "split": cfg.split, "num_points": len(points),
              "nll": nll, "nll_se": standard_error}
    if bounds:
        result.update(max_lipschitz_bound=max(bounds.values()), forced=bool(broken))
    name = getattr(datamodule, "name", None)
    if name in TOY_ENTROPY:
        result.update(entropy=TOY_ENTROPY[name][0], gap=nll - TOY_ENTROPY[name][0])
    out = Path(cfg.out) if cfg.out else run / "evaluation" / f"{checkpoint.stem}-{cfg.split}.json"
    write_json(out, result)
    log.info("%s NLL %.4f +- %.4f nats (%d points) -> %s", cfg.split, nll, standard_error,
             len(points), out)
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(cfg)


if __name__ == "__main__":
    main()
