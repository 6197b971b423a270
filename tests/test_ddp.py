"""Lightning's DDP with 2 CPU processes (gloo): identical ranks, equal to one process.

The in-process test forks its ranks (`ddp_fork`): with `ddp_spawn` a spawned rank sometimes
aborted at interpreter exit ("terminate called without an active exception") after training
had finished correctly. The command-line test uses `ddp`, Lightning's subprocess launcher.
"""

import functools
import json

import lightning as L
import torch

from flows.bijections.normalization import ActNorm
from flows.data.datamodules import ToyDataModule
from flows.lit.module import DensityModule
from flows.models.realnvp import RealNVP
from tests.conftest import run_cli


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


def test_two_ranks_hold_identical_weights_equal_to_one_process_with_twice_the_batch(tmp_path):
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    fit(tmp_path / "ddp", devices=2, batch_size=128)
    fit(tmp_path / "single", devices=1, batch_size=256)

    ranks = [torch.load(tmp_path / "ddp" / f"actnorm-{r}.pt") for r in (0, 1)]
    assert ranks[0] and ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    final = [torch.load(tmp_path / "ddp" / f"final-{r}.pt") for r in (0, 1)]
    single = torch.load(tmp_path / "single" / "final-0.pt")
    for key in single:
        assert torch.equal(final[0][key], final[1][key]), key
        # Rank r's batch is half of the single run's batch: the same gradient up to rounding.
        torch.testing.assert_close(final[0][key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    # ActNorm was initialised from both ranks' halves, i.e. from the single run's full batch.
    single_actnorm = torch.load(tmp_path / "single" / "actnorm-0.pt")
    for key in single_actnorm:
        torch.testing.assert_close(ranks[0][key], single_actnorm[key], rtol=1e-4, atol=1e-5)


def test_ddp_command_line_writes_one_run_folder_from_rank_zero(tmp_path):
    result = run_cli("flows.train", "trainer=ddp", "trainer.accelerator=cpu",
                     "trainer.devices=2", "trainer.max_steps=10", "data.num_train=4096",
                     "data.num_val=512", "data.num_test=1000", "data.batch_size=128",
                     "callbacks.plots.grid_points=20", "callbacks.plots.num_samples=100",
                     "name=ddp", "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "outputs").rglob("results.json"))
    assert [r.parent.name for r in runs] == ["ddp"]  # no folder from the second process
    results = json.loads(runs[0].read_text())
    assert results["num_test"] == 1000  # every test point exactly once over both ranks
    assert results["train_steps"] == 10
    assert (runs[0].parent / "plots" / "final" / "density.png").is_file()
