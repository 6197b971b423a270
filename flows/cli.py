"""Shared by the command-line entry points: one-line errors and atomic JSON writes."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.errors import HydraException
from hydra.utils import get_object
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from typeguard import TypeCheckError, check_type

log = logging.getLogger("flows")

# Errors that mean "the input was wrong": reported in one line, no traceback wall.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
               HydraException, OmegaConfBaseException, FloatingPointError,
               MisconfigurationException)


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


def _annotations(target: str) -> dict[str, Any]:
    obj = get_object(target)
    try:
        return typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except (NameError, TypeError):  # unresolvable annotations: nothing to check against
        return {}


def check_config_types(cfg: DictConfig, path: str = "") -> None:
    """Check every scalar argument of every ``_target_`` node against its type annotation.

    Catches ``trainer.max_steps=abc`` before anything runs, naming the key and the type the
    target expects (Hydra passes the string through and the failure would come much later).
    """
    if "_target_" in cfg:
        hints = _annotations(cfg._target_)
        for key, value in cfg.items():
            if key.startswith("_") or key not in hints:
                continue
            value = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
            if isinstance(value, dict | list):
                continue
            try:
                check_type(value, hints[key])
            except TypeCheckError:
                expected = getattr(hints[key], "__name__", None) or str(hints[key])
                source = cfg._get_node(key)._value()  # the raw text, before interpolation
                origin = f" (set by {source})" if OmegaConf.is_interpolation(cfg, key) else ""
                raise ValueError(
                    f"{path}{key}={value!r}{origin} has the wrong type: {cfg._target_} "
                    f"expects {expected}"
                ) from None
    for key, value in cfg.items():
        if isinstance(value, DictConfig):
            check_config_types(value, f"{path}{key}.")


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
