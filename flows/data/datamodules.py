"""Lightning data modules for points and images (the only Lightning in ``flows.data``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from flows.data.images import (
    NATIVE_LEVELS,
    dequantize,
    load_digits,
    load_torchvision,
    requantize,
)
from flows.data.toy import TOY_DATASETS, sample_toy
from flows.seeds import DATA_STREAM, step_seed


class _Points(Dataset):
    """Rows of an ``(N, D)`` tensor, indexed by whole batches of indices (no per-row collate)."""

    def __init__(self, points: Tensor) -> None:
        self.points = points

    def __len__(self) -> int:
        return self.points.shape[0]

    def __getitem__(self, indices: list[int]) -> Tensor:
        return self.points[indices]


class TrainBatches(Sampler[Tensor]):
    """Index batches for training, a pure function of (seed, epoch, position, rank).

    Epoch ``e`` visits ``randperm(N)`` drawn from a generator seeded by ``(seed, e)``; step
    ``i`` of the epoch on rank ``r`` of ``W`` takes the slice ``[(i W + r) B, (i W + r + 1) B)``
    of it (every rank a disjoint full batch of ``B``; ``N // (B W)`` steps per epoch; the rest
    of the permutation is dropped). ``progress()`` returns ``(batches already consumed, rank,
    world size)``; iteration starts there, so a run resumed from a checkpoint written in the
    middle of an epoch sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, num_points: int, batch_size: int, seed: int,
                 progress: Callable[[], tuple[int, int, int]]) -> None:
        self.num_points = num_points
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress

    def __len__(self) -> int:
        _, _, world = self.progress()
        return self.num_points // (self.batch_size * world)

    def __iter__(self) -> Iterator[Tensor]:
        consumed, rank, world = self.progress()
        epoch, start = divmod(consumed, len(self))
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        order = torch.randperm(self.num_points, generator=torch.Generator().manual_seed(seed))
        for step in range(start, len(self)):
            first = (step * world + rank) * self.batch_size
            yield order[first: first + self.batch_size]


class StepResumedLoader(DataLoader):
    """The training ``DataLoader``: its ``TrainBatches`` restart where the trainer's restored
    step count says, so a run resumed mid-epoch sees the batches an uninterrupted one would.

    ``state_dict`` / ``load_state_dict`` are how Lightning recognises a resumable loader (and
    stops warning that a mid-epoch resume is unreliable); there is nothing to save beyond the
    step count the checkpoint already holds.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the batches follow the trainer's step count."""


def loader_class(batches: Sampler) -> type[DataLoader]:
    """``StepResumedLoader`` for ``TrainBatches``, a plain ``DataLoader`` otherwise."""
    return StepResumedLoader if isinstance(batches, TrainBatches) else DataLoader


def validate_points(points: np.ndarray, source: str) -> np.ndarray:
    """Check that ``points`` is a finite ``(N, D)`` float array; name the problem if not."""
    if points.ndim != 2:
        raise ValueError(
            f"{source}: expected an array of shape (num_points, num_features), got shape "
            f"{points.shape}; reshape the data to one row per point"
        )
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{source}: {rows.size} row(s) hold NaN or inf (first at row {rows[0]}); "
            f"remove or impute them before training"
        )
    with np.errstate(over="ignore"):
        single = points.astype(np.float32)
    huge = ~np.isfinite(single).all(axis=1)  # finite, but beyond float32's 3.4e38
    if huge.any():
        rows = np.flatnonzero(huge)
        raise ValueError(
            f"{source}: {rows.size} row(s) hold values beyond float32's range (+-3.4e38; "
            f"first at row {rows[0]}); rescale the data (standardise it) before training"
        )
    return single


