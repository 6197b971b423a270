"""Train a flow: ``python -m flows.train model=iresnet data=moons [key=value ...]``.

Instantiates data, model, optimizer, trainer, callbacks and loggers from ``conf/``, fits,
evaluates the best checkpoint on the test split and writes ``results.json`` into the run
folder next to the plots, checkpoints and logs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from flows.cli import (
    JobRefused,
    check_config_types,
    check_settings,
    ignored_overrides,
    remove_created_run_folder,
    resolve_run_dir,
    switch,
    user_errors,
    write_json,
)
from flows.core import NormalizingFlow
from flows.data.entropy import TOY_ENTROPY
from flows.lit.callbacks import EMAWeights
from flows.lit.module import DensityModule, NonFiniteError
from flows.lit.schedules import ScheduleError, build_schedule
from flows.metrics import bits_per_dim
from flows.runs import device_name, flow_weights, read_checkpoint, use_tf32

log = logging.getLogger("flows")


OmegaConf.register_new_resolver("flows_run_dir", resolve_run_dir, replace=True)


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """``"last"``: the run folder's ``checkpoints/last.ckpt``; a path: that file; must exist
    (``check_resumable`` reads it)."""
    if ckpt_path is None:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path}: {path} is not a file; give a .ckpt path, or name= the run "
            f"folder to resume with ckpt_path=last"
        )
    return str(path)


def check_resumable(checkpoint: Path, flow: NormalizingFlow, ema_decay: float | None) -> None:
    """A ``ValueError`` unless the checkpoint is readable (safely, ``weights_only``), holds
    this command's model (names and shapes) and, if its run averaged the weights
    (``current_model_state``: its ``state_dict`` is the average), this command averages them
    too, so that the fit continues the trained weights."""
    state = read_checkpoint(checkpoint)
    flow_weights(state, flow, checkpoint, "this command's model (resume with the model.* and "
                 "data.* settings it was trained with)")
    if "current_model_state" in state and ema_decay is None:
        raise ValueError(
            f"checkpoint {checkpoint} comes from a run with ema_decay set (its weights are the "
            f"average; the trained ones continue only with averaging on): resume with that "
            f"run's ema_decay"
        )


THREADS = ((int, type(None)), lambda value: value is None or value >= 1,
           "give torch's threads for this job, a whole number >= 1, or null for its default")


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, DensityModule, L.Trainer]:
    """Data (validated), the system and the trainer, before anything is written."""
    check_config_types(cfg)  # a seed that is not an int fails here, through data.seed
    check_settings(cfg, {"compile_step": switch("compile_step"), "test": switch("test"),
                         "threads": THREADS})
    if HydraConfig.initialized():
        for warning in ignored_overrides(cfg, list(HydraConfig.get().overrides.task)):
            log.warning(warning)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True)
    use_tf32(cfg.tf32)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    flow = instantiate(cfg.model)
    flow.check_input(datamodule.splits["train"][:2])
    optimizer = instantiate(cfg.optim)
    try:
        probe = optimizer(flow.parameters())  # its own checks (a negative lr, ...), up front
    except ValueError as error:
        raise ValueError(f"optim ({cfg.optim._target_}): {error}") from None
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = DensityModule(flow, optimizer, scheduler, seed=cfg.seed,
                           on_nonfinite=cfg.on_nonfinite,
                           num_levels=getattr(datamodule, "num_levels", None),
                           compile_step=cfg.compile_step)
    # a group's member set to null (callbacks.diagnostics=null) is switched off
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if cfg.ema_decay is not None:
        callbacks.append(EMAWeights(cfg.ema_decay))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    datamodule.batches_per_epoch(trainer.world_size)  # a batch for every process
    if cfg.on_nonfinite == "skip" and trainer.world_size > 1:
        raise ValueError(
            f"on_nonfinite=skip needs a single process: Lightning cannot skip a training step "
            f"under {trainer.world_size} processes (DDP); use on_nonfinite=stop, which stops "
            f"with the last good checkpoint"
        )
    if scheduler is not None:
        check_schedule(scheduler, probe, trainer)
    if cfg.compile_step:
        module.check_compile_step(trainer)
    return datamodule, module, trainer


def check_schedule(scheduler: Callable[..., LRScheduler], optimizer: Optimizer,
                   trainer: L.Trainer) -> None:
    """Build the schedule once on a throwaway optimizer where the run's length is known before
    the fit (``trainer.max_steps`` alone, or no limit at all), so that a warmup as long as the
    run or a decay over an unbounded run is refused before anything is written. An epoch limit
    is counted in steps only when the fit starts (``DensityModule.configure_optimizers``)."""
    if trainer.max_epochs not in (None, -1):
        return
    build_schedule(scheduler, optimizer, trainer.max_steps if trainer.max_steps > 0 else math.inf)


def fit_and_test(cfg: DictConfig, run_dir: Path, ckpt_path: str | None,
                 datamodule: L.LightningDataModule, module: DensityModule,
                 trainer: L.Trainer) -> dict[str, Any]:
    """Fit, test the best checkpoint, write ``results.json``; a failure is recorded there too."""
    choices = HydraConfig.get().runtime.choices
    results: dict[str, Any] = {
        "model": choices.get("model"),
        "data": choices.get("data"),
        "seed": cfg.seed,
        "ema_decay": cfg.ema_decay,
        "num_params": sum(p.numel() for p in module.flow.parameters()),
        "device": device_name(trainer.strategy.root_device),
    }
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except NonFiniteError as error:
        last = run_dir / "checkpoints" / "last.ckpt"
        results.update(status="failed", error=str(error), train_steps=trainer.global_step,
                       skipped_steps=module.skipped_steps,
                       last_good_ckpt=str(last) if last.is_file() else None)
        if trainer.is_global_zero:
            write_json(run_dir / "results.json", results)
        raise
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    score = checkpoint.best_model_score if checkpoint is not None else None
    if score is None:  # no monitored checkpoint (callbacks=none): the last validation
        score = trainer.callback_metrics.get("val/nll")
    results.update(
        status="finished",
        train_steps=trainer.global_step,
        skipped_steps=module.skipped_steps,
        resumed_from=ckpt_path,
        wall_s=round(module.fit_seconds, 2),  # every segment of a resumed run
        val_nll=None if score is None else float(score),
        best_ckpt=best or None,
    )
    if module.num_levels and score is not None:
        results["val_bpd"] = bits_per_dim(float(score), module.num_dims, module.num_levels)
    if module.train_bpd_key.endswith("estimate"):
        results["logdet"] = ("power-series estimate (the model's eval_num_terms and "
                             "eval_num_probes); python -m flows.evaluate chooses the terms for a "
                             "stated truncation bias and reports the Monte Carlo error")
    if cfg.test:
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        results.update(module.test_result)
        name = getattr(datamodule, "name", None)
        if name in TOY_ENTROPY:
            entropy, entropy_se = TOY_ENTROPY[name]
            results.update(entropy=entropy, entropy_se=entropy_se,
                           gap=results["test_nll"] - entropy)
    nonfinite = [key for key in ("val_nll", "test_nll")
                 if results.get(key) is not None and not math.isfinite(results[key])]
    if nonfinite:  # e.g. on_nonfinite=skip through a divergence: not a usable model
        results["status"] = "nonfinite"
        log.warning("the run's %s is not finite: the model puts zero density on some points "
                    "(skipped steps: %d); lower the learning rate or clip gradients",
                    " and ".join(nonfinite), module.skipped_steps)
    if trainer.is_global_zero:  # under DDP every rank holds the same results
        write_json(run_dir / "results.json", results)
        log.info("results: %s", results)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Entry point; returns the test NLL (so Hydra sweepers can optimise it)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with user_errors():
            ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir)
            parts = build(cfg)
            if ckpt_path is not None:
                check_resumable(Path(ckpt_path), parts[1].flow, cfg.ema_decay)
    except (SystemExit, JobRefused):  # bad input: remove the run folder if this command made it
        remove_created_run_folder(run_dir)
        raise
    with user_errors():
        try:
            results = fit_and_test(cfg, run_dir, ckpt_path, *parts)
        except ScheduleError:  # raised as the fit starts, before the first step
            remove_created_run_folder(run_dir, fit_started=True)
            raise
    return results.get("test_nll")


if __name__ == "__main__":
    main()
