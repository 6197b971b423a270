"""The Lightning system: the loss is the NLL, and a non-finite loss stops training loudly."""

import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from flows.bijections.normalization import ActNorm
from flows.core import Bijection, NormalizingFlow
from flows.data.datamodules import ToyDataModule
from flows.distributions import StandardNormal
from flows.lit.module import DensityModule, NonFiniteError


class BreaksAfter(Bijection):
    """Identity plus a learnable shift whose log-det turns NaN after ``calls`` forwards."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.shift = torch.nn.Parameter(torch.zeros(2))
        self.calls, self.count = calls, 0

    def forward(self, x):
        self.count += self.training
        logdet = x.new_zeros(x.shape[0])
        return x + self.shift, logdet + (math.nan if self.count > self.calls else 0.0)

    def inverse(self, z):
        return z - self.shift, z.new_zeros(z.shape[0])


def small_toy(**kwargs):
    return ToyDataModule("moons", num_train=2048, num_val=512, num_test=1024, batch_size=256,
                         **kwargs)


def trainer(tmp_path, **kwargs):
    return L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     inference_mode=False, **kwargs)


def test_nonfinite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    flow = NormalizingFlow(BreaksAfter(calls=5), StandardNormal((2,)))
    module = DensityModule(flow, lambda p: torch.optim.SGD(p, lr=0.01))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2,
                                  save_last=True, save_top_k=-1)
    with pytest.raises(NonFiniteError, match="at step 5 "):
        trainer(tmp_path, max_steps=20, callbacks=[checkpoints]).fit(module, small_toy())
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


@pytest.mark.parametrize(("clip", "advice"), [
    (None, "enable gradient clipping (trainer.gradient_clip_val)"),
    (5.0, "gradients are already clipped at norm 5"),
])
def test_nonfinite_advice_names_the_rate_and_does_not_offer_clipping_twice(tmp_path, clip,
                                                                           advice):
    flow = NormalizingFlow(BreaksAfter(calls=2), StandardNormal((2,)))
    module = DensityModule(flow, lambda p: torch.optim.Adam(p, lr=0.003))
    with pytest.raises(NonFiniteError, match="at step 2 ") as info:
        trainer(tmp_path, max_steps=5, gradient_clip_val=clip).fit(module, small_toy())
    message = str(info.value)
    assert "lower optim.lr (the rate at this step: 0.003)" in message
    assert advice in message and ("enable gradient clipping" in message) == (clip is None)


def test_validation_and_test_of_a_series_logdet_do_not_depend_on_the_generator_state(tmp_path):
    """The i-ResNet's series log-det draws Hutchinson probes at evaluation: each validation and
    test batch is seeded, so whatever drew random numbers before (a resumed run's history, a
    callback) leaves the figures unchanged."""
    from flows.models.iresnet import IResNet

    flow = IResNet(2, num_blocks=2, hidden_features=16, logdet="series", eval_num_probes=1)
    module = DensityModule(flow, lambda p: torch.optim.Adam(p, lr=1e-3))
    fit = trainer(tmp_path, max_steps=2, limit_val_batches=2, limit_test_batches=2)
    data = small_toy(eval_batch_size=256)
    fit.fit(module, data)
    figures = []
    for state in (1, 2):
        torch.manual_seed(state)  # another history before each evaluation
        val = fit.validate(module, data, verbose=False)[0]["val/nll"]
        fit.test(module, data, verbose=False)
        figures.append((val, module.test_result["test_nll"]))
    assert figures[0] == figures[1]
    probes_matter = flow.log_prob(data.splits["val"][:256]).mean()  # unseeded: other probes
    assert float(probes_matter) != -figures[0][0]


class SteepShift(Bijection):
    """``x + shift`` with log-det ``3e38 * sum(shift)``: a finite loss at ``shift = 0`` whose
    gradient is finite in every element but overflows float32 in its total norm."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = torch.nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return x + self.shift[:2], (3e38 * self.shift).sum().expand(x.shape[0])

    def inverse(self, z):
        return z - self.shift[:2], (-3e38 * self.shift).sum().expand(z.shape[0])


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_gradient_norm_that_overflows_is_caught_like_a_nonfinite_gradient(tmp_path, mode):
    flow = NormalizingFlow(SteepShift(), StandardNormal((2,)))
    module = DensityModule(flow, lambda p: torch.optim.SGD(p, lr=0.01), on_nonfinite=mode)
    fit = trainer(tmp_path, max_steps=3, num_sanity_val_steps=0, limit_val_batches=0)
    if mode == "stop":
        with pytest.raises(NonFiniteError, match="every gradient finite but their total norm"):
            fit.fit(module, small_toy())
    else:
        fit.fit(module, small_toy())
        assert module.skipped_steps > 0 and torch.equal(flow.transform.shift, torch.zeros(4))