class PointDataModule(L.LightningDataModule):
    """Train/val/test splits of ``(N, D)`` points, batched by index for speed.

    Subclasses implement ``make_splits`` returning three float32 arrays. Training batches
    come from ``TrainBatches``: fixed given the seed, sharded over distributed ranks (so the
    trainer must not add a ``DistributedSampler``: ``use_distributed_sampler=False``) and
    resumable mid-epoch from the trainer's step count.
    """

    def __init__(self, features: int, batch_size: int = 512, eval_batch_size: int = 10_000,
                 seed: int = 0) -> None:
        super().__init__()
        self.features = features
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.splits: dict[str, Tensor] = {}

    def make_splits(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            train, val, test = self.make_splits()
            if train.shape[1] != self.features:
                raise ValueError(
                    f"the data has {train.shape[1]} features per point but data.features="
                    f"{self.features}; set data.features={train.shape[1]}"
                )
            splits = {"train": torch.from_numpy(train), "val": torch.from_numpy(val),
                      "test": torch.from_numpy(test)}
            self.check_split_sizes(splits)
            self.splits = splits

    def check_split_sizes(self, splits: dict[str, Tensor]) -> None:
        """Raise a ``ValueError`` unless training has a full batch and evaluation 2 points.

        Training batches are always full (``TrainBatches`` drops the remainder), so fewer
        training points than ``batch_size`` would train nothing; a standard error needs 2.
        """
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(
                f"data.batch_size={self.batch_size} and data.eval_batch_size="
                f"{self.eval_batch_size} must both be >= 1"
            )
        sizes = {split: len(points) for split, points in splits.items()}
        if sizes["train"] < self.batch_size:
            raise ValueError(
                f"the training split has {sizes['train']} points, fewer than one batch "
                f"(data.batch_size={self.batch_size}), so nothing would train; lower "
                f"data.batch_size or give more data"
            )
        small = {split: n for split, n in sizes.items() if split != "train" and n < 2}
        if small:
            raise ValueError(
                f"the {' and '.join(small)} split(s) hold {', '.join(map(str, small.values()))} "
                f"point(s); evaluation needs at least 2 (for a standard error): give more data "
                f"or larger split sizes"
            )

    def batches_per_epoch(self, world: int) -> int:
        """Training batches per epoch on each of ``world`` processes (``TrainBatches``); a
        ``ValueError`` if there is not one each."""
        per_epoch = len(self.splits["train"]) // (self.batch_size * world)
        if per_epoch < 1:
            raise ValueError(
                f"the training split has {len(self.splits['train'])} points, fewer than one "
                f"batch for each of the {world} processes (data.batch_size={self.batch_size} "
                f"each), so nothing would train; lower data.batch_size or give more data")
        return per_epoch

    def _progress(self) -> tuple[int, int, int]:
        """``(batches consumed, rank, world size)`` from the trainer's step count; ``(0, 0, 1)``
        alone.

        Lightning steps the optimizer every ``a = accumulate_grad_batches`` batches and at an
        epoch's last batch, so an epoch of ``n`` batches takes ``ceil(n / a)`` steps, and
        ``s`` steps have consumed ``(s // ceil(n / a)) n + (s % ceil(n / a)) a`` batches (``n``
        Lightning's batches per epoch: ``TrainBatches``', or ``limit_train_batches``').
        """
        trainer = self.trainer
        if trainer is None:
            return 0, 0, 1
        world = trainer.world_size
        per_epoch = trainer.num_training_batches  # inf until Lightning has counted them
        if not math.isfinite(per_epoch) or per_epoch < 1:
            per_epoch = self.batches_per_epoch(world)
        accumulate = trainer.accumulate_grad_batches
        epochs, steps = divmod(trainer.global_step, math.ceil(per_epoch / accumulate))
        return epochs * per_epoch + steps * accumulate, trainer.global_rank, world

    def _loader(self, split: str, batches: Sampler) -> DataLoader:
        return loader_class(batches)(_Points(self.splits[split]), sampler=batches,
                                     batch_size=None)

    def train_dataloader(self) -> DataLoader:
        batches = TrainBatches(len(self.splits["train"]), self.batch_size, self.seed,
                               self._progress)
        return self._loader("train", batches)

    def _eval_loader(self, split: str) -> DataLoader:
        """Every row once over all ranks: rank ``r`` of ``W`` takes rows ``r, r + W, ...``."""
        _, rank, world = self._progress()
        rows = range(rank, len(self.splits[split]), world)
        return self._loader(split, BatchSampler(rows, self.eval_batch_size, drop_last=False))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


class ToyDataModule(PointDataModule):
    """One of the 2-D toy distributions (FFJORD / Residual Flows definitions).

    The three splits are drawn from independent streams of one seed
    (``np.random.SeedSequence(seed).spawn(3)``), so each split is fixed given the seed and
    the test set does not change when ``num_train`` does.

    Args:
        name: one of ``flows.data.toy.TOY_DATASETS``.
        num_train, num_val, num_test: split sizes; 50,000 test points keep the standard
            error of the test NLL near 0.005 nats.
    """

    def __init__(self, name: str, features: int = 2, num_train: int = 200_000,
                 num_val: int = 20_000, num_test: int = 50_000, batch_size: int = 512,
                 eval_batch_size: int = 10_000, seed: int = 0) -> None:
        super().__init__(features, batch_size, eval_batch_size, seed)
        if name not in TOY_DATASETS:
            raise ValueError(f"unknown toy dataset {name!r}; choose one of {list(TOY_DATASETS)}")
        self.name = name
        self.sizes = (num_train, num_val, num_test)

    def make_splits(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        streams = np.random.SeedSequence(self.seed).spawn(3)
        return tuple(
            sample_toy(self.name, size, np.random.default_rng(stream))
            for size, stream in zip(self.sizes, streams, strict=True)
        )


class FileDataModule(PointDataModule):
    """Your own points from a ``.npy`` (``(N, D)`` array) or ``.csv``/``.txt`` file.

    The rows are shuffled once with ``seed`` and split into train/val/test fractions.
    """

    def __init__(self, path: str, features: int, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, batch_size: int = 512,
                 eval_batch_size: int = 10_000, seed: int = 0) -> None:
        super().__init__(features, batch_size, eval_batch_size, seed)
        self.path = Path(path)
        if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be positive and sum below 1")
        self.fractions = (val_fraction, test_fraction)

    def make_splits(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.path.is_file():
            raise FileNotFoundError(f"data file {self.path} does not exist; set data.path")
        if self.path.suffix == ".npy":
            with open(self.path, "rb") as file:
                numpy_file = file.read(6) == b"\x93NUMPY"  # the .npy format's magic string
            try:
                if not numpy_file:
                    raise ValueError("not a NumPy .npy file (no .npy header)")
                points = np.load(self.path, allow_pickle=False)
            except ValueError as error:  # that, or an object array (pickles are never loaded)
                raise ValueError(f"{self.path}: {str(error).split('. ')[0]}; save the points "
                                 f"with numpy.save as a float array of shape (num_points, "
                                 f"num_features)") from None
        else:
            try:
                points = np.loadtxt(self.path, ndmin=2,
                                    delimiter="," if self.path.suffix == ".csv" else None)
            except ValueError as error:
                raise ValueError(f"{self.path}: {error}; the file must hold numbers only, one "
                                 f"point per line (no header)") from None
        if points.dtype.kind not in "biuf":  # bool, integers, floats: values a density can take
            raise ValueError(
                f"{self.path}: holds {points.dtype} values, not real numbers; save the points "
                f"as a float array (complex data: split real and imaginary parts into features)"
            )
        points = validate_points(points.astype(np.float64), str(self.path))
        order = np.random.default_rng(self.seed).permutation(points.shape[0])
        num_val, num_test = (max(1, int(f * points.shape[0])) for f in self.fractions)
        val, test, train = np.split(points[order], [num_val, num_val + num_test])
        return train, val, test


class ImageDataModule(PointDataModule):
    """Images as levels, uniformly dequantised to ``[0, 1)``: digits, MNIST, Fashion, CIFAR-10.

    Training batches hold ``uint8`` levels and are dequantised on the device after transfer
    (``on_after_batch_transfer``) with noise seeded by ``(seed, batch, rank)`` in its own stream
    (``flows.seeds.DATA_STREAM``: the model's Hutchinson probes must not reuse its bits), the
    batch counted from the trainer's step count (``_progress``) and, with gradient
    accumulation, its place in the step, so a resumed run sees the same noise. The validation
    and test splits are dequantised once with fixed noise (from ``seed``): evaluation is
    repeatable and ``evaluate`` reproduces the test number.

    Splits: ``digits`` (scikit-learn, offline) is shuffled once with a fixed generator into
    ``num_test`` test, ``num_val`` validation and the remaining training images, the same for
    every run seed; the torchvision sets keep their own test split and hold out the last
    ``num_val`` of a fixed shuffle of their training split for validation.

    Args:
        name: ``digits``, ``mnist``, ``fashion_mnist`` or ``cifar10``.
        shape: the expected ``(C, H, W)`` (the model configs read it); checked on load.
        root: folder of the torchvision files (downloaded there when ``download``).
        download: download missing torchvision files.
        num_levels: quantisation levels ``L`` (``null``: the data's own, 17 for digits, 256
            for 8-bit images); fewer merge levels, e.g. 32 for Glow's 5-bit setting.
        num_val: validation images held out of the training split.
        num_test: test images (digits only; the torchvision sets have their own).
        batch_size, eval_batch_size: training and evaluation batch sizes.
        num_workers: loader processes; 0 is fastest here (batches are slices of an in-memory
            tensor, a worker would only add a copy).
        pin_memory: pin batches for faster host-to-GPU copies (ignored without CUDA).
        seed: the run's seed (training order, dequantisation noise).
    """

    def __init__(self, name: str, shape: list[int], root: str = "data", download: bool = True,
                 num_levels: int | None = None, num_val: int = 5000, num_test: int = 297,
                 batch_size: int = 64, eval_batch_size: int = 500, num_workers: int = 0,
                 pin_memory: bool = True, seed: int = 0) -> None:
        if name not in NATIVE_LEVELS:
            raise ValueError(f"unknown image dataset {name!r}; choose one of "
                             f"{list(NATIVE_LEVELS)}")
        super().__init__(0, batch_size, eval_batch_size, seed)
        self.name = name
        self.shape = tuple(shape)
        self.root = root
        self.download = download
        self.num_levels = NATIVE_LEVELS[name] if num_levels is None else int(num_levels)
        self.num_val = num_val
        self.num_test = num_test
        # the training batch's place in its optimizer step (gradient accumulation)
        self._micro_batch, self._micro_batch_step = 0, None
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    def load_levels(self) -> tuple[Tensor, Tensor, Tensor]:
        """``uint8`` levels of the train, validation and test splits."""
        split = torch.Generator().manual_seed(0)  # the same split for every run seed
        if self.name == "digits":
            images = load_digits()
            order = torch.randperm(len(images), generator=split)
            test, val, train = torch.split(images[order], [
                self.num_test, self.num_val, len(images) - self.num_test - self.num_val])
        else:
            train_all = load_torchvision(self.name, self.root, True, self.download)
            test = load_torchvision(self.name, self.root, False, self.download)
            order = torch.randperm(len(train_all), generator=split)
            train, val = torch.split(train_all[order], [len(train_all) - self.num_val,
                                                        self.num_val])
        source = NATIVE_LEVELS[self.name]
        return tuple(requantize(s, source, self.num_levels) for s in (train, val, test))

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train, val, test = self.load_levels()
        if tuple(train.shape[1:]) != self.shape:
            raise ValueError(f"{self.name} images have shape {tuple(train.shape[1:])} but "
                             f"data.shape={list(self.shape)}; set data.shape to the images' shape")
        streams = np.random.SeedSequence([self.seed, 1]).generate_state(2)
        splits = {"train": train}
        for name, levels, stream in (("val", val, streams[0]), ("test", test, streams[1])):
            generator = torch.Generator().manual_seed(int(stream))
            splits[name] = dequantize(levels, self.num_levels, generator)
        self.check_split_sizes(splits)
        self.splits = splits

    def _loader(self, split: str, batches: Sampler) -> DataLoader:
        return loader_class(batches)(_Points(self.splits[split]), sampler=batches,
                                     batch_size=None, num_workers=self.num_workers,
                                     pin_memory=self.pin_memory and torch.cuda.is_available())

    def on_after_batch_transfer(self, batch: Tensor, dataloader_idx: int) -> Tensor:
        """Dequantise a training batch of levels on its device: ``(k + u) / L``."""
        if batch.dtype != torch.uint8:
            return batch
        consumed, rank, _ = self._progress()  # the batches before this optimizer step's
        step = self.trainer.global_step if self.trainer is not None else 0
        self._micro_batch = self._micro_batch + 1 if step == self._micro_batch_step else 0
        self._micro_batch_step = step
        generator = torch.Generator(device=batch.device)
        generator.manual_seed(step_seed(self.seed, consumed + self._micro_batch, rank,
                                        DATA_STREAM))
        module = self.trainer.lightning_module if self.trainer is not None else None
        dtype = module.dtype if module is not None else torch.float32  # 64-true: float64
        return dequantize(batch, self.num_levels, generator).to(dtype)
