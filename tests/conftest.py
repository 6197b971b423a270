import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


CLI_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
CLI_TIMEOUT_S = 600


class WarmInterpreter:
    """``tests/warm_cli.py`` for the whole session: each command runs in a fork of it."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "warm_cli.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=CLI_ENV, start_new_session=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="flows-cli-"))
        self.count = 0

    def run(self, module: str, args: tuple[str, ...], cwd: Path,
            ) -> subprocess.CompletedProcess:
        self.count += 1
        out, err = (self.scratch / f"{self.count}.{kind}" for kind in ("out", "err"))
        command = {"module": module, "args": list(args), "cwd": str(cwd),
                   "stdout": str(out), "stderr": str(err)}
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], CLI_TIMEOUT_S)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise RuntimeError(f"python -m {module} {' '.join(args)} did not finish in "
                               f"{CLI_TIMEOUT_S} s, or the warm interpreter died")
        return subprocess.CompletedProcess([module, *args], int(line), out.read_text(),
                                           err.read_text())

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        shutil.rmtree(self.scratch, ignore_errors=True)


_warm: WarmInterpreter | None = None


def run_cli(module: str, *args: str, cwd: Path, fresh: bool = False,
            ) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <args>`` as a user would, from ``cwd``.

    By default in a fork of the session's warm interpreter (``tests/warm_cli.py``: the same
    ``python -m`` semantics without seconds of imports per command); ``fresh=True`` starts a
    new interpreter (``test_train.py`` checks that the two report alike).
    """
    global _warm
    if fresh:
        return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=CLI_ENV,
                              capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    if _warm is None or _warm.process.poll() is not None:
        _warm = WarmInterpreter()
    return _warm.run(module, args, cwd)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _warm is not None:
        _warm.close()


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
