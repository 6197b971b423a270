"""Callbacks: plots of 2-D flows and image grids, health checks, the last checkpoint,
averaged weights."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from matplotlib.figure import Figure

from flows.bijections.residual import ResidualBlock
from flows.diagnostics import reconstruction_error, residual_lipschitz_bounds, saturated_scales
from flows.lit.module import ends_training
from flows.plots import (
    density_grid,
    image_grid,
    plot_density,
    plot_image_grids,
    plot_latent,
    plot_samples,
)


def save_figures(trainer: L.Trainer, figures: dict[str, Figure], name: str) -> None:
    """``<run>/plots/<name>/<kind>.png`` and TensorBoard images tagged ``<kind>/<stage>``."""
    folder = Path(trainer.default_root_dir) / "plots" / name
    folder.mkdir(parents=True, exist_ok=True)
    for kind, figure in figures.items():
        figure.savefig(folder / f"{kind}.png", dpi=110)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(f"{kind}/{name.split('_')[0]}", figure,
                                             trainer.global_step, close=False)
        plt.close(figure)


class ToyPlots(L.Callback):
    """Samples over the data, the density heatmap and the latent view of 2-D flows.

    Every ``every_n_epochs`` validations the figures go to ``<run>/plots/step_<N>/`` and to
    TensorBoard; after testing (the weights that ``test/nll`` is reported for) they go to
    ``<run>/plots/final/``. Flows of any other event shape are skipped.

    Args:
        every_n_epochs: plot every this many validation epochs (0: only at the end).
        num_samples: points drawn for the sample and latent views.
        grid_points: density grid resolution per axis.
        bounds: the square ``[lo, hi]^2`` shown.
        temperature: sampling temperature (``z ~ N(0, T^2 I)``).
    """

    def __init__(self, every_n_epochs: int = 5, num_samples: int = 5000, grid_points: int = 200,
                 bounds: tuple[float, float] = (-4.0, 4.0), temperature: float = 1.0) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.grid_points = grid_points
        self.bounds = tuple(bounds)
        self.temperature = temperature

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_epochs <= 0:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._plot(trainer, module, f"step_{trainer.global_step:06d}")

    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._plot(trainer, module, "final")

    @rank_zero_only
    @torch.no_grad()
    def _plot(self, trainer: L.Trainer, module: L.LightningModule, name: str) -> None:
        flow = module.flow
        if flow.event_shape != (2,):
            return
        was_training = flow.training
        flow.eval()
        data = trainer.datamodule.splits["val"][: self.num_samples]
        data = data.to(module.device, module.dtype)
        samples = flow.sample(self.num_samples, self.temperature)
        z, _ = flow(data)
        axis, density = density_grid(flow, self.bounds, self.grid_points)
        flow.train(was_training)
        figures = {
            "samples": plot_samples(data.float().cpu().numpy(), samples.float().cpu().numpy(),
                                    self.bounds,
                                    f"samples, T={self.temperature}"),
            "density": plot_density(axis, density),
            "latent": plot_latent(z.float().cpu().numpy()),
        }
        save_figures(trainer, figures, name)


class ImageSamples(L.Callback):
    """Image grids: samples at several temperatures, and data beside its reconstructions.

    ``samples.png``: ``num_samples`` images decoded from ``z ~ N(0, T^2 I)`` for each ``T`` in
    ``temperatures``. ``reconstructions.png``: validation images beside ``f^{-1}(f(x))``, titled
    with ``max |f^{-1}(f(x)) - x|`` (a direct check of invertibility; for i-ResNets through the
    fixed-point inverse). Written every ``every_n_validations`` validations to
    ``<run>/plots/step_<N>/`` and after testing to ``<run>/plots/final/``, and to TensorBoard.
    Flows of non-image event shapes are skipped.

    Args:
        every_n_validations: draw every this many validations (0: only at the end).
        num_samples: images per temperature (a square number fills the grid).
        temperatures: sampling temperatures.
        num_reconstructions: validation images reconstructed.
    """

    def __init__(self, every_n_validations: int = 5, num_samples: int = 64,
                 temperatures: tuple[float, ...] = (1.0, 0.8, 0.6),
                 num_reconstructions: int = 32) -> None:
        self.every_n_validations = every_n_validations
        self.num_samples = num_samples
        self.temperatures = tuple(temperatures)
        self.num_reconstructions = num_reconstructions
        self._validations = 0

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_validations <= 0:
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self._draw(trainer, module, f"step_{trainer.global_step:06d}")

    def state_dict(self) -> dict[str, int]:
        """The validation count, checkpointed so a resumed run keeps the grid cadence."""
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._validations = state_dict["validations"]

    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._draw(trainer, module, "final")

    @rank_zero_only
    @torch.no_grad()
    def _draw(self, trainer: L.Trainer, module: L.LightningModule, name: str) -> None:
        flow = module.flow
        if len(flow.event_shape) != 3:
            return
        was_training = flow.training
        flow.eval()
        nrow = max(1, int(self.num_samples ** 0.5))
        samples = {f"T = {t}": image_grid(flow.sample(self.num_samples, t), nrow)
                   for t in self.temperatures}
        data = trainer.datamodule.splits["val"][: self.num_reconstructions]
        data = data.to(module.device, module.dtype)
        z, _ = flow(data)
        reconstructed, _ = flow.inverse(z)
        flow.train(was_training)
        error = float((reconstructed - data).abs().max())
        figures = {
            "samples": plot_image_grids(samples),
            "reconstructions": plot_image_grids({
                "data": image_grid(data, nrow), f"reconstructed (max error {error:.1e})":
                image_grid(reconstructed, nrow)}),
        }
        save_figures(trainer, figures, name)


def worst(values: list[float]) -> float:
    """The largest value, or NaN if any is NaN (Python's ``max`` keeps or drops a NaN
    depending on where it stands)."""
    return math.nan if any(math.isnan(v) for v in values) else max(values)


class FlowDiagnostics(L.Callback):
    """Checks at every validation that the flow is still a valid density, and logs them.

    On ``num_points`` validation points: ``diagnostics/reconstruction_error``
    (``max |f^{-1}(f(x)) - x|``, for i-ResNets through the fixed-point inverse, whose largest
    per-block residual ``max |x + g(x) - z|`` is ``diagnostics/max_inverse_residual``, a warning
    naming every block above ``reconstruction_warning``);
    ``diagnostics/max_lipschitz_bound`` over residual blocks (a warning names every block whose
    bound is ``>= 1``: not contractive, the likelihood is not valid); and
    ``diagnostics/max_saturated_scale``, the largest fraction of affine-coupling log-scales at
    their clamp (a warning names layers above ``saturation_warning``).

    Args:
        num_points: validation points used (vector data).
        num_images: validation images used (image data): each costs a fixed-point inverse
            through every residual block (1,000 MNIST images: 192 s for the default conv
            i-ResNet on 2 CPU threads, more than the validation itself).
        reconstruction_warning: warn when the reconstruction error exceeds this.
        saturation_warning: warn when a coupling has more than this fraction of saturated scales.
        batch_size: points per forward and inverse pass (the saturation check uses the first
            batch).
    """

    def __init__(self, num_points: int = 1000, num_images: int = 100,
                 reconstruction_warning: float = 1e-3, saturation_warning: float = 0.05,
                 batch_size: int = 1000) -> None:
        self.num_points = num_points
        self.num_images = num_images
        self.batch_size = batch_size
        self.reconstruction_warning = reconstruction_warning
        self.saturation_warning = saturation_warning

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        flow = module.flow
        count = self.num_images if len(flow.event_shape) == 3 else self.num_points
        x = trainer.datamodule.splits["val"][:count].to(module.device, module.dtype)
        was_training = flow.training
        flow.eval()
        errors: list[float] = []
        residuals: dict[str, float] = {}
        for chunk in x.split(self.batch_size):
            errors.append(reconstruction_error(flow, chunk))
            # The reconstruction ran every residual block's fixed-point inverse.
            for name, layer in flow.named_modules():
                if isinstance(layer, ResidualBlock):
                    residuals[name] = worst([residuals.get(name, 0.0),
                                             layer.last_inverse_residual])
        metrics = {"diagnostics/reconstruction_error": worst(errors)}
        bounds = residual_lipschitz_bounds(flow)
        saturation = saturated_scales(flow, x[: self.batch_size])
        flow.train(was_training)
        step = trainer.global_step
        if not metrics["diagnostics/reconstruction_error"] <= self.reconstruction_warning:
            rank_zero_warn(f"step {step}: reconstruction error "
                           f"{metrics['diagnostics/reconstruction_error']:.3g} > "
                           f"{self.reconstruction_warning}: the inverse is inaccurate")
        per_layer = [
            # "not <=": a NaN (non-finite weights or samples) counts as bad
            ("max_inverse_residual", residuals, lambda r: not r <= self.reconstruction_warning,
             "fixed-point inverses not converged, max|x + g(x) - z| per block"),
            ("max_lipschitz_bound", bounds, lambda b: not b < 1.0,
             "residual blocks not contractive (Lip bound >= 1), the likelihood is not valid"),
            ("max_saturated_scale", saturation, lambda f: not f <= self.saturation_warning,
             "affine couplings with log-scales at their clamp (fraction of scales)"),
        ]
        for key, values, is_bad, problem in per_layer:
            if values:
                metrics[f"diagnostics/{key}"] = worst(list(values.values()))
                bad = {name: value for name, value in values.items() if is_bad(value)}
                if bad:
                    rank_zero_warn(f"step {step}: {problem}: {bad}")
        module.log_dict(metrics, sync_dist=False, rank_zero_only=True)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose saved state follows its run folder when the folder
    was moved or copied before a resume.

    The state holds absolute paths (the best checkpoints, the last). Lightning, finding another
    folder, keeps only the old ``best_model_path``: the resumed run would test the old folder's
    checkpoint, or fail where it is gone. Here the paths inside the saved folder are read
    inside this one, and the whole state is restored.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        saved, now = state_dict.get("dirpath"), self.dirpath
        if saved is None or now is None or saved == now:
            return super().load_state_dict(state_dict)

        def moved(path: object) -> object:
            if isinstance(path, str) and path and Path(path).parent == Path(saved):
                return str(Path(now) / Path(path).name)
            return path

        state = {key: moved(value) for key, value in state_dict.items()}
        state["dirpath"] = now
        state["best_k_models"] = {moved(path): score for path, score
                                  in state_dict.get("best_k_models", {}).items()}
        super().load_state_dict(state)


class LastCheckpoint(RunCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps and once more when training ends.

    What ``ckpt_path=last`` resumes from. A save due at a step that a validation follows is
    made when that validation ends: Lightning resumes a checkpoint written at a step's end as
    if its validation had run, so a kill during the validation would lose it for good (a
    resumed run never validated that step, and its weights were never a candidate for the
    best checkpoint). Lightning's step-triggered ``save_last`` also leaves the file up to
    ``every_n_train_steps - 1`` steps behind the final weights; the extra save at the end
    makes it the final state whatever the step count. Written through the trainer's
    checkpoint IO (atomically, with ``AtomicCheckpointIO``).

    Args:
        dirpath: the checkpoint folder.
        every_n_train_steps: save period in optimizer steps.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 200) -> None:
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps,
                         save_top_k=0, save_last=True, enable_version_counter=False)
        self._save_after_validation = False

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule,
                           outputs: object, batch: object, batch_idx: int) -> None:
        every = self._every_n_train_steps
        if every > 0 and trainer.global_step % every == 0 and validation_follows(trainer,
                                                                                 batch_idx):
            self._save_after_validation = True
            return
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._save_after_validation and not trainer.sanity_checking:
            self._save_after_validation = False
            if not self._should_skip_saving_checkpoint(trainer):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_validation_end(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # also where the last step was saved already: that save came before the step's
        # validation, so its record of the best checkpoints lacked the final one
        trainer.save_checkpoint(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}.ckpt",
                                self.save_weights_only)  # as ModelCheckpoint's own saves


def validation_follows(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether Lightning validates after the training step just taken: its own test (every
    ``val_check_interval`` steps, epoch ends) or the run's last step (``ends_training``),
    which ``DensityModule`` stops at, after the callbacks' batch-end hooks have run."""
    loop = trainer.fit_loop
    return ends_training(trainer, batch_idx) or loop.epoch_loop._should_check_val_fx(
        loop._data_fetcher)


