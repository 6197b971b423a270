"""Checkpoint files written atomically: the previous file survives any failure mid-write."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file beside the target, ``fsync``, then ``os.replace``.

    ``os.replace`` within one directory is atomic on POSIX and Windows, so a reader sees the
    old checkpoint or the new one, never a partial file, whatever stops the write (a full disk,
    SIGKILL, power loss once fsynced). On an error the temporary file is removed and the error
    names the checkpoint. (Lightning's default writes to the system temp folder and moves the
    file, a copy, not a rename, when that is another file system.)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException as error:
            temporary.unlink(missing_ok=True)
            if isinstance(error, OSError):
                reason = error.strerror or str(error)
                raise OSError(error.errno, f"could not write checkpoint {path} ({reason}); "
                                           f"the previous one is intact") from None
            raise
