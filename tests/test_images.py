"""Image data, dequantisation and bits per dimension against known values."""

import math
import pickle
import struct
import urllib.error
import urllib.request
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from scipy.stats import norm
from torchvision.datasets import cifar

from flows.bijections.normalization import ActNorm
from flows.core import Compose, NormalizingFlow
from flows.data.datamodules import ImageDataModule
from flows.data.images import dequantize, requantize
from flows.distributions import StandardNormal
from flows.evaluation import (
    log_prob_passes,
    probe_standard_error,
    terms_for_bias,
    truncation_bias_bound,
)
from flows.lit.module import DensityModule
from flows.metrics import bits_per_dim, bits_per_dim_scale


@pytest.mark.parametrize("num_levels", [2, 17, 32, 256])
def test_uniform_density_is_log2_levels_bits_per_dim(num_levels):
    # log p(x) = 0 on [0, 1)^D: the discrete data has probability 1 / L per dimension
    assert bits_per_dim(0.0, 784, num_levels) == pytest.approx(math.log2(num_levels), abs=1e-12)


def test_gaussian_flow_bits_per_dim_is_its_closed_form():
    """x = mu + sigma * z per dimension: log p(x) is a sum of normal log-densities."""
    shift, log_scale = torch.tensor([0.4, 0.6]), torch.tensor([-1.5, -2.0])
    actnorm = ActNorm(2)
    with torch.no_grad():
        actnorm.shift.copy_(shift)
        actnorm.log_scale.copy_(log_scale)
    flow = NormalizingFlow(Compose(actnorm), StandardNormal((2, 3, 3))).eval()
    x = torch.rand(5, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    expected = norm.logpdf(x.numpy(), loc=shift.view(1, 2, 1, 1).numpy(),
                           scale=np.exp(log_scale.view(1, 2, 1, 1).numpy()))
    expected = expected.reshape(5, -1).sum(1)
    log_prob = flow.log_prob(x)
    np.testing.assert_allclose(log_prob.detach().numpy(), expected, rtol=1e-5)
    # bpd = -(log p - D log L) / (D ln 2) term by term
    bpd = bits_per_dim(-float(log_prob.detach().mean()), 18, 256)
    assert bpd == pytest.approx(-(expected.mean() - 18 * math.log(256)) / (18 * math.log(2)))
    assert bits_per_dim_scale(18) == pytest.approx(1 / (18 * math.log(2)))


def test_dequantization_fills_each_level_cell():
    levels = torch.arange(17, dtype=torch.uint8).repeat(2000)
    x = dequantize(levels, 17, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() < 1
    cell = torch.floor(x * 17).to(torch.uint8)
    assert torch.equal(cell, levels)  # (k + u) / L stays in [k / L, (k + 1) / L)
    offset = (x * 17 - levels.float()).mean()
    assert abs(float(offset) - 0.5) < 0.01  # u ~ U[0, 1): mean 1/2, SE 0.0016


def test_requantize_keeps_the_top_bits():
    levels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(requantize(levels, 256, 32), levels // 8)
    with pytest.raises(ValueError, match="num_levels"):
        requantize(levels, 17, 32)


def test_digits_splits_are_fixed_and_noise_follows_the_seed():
    first = ImageDataModule("digits", [1, 8, 8], num_val=150, seed=0)
    second = ImageDataModule("digits", [1, 8, 8], num_val=150, seed=1)
    first.setup()
    second.setup()
    sizes = [len(first.splits[s]) for s in ("train", "val", "test")]
    assert sizes == [1350, 150, 297]
    assert first.splits["train"].dtype == torch.uint8 and first.num_levels == 17
    assert torch.equal(first.splits["train"], second.splits["train"])  # same images
    # the same test images, dequantised with each seed's own fixed noise
    levels = [torch.floor(data.splits["test"] * 17) for data in (first, second)]
    assert torch.equal(*levels)
    assert not torch.equal(first.splits["test"], second.splits["test"])
    all_images = torch.cat([first.splits["train"].float(),
                            torch.floor(first.splits["val"] * 17),
                            torch.floor(first.splits["test"] * 17)])
    assert len(torch.unique(all_images.flatten(1), dim=0)) > 1700  # no image in two splits twice


def test_wrong_shape_is_named():
    with pytest.raises(ValueError, match=r"data.shape=\[1, 28, 28\]"):
        ImageDataModule("digits", [1, 28, 28], num_val=150).setup()


def write_idx(path, array):
    """An IDX file (MNIST's format): magic 0x0000080<ndim>, big-endian sizes, raw uint8."""
    header = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_mnist(root, folder="MNIST", num_train=40, num_test=12):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (num_train, 28, 28))
    test = rng.integers(0, 256, (num_test, 28, 28))
    write_idx(raw / "train-images-idx3-ubyte", train)
    write_idx(raw / "train-labels-idx1-ubyte", rng.integers(0, 10, num_train))
    write_idx(raw / "t10k-images-idx3-ubyte", test)
    write_idx(raw / "t10k-labels-idx1-ubyte", rng.integers(0, 10, num_test))
    return train, test


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"),
                                              ("fashion_mnist", "FashionMNIST")])
