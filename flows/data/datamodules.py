"""Lightning data modules for point data (the only Lightning in ``flows.data``)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from flows.data.toy import TOY_DATASETS, sample_toy


class _Points(Dataset):
    """Rows of an ``(N, D)`` tensor, indexed by whole batches of indices (no per-row collate)."""

    def __init__(self, points: Tensor) -> None:
        self.points = points

    def __len__(self) -> int:
        return self.points.shape[0]

    def __getitem__(self, indices: list[int]) -> Tensor:
        return self.points[indices]


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
    return points.astype(np.float32)


class PointDataModule(L.LightningDataModule):
    """Train/val/test splits of ``(N, D)`` points, batched by index for speed.

    Subclasses implement ``make_splits`` returning three float32 arrays. Shuffling draws
    from a generator seeded by ``seed``, so the batch order is fixed given the seed.
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
            self.splits = {"train": torch.from_numpy(train), "val": torch.from_numpy(val),
                           "test": torch.from_numpy(test)}

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        points = _Points(self.splits[split])
        if shuffle:
            generator = torch.Generator().manual_seed(self.seed)
            order = RandomSampler(points, generator=generator)
        else:
            order = SequentialSampler(points)
        batches = BatchSampler(order, batch_size=batch_size, drop_last=shuffle)
        return DataLoader(points, sampler=batches, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)


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
            points = np.load(self.path, allow_pickle=False)
        else:
            points = np.loadtxt(self.path, delimiter="," if self.path.suffix == ".csv" else None,
                                ndmin=2)
        points = validate_points(np.asarray(points, dtype=np.float64), str(self.path))
        order = np.random.default_rng(self.seed).permutation(points.shape[0])
        num_val, num_test = (max(1, int(f * points.shape[0])) for f in self.fractions)
        val, test, train = np.split(points[order], [num_val, num_val + num_test])
        return train, val, test
