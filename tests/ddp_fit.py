"""One small DDP (or single-process) fit that saves each rank's state: run as
``python -m tests.ddp_fit <folder> <devices> <batch size>`` in a fresh process.

A fresh process because forking ranks (``ddp_fork``) is unsafe once autograd has run in the
parent (as it has inside a pytest session), and spawned ranks (``ddp_spawn``) sometimes
aborted at interpreter exit ("terminate called without an active exception") after training
had finished correctly.
"""

import functools
import sys
from pathlib import Path

import lightning as L
import torch

from flows.bijections.normalization import ActNorm
from flows.data.datamodules import ToyDataModule
from flows.lit.module import DensityModule
from flows.models.realnvp import RealNVP


class SaveRankState(L.Callback):
    """Each rank writes its ActNorm state after the first step and its weights at the end."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            actnorm = {f"{name}.{key}": value.clone()
                       for name, layer in module.flow.named_modules()
                       if isinstance(layer, ActNorm) for key, value in layer.state_dict().items()}
            torch.save(actnorm, self.folder / f"actnorm-{trainer.global_rank}.pt")

    def on_train_end(self, trainer, module):
        torch.save(module.flow.state_dict(), self.folder / f"final-{trainer.global_rank}.pt")


def fit(folder, devices, batch_size):
    torch.manual_seed(0)
    flow = RealNVP(2, num_layers=4, hidden_features=16, normalization="actnorm")
    # SGD: the update is linear in the gradient, so rounding differences stay rounding-sized
    # (Adam divides by sqrt(v), which amplifies them where a gradient is near zero).
    module = DensityModule(flow, functools.partial(torch.optim.SGD, lr=0.05), seed=0)
    data = ToyDataModule("moons", num_train=4096, num_val=512, num_test=1024,
                         batch_size=batch_size)
    trainer = L.Trainer(accelerator="cpu", devices=devices, max_steps=12, logger=False,
                        strategy="ddp_fork" if devices > 1 else "auto",
                        use_distributed_sampler=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[SaveRankState(folder)])
    trainer.fit(module, data)


if __name__ == "__main__":
    fit(Path(sys.argv[1]), devices=int(sys.argv[2]), batch_size=int(sys.argv[3]))
