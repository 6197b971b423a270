"""Loud numerical failures, safe checkpoint files, refused unsafe input, flow health checks."""

import errno
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows.bijections.coupling import AffineCoupling
from flows.cli import write_json
from flows.core import Compose, NormalizingFlow, first_nonfinite_bijection
from flows.diagnostics import reconstruction_error, residual_lipschitz_bounds, saturated_scales
from flows.distributions import StandardNormal
from flows.lit.checkpoint_io import AtomicCheckpointIO
from flows.lit.module import DensityModule
from flows.models.iresnet import IResNet
from flows.models.realnvp import RealNVP
from flows.nn.lipschitz import _identity, power_iterate_
from flows.runs import find_checkpoint, read_checkpoint
from tests.conftest import ROOT, fake_run_folder, run_cli
from tests.test_module import BreaksAfter, small_toy, trainer

# NaN and inf ---------------------------------------------------------------------------------


def test_first_nonfinite_bijection_names_the_innermost_layer():
    flow = RealNVP(2, num_layers=4, hidden_features=8)
    x = torch.randn(5, 2)
    assert first_nonfinite_bijection(flow, x) is None
    with torch.no_grad():
        flow.transform.bijections[2].conditioner[0].bias.fill_(math.nan)
    assert first_nonfinite_bijection(flow, x) == "transform.bijections.2 (AffineCoupling)"
    assert first_nonfinite_bijection(flow, x.index_fill(0, torch.tensor([1]), math.inf)) \
        == "the input"


def test_nonfinite_error_names_the_layer(tmp_path):
    flow = NormalizingFlow(Compose(BreaksAfter(calls=10**9), BreaksAfter(calls=3)),
                           StandardNormal((2,)))
    module = DensityModule(flow, lambda p: torch.optim.SGD(p, lr=0.01))
    with pytest.raises(FloatingPointError, match=r"at step 3 .*first in "
                                                 r"transform\.bijections\.1 \(BreaksAfter\)"):
        trainer(tmp_path, max_steps=10).fit(module, small_toy())


def test_skip_mode_skips_and_counts_nonfinite_batches(tmp_path):
    shift = BreaksAfter(calls=4)
    module = DensityModule(NormalizingFlow(shift, StandardNormal((2,))),
                           lambda p: torch.optim.SGD(p, lr=0.01), on_nonfinite="skip")
    fit = trainer(tmp_path, max_steps=10, num_sanity_val_steps=0, limit_val_batches=0)
    fit.fit(module, small_toy())
    # Forwards 1-4 are finite, every later one NaN: 4 updates, then every batch skipped.
    assert module.skipped_steps > 0 and torch.isfinite(shift.shift).all()
    assert fit.callback_metrics["train/skipped_steps"] == module.skipped_steps
    # a checkpoint carries the count, so a resumed run goes on counting from it
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    resumed = DensityModule(NormalizingFlow(BreaksAfter(calls=4), StandardNormal((2,))),
                            lambda p: torch.optim.SGD(p, lr=0.01), on_nonfinite="skip")
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.skipped_steps == module.skipped_steps


# Checkpoint files ----------------------------------------------------------------------------


