"""The command line on images (offline digits): train, evaluate, sample, bad input."""

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch

from flows.lit import callbacks
from flows.lit.callbacks import FlowDiagnostics, ImageSamples
from tests.conftest import run_cli

FAST = ["data=digits", "trainer.max_steps=20", "trainer.val_check_interval=10",
        "trainer.log_every_n_steps=5",
        "callbacks.image_samples.every_n_validations=1", "callbacks.image_samples.num_samples=16",
        "callbacks.image_samples.num_reconstructions=8", "callbacks.diagnostics.num_images=32"]
SMALL = {
    "realnvp": ["model.hidden_channels=8", "model.num_couplings=2"],
    "glow": ["model.hidden_channels=8", "model.num_steps=2"],
    "iresnet": ["model.hidden_channels=8", "model.num_blocks=2", "model.eval_num_probes=2"],
}


@pytest.fixture(scope="module", params=sorted(SMALL))
def image_run(request, tmp_path_factory):
    cwd = tmp_path_factory.mktemp(request.param)
    run_dir = cwd / "run"
    result = run_cli("flows.train", f"model={request.param}", f"hydra.run.dir={run_dir}",
                     *FAST, *SMALL[request.param], cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return request.param, run_dir


def test_image_run_reports_bits_per_dim_and_draws_grids(image_run):
    model, run = image_run
    results = json.loads((run / "results.json").read_text())
    assert results["num_test"] == 297 and results["train_steps"] == 20
    assert results["device"] == "cpu"
    # bpd and nats are one formula apart: bpd = (nll + D ln 17) / (D ln 2), D = 64
    expected = (results["test_nll"] + 64 * math.log(17)) / (64 * math.log(2))
    assert results["test_bpd"] == pytest.approx(expected)
    assert results["test_bpd_se"] == pytest.approx(results["test_nll_se"] / (64 * math.log(2)))
    assert 0.5 < results["test_bpd"] < math.log2(17) + 1  # trained 20 steps: near uniform
    for kind in ("samples", "reconstructions"):
        assert (run / "plots" / "final" / f"{kind}.png").stat().st_size > 5000
        assert (run / "plots" / "step_000020" / f"{kind}.png").is_file()
    with open(run / "csv" / "version_0" / "metrics.csv") as f:
        columns = next(csv.reader(f))
    train_key = "train/bpd_estimate" if model == "iresnet" else "train/bpd"
    assert train_key in columns and "val/bpd" in columns
    assert ("train/bpd" in columns) == (model != "iresnet")


def test_image_grid_cadence_survives_a_resume(image_run):
    """The validation count is in the checkpoint, so a resumed run draws on the same steps."""
    _, run = image_run
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    states = [v for k, v in checkpoint["callbacks"].items() if k.startswith("ImageSamples")]
    assert states == [{"validations": 2}]  # 20 steps, a validation every 10

    callback = ImageSamples(every_n_validations=3)
    callback.load_state_dict(states[0])
    drawn = []
    callback._draw = lambda trainer, module, name: drawn.append(name)
    trainer = SimpleNamespace(sanity_checking=False, global_step=30)
    callback.on_validation_epoch_end(trainer, None)  # the 3rd validation overall
    assert drawn == ["step_000030"]


def test_an_epoch_budget_ends_with_a_validation(tmp_path):
    """Image configs validate every val_check_interval steps, not at epoch ends; the last
    batch of ``trainer.max_epochs`` is validated all the same, so the final weights are a
    best-checkpoint candidate and the run reports validation bits/dim (it had none)."""
    run = tmp_path / "run"
    overrides = [o for o in FAST if not o.startswith(("trainer.max_steps", "trainer.val_check"))]
    result = run_cli("flows.train", "model=realnvp", *overrides, *SMALL["realnvp"],
                     "trainer.max_epochs=1", "trainer.val_check_interval=250",
                     f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    # 1,350 training digits at batch 64: one epoch is 21 full batches (the rest is dropped)
    assert results["status"] == "finished" and results["train_steps"] == 21
    assert "val_bpd" in results and "best-000021-" in results["best_ckpt"]


@pytest.mark.parametrize(("event_shape", "checked"), [((1, 4, 4), 3), ((2,), 5)])
def test_diagnostics_reconstruct_fewer_images_than_points(monkeypatch, event_shape, checked):
    flow = torch.nn.Module()  # the callback reads only the flow's event shape and modules
    flow.event_shape = event_shape
    seen = []
    monkeypatch.setattr(callbacks, "reconstruction_error",
                        lambda flow, x: seen.append(len(x)) or 0.0)
    monkeypatch.setattr(callbacks, "saturated_scales", lambda flow, x: {})
    module = SimpleNamespace(flow=flow, device="cpu", dtype=torch.float32,
                             log_dict=lambda *a, **k: None)
    trainer = SimpleNamespace(sanity_checking=False, global_step=1, datamodule=SimpleNamespace(
        splits={"val": torch.zeros(10, *event_shape)}))
    FlowDiagnostics(num_points=5, num_images=3).on_validation_epoch_end(trainer, module)
    assert seen == [checked]


def test_evaluate_gives_test_bits_per_dim_with_its_accuracy(image_run, tmp_path):
    model, run = image_run
    out = tmp_path / "eval.json"
    result = run_cli("flows.evaluate", f"ckpt={run}", f"out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads(out.read_text())
    results = json.loads((run / "results.json").read_text())
    assert evaluation["num_points"] == 297 and evaluation["num_levels"] == 17
    assert "series_estimate" not in evaluation
    if model != "iresnet":  # exact log-det: the same number as at the end of training
        assert evaluation["bpd"] == pytest.approx(results["test_bpd"], abs=1e-5)
        return
    # 8x8 images: every residual block sees at most 64 dimensions, so the log-det is exact;
    # the training-time test used the series (20 terms x 2 probes): equal within its noise
    assert evaluation["logdet"] == "exact"
    assert evaluation["bpd"] == pytest.approx(results["test_bpd"], abs=0.02)

    # The series estimator with its stated accuracy, against that exact value. Its standard
    # error pools each image's spread over the passes (297 images: hundreds of degrees of
    # freedom), so (error - bias) / SE is close to a unit normal: |z| > 5 has probability 6e-7.
    series_out = tmp_path / "series.json"
    result = run_cli("flows.evaluate", f"ckpt={run}", f"out={series_out}", "min_passes=2",
                     "max_passes=2", "max_bias=1e-3", "exact_logdet_max_dims=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    series = json.loads(series_out.read_text())
    estimate = series["series_estimate"]
    assert series["logdet"] == "series estimate"
    assert estimate["truncation_bias_bound"] <= 1e-3 and estimate["unit"] == "bits/dim"
    assert estimate["passes"] == 2 and estimate["num_terms"] >= 5
    error = abs(series["bpd"] - evaluation["bpd"])
    assert error <= estimate["truncation_bias_bound"] + 5 * estimate["monte_carlo_se"] + 1e-5


def test_sample_writes_an_image_grid(image_run, tmp_path):
    _, run = image_run
    result = run_cli("flows.sample", f"ckpt={run}", "n=16", "temperature=0.7",
                     f"out={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert next(tmp_path.glob("*.png")).stat().st_size > 2000
    assert next(tmp_path.glob("*.npy")).is_file()


BAD_IMAGE_INPUT = [
    (["model=glow", "data=moons"], "Glow models images of shape (channels, height, width)"),
    (["model=nice"], "RealNVP and NICE model vector data"),
    (["model=realnvp", "model.num_scales=1", "model.log_scale_clamp=0"],
     "log_scale_clamp must be a positive finite number"),
    (["model=realnvp", "data.shape=[1,9,9]"], "data.shape=[1, 9, 9]"),
    (["model=realnvp", "model.num_scales=5"], "height and width must be even"),
    (["model=glow", "data.num_levels=64"], "num_levels=64 must be in [2, 17]"),
    (["model=glow", "data.num_levels=0"], "num_levels=0 must be in [2, 17]"),
    (["model=realnvp", "data=mnist", "data.download=false"], "no dataset files in"),
    (["model=realnvp", "trainer.max_steps=-1", "scheduler=cosine"], "scheduler=constant"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_IMAGE_INPUT)
def test_bad_image_input_fails_in_one_line(overrides, expected, tmp_path):
    other_data = any(o.startswith("data=") for o in overrides)
    fast = [o for o in FAST if not (other_data and o.startswith("data="))]
    if "data=moons" in overrides:
        fast = [o for o in fast if "image_samples" not in o]
    if "data=mnist" in overrides:
        fast.append(f"data.root={tmp_path / 'none'}")
    result = run_cli("flows.train", *fast, *overrides, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert expected in result.stderr, result.stderr[-2000:]
    outputs = tmp_path / "outputs"
    assert not outputs.exists() or not any(p.is_file() for p in outputs.rglob("*"))


def test_a_float64_image_run_dequantises_to_float64(tmp_path):
    result = run_cli("flows.train", "model=glow", *FAST, *SMALL["glow"],
                     "trainer.precision=64-true", "name=p", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "outputs" / "glow-digits" / "p" / "results.json")
                         .read_text())
    assert results["status"] == "finished" and results["test_bpd"] > 0
