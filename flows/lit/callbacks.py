"""Callbacks that draw the 2-D plots of a flow during and at the end of training."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure

from flows.plots import density_grid, plot_density, plot_latent, plot_samples


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
        data = trainer.datamodule.splits["val"][: self.num_samples].to(module.device)
        samples = flow.sample(self.num_samples, self.temperature)
        z, _ = flow(data)
        axis, density = density_grid(flow, self.bounds, self.grid_points)
        flow.train(was_training)
        figures = {
            "samples": plot_samples(data.cpu().numpy(), samples.cpu().numpy(), self.bounds,
                                    f"samples, T={self.temperature}"),
            "density": plot_density(axis, density),
            "latent": plot_latent(z.cpu().numpy()),
        }
        folder = Path(trainer.default_root_dir) / "plots" / name
        folder.mkdir(parents=True, exist_ok=True)
        for kind, figure in figures.items():
            figure.savefig(folder / f"{kind}.png", dpi=110)
            self._to_tensorboard(trainer, f"{kind}/{name.split('_')[0]}", figure)
            plt.close(figure)

    @staticmethod
    def _to_tensorboard(trainer: L.Trainer, tag: str, figure: Figure) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(tag, figure, trainer.global_step, close=False)
