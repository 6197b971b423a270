import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <args>`` as a user would, from ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def cli():
    return run_cli


def fake_run_folder(root: Path, config: str, checkpoint: object) -> Path:
    """``root/run`` laid out like a training run: ``.hydra/config.yaml`` holding ``config``
    and ``checkpoints/last.ckpt`` holding ``checkpoint`` (bytes as they are, else torch.save)."""
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(config)
    path = run / "checkpoints" / "last.ckpt"
    if isinstance(checkpoint, bytes):
        path.write_bytes(checkpoint)
    else:
        torch.save(checkpoint, path)
    return run
