import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <args>`` as a user would, from ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def run_cli_batch(commands: list[tuple[str, list[str], Path]], scratch: Path,
                  ) -> list[subprocess.CompletedProcess]:
    """Run each ``python -m <module> <args>`` from its ``cwd`` as ``tests/cli_batch.py`` does:
    in a fork of one interpreter that imported torch, Lightning and Hydra once. Each result
    holds the command's exit code and stderr (stdout is not kept)."""
    spec = [{"module": module, "args": list(args), "cwd": str(cwd),
             "stderr": str(scratch / f"stderr_{i}.txt")}
            for i, (module, args, cwd) in enumerate(commands)]
    (scratch / "commands.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    batch = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_batch.py"),
                            str(scratch / "commands.json")], env=env, capture_output=True,
                           text=True, timeout=600)
    assert batch.returncode == 0, batch.stderr[-3000:]
    codes = json.loads(batch.stdout.splitlines()[-1])
    return [subprocess.CompletedProcess([module, *args], code, "",
                                        Path(command["stderr"]).read_text())
            for (module, args, _), code, command in zip(commands, codes, spec, strict=True)]


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