def warmed_up_decay(decay: float, num_averaged: int) -> float:
    """The decay of the average's update after ``n = num_averaged`` earlier ones:
    ``min(decay, (1 + n) / (10 + n))`` (TensorFlow's ``ExponentialMovingAverage`` with
    ``num_updates``). Without the warm-up the first weights keep ``decay^t`` of the average
    after ``t`` steps: 0.37 after 1,000 steps at 0.999, 0.03 after 3,500."""
    return min(decay, (1 + num_averaged) / (10 + num_averaged))


class EMAWeights(WeightAveraging):
    """Evaluate, sample and checkpoint an exponential moving average of the weights.

    After every optimizer step ``theta_ema <- d_n theta_ema + (1 - d_n) theta`` with
    ``d_n = warmed_up_decay(decay, n)`` after ``n`` earlier updates (the first step copies
    ``theta``), through Lightning's ``WeightAveraging`` and torch's ``AveragedModel`` (one
    ``foreach`` lerp; ``n`` is counted on the host, no device read). The average spans about
    ``1 / (1 - decay)`` steps once ``n > (10 decay - 1) / (1 - decay)``, and early on the
    last ``n / 10`` or so: at a constant learning rate the last iterate is one noisy draw
    around the optimum, the average is not (Polyak averaging, as Glow; Residual Flows
    evaluates EMA weights).

    Validation, the test after ``fit`` and every checkpoint's ``state_dict`` use the averaged
    weights, so ``flows.evaluate`` and ``flows.sample`` read them from any checkpoint; the
    trained weights go to the checkpoint's ``current_model_state``, which a resumed fit
    continues from. Buffers (ActNorm's initialised flag, spectral normalisation's ``u, v``)
    are not averaged: they follow the trained model, and an i-ResNet's power iteration
    converges afresh for the averaged weights at its first evaluation.

    Args:
        decay: the weight of the old average per step, in (0, 1).
    """

    def __init__(self, decay: float = 0.999) -> None:
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay < 1:
            raise ValueError(f"ema_decay={decay!r}: give a number in (0, 1), e.g. 0.999 (an "
                             f"average over about 1,000 steps), or null for no averaging")
        super().__init__(use_buffers=False, multi_avg_fn=self._average_step)
        self.decay = float(decay)
        self._num_averaged = 1  # when torch first calls _average_step: the first step's copy
        self._trained_state: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def _average_step(self, averaged: list[torch.Tensor], current: list[torch.Tensor],
                      num_averaged: torch.Tensor) -> None:
        """torch's ``multi_avg_fn``, called from the second update on; ``num_averaged`` (on
        the device) is mirrored by the host count."""
        decay = warmed_up_decay(self.decay, self._num_averaged)
        torch._foreach_lerp_(averaged, current, 1 - decay)
        self._num_averaged += 1

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._trained_state = None
            self._num_averaged = 1
        super().setup(trainer, module, stage)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Lightning copies the average into the model here; the checkpoints written after it
        # (last.ckpt at the end) must still resume from the trained weights.
        self._trained_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        super().on_train_end(trainer, module)

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule,
                           checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, module, checkpoint)
        if self._trained_state is not None:
            checkpoint["current_model_state"] = self._trained_state

    def on_load_checkpoint(self, trainer: L.Trainer, module: L.LightningModule,
                           checkpoint: dict) -> None:
        # Lightning would load the trained weights for testing too: only a fit resumes them,
        # evaluation keeps the checkpoint's state_dict, the average.
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, module, checkpoint)
            # one device read per resume; 0 (no averaging state saved): the next step copies
            self._num_averaged = max(1, int(self._average_model.n_averaged))
