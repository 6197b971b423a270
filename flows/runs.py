"""Load a trained flow back from a checkpoint or run folder, using the run's own config."""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flows.cli import check_config_types
from flows.core import NormalizingFlow


def find_checkpoint(path: str | Path) -> Path:
    """A ``.ckpt`` file as given, or the best (else last) checkpoint of a run folder.

    The best is the one the training run tested (``results.json``'s ``best_ckpt``) if it is
    still there, else the ``best-<step>-nll=<val nll>.ckpt`` with the lowest validation NLL
    (the later step of a tie, as the checkpoint callback keeps it).
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        folder = path / "checkpoints"
        recorded = _tested_checkpoint(path)
        if recorded is not None:
            return recorded
        best = sorted(sorted(folder.glob("best-*.ckpt"), reverse=True), key=_validation_nll)
        candidates = best or sorted(folder.glob("last*.ckpt"))
        if candidates:
            return candidates[0]
        raise FileNotFoundError(f"run folder {path} holds no checkpoints/*.ckpt")
    raise FileNotFoundError(
        f"checkpoint {path} does not exist; pass ckpt=<run folder> or ckpt=<file.ckpt>"
    )


def _tested_checkpoint(run: Path) -> Path | None:
    """``<run>/checkpoints/<name>`` of ``results.json``'s ``best_ckpt``, if both exist."""
    try:
        name = json.loads((run / "results.json").read_text()).get("best_ckpt")
    except (OSError, ValueError, AttributeError):
        return None
    checkpoint = run / "checkpoints" / Path(name).name if name else None
    return checkpoint if checkpoint is not None and checkpoint.is_file() else None


def _validation_nll(checkpoint: Path) -> float:
    _, _, nll = checkpoint.stem.partition("-nll=")
    try:
        return float(nll)
    except ValueError:
        return math.inf


def run_folder(checkpoint: Path) -> Path:
    """The run folder of ``<run>/checkpoints/<name>.ckpt`` (it holds ``.hydra/config.yaml``)."""
    run = checkpoint.resolve().parent.parent
    if not (run / ".hydra" / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{checkpoint} is not inside a run folder (no {run}/.hydra/config.yaml); "
            f"keep checkpoints in <run>/checkpoints/"
        )
    return run


def load_run_config(run: Path) -> DictConfig:
    return OmegaConf.load(run / ".hydra" / "config.yaml")


def read_checkpoint(checkpoint: Path) -> dict:
    """The checkpoint's contents (``weights_only=True``: no code in it runs); a ``ValueError``
    if it is unreadable or not a Lightning checkpoint."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, KeyError,
            IndexError, TypeError, AttributeError) as error:  # what a file of another kind raises
        raise ValueError(
            f"cannot read checkpoint {checkpoint} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); it is truncated, corrupt or "
            f"not a flows checkpoint"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict) or not all(
            isinstance(value, torch.Tensor) for value in state["state_dict"].values()):
        raise ValueError(f"{checkpoint} is not a Lightning checkpoint (no 'state_dict' of "
                         f"tensors)")
    return state


def flow_weights(state: dict, flow: NormalizingFlow, checkpoint: Path | str,
                 expected: str) -> dict[str, torch.Tensor]:
    """The checkpoint's flow weights (its ``state_dict`` without the ``flow.`` prefix), or a
    ``ValueError`` unless they have ``flow``'s names and shapes (``expected`` names the model
    that ``flow`` is, for the message)."""
    weights = {k.removeprefix("flow."): v for k, v in state["state_dict"].items()}
    own = flow.state_dict()
    missing = sorted(own.keys() - weights.keys())
    unexpected = sorted(weights.keys() - own.keys())
    reshaped = [f"{key}: {tuple(weights[key].shape)} there, {tuple(own[key].shape)} here"
                for key in sorted(own.keys() & weights.keys())
                if weights[key].shape != own[key].shape]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"checkpoint {checkpoint} does not match {expected} ({len(missing)} tensors "
            f"missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape, e.g. "
            f"{(reshaped or missing or unexpected)[0]})"
        )
    return weights


def load_flow(checkpoint: Path, cfg: DictConfig) -> NormalizingFlow:
    """Instantiate ``cfg.model`` and load the checkpoint's weights (``weights_only=True``)."""
    state = read_checkpoint(checkpoint)
    check_config_types(cfg.model, "model.")  # the run's config may not instantiate just anything
    flow = instantiate(cfg.model)
    flow.load_state_dict(flow_weights(state, flow, checkpoint, "the model in its run config"))
    return flow.eval()


def pick_device(name: str) -> torch.device:
    """``"auto"``: the GPU when there is one, else the CPU; otherwise a torch device name that
    this machine has (a ``ValueError`` says so if not)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not a torch device; use auto, cpu or cuda") from None
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (backend is not None and backend.is_available()):
        raise ValueError(f"device={name!r}: no {device.type} device is available here; use "
                         f"device=auto or device=cpu")
    return device


def device_name(device: torch.device) -> str:
    """``"cpu"``, or an accelerator's model name (``"NVIDIA H100 80GB HBM3"``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def use_tf32(enabled: bool) -> None:
    """TensorFloat-32 (float32 range, 10-bit mantissa) for float32 matmuls and cuDNN
    convolutions on NVIDIA GPUs; no effect elsewhere. torch leaves it on for convolutions by
    default. An i-ResNet needs it off: its fixed-point inverse cannot get below g's own
    rounding error, and with TF32 convolutions a 1x8x8 i-ResNet's blocks stalled at residuals
    of 1.4e-5 to 9.7e-5 after 1,000 iterations (H100), where full float32 reaches the 1e-5
    tolerance."""
    if not isinstance(enabled, bool):
        raise ValueError(f"tf32={enabled!r}: use tf32=true or tf32=false")
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def load_trained(path: str | Path, device: str = "auto") -> tuple[NormalizingFlow, DictConfig,
                                                                     Path, Path]:
    """``(flow in eval mode on device, the run's config, run folder, checkpoint file)``."""
    checkpoint = find_checkpoint(path)
    run = run_folder(checkpoint)
    run_cfg = load_run_config(run)
    return load_flow(checkpoint, run_cfg).to(pick_device(device)), run_cfg, run, checkpoint