def test_torchvision_sets_load_from_idx_files_offline(tmp_path, name, folder):
    train, test = fake_mnist(tmp_path, folder)
    data = ImageDataModule(name, [1, 28, 28], root=str(tmp_path), download=False, num_val=8,
                           batch_size=16)
    data.setup()
    assert data.num_levels == 256
    assert len(data.splits["train"]) == 32 and len(data.splits["val"]) == 8
    loaded = torch.cat([data.splits["train"].float(), torch.floor(data.splits["val"] * 256)])
    expected = torch.from_numpy(train).float().unsqueeze(1)
    # the same 40 training images, in the module's fixed shuffled order
    assert sorted(map(tuple, loaded.flatten(1).tolist())) == sorted(
        map(tuple, expected.flatten(1).tolist()))
    assert torch.equal(torch.floor(data.splits["test"] * 256),
                       torch.from_numpy(test).float().unsqueeze(1))


def write_cifar_batch(path, images):
    """A CIFAR-10 python batch: a pickled dict whose ``data`` rows are 3,072 bytes, the red,
    green and blue 32x32 planes one after another, each row-major."""
    rows = images.reshape(len(images), 3 * 32 * 32).astype(np.uint8)
    path.write_bytes(pickle.dumps({"data": rows, "labels": [0] * len(images)}))


def test_cifar10_loads_from_its_python_batches_as_channels_first(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (5, 4, 3, 32, 32))  # 5 batches of 4 images, (C, H, W) each
    test = rng.integers(0, 256, (6, 3, 32, 32))
    for index, batch in enumerate(train, 1):
        write_cifar_batch(folder / f"data_batch_{index}", batch)
    write_cifar_batch(folder / "test_batch", test)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    # torchvision checks each file's MD5 against the real data set's; these files are small
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())

    data = ImageDataModule("cifar10", [3, 32, 32], root=str(tmp_path), download=False,
                           num_val=4, batch_size=16)
    data.setup()
    assert data.num_levels == 256 and data.splits["test"].shape == (6, 3, 32, 32)
    # the planes come back as channels: image i, channel c is plane c of row i
    assert torch.equal(torch.floor(data.splits["test"] * 256), torch.from_numpy(test).float())
    loaded = torch.cat([data.splits["train"].float(), torch.floor(data.splits["val"] * 256)])
    assert sorted(map(tuple, loaded.flatten(1).tolist())) == sorted(
        map(tuple, torch.from_numpy(train).float().flatten(0, 1).flatten(1).tolist()))


def test_missing_files_say_where_they_go(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"MNIST/raw.*download=false"):
        ImageDataModule("mnist", [1, 28, 28], root=str(tmp_path), download=False).setup()

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match=r"could not be downloaded.*data.root"):
        ImageDataModule("mnist", [1, 28, 28], root=str(tmp_path), download=True).setup()


class UniformDensity(NormalizingFlow):
    """A test double with log p(x) = 0 on [0, 1)^D: the uniform density."""

    def log_prob(self, x):
        return x.flatten(1).sum(1) * 0.0


def test_module_reports_log2_levels_for_the_uniform_density():
    flow = UniformDensity(Compose(), StandardNormal((1, 8, 8)))
    data = ImageDataModule("digits", [1, 8, 8], num_val=150)
    module = DensityModule(flow, lambda p: torch.optim.SGD(p, lr=0.1), num_levels=17)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, inference_mode=False)
    trainer.test(module, datamodule=data, verbose=False)
    assert module.test_result["test_bpd"] == pytest.approx(math.log2(17), abs=1e-12)
    assert module.test_result["test_bpd_se"] == 0.0