def test_test_nll_and_standard_error_match_direct_computation(tmp_path):
    flow = NormalizingFlow(ActNorm(2), StandardNormal((2,)))
    module = DensityModule(flow, lambda p: torch.optim.Adam(p, lr=1e-2))
    data = small_toy(eval_batch_size=100)  # several test batches: the gather must be exact
    fit = trainer(tmp_path, max_steps=10, num_sanity_val_steps=0)
    fit.fit(module, data)
    fit.test(module, data, verbose=False)
    with torch.no_grad():
        nll = -flow.eval().log_prob(data.splits["test"]).double()
    assert module.test_result["num_test"] == 1024
    assert module.test_result["test_nll"] == pytest.approx(nll.mean().item(), abs=1e-6)
    assert module.test_result["test_nll_se"] == pytest.approx(
        nll.std().item() / math.sqrt(1024), rel=1e-6)


class ValidationSteps(L.Callback):
    def __init__(self):
        self.steps = []

    def on_validation_end(self, trainer, module):
        self.steps.append(trainer.global_step)


class StopAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = trainer.should_stop or trainer.global_step == self.step


@pytest.mark.parametrize(("budget", "validation", "validated"), [
    ({"max_steps": 12}, {"val_check_interval": 5, "check_val_every_n_epoch": None},
     [5, 10, 12]),
    ({"max_steps": 10}, {"val_check_interval": 5, "check_val_every_n_epoch": None}, [5, 10]),
    ({"max_steps": 3}, {}, [3]),
    # every 2nd 8-batch epoch, ending inside the 3rd epoch or after it
    ({"max_steps": 20}, {"check_val_every_n_epoch": 2}, [16, 20]),
    ({"max_epochs": 3}, {"check_val_every_n_epoch": 2}, [16, 24]),
    # a callback stops training at step 3, as max_time's Timer does
    ({"max_steps": 100, "callbacks": [StopAt(3)]}, {"check_val_every_n_epoch": 2}, [3]),
    # ... but min_steps keeps it going to step 20: the epochs in between keep their schedule
    ({"max_steps": 100, "min_steps": 20, "callbacks": [StopAt(3)]},
     {"check_val_every_n_epoch": 2}, [16, 20]),
])
def test_the_last_step_is_always_validated(tmp_path, budget, validation, validated):
    """Every ``val_check_interval`` steps or ``check_val_every_n_epoch`` epochs of 8 batches,
    and once at the last step, wherever it falls."""
    flow = NormalizingFlow(ActNorm(2), StandardNormal((2,)))
    module = DensityModule(flow, lambda p: torch.optim.Adam(p, lr=1e-2))
    seen = ValidationSteps()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/nll", save_top_k=-1,
                                  filename="{step}")
    budget = dict(budget)  # the parameter is shared: take the callbacks off a copy
    callbacks = [seen, checkpoints, *budget.pop("callbacks", [])]
    trainer(tmp_path, num_sanity_val_steps=0, callbacks=callbacks, **budget,
            **validation).fit(module, small_toy())
    assert seen.steps == validated
    assert f"step={validated[-1]}.ckpt" in {p.name for p in (tmp_path / "ckpt").iterdir()}


def test_a_gradient_under_the_clipping_norm_is_applied_whole(tmp_path):
    """One SGD step with lr 1 moves the parameters by the whole gradient, unscaled."""
    shift = BreaksAfter(calls=10**9)
    module = DensityModule(NormalizingFlow(shift, StandardNormal((2,))),
                           lambda p: torch.optim.SGD(p, lr=1.0))
    fit = trainer(tmp_path, max_steps=1, num_sanity_val_steps=0, limit_val_batches=0,
                  gradient_clip_val=10.0)
    fit.fit(module, small_toy())
    gradient_norm = fit.callback_metrics["train/grad_norm"].item()
    assert 0.1 < gradient_norm < 10.0  # the moons mean, under the clipping norm
    assert shift.shift.detach().norm().item() == pytest.approx(gradient_norm, rel=1e-6)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_bounds_the_step(tmp_path, algorithm):
    """One SGD step with lr 1 moves the parameters by exactly the clipped gradient."""
    shift = BreaksAfter(calls=10**9)
    module = DensityModule(NormalizingFlow(shift, StandardNormal((2,))),
                           lambda p: torch.optim.SGD(p, lr=1.0))
    fit = trainer(tmp_path, max_steps=1, num_sanity_val_steps=0, limit_val_batches=0,
                  gradient_clip_val=1e-3, gradient_clip_algorithm=algorithm)
    fit.fit(module, small_toy())
    step = shift.shift.detach()  # started at zero
    unclipped = fit.callback_metrics["train/grad_norm"]
    assert unclipped > 0.1  # the moons mean: clipping really acts
    if algorithm == "norm":
        assert step.norm().item() == pytest.approx(1e-3, rel=1e-3)
    else:
        torch.testing.assert_close(step.abs(), torch.full((2,), 1e-3))


def test_training_metrics_reach_the_logger_every_n_steps_and_at_the_last(tmp_path):
    """Logged only on the steps Lightning's logger writes, none of those steps lacks them."""
    flow = NormalizingFlow(ActNorm(2), StandardNormal((2,)))
    module = DensityModule(flow, lambda p: torch.optim.Adam(p, lr=1e-2))
    L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=CSVLogger(tmp_path),
              enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
              max_steps=12, log_every_n_steps=5, num_sanity_val_steps=0,
              limit_val_batches=0).fit(module, small_toy())
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    for key in ("train/nll", "train/grad_norm"):
        steps = [int(row["step"]) for row in rows if row.get(key)]
        assert steps == [4, 9, 11], (key, steps)
