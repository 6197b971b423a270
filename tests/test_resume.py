"""Faults survived: a run killed with SIGKILL mid-epoch resumes to the uninterrupted result."""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.types import _Stateful

from flows.data.datamodules import ToyDataModule
from tests.conftest import CLI_ENV, run_cli
from tests.test_configs import build_from

# A small i-ResNet with the Hutchinson series log-det: training draws random probes every
# step, and the spectral norms keep power-iteration buffers: both must survive a restart.
# 4096 / 256 = 16 steps per epoch; last.ckpt every 7 steps, so most are mid-epoch.
STEPS_PER_EPOCH = 16
SMALL = ["model=iresnet", "model.num_blocks=2", "model.hidden_features=8", "model.logdet=series",
         "model.compile=false", "data=moons", "data.num_train=4096", "data.num_val=512",
         "data.num_test=1024", "data.batch_size=256", "trainer.enable_progress_bar=false",
         "~callbacks.plots"]
RUN = [*SMALL, "trainer.max_steps=400", "callbacks.last_checkpoint.every_n_train_steps=7"]


def logged(metrics_csv):
    """Every (step, metric, value) in a CSV log, whatever its column order."""
    with open(metrics_csv) as file:
        return {(row["step"], key, value) for row in csv.DictReader(file)
                for key, value in row.items() if value and key != "step"}


def last_step(run_dir):
    path = run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        return -1
    return torch.load(path, weights_only=True)["global_step"]


