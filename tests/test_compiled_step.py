"""The whole training step as one compiled graph: torch's Adam to rounding, nothing changed by a
non-finite step, and in the Lightning system the same run as the standard step."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from flows.bijections.elementwise import Logit
from flows.bijections.normalization import ActNorm
from flows.compiled_step import CompiledAdamStep
from flows.core import NormalizingFlow
from flows.distributions import StandardNormal
from flows.lit.module import DensityModule, NonFiniteError
from flows.models.iresnet import IResNet
from flows.models.multiscale import Glow
from flows.models.realnvp import RealNVP
from tests.test_module import SteepShift, small_toy, trainer


def perturbed_realnvp(dtype: torch.dtype) -> RealNVP:
    """Zero-initialised last layers give log-det 0 and gradients on few weights: perturb."""
    torch.manual_seed(0)
    flow = RealNVP(2, num_layers=2, hidden_features=16).to(dtype)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


def reference_step(flow: RealNVP, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                   max_grad_norm: float = float("inf")) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard step: autograd, ``clip_grad_norm_``, the optimizer's own ``step``."""
    loss = -flow.log_prob(x).mean()
    optimizer.zero_grad()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(flow.parameters(), max_grad_norm)
    optimizer.step()
    return loss.detach(), norm


def test_step_is_torchs_adamw_with_amsgrad_and_clipping_in_float64():
    compiled_flow, eager_flow = perturbed_realnvp(torch.float64), perturbed_realnvp(torch.float64)
    hyper = dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True)
    compiled_opt = torch.optim.AdamW(compiled_flow.parameters(), **hyper)
    eager_opt = torch.optim.AdamW(eager_flow.parameters(), **hyper)
    step = CompiledAdamStep(compiled_flow, compiled_opt, max_grad_norm=50.0)
    generator = torch.Generator().manual_seed(1)
    clipped = 0
    for i in range(6):
        x = 1.5 * torch.randn(64, 2, generator=generator, dtype=torch.float64)
        compiled_opt.param_groups[0]["lr"] = eager_opt.param_groups[0]["lr"] = 1e-2 / (i + 1)
        out = step(x)
        if i == 0:
            flat = step.storage.flat(True)  # moved in on the first call, then left in place
        loss, norm = reference_step(eager_flow, eager_opt, x, 50.0)
        clipped += bool(norm > 50.0)
        assert bool(out.finite)
        torch.testing.assert_close(out.loss, loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.grad_norm, norm, rtol=1e-12, atol=0)
    assert 0 < clipped < 6  # both sides of the threshold were exercised
    assert step._compiled.compiled is not None and not step._compiled.failed  # no fallback
    assert step.storage.flat(True) is flat
    for got, want in zip(compiled_flow.parameters(), eager_flow.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got_state = compiled_opt.state_dict()["state"]
    want_state = eager_opt.state_dict()["state"]
    for index, want in want_state.items():
        assert got_state[index].keys() == want.keys()
        for key, value in want.items():
            torch.testing.assert_close(got_state[index][key], value, rtol=1e-10, atol=1e-14)

    # a NaN in the batch: loss and norm NaN, and weights and optimizer state untouched
    weights = [p.clone() for p in compiled_flow.parameters()]
    state = {i: {k: v.clone() for k, v in s.items()} for i, s in got_state.items()}
    x = torch.randn(64, 2, dtype=torch.float64).index_fill(0, torch.tensor([5]), torch.nan)
    out = step(x)
    assert not bool(out.finite) and torch.isnan(out.loss)
    for before, after in zip(weights, compiled_flow.parameters(), strict=True):
        assert torch.equal(before, after)
    for index, values in compiled_opt.state_dict()["state"].items():
        for key, value in values.items():
            assert torch.equal(value, state[index][key]), (index, key)


def test_step_is_torchs_adam_with_maximize_and_coupled_weight_decay_in_float64():
    """The update's other branches: a negated gradient and L2 decay added to the gradient."""
    compiled_flow, eager_flow = perturbed_realnvp(torch.float64), perturbed_realnvp(torch.float64)
    hyper = dict(lr=3e-3, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.2, maximize=True)
    compiled_opt = torch.optim.Adam(compiled_flow.parameters(), **hyper)
    eager_opt = torch.optim.Adam(eager_flow.parameters(), **hyper)
    step = CompiledAdamStep(compiled_flow, compiled_opt)
    generator = torch.Generator().manual_seed(2)
    for _ in range(4):
        x = torch.randn(32, 2, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(step(x).loss, reference_step(eager_flow, eager_opt, x)[0],
                                   rtol=1e-12, atol=0)
    assert step._compiled.compiled is not None and not step._compiled.failed  # no fallback
    for got, want in zip(compiled_flow.parameters(), eager_flow.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got_state = compiled_opt.state_dict()["state"]
    for index, want in eager_opt.state_dict()["state"].items():
        for key, value in want.items():
            torch.testing.assert_close(got_state[index][key], value, rtol=1e-10, atol=1e-14)


def test_float32_step_with_a_tensor_learning_rate_is_torchs_adam_to_float32_rounding():
    compiled_flow, eager_flow = perturbed_realnvp(torch.float32), perturbed_realnvp(torch.float32)
    compiled_opt = torch.optim.Adam(compiled_flow.parameters(), lr=torch.tensor(3e-3))
    eager_opt = torch.optim.Adam(eager_flow.parameters(), lr=3e-3)
    step = CompiledAdamStep(compiled_flow, compiled_opt)
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        x = torch.randn(64, 2, generator=generator)
        torch.testing.assert_close(step(x).loss, reference_step(eager_flow, eager_opt, x)[0],
                                   rtol=1e-5, atol=0)
    assert step._compiled.compiled is not None and not step._compiled.failed
    for got, want in zip(compiled_flow.parameters(), eager_flow.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_unsupported_flows_and_optimizers_are_refused_with_the_reason():
    flow = RealNVP(2, num_layers=2, hidden_features=8)
    with pytest.raises(ValueError, match="runs Adam or AdamW, got SGD"):
        CompiledAdamStep(flow, torch.optim.SGD(flow.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"exactly the flow's 12 trainable parameters, got \[6\]"):
        CompiledAdamStep(flow, torch.optim.Adam(list(flow.parameters())[:6]))
    normed = RealNVP(2, num_layers=2, hidden_features=8, normalization="batchnorm")
    with pytest.raises(ValueError, match=r"transform.bijections.1 \(BatchNorm\) updates its "
                                         r"running statistics"):
        CompiledAdamStep(normed, torch.optim.Adam(normed.parameters()))
    iresnet = IResNet(2, num_blocks=1, hidden_features=8, actnorm=False)
    with pytest.raises(ValueError, match=r"transform.bijections.0 \(ResidualBlock\) updates the "
                                         r"power-iteration vectors of its spectral"):
        CompiledAdamStep(iresnet, torch.optim.Adam(iresnet.parameters()))
    half = RealNVP(2, num_layers=2, hidden_features=8).to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 or float64 weights .* got torch.bfloat16"):
        CompiledAdamStep(half, torch.optim.Adam(half.parameters()))
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        CompiledAdamStep(flow, torch.optim.Adam(flow.parameters()), max_grad_norm=0.0)


def test_glow_steps_are_torchs_adam_after_actnorms_first_batch_and_bad_pixels_change_nothing():
    """Glow: ActNorm initialised from the first batch as the eager step does, the logit's
    [0, 1] check before the graph; float64, so the two runs agree to rounding."""
    def glow() -> Glow:
        torch.manual_seed(0)
        flow = Glow((1, 4, 4), num_levels=2, num_steps=2, hidden_channels=8).double()
        with torch.no_grad():  # zero-initialised last convolutions: perturb
            for p in flow.parameters():
                p.add_(0.05 * torch.randn_like(p))
        return flow

    torch._dynamo.reset()  # earlier tests' graphs count towards the recompile limit
    compiled_flow, eager_flow = glow(), glow()
    compiled_opt = torch.optim.Adam(compiled_flow.parameters(), lr=1e-2, weight_decay=0.03)
    eager_opt = torch.optim.Adam(eager_flow.parameters(), lr=1e-2, weight_decay=0.03)
    step = CompiledAdamStep(compiled_flow, compiled_opt, max_grad_norm=100.0)
    actnorms = [m for m in compiled_flow.modules() if isinstance(m, ActNorm)]
    assert len(actnorms) == 4
    generator = torch.Generator().manual_seed(2)
    batches = [torch.rand(16, 1, 4, 4, generator=generator, dtype=torch.float64)
               for _ in range(4)]

    bad = batches[0].clone()
    bad[3, 0, 1, 2] = 1.5
    weights = [p.clone() for p in compiled_flow.parameters()]
    with pytest.raises(ValueError, match=r"image values must lie in \[0, 1\] .*, got values in "
                                         r"\[.*, 1.5\]"):
        step(bad)
    assert all(m.needs_initialization for m in actnorms)  # not initialised from a refused batch
    assert all(torch.equal(a, b) for a, b in zip(weights, compiled_flow.parameters(), strict=True))

    for x in batches:
        out = step(x)
        loss, norm = reference_step(eager_flow, eager_opt, x, 100.0)
        assert bool(out.finite)
        torch.testing.assert_close(out.loss, loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.grad_norm, norm, rtol=1e-11, atol=0)
    assert not any(m.needs_initialization for m in actnorms)
    assert step._compiled.compiled is not None and not step._compiled.failed  # no fallback
    for got, want in zip(compiled_flow.state_dict().values(), eager_flow.state_dict().values(),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    weights = [p.clone() for p in compiled_flow.parameters()]
    with pytest.raises(ValueError, match=r"image values must lie in \[0, 1\]"):
        step(bad)  # refused after compiling as well
    assert all(torch.equal(a, b) for a, b in zip(weights, compiled_flow.parameters(), strict=True))

    # resumed into a new model and optimizer: ActNorm is not initialised again
    resumed_flow = glow()
    resumed_flow.load_state_dict(compiled_flow.state_dict())
    resumed_opt = torch.optim.Adam(resumed_flow.parameters(), lr=1e-2, weight_decay=0.03)
    resumed_opt.load_state_dict(compiled_opt.state_dict())
    resumed = CompiledAdamStep(resumed_flow, resumed_opt, max_grad_norm=100.0)
    x = torch.rand(16, 1, 4, 4, generator=generator, dtype=torch.float64)
    out = resumed(x)
    loss, _ = reference_step(eager_flow, eager_opt, x, 100.0)
    torch.testing.assert_close(out.loss, loss, rtol=1e-12, atol=0)
    for got, want in zip(resumed_flow.state_dict().values(), eager_flow.state_dict().values(),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_logit_compiled_outside_flows_callers_still_refuses_bad_pixels():
    """Only flows' compiled callers, which check first, let the logit skip its check."""
    torch._dynamo.reset()
    logit = torch.compile(Logit(1e-6))
    x = torch.rand(4, 1, 2, 2)
    torch.testing.assert_close(logit(x)[0], Logit(1e-6)(x)[0])
    with pytest.raises(ValueError, match=r"image values must lie in \[0, 1\]"):
        logit(x - 0.5)


def fit_realnvp(tmp_path, compile_step: bool, max_steps: int, ckpt_path=None,
                callbacks=()) -> tuple[DensityModule, L.Trainer]:
    """A small Real NVP in float64, Adam with a cosine schedule and norm clipping."""
    module = DensityModule(
        perturbed_realnvp(torch.float64), lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=40),
        compile_step=compile_step)
    fit = trainer(tmp_path, max_steps=max_steps, precision="64-true", gradient_clip_val=3.0,
                  log_every_n_steps=1, num_sanity_val_steps=0, limit_val_batches=0,
                  callbacks=list(callbacks))
    fit.fit(module, small_toy(), ckpt_path=ckpt_path)
    return module, fit


def test_lightning_run_with_the_compiled_step_is_the_standard_run_and_resumes(tmp_path):
    standard, standard_fit = fit_realnvp(tmp_path / "standard", False, 20)
    # one graph for the whole run: a recompile (a new learning rate taken for a constant, say)
    # fails the compile, which the step reports by falling back to eager
    torch._dynamo.reset()  # forget the graphs of other tests' steps
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled, compiled_fit = fit_realnvp(tmp_path / "compiled", True, 20)
    assert compiled_fit.global_step == standard_fit.global_step == 20
    for key in ("train/nll", "train/grad_norm"):  # the last step's values
        torch.testing.assert_close(compiled_fit.callback_metrics[key],
                                   standard_fit.callback_metrics[key], rtol=1e-9, atol=0)
    assert compiled._compiled_step._compiled.compiled is not None  # compiled, no fallback
    assert not compiled._compiled_step._compiled.failed
    for fit in (compiled_fit, standard_fit):  # the cosine schedule stepped 20 of its 40 steps
        assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(5e-3)
    for got, want in zip(compiled.flow.parameters(), standard.flow.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)

    # stopped at step 12 and resumed from its checkpoint: the uninterrupted run, bitwise
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=12,
                                  save_top_k=-1)
    fit_realnvp(tmp_path / "first", True, 12, callbacks=[checkpoints])
    resumed, _ = fit_realnvp(tmp_path / "resumed", True, 20,
                             ckpt_path=str(next((tmp_path / "ckpt").glob("*step=12.ckpt"))))
    for got, want in zip(resumed.flow.parameters(), compiled.flow.parameters(), strict=True):
        assert torch.equal(got, want)

    # a standard run's checkpoint resumed with the compiled step: the standard run, to rounding
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "standard_ckpt", every_n_train_steps=12,
                                  save_top_k=-1)
    fit_realnvp(tmp_path / "standard_first", False, 12, callbacks=[checkpoints])
    switched, _ = fit_realnvp(
        tmp_path / "switched", True, 20,
        ckpt_path=str(next((tmp_path / "standard_ckpt").glob("*step=12.ckpt"))))
    for got, want in zip(switched.flow.parameters(), standard.flow.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_gradient_norm_is_stopped_or_skipped_with_nothing_changed(tmp_path, mode):
    flow = NormalizingFlow(SteepShift(), StandardNormal((2,)))
    module = DensityModule(flow, lambda p: torch.optim.Adam(p, lr=0.01), on_nonfinite=mode,
                           compile_step=True)
    fit = trainer(tmp_path, max_steps=3, num_sanity_val_steps=0, limit_val_batches=0)
    if mode == "stop":
        with pytest.raises(NonFiniteError, match="at step 0 with a finite loss, every gradient "
                                                 "finite but their total norm overflows"):
            fit.fit(module, small_toy())
    else:
        fit.fit(module, small_toy())
        assert module.skipped_steps == fit.global_step == 3
    assert torch.equal(flow.transform.shift, torch.zeros(4))
    state = fit.optimizers[0].state[flow.transform.shift]
    assert state["step"] == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()


def test_without_a_compiler_the_step_runs_eagerly_with_the_same_math(monkeypatch):
    def no_compiler(fn, **options):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    eager_flow, reference = perturbed_realnvp(torch.float64), perturbed_realnvp(torch.float64)
    step = CompiledAdamStep(eager_flow, torch.optim.Adam(eager_flow.parameters(), lr=1e-2))
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2)
    x = torch.randn(64, 2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found.*set compile_step=false"):
        step(x)
    for _ in range(2):
        step(x)
    for _ in range(3):
        reference_step(reference, optimizer, x)
    assert step._compiled.failed
    for got, want in zip(eager_flow.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
