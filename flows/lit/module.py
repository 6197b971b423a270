"""The one LightningModule: maximum likelihood for any ``NormalizingFlow``."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from flows.core import NormalizingFlow
from flows.metrics import nll_with_standard_error

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer], LRScheduler]


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or inf loss or gradient; the message names the step."""


class DensityModule(L.LightningModule):
    """Trains ``flow`` by minimising the mean negative log-likelihood in nats.

    Logs ``train/nll`` every step, ``val/nll`` per validation and, at test time,
    ``test/nll`` with its standard error over the whole test split (``test_result``).
    A non-finite loss or gradient norm stops training with a ``NonFiniteError`` that
    names the global step, before the optimizer can write NaNs into the weights.

    Args:
        flow: the model; the only ``nn.Module`` this system owns.
        optimizer: ``params -> Optimizer`` (Hydra ``_partial_``).
        scheduler: ``optimizer -> LRScheduler`` stepped every training step, or ``None``.
    """

    def __init__(self, flow: NormalizingFlow, optimizer: OptimizerFactory,
                 scheduler: SchedulerFactory | None = None) -> None:
        super().__init__()
        self.flow = flow
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self._test_log_probs: list[Tensor] = []
        self.test_result: dict[str, float] = {}

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = -self.flow.log_prob(batch).mean()
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"training loss became {loss.item()} at step {self.global_step} (epoch "
                f"{self.current_epoch}, batch {batch_idx}); lower optim.lr or enable gradient "
                f"clipping (trainer.gradient_clip_val)"
            )
        self.log("train/nll", loss, prog_bar=True)
        return loss

    def configure_gradient_clipping(self, optimizer: Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Check and log the total gradient norm, then clip with that same norm.

        Lightning calls this after every backward (the gradients are unscaled under mixed
        precision); computing the norm once serves the NaN check, the log and norm clipping.
        """
        params = [p for p in self.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not torch.isfinite(norm):
            raise NonFiniteError(
                f"gradient norm became {norm.item()} at step {self.global_step} with a finite "
                f"loss; lower optim.lr or enable gradient clipping (trainer.gradient_clip_val)"
            )
        self.log("train/grad_norm", norm)
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm in (None, "norm"):
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        nll = -self.flow.log_prob(batch).mean()
        self.log("val/nll", nll, prog_bar=True, batch_size=batch.shape[0])

    def on_test_epoch_start(self) -> None:
        self._test_log_probs = []

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._test_log_probs.append(self.flow.log_prob(batch).detach())

    def on_test_epoch_end(self) -> None:
        log_prob = self.all_gather(torch.cat(self._test_log_probs)).flatten()
        nll, standard_error = nll_with_standard_error(log_prob)
        self.test_result = {"test_nll": nll, "test_nll_se": standard_error,
                            "num_test": log_prob.numel()}
        self.log("test/nll", nll)
        self.log("test/nll_se", standard_error)

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory(self.flow.parameters())
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
