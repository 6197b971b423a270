"""A training step's forward and backward make no needless host syncs.

On a GPU every read of a tensor's value on the host (``bool(t)``, ``t.item()``, ``if t < 0``)
waits for all queued kernels, so the host stops queueing ahead. The count is taken on the CPU
as calls of ``aten::_local_scalar_dense``, the op such a read dispatches to on any device.
"""

import pytest
import torch
from hydra.utils import instantiate
from torch.utils._python_dispatch import TorchDispatchMode

from tests.test_configs import build_from, compose_train


class HostReads(TorchDispatchMode):
    """Counts the ops that copy one tensor value to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._local_scalar_dense:
            self.count += 1
        return func(*args, **(kwargs or {}))


def host_reads_in_a_training_step(flow, x) -> int:
    optimizer = torch.optim.Adam(flow.parameters(), 1e-4)
    flow.train()
    for _ in range(2):  # the first forward initialises ActNorm from the data
        loss = -flow.log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with HostReads() as reads:
        (-flow.log_prob(x).mean()).backward()
    return reads.count


@pytest.mark.parametrize("model", ["realnvp", "nice", "iresnet"])
def test_vector_models_train_without_host_syncs(model):
    cfg = compose_train(f"model={model}", "data=moons")
    if "compile" in cfg.model:  # eager: the count is of flows' own code
        cfg.model.compile = False
    flow = instantiate(cfg.model)
    assert host_reads_in_a_training_step(flow, torch.randn(64, 2)) == 0


@pytest.mark.parametrize("model", ["realnvp", "glow", "iresnet"])
def test_image_models_sync_once_for_the_input_check(model):
    """One read: the logit's check that the images lie in [0, 1] (ActNorm's data-dependent
    initialisation used to read its buffer in every forward: 10-16 reads a step)."""
    cfg = compose_train(f"model={model}", "data=digits", "model.hidden_channels=8")
    flow = instantiate(cfg.model)
    x = torch.rand(16, 1, 8, 8)
    assert host_reads_in_a_training_step(flow, x) == 1


def test_the_training_loop_reads_two_values_a_step(tmp_path):
    """Lightning's loop around the step adds two reads: the loss's and the gradient norm's
    finiteness checks (the norm is read once for its check, its log and clipping)."""
    reads = {}
    for steps in (10, 30):
        datamodule, module, trainer = build_from(
            tmp_path / str(steps), "data=moons", "data.num_train=30000", "data.num_val=512",
            "data.num_test=512", f"trainer.max_steps={steps}", "callbacks=none",
            "trainer.check_val_every_n_epoch=1000", "logger=csv",
            "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
            "+trainer.enable_checkpointing=false")
        with HostReads() as counter:
            trainer.fit(module, datamodule=datamodule)
        reads[steps] = counter.count
    assert (reads[30] - reads[10]) / 20 == 2
