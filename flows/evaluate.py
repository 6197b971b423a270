"""Test NLL of a trained flow: ``python -m flows.evaluate ckpt=<run folder or .ckpt>``.

Rebuilds the model and data from the run's saved config, computes ``-log p(x)`` over the
whole split in eval mode (exact log-det where the model supports it) and writes the mean,
its standard error, bits per dimension for images and the gap to a toy set's entropy to JSON.
Residual blocks on inputs of at most ``exact_logdet_max_dims`` dimensions (8x8 images) get
the exact log-det of their dense Jacobian. Where the log-det is still a power series (i-ResNet
on larger images) it states how the estimate was made:
the number of terms chosen so the truncation bias is below ``max_bias`` and the passes of
fresh Hutchinson probes repeated until their Monte Carlo standard error is below ``max_se``
(``flows.evaluation``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from flows.bijections.residual import ResidualBlock, has_series_logdet
from flows.cli import check_settings, positive, switch, user_errors, whole, write_json
from flows.data.entropy import TOY_ENTROPY
from flows.data.images import dequantize
from flows.diagnostics import residual_lipschitz_bounds
from flows.evaluation import (
    exact_logdet_up_to,
    log_prob_passes,
    probe_standard_error,
    set_eval_terms,
    terms_for_bias,
    truncation_bias_bound,
)
from flows.metrics import bits_per_dim, bits_per_dim_scale, nll_with_standard_error
from flows.runs import load_trained, use_tf32

log = logging.getLogger("flows")


SETTINGS = {
    "batch_size": whole(1, "give the points per batch, a whole number >= 1"),
    "force": switch("force"),
    "exact_logdet_max_dims": whole(0, "give a whole number >= 0 (0: always the series)"),
    "max_bias": positive("give the truncation bias allowed, a number > 0"),
    "max_se": positive("give the Monte Carlo standard error allowed, a number > 0"),
    "min_passes": whole(1, "give a whole number >= 1"),
    "max_passes": whole(1, "give a whole number >= 1"),
}


def evaluate(cfg: DictConfig) -> dict:
    check_settings(cfg, SETTINGS)
    use_tf32(cfg.get("tf32", False))
    flow, run_cfg, run, checkpoint = load_trained(cfg.ckpt, cfg.device)
    bounds = residual_lipschitz_bounds(flow)
    # "not <": a NaN bound (a non-finite weight) is broken too
    broken = {name: round(bound, 4) for name, bound in bounds.items() if not bound < 1.0}
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
    num_dims = math.prod(flow.event_shape)
    num_levels = getattr(datamodule, "num_levels", None)
    if not points.is_floating_point():  # image training levels: dequantise with fixed noise
        points = dequantize(points, num_levels, torch.Generator().manual_seed(run_cfg.seed))
    # Images report bits/dim; the accuracy targets are in that unit, else nats per sample.
    se_scale = bits_per_dim_scale(num_dims) if num_levels else 1.0
    estimator = None
    exact_logdet_up_to(flow, cfg.exact_logdet_max_dims)
    if has_series_logdet(flow):
        max_bias_per_dim = cfg.max_bias * math.log(2) if num_levels else cfg.max_bias / num_dims
        num_terms = terms_for_bias(list(bounds.values()), max_bias_per_dim)
        set_eval_terms(flow, num_terms)
        bias = truncation_bias_bound(bounds.values(), num_terms)
        log_prob, passes = log_prob_passes(flow, points, cfg.batch_size, device, cfg.max_se,
                                           se_scale, cfg.min_passes, cfg.max_passes)
        estimator = {
            "num_terms": num_terms,
            "truncation_bias_bound": bias / math.log(2) if num_levels else bias * num_dims,
            "probes_per_pass": max(m.eval_num_probes for m in flow.modules()
                                   if isinstance(m, ResidualBlock)),
            "passes": len(passes),
            "monte_carlo_se": probe_standard_error(passes) * se_scale,
            "unit": "bits/dim" if num_levels else "nats",
        }
    else:
        with torch.no_grad():
            log_prob = torch.cat([flow.log_prob(batch.to(device)).cpu()
                                  for batch in points.split(cfg.batch_size)])
    nll, standard_error = nll_with_standard_error(log_prob)
    result = {"checkpoint": str(checkpoint), "split": cfg.split, "num_points": len(points),
              "nll": nll, "nll_se": standard_error}
    if num_levels:
        result.update(bpd=bits_per_dim(nll, num_dims, num_levels),
                      bpd_se=standard_error * se_scale, num_levels=num_levels)
    if estimator:
        result["series_estimate"] = estimator
    if bounds:
        result.update(max_lipschitz_bound=max(bounds.values()), forced=bool(broken),
                      logdet="series estimate" if estimator else "exact")
    name = getattr(datamodule, "name", None)
    if name in TOY_ENTROPY:
        result.update(entropy=TOY_ENTROPY[name][0], gap=nll - TOY_ENTROPY[name][0])
    out = Path(cfg.out) if cfg.out else run / "evaluation" / f"{checkpoint.stem}-{cfg.split}.json"
    write_json(out, result)
    if num_levels:
        log.info("%s: %.4f +- %.4f bits/dim (%d images)", cfg.split, result["bpd"],
                 result["bpd_se"], len(points))
    if bounds and not estimator:
        log.info("log-det: exact in every residual block (no truncation bias, no probes)")
    if estimator:
        log.info("log-det series: %d terms (truncation bias <= %.1e %s), %d passes x %d "
                 "probe(s) per point (Monte Carlo standard error %.1e %s)", estimator["num_terms"],
                 estimator["truncation_bias_bound"], estimator["unit"], estimator["passes"],
                 estimator["probes_per_pass"], estimator["monte_carlo_se"], estimator["unit"])
    log.info("%s NLL %.4f +- %.4f nats (%d points) -> %s", cfg.split, nll, standard_error,
             len(points), out)
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(cfg)


if __name__ == "__main__":
    main()