def start_and_kill_mid_epoch(cwd, name, min_step=60):
    """Start a run and SIGKILL it once last.ckpt is past ``min_step`` and mid-epoch."""
    run_dir = cwd / "outputs" / "iresnet-moons" / name
    process = subprocess.Popen([sys.executable, "-m", "flows.train", *RUN, f"name={name}"],
                               cwd=cwd, env=CLI_ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        step = last_step(run_dir)
        if step >= min_step and step % STEPS_PER_EPOCH:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return run_dir, step
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"the run ended (code {process.returncode}) before it could be killed")


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run_bitwise(tmp_path):
    result = run_cli("flows.train", *RUN, "name=straight", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    straight = tmp_path / "outputs" / "iresnet-moons" / "straight"

    killed, step = start_and_kill_mid_epoch(tmp_path, "killed")
    assert not (killed / "results.json").exists()  # it really died mid-run
    logged_before = logged(killed / "csv" / "version_0" / "metrics.csv")
    seconds_before = torch.load(killed / "checkpoints" / "last.ckpt",
                                weights_only=True)["flows"]["fit_seconds"]
    result = run_cli("flows.train", *RUN, "name=killed", "ckpt_path=last", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    want = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    got = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert got["global_step"] == want["global_step"] == 400
    # Weights, spectral-norm u/v buffers and ActNorm flags: bitwise (CPU, same op order).
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for key, value in want["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
    for got_state, want_state in zip(got["optimizer_states"][0]["state"].values(),
                                     want["optimizer_states"][0]["state"].values(), strict=True):
        for key in want_state:
            assert torch.equal(got_state[key], want_state[key]), key
    assert got["lr_schedulers"] == want["lr_schedulers"]

    results = json.loads((killed / "results.json").read_text())
    expected = json.loads((straight / "results.json").read_text())
    assert results["test_nll"] == expected["test_nll"]
    assert results["val_nll"] == expected["val_nll"]
    assert results["resumed_from"].endswith("last.ckpt")
    # its wall time counts the segment before the kill too
    assert 0 < seconds_before < results["wall_s"]
    # Resuming appended to the run folder's logs: the rows from before the kill are still there.
    assert logged(killed / "csv" / "version_0" / "metrics.csv") == logged_before
    resumed = logged(killed / "csv" / "version_1" / "metrics.csv")
    assert min(int(s) for s, _, _ in resumed) >= step
    print(f"killed after the checkpoint of step {step}")


def test_a_named_run_folder_is_never_overwritten(tmp_path):
    short = [*SMALL, "trainer.max_steps=5"]
    result = run_cli("flows.train", *short, "name=mine", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "iresnet-moons" / "mine"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    # the folder named by name= or given as hydra.run.dir=, refused in one line either way
    for folder in ("name=mine", f"hydra.run.dir={run_dir}"):
        again = run_cli("flows.train", *short, folder, "optim.lr=0.5", cwd=tmp_path)
        assert again.returncode != 0
        assert "already holds a run; resume it with ckpt_path=last" in again.stderr
        assert again.stderr.strip().count("\n") == 0, again.stderr[-2000:]
        after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        assert after == before  # not one byte changed, the saved config included

    # a resume keeps the run's settings: a longer schedule, another model or averaging
    # switched on is refused
    wider = [o.replace("hidden_features=8", "hidden_features=16") for o in SMALL]
    for folder in ("name=mine", f"hydra.run.dir={run_dir}"):
        changed = run_cli("flows.train", *wider, "trainer.max_steps=10", "ema_decay=0.9",
                          folder, "ckpt_path=last", cwd=tmp_path)
        assert changed.returncode != 0
        assert ("this command changes ema_decay (None -> 0.9), model.hidden_features (8 -> 16), "
                "trainer.max_steps (5 -> 10)" in changed.stderr), changed.stderr[-2000:]
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before

    # its checkpoint into a new run of another size: refused before anything is kept
    other = run_cli("flows.train", *wider, "trainer.max_steps=10", "name=wider",
                    f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", cwd=tmp_path)
    assert other.returncode == 1 and "Traceback" not in other.stderr
    assert "does not match this command's model" in other.stderr, other.stderr[-2000:]
    assert not (tmp_path / "outputs" / "iresnet-moons" / "wider").exists()

    missing = run_cli("flows.train", *short, "name=other", "ckpt_path=last", cwd=tmp_path)
    assert missing.returncode == 1
    assert "other/checkpoints/last.ckpt is not a file" in missing.stderr
    assert not (tmp_path / "outputs" / "iresnet-moons" / "other").exists()


def test_a_moved_run_folder_resumes_and_tests_its_own_best_checkpoint(tmp_path):
    short = [*SMALL, "trainer.max_steps=6", "trainer.val_check_interval=3",
             "callbacks.last_checkpoint.every_n_train_steps=3"]
    assert run_cli("flows.train", *short, "name=before", cwd=tmp_path).returncode == 0
    group = tmp_path / "outputs" / "iresnet-moons"
    first = json.loads((group / "before" / "results.json").read_text())
    (group / "before").rename(group / "after")
    (group / "after" / "results.json").unlink()  # as if killed before the end
    result = run_cli("flows.train", *short, "name=after", "ckpt_path=last", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((group / "after" / "results.json").read_text())
    assert Path(again["best_ckpt"]).parent == group / "after" / "checkpoints"
    assert again["val_nll"] == first["val_nll"] and again["test_nll"] == first["test_nll"]


def test_training_loader_declares_itself_resumable_to_lightning():
    """Lightning warns that a mid-epoch resume is "unreliable" unless every training loader
    has ``state_dict`` / ``load_state_dict``; ours resumes from the step count (tested above)."""
    data = ToyDataModule("moons", num_train=1024, num_val=64, num_test=64, batch_size=256)
    data.setup()
    assert isinstance(data.train_dataloader(), _Stateful)
    assert len(list(data.train_dataloader())) == 4


class KilledInValidation(Exception):
    """Stands for a kill while the validation after a step runs."""


class ValidationLog(L.Callback):
    """The steps validated (sanity check aside); raises ``KilledInValidation`` as the
    validation after step ``kill_at`` starts."""

    def __init__(self, kill_at=None):
        self.kill_at, self.steps = kill_at, []

    def on_validation_start(self, trainer, module):
        if not trainer.sanity_checking and trainer.global_step == self.kill_at:
            raise KilledInValidation

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)


@pytest.mark.parametrize("kill_at", [32, 48])
def test_a_kill_during_a_validation_that_follows_a_last_save_is_validated_on_resume(
        tmp_path, kill_at):
    """Steps 16, 32 and 48 end an epoch (4096 / 256 points) and are due a ``last.ckpt``. A kill
    while step 32's or the final step 48's validation runs: the resumed run validates that
    step, and its best checkpoints are the uninterrupted run's. (Lightning resumes a
    checkpoint written at a step's end as if that step's validation had run, and skipped it.)
    """
    overrides = ["data.num_train=4096", "data.num_val=512", "data.num_test=512",
                 "data.batch_size=256", "trainer.max_steps=48",
                 "callbacks.last_checkpoint.every_n_train_steps=16", "callbacks.plots=null",
                 "callbacks.diagnostics=null", "logger=csv", "test=false",
                 "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]

    def fit(folder, log, ckpt_path=None):
        datamodule, module, trainer = build_from(folder, *overrides)
        trainer.callbacks.append(log)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        return sorted(p.name for p in (folder / "checkpoints").glob("best-*"))

    whole = ValidationLog()
    uninterrupted = fit(tmp_path / "whole", whole)
    assert whole.steps == [16, 32, 48]
    killed = ValidationLog(kill_at)
    with pytest.raises(KilledInValidation):
        fit(tmp_path / "killed", killed)
    assert killed.steps == [16, 32, 48][:[16, 32, 48].index(kill_at)]
    resumed = ValidationLog()
    assert fit(tmp_path / "killed", resumed,
               str(tmp_path / "killed" / "checkpoints" / "last.ckpt")) == uninterrupted
    assert resumed.steps[0] == kill_at and resumed.steps[-1] == 48


class BatchLog(L.Callback):
    """Training batches per epoch; raises ``KilledInValidation`` after step ``kill_at``."""

    def __init__(self, kill_at=None):
        self.kill_at, self.per_epoch = kill_at, {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        epoch = trainer.current_epoch
        self.per_epoch[epoch] = self.per_epoch.get(epoch, 0) + 1
        if trainer.global_step == self.kill_at:
            raise KilledInValidation


def test_gradient_accumulation_that_does_not_divide_the_epoch(tmp_path):
    """16 batches an epoch, 3 per step: Lightning steps at batches 3, 6, ..., 15 and at the
    epoch's last, 6 steps an epoch. Every epoch sees its 16 batches (the batches used to be
    counted as 3 a step, so epochs shrank until one held too few to step and training never
    ended), and a run killed mid-epoch resumes to the uninterrupted run's weights."""
    overrides = ["data.num_train=4096", "data.num_val=256", "data.num_test=256",
                 "data.batch_size=256", "+trainer.accumulate_grad_batches=3",
                 "trainer.max_steps=20", "callbacks.last_checkpoint.every_n_train_steps=4",
                 "callbacks.plots=null", "callbacks.diagnostics=null", "logger=csv",
                 "test=false", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false"]

    def fit(folder, log, ckpt_path=None):
        datamodule, module, trainer = build_from(folder, *overrides)
        trainer.callbacks.append(log)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        return trainer, module

    whole = BatchLog()
    trainer, module = fit(tmp_path / "whole", whole)
    assert trainer.global_step == 20
    assert whole.per_epoch == {0: 16, 1: 16, 2: 16, 3: 6}  # 18 steps, then 2 of 3 batches
    killed = BatchLog(kill_at=10)  # after last.ckpt at step 8, mid-epoch 1
    with pytest.raises(KilledInValidation):
        fit(tmp_path / "killed", killed)
    _, resumed = fit(tmp_path / "killed", BatchLog(),
                     str(tmp_path / "killed" / "checkpoints" / "last.ckpt"))
    for (name, want), got in zip(module.state_dict().items(), resumed.state_dict().values(),
                                 strict=True):
        assert torch.equal(want, got), name


def test_last_checkpoint_only_at_the_end(tmp_path):
    """``every_n_train_steps=0``: no periodic ``last.ckpt``, the one at the end still."""
    datamodule, module, trainer = build_from(
        tmp_path, "data.num_train=2048", "data.num_val=256", "data.num_test=256",
        "data.batch_size=256", "trainer.max_steps=12",
        "callbacks.last_checkpoint.every_n_train_steps=0", "callbacks.plots=null",
        "callbacks.diagnostics=null", "logger=csv", "test=false",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")
    trainer.fit(module, datamodule=datamodule)
    assert last_step(tmp_path) == 12