def test_atomic_checkpoint_survives_a_full_disk(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    good = path.read_bytes()

    real_save = torch.save

    def fill_disk(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)  # some bytes reach the disk, then it is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fill_disk)
    with pytest.raises(OSError, match=r"could not write checkpoint .*last\.ckpt \(No space "
                                      r"left on device\); the previous one is intact"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left
    assert torch.load(path, weights_only=True)["step"] == 1


def test_disk_full_during_training_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """A real run whose checkpoint write fails with ENOSPC (a sitecustomize fault)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import errno, torch\n"
        "real, calls = torch.save, [0]\n"
        "def save(obj, f, *a, **k):\n"
        "    calls[0] += 1\n"
        "    if calls[0] > 1:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return real(obj, f, *a, **k)\n"
        "torch.save = save\n")
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"}
    result = subprocess.run(
        [sys.executable, "-m", "flows.train", "data.num_train=4096", "data.num_val=512",
         "data.num_test=1024", "data.batch_size=256", "trainer.max_steps=40",
         "callbacks.last_checkpoint.every_n_train_steps=10", "~callbacks.plots", "name=full",
         "trainer.enable_progress_bar=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "No space left on device" in result.stderr and "previous one is intact" in result.stderr
    checkpoints = tmp_path / "outputs" / "realnvp-moons" / "full" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 10


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/flows-pwned"),))


def test_malicious_checkpoint_does_not_execute(tmp_path):
    run = fake_run_folder(tmp_path, "model:\n  _target_: flows.models.realnvp.RealNVP\n"
                                    "  features: 2\n", {"state_dict": _Payload()})
    Path("/tmp/flows-pwned").unlink(missing_ok=True)
    for command in ("flows.evaluate", "flows.sample"):
        result = run_cli(command, f"ckpt={run}", cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "truncated, corrupt or not a flows checkpoint" in result.stderr
    # resuming training from it: refused the same way, before a run folder is kept
    result = run_cli("flows.train", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                     cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "truncated, corrupt or not a flows checkpoint" in result.stderr
    assert not [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    assert not Path("/tmp/flows-pwned").exists()


def test_every_load_in_the_code_is_weights_only():
    pattern = re.compile(r"torch\.load\(|pickle\.loads?\(|weights_only\s*=\s*False")
    for path in (ROOT / "flows").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                assert "torch.load(" in line and "weights_only=True" in line, \
                    f"{path.relative_to(ROOT)}:{number}: {line.strip()}"


def test_results_files_are_standard_json_with_null_for_nonfinite_numbers(tmp_path):
    write_json(tmp_path / "r.json", {"test_nll": math.inf, "se": math.nan, "ok": 1.5,
                                     "nested": {"gap": -math.inf, "values": [math.nan, 2.0]}})
    text = (tmp_path / "r.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text) == {"test_nll": None, "se": None, "ok": 1.5,
                                "nested": {"gap": None, "values": [None, 2.0]}}


def test_run_folder_resolves_to_the_checkpoint_training_tested(tmp_path):
    run = fake_run_folder(tmp_path, "model: {}\n", b"")
    for name in ("best-000099-nll=2.90617.ckpt", "best-000100-nll=2.90617.ckpt",
                 "best-000050-nll=2.95000.ckpt"):
        (run / "checkpoints" / name).write_bytes(b"")
    # a tie in the rounded name: the later step, as the checkpoint callback keeps it
    assert find_checkpoint(run).name == "best-000100-nll=2.90617.ckpt"
    results = {"best_ckpt": "/elsewhere/run/checkpoints/best-000099-nll=2.90617.ckpt"}
    (run / "results.json").write_text(json.dumps(results))
    assert find_checkpoint(run).name == "best-000099-nll=2.90617.ckpt"  # the one it tested
    (run / "checkpoints" / "best-000099-nll=2.90617.ckpt").unlink()
    assert find_checkpoint(run).name == "best-000100-nll=2.90617.ckpt"


@pytest.mark.parametrize(("content", "expected"), [
    (b"hello\n", "cannot read checkpoint"),
    (b"model:\n  _target_: flows.models.realnvp.RealNVP\n", "cannot read checkpoint"),
    ([1, 2], "is not a Lightning checkpoint"),
    ({"state_dict": 3}, "is not a Lightning checkpoint"),
    ({"state_dict": {"flow.w": 3}}, "is not a Lightning checkpoint"),
])
def test_a_file_that_is_not_a_checkpoint_is_refused_by_name(tmp_path, content, expected):
    path = tmp_path / "c.ckpt"
    if isinstance(content, bytes):  # a text file, a YAML file renamed
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=expected) as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


def test_run_config_with_a_foreign_target_is_refused(tmp_path):
    run = fake_run_folder(tmp_path, "model:\n  _target_: subprocess.run\n"
                                    "  args: [touch, /tmp/flows-pwned-2]\n", {"state_dict": {}})
    Path("/tmp/flows-pwned-2").unlink(missing_ok=True)
    result = run_cli("flows.evaluate", f"ckpt={run}", cwd=tmp_path)
    assert result.returncode == 1 and "is refused" in result.stderr
    assert not Path("/tmp/flows-pwned-2").exists()


# Health checks -------------------------------------------------------------------------------


def test_residual_lipschitz_bounds_detect_a_stale_power_iteration():
    torch.manual_seed(0)
    model = IResNet(2, num_blocks=2, hidden_features=8, lipschitz_coeff=0.9)
    power_iterate_(model, rtol=1e-10)
    bounds = residual_lipschitz_bounds(model)
    assert len(bounds) == 2 and all(0 < b <= 0.9**3 * (1 + 1e-5) for b in bounds.values())
    # Give one weight singular values (100, 1, ..., 1) and point its v at the second singular
    # direction, and let the layer take its vectors as converged for that weight (it would
    # converge them itself: test_a_weight_changed_in_eval_mode_is_normalised_again; a stalled
    # power iteration is what is left): it estimates sigma = 1 instead of 100, scales by
    # 1/0.9 instead of 100/0.9, and the block stops being contractive.
    linear = model.transform.bijections[0].net.linears[1]
    normalization = linear.parametrizations.weight[0]
    with torch.no_grad():
        raw = linear.parametrizations.weight.original
        u, _, vh = torch.linalg.svd(raw)
        singular = torch.ones(8)
        singular[0] = 100.0
        raw.copy_(u @ torch.diag(singular) @ vh)
        normalization.v.copy_(vh[1])
    normalization.stale, normalization.converged_for = False, _identity(raw)
    bounds = residual_lipschitz_bounds(model.eval())
    assert bounds["transform.bijections.0"] > 1.0 > bounds["transform.bijections.2"]


def test_saturated_scales_and_reconstruction_error():
    torch.manual_seed(0)
    flow = RealNVP(2, num_layers=2, hidden_features=8)
    x = torch.randn(100, 2)
    assert saturated_scales(flow, x) == {"transform.bijections.0": 0.0,
                                         "transform.bijections.1": 0.0}
    coupling = flow.transform.bijections[1]
    assert isinstance(coupling, AffineCoupling)
    with torch.no_grad():
        coupling.conditioner[-1].bias[0].fill_(100.0)  # s_raw of the one scale: saturated
    assert saturated_scales(flow, x)["transform.bijections.1"] == 1.0
    assert reconstruction_error(flow, x) < 1e-5
