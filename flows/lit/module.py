"""The one LightningModule: maximum likelihood for any ``NormalizingFlow``."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from flows.bijections.residual import has_series_logdet
from flows.compiled_step import CompiledAdamStep, check_supported
from flows.core import NormalizingFlow, first_nonfinite_bijection
from flows.lit.schedules import build_schedule
from flows.metrics import bits_per_dim, bits_per_dim_scale, nll_from_moments, nll_moments
from flows.seeds import TEST_STREAM, VAL_STREAM, step_seed

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[..., LRScheduler]


def ends_training(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the training step just taken (batch ``batch_idx`` of the epoch) is the run's
    last by its limits: ``trainer.max_steps`` reached, or the last batch of the last of
    ``trainer.max_epochs`` epochs. ``DensityModule`` stops there, so a validation follows."""
    last_epoch = 0 < (trainer.max_epochs or 0) <= trainer.current_epoch + 1
    return (0 < trainer.max_steps <= trainer.global_step
            or last_epoch and batch_idx + 1 >= trainer.num_training_batches)


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or inf loss or gradient; the message names the step and layer."""


class DensityModule(L.LightningModule):
    """Trains ``flow`` by minimising the mean negative log-likelihood in nats.

    Logs ``train/nll`` and ``train/grad_norm`` on the steps Lightning writes (every
    ``trainer.log_every_n_steps`` and the last: ``logs_this_step``), ``val/nll`` per
    validation and, at test time,
    ``test/nll`` with its standard error over the whole test split (``test_result``). For
    quantised data (``num_levels``) it also logs bits per dimension, ``train/bpd``, ``val/bpd``
    and ``test/bpd`` (``flows.metrics.bits_per_dim``); where the training log-det is a
    stochastic estimate (an i-ResNet's power series) the training value is logged as
    ``train/bpd_estimate``.

    A non-finite loss or gradient norm stops training (``on_nonfinite="stop"``) with a
    ``NonFiniteError`` naming the global step and the first layer whose output or log-det is
    not finite (or the parameters whose gradients are not), before the optimizer can write
    NaNs into the weights; with ``"skip"`` the batch is skipped (no update) and counted in
    ``skipped_steps`` (logged as ``train/skipped_steps``).

    The last step (``trainer.max_steps``, the last batch of ``trainer.max_epochs``, or a step
    after which a callback's batch-end hook stops training, as ``max_time``'s timer does) is
    always followed by a validation, wherever it falls between ``val_check_interval`` steps,
    epoch ends or the epochs ``check_val_every_n_epoch`` selects.

    With ``compile_step`` a training step is ``flows.compiled_step.CompiledAdamStep``: the
    loss, its gradient, the norm clipping (``trainer.gradient_clip_val``) and the Adam update in
    one compiled graph, run inside ``training_step``, which returns ``None`` so that Lightning
    has no backward to run and its optimizer step finds no gradients. Checkpoints, resuming,
    schedules, the logs and the non-finite handling are the same as with the standard step;
    it needs Adam or AdamW, one process, no gradient accumulation, ``32-true`` or ``64-true``
    precision and a flow whose forward pass updates no state once ActNorm is initialised
    (``check_compile_step``).

    Every training step first reseeds torch's global generator (on an accelerator, its
    generators too) from ``(seed, step, rank)`` (``step_seed``), so the randomness drawn
    inside a step (Hutchinson probes, noise) is the same whether or not the run was
    interrupted and resumed there; every validation and test batch from ``(seed, batch,
    rank)`` and its split, so every validation draws the same probes (checkpoints compared on
    the same draws) and the test is the same after a resume.

    Args:
        flow: the model; the only ``nn.Module`` this system owns.
        optimizer: ``params -> Optimizer`` (Hydra ``_partial_``).
        scheduler: ``(optimizer, total_steps) -> LRScheduler`` stepped every training step,
            given the number of steps the trainer will run (``build_schedule``; one without
            ``total_steps`` is called with the optimizer alone), or ``None``.
        seed: the run's seed, for the per-step seeds.
        on_nonfinite: ``"stop"`` or ``"skip"``.
        num_levels: quantisation levels of the data (images), ``None`` for continuous data.
        compile_step: train with ``CompiledAdamStep`` (above).
    """

    def __init__(self, flow: NormalizingFlow, optimizer: OptimizerFactory,
                 scheduler: SchedulerFactory | None = None, seed: int = 0,
                 on_nonfinite: str = "stop", num_levels: int | None = None,
                 compile_step: bool = False) -> None:
        super().__init__()
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite={on_nonfinite!r} must be 'stop' or 'skip'")
        self.flow = flow
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.seed = seed
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0
        self._seconds_before_fit = 0.0  # from the checkpoint a fit resumed
        self._fit_start: float | None = None
        self.num_levels = num_levels
        self.num_dims = math.prod(flow.event_shape)
        self.train_bpd_key = "train/bpd_estimate" if has_series_logdet(flow) else "train/bpd"
        self._test_moments: Tensor | None = None
        self.test_result: dict[str, float] = {}
        self.compile_step = compile_step
        self._compiled_step: CompiledAdamStep | None = None
        self._warning_filters: list | None = None

    def on_fit_start(self) -> None:
        # fixed during a fit: walking the module tree for them every step took 0.2 ms
        # (Real NVP 2-D, 48 parameter tensors)
        self._parameter_list = list(self.parameters())
        self._fit_start = time.perf_counter()
        if self.compile_step:
            self.check_compile_step(self.trainer)
            torch._dynamo.reset()  # earlier fits' graphs (a sweep in one process) count
            optimizer = self.optimizers(use_pl_optimizer=False)
            self._compiled_step = CompiledAdamStep(self.flow, optimizer,
                                                   self.trainer.gradient_clip_val or None)
            # training_step returns None by design here, which Lightning warns about: silenced
            # until the fit ends (a fit that raises leaves the filter in place)
            self._warning_filters = warnings.filters[:]
            warnings.filterwarnings("ignore", message="`training_step` returned `None`")

    def on_fit_end(self) -> None:
        if self._warning_filters is not None:
            warnings.filters[:] = self._warning_filters
            self._warning_filters = None

    def check_compile_step(self, trainer: L.Trainer) -> None:
        """Raise a ``ValueError`` saying why ``compile_step`` cannot train under ``trainer``
        (or with this flow and optimizer), if it cannot."""
        fix = "; set compile_step=false"
        if trainer.world_size > 1:
            raise ValueError(f"compile_step needs a single process (its gradients bypass DDP's "
                             f"all-reduce), got {trainer.world_size}{fix}")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(f"compile_step updates the weights on every batch, got "
                             f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}"
                             f"{fix}")
        if str(trainer.precision) not in ("32-true", "64-true"):
            raise ValueError(f"compile_step trains float32 or float64 weights (Adam's step "
                             f"count and learning rate in half precision would round), got "
                             f"trainer.precision={trainer.precision}; use "
                             f"trainer.precision=32-true or set compile_step=false")
        if trainer.gradient_clip_val and trainer.gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"compile_step clips the gradient norm, got "
                             f"trainer.gradient_clip_algorithm="
                             f"{trainer.gradient_clip_algorithm}{fix}")
        check_supported(self.flow, self.optimizer_factory(self.flow.parameters()))

    @property
    def fit_seconds(self) -> float:
        """Wall-clock seconds of ``fit`` over the whole run, the segments before a resume
        included (carried in the checkpoint)."""
        running = 0.0 if self._fit_start is None else time.perf_counter() - self._fit_start
        return self._seconds_before_fit + running

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The run's counters a resumed fit continues from."""
        checkpoint["flows"] = {"fit_seconds": self.fit_seconds,
                               "skipped_steps": self.skipped_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counters = checkpoint.get("flows", {})
        self._seconds_before_fit = float(counters.get("fit_seconds", 0.0))
        self.skipped_steps = int(counters.get("skipped_steps", 0))

    def on_train_batch_start(self, batch: Tensor, batch_idx: int) -> None:
        self._reseed(step_seed(self.seed, self.global_step, self.global_rank))

    def on_validation_batch_start(self, batch: Tensor, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._reseed(step_seed(self.seed, batch_idx, self.global_rank, VAL_STREAM))

    def on_test_batch_start(self, batch: Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._reseed(step_seed(self.seed, batch_idx, self.global_rank, TEST_STREAM))

    def _reseed(self, seed: int) -> None:
        if self.device.type == "cpu":  # 2 us, where torch.manual_seed takes 0.3 ms
            torch.default_generator.manual_seed(seed)
        else:  # the accelerators' generators as well
            torch.manual_seed(seed)

    def on_train_batch_end(self, outputs: object, batch: Tensor, batch_idx: int) -> None:
        # Lightning validates every val_check_interval steps or at epoch ends, so a max_steps
        # between them would leave the final weights unvalidated and never a candidate for
        # the best checkpoint (what testing uses). Asking it to stop at the last step makes
        # it validate there; the same for the last batch of the last epoch (image configs
        # validate every val_check_interval steps, not at epoch ends).
        trainer = self.trainer
        if ends_training(trainer, batch_idx):
            trainer.should_stop = True
        # Lightning validates a stopping step (ours, max_time's) only in an epoch that
        # check_val_every_n_epoch selects; lifting it for the step where the run really ends
        # (min_steps / min_epochs met: Lightning's own test) validates the final weights
        # whichever epoch that is.
        if trainer.should_stop and trainer.fit_loop._can_stop_early:
            trainer.check_val_every_n_epoch = None

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor | None:
        if self._compiled_step is not None:
            return self._compiled_training_step(batch, batch_idx)
        loss = -self.flow.log_prob(batch).mean()
        if not torch.isfinite(loss):
            return self._nonfinite_loss(loss, batch, batch_idx)
        self._log_loss(loss)
        return loss

    def _compiled_training_step(self, batch: Tensor, batch_idx: int) -> None:
        """The whole step by ``CompiledAdamStep``; a non-finite step has changed nothing."""
        loss, norm, finite = self._compiled_step(batch)
        if not finite:  # the step's one host read (a GPU sync)
            if not torch.isfinite(loss):
                return self._nonfinite_loss(loss, batch, batch_idx)
            loss = -self.flow.log_prob(batch).mean()  # again, to name the gradients
            named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            return self._nonfinite_gradient(norm, zip((n for n, _ in named), grads,
                                                          strict=True))
        self._log_loss(loss)
        if self.logs_this_step():
            self.log("train/grad_norm", norm)
        return None

    def _log_loss(self, loss: Tensor) -> None:
        if self.logs_this_step():
            self.log("train/nll", loss, prog_bar=True)
            if self.num_levels:
                self.log(self.train_bpd_key, bits_per_dim(loss.detach(), self.num_dims,
                                                          self.num_levels))

    def _nonfinite_loss(self, loss: Tensor, batch: Tensor, batch_idx: int) -> None:
        where = first_nonfinite_bijection(self.flow, batch) or "the base log-density"
        return self._nonfinite(
            f"training loss became {loss.item()} at step {self.global_step} (epoch "
            f"{self.current_epoch}, batch {batch_idx}), first in {where}"
        )

    def _nonfinite_gradient(self, norm: Tensor,
                            named_grads: Iterable[tuple[str, Tensor | None]]) -> None:
        bad = [name for name, grad in named_grads
               if grad is not None and not torch.isfinite(grad).all()]
        where = (f"in {len(bad)} parameter(s), first {bad[0]}" if bad else
                 "every gradient finite but their total norm overflows float32")
        return self._nonfinite(f"gradient norm became {float(norm)} at step "
                               f"{self.global_step} with a finite loss, {where}")

    def logs_this_step(self) -> bool:
        """Whether this training step's metrics are logged: on the steps Lightning's logger
        writes (every ``log_every_n_steps``) and the last. Each ``self.log`` call costs 1-2 ms
        (Lightning moves its stored metric to the device on every call): logging two metrics
        every step made a Real NVP 2-D training step (22 ms) 9% slower."""
        step, every = self.global_step + 1, self.trainer.log_every_n_steps
        return (every > 0 and step % every == 0) or step == self.trainer.max_steps

    def _nonfinite(self, message: str) -> None:
        """Stop with ``message``, or count the step as skipped."""
        if self.on_nonfinite == "stop":
            raise NonFiniteError(f"{message}; {self._nonfinite_advice()}")
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps))

    def _nonfinite_advice(self) -> str:
        """What to change, from this run's rate and clipping: norm clipping does not bound an
        Adam or Adamax step (about ``lr`` per weight whatever the gradient's scale), so with
        clipping on only the rate, its warmup or the data are left to change."""
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        clip = self.trainer.gradient_clip_val
        advice = (f"lower optim.lr (the rate at this step: {lr:.3g}), warm it up "
                  f"(scheduler=warmup_cosine warmup_steps=N)")
        if not clip:
            return (f"{advice}, enable gradient clipping (trainer.gradient_clip_val) or check "
                    f"the data")
        return f"{advice} or check the data; gradients are already clipped at norm {clip:g}"

    def configure_gradient_clipping(self, optimizer: Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Check and log the total gradient norm, then clip with that same norm.

        Lightning calls this after every backward (the gradients are unscaled under mixed
        precision); computing the norm once serves the NaN check, the log and norm clipping.
        """
        if self._compiled_step is not None:  # it clipped inside its graph; no gradients here
            return
        params = [p for p in self._parameter_list if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm_value = float(norm)  # the step's one host read of it (a GPU sync)
        if not math.isfinite(norm_value):
            self._nonfinite_gradient(norm, ((name, p.grad)
                                            for name, p in self.named_parameters()))
            for p in params:  # skip: no update from this batch
                p.grad = None
            return
        if self.logs_this_step():
            self.log("train/grad_norm", norm)
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm in (None, "norm"):
            if norm_value > gradient_clip_val:  # below it the scale is 1: nothing to multiply
                torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        nll = -self.flow.log_prob(batch).mean()
        # sync_dist: under DDP every rank sees a share of the split; the logged (and
        # checkpoint-monitored) value is the mean over all of them
        self.log("val/nll", nll, prog_bar=True, batch_size=batch.shape[0], sync_dist=True)
        if self.num_levels:
            self.log("val/bpd", bits_per_dim(nll, self.num_dims, self.num_levels),
                     batch_size=batch.shape[0], sync_dist=True)

    def on_test_epoch_start(self) -> None:
        self._test_moments = torch.zeros(3, dtype=torch.float64, device=self.device)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._test_moments += nll_moments(self.flow.log_prob(batch))

    def on_test_epoch_end(self) -> None:
        # Each rank saw a disjoint part of the test split: the moments add up.
        moments = self.trainer.strategy.reduce(self._test_moments, reduce_op="sum")
        nll, standard_error = nll_from_moments(moments)
        self.test_result = {"test_nll": nll, "test_nll_se": standard_error,
                            "num_test": int(moments[0].item())}
        self.log("test/nll", nll)
        self.log("test/nll_se", standard_error)
        if self.num_levels:
            bpd = bits_per_dim(nll, self.num_dims, self.num_levels)
            bpd_se = standard_error * bits_per_dim_scale(self.num_dims)
            self.test_result.update(test_bpd=bpd, test_bpd_se=bpd_se)
            self.log("test/bpd", bpd)

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory(self.flow.parameters())
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = build_schedule(self.scheduler_factory, optimizer,
                                   self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
