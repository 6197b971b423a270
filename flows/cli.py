"""Shared by the command-line entry points: one-line errors and atomic JSON writes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger("flows")

# Errors that mean "the input was wrong": reported in one line, no traceback wall.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
               HydraException, OmegaConfBaseException, FloatingPointError)


def describe(error: BaseException) -> str:
    """One line: the root cause of a (possibly Hydra-wrapped) error and the config key."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    where = ""
    for line in str(error).splitlines():
        if line.startswith("full_key:"):
            where = line.removeprefix("full_key:").strip() + ": "
    message = " ".join(str(root).split()) or type(root).__name__
    return f"{where}{message}"


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into ``error: <one line>`` and exit status 1."""
    try:
        yield
    except USER_ERRORS as error:
        log.error(describe(error))
        print(f"error: {describe(error)}", file=sys.stderr)
        raise SystemExit(1) from None


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
