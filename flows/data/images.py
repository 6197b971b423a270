"""Image datasets as integer levels, and uniform dequantisation (plain torch, no Lightning).

Every loader returns ``uint8`` tensors ``(N, C, H, W)`` of levels ``0 .. L - 1``; the flow models
``x = (k + u) / L`` with ``u ~ U[0, 1)^D``, a density on ``[0, 1)^D`` whose likelihood bounds
the discrete one: ``log P(k) >= E_u[log p((k + u) / L)] - D log L`` (Theis et al. 2016).
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch
from filelock import FileLock
from torch import Tensor

# Levels of each source and the event shape of its images.
NATIVE_LEVELS = {"digits": 17, "mnist": 256, "fashion_mnist": 256, "cifar10": 256}
IMAGE_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28),
                "cifar10": (3, 32, 32)}


def load_digits() -> Tensor:
    """scikit-learn's 1,797 8x8 handwritten digits, levels 0..16, offline: ``(N, 1, 8, 8)``."""
    from sklearn.datasets import load_digits as sklearn_digits

    images = sklearn_digits().images  # (1797, 8, 8) floats holding the integers 0..16
    return torch.from_numpy(images).round().to(torch.uint8).unsqueeze(1)


def _torchvision_class(name: str) -> type:
    from torchvision import datasets

    return {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST,
            "cifar10": datasets.CIFAR10}[name]


def expected_location(name: str, root: str | Path) -> Path:
    """Where torchvision looks for the files of ``name`` under ``root``."""
    if name == "cifar10":
        return Path(root) / "cifar-10-batches-py"
    return Path(root) / _torchvision_class(name).__name__ / "raw"


def load_torchvision(name: str, root: str | Path, train: bool, download: bool,
                     timeout_s: float = 20.0) -> Tensor:
    """MNIST, Fashion-MNIST or CIFAR-10 from ``root`` as ``uint8`` ``(N, C, H, W)``.

    Uses the files under ``root`` if they are there; else downloads them when ``download``
    (each network call times out after ``timeout_s`` seconds, so an offline machine fails
    fast). A ``FileNotFoundError`` says where the files must go if neither works.
    """
    cls = _torchvision_class(name)
    try:
        dataset = cls(str(root), train=train, download=False)
    except RuntimeError:  # torchvision: "Dataset not found"
        if not download:
            raise FileNotFoundError(
                f"{name}: no dataset files in {expected_location(name, root)} and "
                f"data.download=false; put the files there or set data.root") from None
        dataset = _download(cls, name, root, train, timeout_s)
    data = torch.as_tensor(dataset.data)
    return data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2).contiguous()


def _download(cls: type, name: str, root: str | Path, train: bool, timeout_s: float) -> object:
    """Download under a file lock: ranks started together (torchrun) download once, in turn."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    Path(root).mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(Path(root) / f".{name}.download.lock")):
            return cls(str(root), train=train, download=True)
    except (OSError, RuntimeError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        if len(reason) > 160:  # torchvision lists every mirror it tried
            reason = reason[:160].rsplit(" ", 1)[0] + " ..."
        raise FileNotFoundError(
            f"{name}: the files are not in {expected_location(name, root)} and could not be "
            f"downloaded ({reason}); on a machine without internet copy them there from one "
            f"that has it, or set data.root to a folder that holds them"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def requantize(levels: Tensor, source_levels: int, num_levels: int) -> Tensor:
    """Levels ``0..source_levels-1`` to ``0..num_levels-1``: ``floor(k num_levels / source)``.

    For 8-bit data and ``num_levels = 2^n`` this keeps the top ``n`` bits (Glow's 5-bit faces).
    """
    if not 2 <= num_levels <= source_levels:
        raise ValueError(f"num_levels={num_levels} must be in [2, {source_levels}] (the data "
                         f"has {source_levels} levels; fewer levels can only merge them)")
    if num_levels == source_levels:
        return levels
    merged = levels.long() * num_levels // source_levels
    return merged.to(torch.uint8)


def dequantize(levels: Tensor, num_levels: int, generator: torch.Generator) -> Tensor:
    """``(k + u) / num_levels`` with ``u ~ U[0, 1)`` from ``generator``: floats in ``[0, 1]``.

    (1.0 itself only by float32 rounding of ``L - 1 + u`` for ``u`` within 1e-5 of 1.)
    """
    noise = torch.rand(levels.shape, generator=generator, device=levels.device)
    return (levels.float() + noise) / num_levels