@pytest.mark.parametrize("lipschitz", [0.5, 0.9])
def test_truncation_bias_bound_holds_and_is_tight(lipschitz):
    """log det(I + J) against its n-term series for J = -L I (the worst case)."""
    eigenvalues = torch.tensor([-lipschitz, -lipschitz], dtype=torch.float64)
    exact = torch.log1p(eigenvalues).sum()
    for num_terms in (1, 5, 20):
        series = sum((-1) ** (k + 1) * (eigenvalues ** k).sum() / k
                     for k in range(1, num_terms + 1))
        bias_per_dim = float(abs(exact - series)) / 2
        bound = truncation_bias_bound([lipschitz], num_terms)
        assert bias_per_dim <= bound
        assert bias_per_dim >= bound / 4  # within a small factor for the extreme eigenvalue
    terms = terms_for_bias([lipschitz, lipschitz], 1e-4)
    assert truncation_bias_bound([lipschitz] * 2, terms) <= 1e-4
    assert truncation_bias_bound([lipschitz] * 2, terms - 1) > 1e-4


def test_probe_standard_error_from_the_spread_of_each_point_over_passes():
    # point 0: 1, 3 (variance 2); point 1: 3, 7 (variance 8): sqrt(10 / 2) / 2
    passes = torch.tensor([[1.0, 3.0], [3.0, 7.0]], dtype=torch.float64)
    assert probe_standard_error(passes) == pytest.approx(math.sqrt(5.0) / 2)
    assert probe_standard_error(passes[:1]) == math.inf

    # Against the truth: points with their own mean and noise level, 2 passes each. The
    # standardised error of the mean, (estimate - truth) / SE, must have unit spread.
    generator = torch.Generator().manual_seed(0)
    trials, num_passes, num_points = 2000, 2, 500
    truth = torch.randn(num_points, generator=generator, dtype=torch.float64) * 5
    noise_level = torch.rand(num_points, generator=generator, dtype=torch.float64) * 3
    z_scores = []
    for _ in range(trials):
        noise = torch.randn(num_passes, num_points, generator=generator, dtype=torch.float64)
        passes = truth + noise * noise_level
        z_scores.append(float(passes.mean() - truth.mean()) / probe_standard_error(passes))
    z_scores = torch.tensor(z_scores)
    # spread of 2,000 unit normals: 1 +- 0.016; from the pass means alone (1 degree of
    # freedom) the ratio would be a Cauchy variable, with no finite spread
    assert abs(float(z_scores.std()) - 1.0) < 0.06
    assert float((z_scores.abs() > 3).float().mean()) < 0.01


@pytest.mark.parametrize(("min_passes", "max_passes"), [(3, 2), (0, 5)])
def test_pass_counts_out_of_order_are_refused(min_passes, max_passes):
    with pytest.raises(ValueError, match=rf"min_passes={min_passes} and max_passes={max_passes}"):
        log_prob_passes(UniformDensity(Compose(), StandardNormal((2,))), torch.rand(4, 2),
                        batch_size=4, device=torch.device("cpu"), max_se=1e-3, se_scale=1.0,
                        min_passes=min_passes, max_passes=max_passes)


def test_accumulated_micro_batches_get_their_own_dequantisation_noise():
    """3 batches a step: the micro-batches of one step are dequantised with different noise,
    and a module that starts at step 1 (a resume) gives the noise an uninterrupted one did."""
    from types import SimpleNamespace

    def module_at(step):
        module = ImageDataModule("digits", [1, 8, 8], num_val=150)
        module.setup()
        module.trainer = SimpleNamespace(global_step=step, num_training_batches=16,
                                         accumulate_grad_batches=3, world_size=1, global_rank=0,
                                         lightning_module=None)
        return module

    levels = module_at(0).splits["train"][:8]
    running = module_at(0)
    first_step = [running.on_after_batch_transfer(levels, 0) for _ in range(3)]
    assert not torch.equal(first_step[0], first_step[1])
    assert not torch.equal(first_step[1], first_step[2])
    running.trainer.global_step = 1
    assert torch.equal(running.on_after_batch_transfer(levels, 0),
                       module_at(1).on_after_batch_transfer(levels, 0))
