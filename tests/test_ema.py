"""Averaged weights (``ema_decay``): the recursion over the trained weights, what evaluation
and checkpoints hold, an exact resume, and spectral norms converged for the average."""

import lightning as L
import pytest
import torch

from flows.lit.callbacks import EMAWeights, LastCheckpoint, warmed_up_decay
from flows.lit.module import DensityModule
from flows.models.iresnet import IResNet
from flows.nn.lipschitz import _spectral_parametrizations
from tests.conftest import run_cli
from tests.test_compiled_step import perturbed_realnvp
from tests.test_module import small_toy, trainer

DECAY = 0.3  # the warm-up's (1 + n) / (10 + n) for n = 1, 2, the decay from n = 3 on


class RecordWeights(L.Callback):
    """The trained weights after every optimizer step, in float64."""

    def __init__(self) -> None:
        self.steps: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.steps.append([p.detach().double().clone() for p in module.flow.parameters()])


def fit(tmp_path, max_steps: int, compile_step: bool = False, ckpt_path=None,
        callbacks=(), decay: float = DECAY) -> tuple[DensityModule, L.Trainer]:
    module = DensityModule(perturbed_realnvp(torch.float64),
                           lambda p: torch.optim.Adam(p, lr=1e-2), compile_step=compile_step)
    run = trainer(tmp_path, max_steps=max_steps, precision="64-true", num_sanity_val_steps=0,
                  limit_val_batches=0,
                  callbacks=[*callbacks, EMAWeights(decay),
                             LastCheckpoint(str(tmp_path / "ckpt"), every_n_train_steps=1000)])
    run.fit(module, small_toy(), ckpt_path=ckpt_path)
    return module, run


@pytest.mark.parametrize("compile_step", [False, True])
def test_checkpoint_and_model_hold_the_recursive_average_and_the_trained_weights(
        tmp_path, compile_step):
    torch._dynamo.reset()
    recorder = RecordWeights()
    module, _ = fit(tmp_path, 12, compile_step, callbacks=[recorder])
    assert len(recorder.steps) == 12
    expected = recorder.steps[0]  # the first step copies
    decays = [warmed_up_decay(DECAY, n) for n in range(1, 12)]
    assert decays[:3] == [2 / 11, 3 / 12, DECAY]
    for d, weights in zip(decays, recorder.steps[1:], strict=True):
        expected = [d * e + (1 - d) * w for e, w in zip(expected, weights, strict=True)]
    trained = recorder.steps[-1]
    assert max((e - t).abs().max() for e, t in zip(expected, trained, strict=True)) > 1e-3

    names = [f"flow.{name}" for name, _ in module.flow.named_parameters()]
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    for name, average, last in zip(names, expected, trained, strict=True):
        torch.testing.assert_close(saved["state_dict"][name], average, rtol=1e-12, atol=1e-14)
        # written after Lightning copied the average into the model, still the trained ones
        assert torch.equal(saved["current_model_state"][name], last)
    for got, average in zip(module.flow.parameters(), expected, strict=True):
        torch.testing.assert_close(got, average, rtol=1e-12, atol=1e-14)


def test_resume_continues_the_trained_weights_and_the_average_bitwise(tmp_path):
    # 2048 / 256 = 8 steps an epoch: stop at an epoch's end, resume from last.ckpt; at 0.9
    # the warm-up's (1 + n) / (10 + n) sets the decay throughout, so the count must resume
    fit(tmp_path / "straight", 16, decay=0.9)
    fit(tmp_path / "first", 8, decay=0.9)
    fit(tmp_path / "first", 16, ckpt_path=str(tmp_path / "first" / "ckpt" / "last.ckpt"),
        decay=0.9)
    want = torch.load(tmp_path / "straight" / "ckpt" / "last.ckpt", weights_only=True)
    got = torch.load(tmp_path / "first" / "ckpt" / "last.ckpt", weights_only=True)
    assert got["global_step"] == want["global_step"] == 16
    for key in ("state_dict", "current_model_state"):
        assert got[key].keys() == want[key].keys()
        for name, value in want[key].items():
            assert torch.equal(got[key][name], value), (key, name)


def test_testing_a_checkpoint_after_fit_evaluates_the_average(tmp_path):
    module, run = fit(tmp_path, 10)
    path = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=True)
    with torch.no_grad():  # the trained weights into the model: the test must load the average
        for name, p in module.named_parameters():
            p.copy_(saved["current_model_state"][name])
    data = small_toy()
    run.test(module, datamodule=data, ckpt_path=str(path), verbose=False)
    reference = perturbed_realnvp(torch.float64)
    reference.load_state_dict({k.removeprefix("flow."): v for k, v in saved["state_dict"].items()})
    with torch.no_grad():
        nll = -reference.log_prob(data.splits["test"].double()).mean()
    assert module.test_result["test_nll"] == pytest.approx(float(nll), rel=1e-12)


def test_spectral_norms_are_converged_for_the_averaged_weights(tmp_path):
    torch.manual_seed(0)
    flow = IResNet(2, num_blocks=2, hidden_features=16, lipschitz_coeff=0.9, logdet="exact")
    module = DensityModule(flow, lambda p: torch.optim.Adam(p, lr=5e-2))
    run = trainer(tmp_path, max_steps=16, callbacks=[EMAWeights(0.9)],
                  val_check_interval=5, num_sanity_val_steps=0)
    run.fit(module, small_toy())
    flow.eval()
    flow.log_prob(torch.zeros(1, 2))  # the first eval-mode use converges u, v
    layers = _spectral_parametrizations(flow)
    assert layers
    for name, normalization, weight in layers:
        sigma = torch.linalg.matrix_norm(weight.detach().double(), ord=2)
        assert float(normalization.sigma(weight.detach())) == pytest.approx(float(sigma),
                                                                            rel=1e-5), name


@pytest.mark.parametrize("decay", [0, 1, 1.5, -0.5, True, "abc"])
def test_a_decay_outside_0_1_is_refused_with_the_range(decay):
    with pytest.raises(ValueError, match=r"ema_decay=.*: give a number in \(0, 1\)"):
        EMAWeights(decay)


def test_the_cli_refuses_a_bad_decay_before_creating_the_run_folder(tmp_path):
    result = run_cli("flows.train", "ema_decay=1.0", "name=refused", cwd=tmp_path)
    assert result.returncode == 1
    assert "ema_decay=1.0: give a number in (0, 1)" in result.stderr
    assert not (tmp_path / "outputs" / "realnvp-moons" / "refused").exists()
