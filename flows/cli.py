"""Shared by the command-line entry points: one-line errors and atomic JSON writes."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import os
import shutil
import sys
import typing
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import get_object
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException
from typeguard import TypeCheckError, check_type

log = logging.getLogger("flows")

# Errors that mean "the input was wrong": reported in one line, no traceback wall.
USER_ERRORS = (ValueError, OSError,
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


# Configs may instantiate only these packages' objects (a config must not run arbitrary code).
ALLOWED_TARGETS = ("flows.", "torch.", "lightning.")


def check_config_types(cfg: DictConfig | ListConfig, path: str = "") -> None:
    """Check every ``_target_`` and every scalar argument against its type annotation.

    A ``_target_`` outside ``ALLOWED_TARGETS`` is refused before it is imported. Catches
    ``trainer.max_steps=abc`` before anything runs, naming the key and the type the target
    expects (Hydra passes the string through and the failure would come much later).
    """
    if isinstance(cfg, ListConfig):
        for index, item in enumerate(cfg):
            if isinstance(item, DictConfig | ListConfig):
                check_config_types(item, f"{path}{index}.")
        return
    if "_target_" in cfg:
        if not str(cfg._target_).startswith(ALLOWED_TARGETS):
            raise ValueError(
                f"{path}_target_={cfg._target_} is refused: configs may only instantiate "
                f"objects from {', '.join(p.rstrip('.') for p in ALLOWED_TARGETS)}"
            )
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
        if isinstance(value, DictConfig | ListConfig):
            check_config_types(value, f"{path}{key}.")


# (the type a setting must have, what else must hold, what to give instead); a bool is not a
# number here, though Python counts it as an int
Setting = tuple[type | tuple[type, ...], Callable[[Any], bool], str]


def check_settings(cfg: DictConfig, settings: dict[str, Setting]) -> None:
    """A ``ValueError`` naming the first of a command's own top-level ``settings`` whose value
    in ``cfg`` is not of its type or fails its condition (``trainer.*`` and the ``_target_``
    arguments are ``check_config_types``'s)."""
    for key, (kind, holds, wanted) in settings.items():
        value = cfg.get(key)
        counted_as_number = isinstance(value, bool) and kind is not bool
        if counted_as_number or not isinstance(value, kind) or not holds(value):
            raise ValueError(f"{key}={value!r}: {wanted}")


# (a setting, when the chosen config ignores it, why and what to do): given on the command
# line in that case it is named in a warning, not silently dropped. A warning, not a refusal:
# a sweep over models shares its settings, and a run saved with one must still resume.
IGNORED_SETTINGS: list[tuple[str, Callable[[DictConfig], bool], str]] = [
    ("model.log_scale_clamp", lambda cfg: cfg.model.get("coupling") == "additive",
     "additive couplings (model=nice, model.coupling=additive) have no log-scales to bound; "
     "drop it, or use model.coupling=affine"),
]


def ignored_overrides(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """What to warn about each command-line ``key=value`` (``+``/``++`` too; not a ``~key``
    deletion) that ``cfg`` ignores (``IGNORED_SETTINGS``)."""
    given = {override.lstrip("+").split("=", 1)[0] for override in overrides
             if not override.startswith("~")}
    return [f"{key} has no effect here: {why}" for key, ignored, why in IGNORED_SETTINGS
            if key in given and ignored(cfg)]


def whole(least: int, wanted: str) -> Setting:
    """An int of at least ``least``."""
    return int, lambda value: value >= least, wanted


def positive(wanted: str) -> Setting:
    """A finite number above 0."""
    return (int, float), lambda value: 0 < value < math.inf, wanted


def switch(key: str) -> Setting:
    """True or false."""
    return bool, lambda value: True, f"use {key}=true or {key}=false"


class JobRefused(CompactHydraException):
    """A sweep job's user error, already logged and printed: Hydra records the job as failed,
    runs the sweep's other jobs, then ends the sweep with this message and exit status 1."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into ``error: <one line>`` and exit status 1; in a sweep
    (``-m``) into ``JobRefused``, so that one job's bad input does not stop the others."""
    try:
        yield
    except USER_ERRORS as error:
        log.error(describe(error))
        print(f"error: {describe(error)}", file=sys.stderr)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise JobRefused(f"error: {describe(error)}") from None
        raise SystemExit(1) from None


class RunFolderError(CompactHydraException, InterpolationResolutionError):
    """A run folder that cannot be used: raised while Hydra resolves ``hydra.run.dir`` or by
    ``CheckRunFolder`` before Hydra writes into it; ``CheckRunFolder`` prints it as one line."""


def resolve_run_dir(parent: str, name: str | None, ckpt_path: str | None,
                    _root_: DictConfig) -> str:
    """``<parent>/<name>`` for ``hydra.run.dir`` (``${flows_run_dir:...}``), checked.

    ``name`` defaults to the start time (to the microsecond) and must be a plain folder name.
    The folder must be creatable, and one holding a run (``.hydra/``) is reused only to resume
    it (``ckpt_path=last`` or a checkpoint inside it); that is not checked when a launcher
    (torchrun, SLURM) started several ranks. A resume must keep the settings that define the
    run (``RUN_DEFINING``, against its saved ``.hydra/config.yaml``). Hydra resolves this
    before it writes anything into the folder, so a refused command changes nothing. Cached:
    later resolutions in the same process (Lightning's DDP launcher reads ``hydra.run.dir``
    again) return the same folder without checking again. A folder given as
    ``hydra.run.dir=<folder>`` gets the same checks from ``CheckRunFolder``.
    """
    # str(): a name YAML reads as a number (name=1, name=nan) is still a folder name.
    name = _start_time() if name is None else str(name)
    if name in ("", ".", "..") or any(sep in name for sep in "/\\"):
        raise RunFolderError(
            f"error: name={name!r} must be a plain folder name (not empty, '.' or '..', no "
            f"'/'): the run goes to {parent}/<name>; for a folder elsewhere give "
            f"hydra.run.dir=<folder> (nothing was changed)"
        )
    folder = _checked_run_dir(str(Path(parent) / name), ckpt_path)
    check_resume(Path(folder), ckpt_path, _root_)
    return folder


def check_resume(folder: Path, ckpt_path: str | None, current: DictConfig) -> None:
    """Where ``ckpt_path`` resumes the run saved in ``folder``, ``check_resume_settings``."""
    saved = folder / ".hydra" / "config.yaml"
    if ckpt_path is not None and saved.is_file():
        check_resume_settings(OmegaConf.load(saved), current, saved)


# What a resumed run must keep: its model, data, optimisation and schedule (a cosine schedule
# restored from a checkpoint keeps its length whatever trainer.max_steps says now; the warmup
# length is read through ${warmup_steps}, compared here unresolved, so it is named itself).
RUN_DEFINING = ("seed", "model", "data", "optim", "scheduler", "warmup_steps", "on_nonfinite",
                "ema_decay", "trainer.max_steps", "trainer.max_epochs", "trainer.max_time",
                "trainer.accumulate_grad_batches", "trainer.gradient_clip_val",
                "trainer.gradient_clip_algorithm", "trainer.precision")


def check_resume_settings(saved: DictConfig, current: DictConfig, source: Path) -> None:
    """Raise ``RunFolderError`` naming every ``RUN_DEFINING`` value (unresolved, as written)
    that differs between the run's saved config and the resuming command's."""
    before, now = _run_defining(saved), _run_defining(current)
    changed = [f"{key} ({before.get(key)} -> {now.get(key)})"
               for key in sorted(before.keys() | now.keys()) if before.get(key) != now.get(key)
               and not (key not in before and _added_at_default(key, now[key]))]
    if changed:
        raise RunFolderError(
            f"error: ckpt_path resumes the run in {source.parent.parent} as it was configured, "
            f"but this command changes {', '.join(changed[:6])}"
            f"{' and more' if len(changed) > 6 else ''}; repeat the run's own overrides "
            f"({source.parent / 'overrides.yaml'}) or start a new run with another name= "
            f"(nothing was changed)"
        )


def _run_defining(cfg: DictConfig) -> dict[str, Any]:
    """``{dotted key: value}`` of the ``RUN_DEFINING`` leaves of ``cfg``, uninterpolated, with
    a schedule saved in an older form written in today's (``_current_schedule``)."""
    flat = _current_schedule(_flatten(OmegaConf.to_container(cfg, resolve=False), ""))
    return {key: value for key, value in flat.items()
            if any(key == p or key.startswith(f"{p}.") for p in RUN_DEFINING)}


# Settings added since runs were saved, with the value that reproduces what a run saved
# without them did: at that value their absence is no change. Only settings whose default is
# the old behaviour belong here (not, say, model.series_gradient, whose default "neumann"
# replaced backpropagating through every term).
ADDED_SETTINGS: dict[str, Any] = {
    "model.power_iteration_tol": None,  # 2026-12-05
    "model.training_svd": False,  # 2026-12-05
}


def _added_at_default(key: str, value: Any) -> bool:
    """Whether ``key`` is an ``ADDED_SETTINGS`` setting at its old behaviour's value."""
    return key in ADDED_SETTINGS and value == ADDED_SETTINGS[key]


def _current_schedule(flat: dict[str, Any]) -> dict[str, Any]:
    """Until 2026-12-05 the schedule configs passed the run's length as ``trainer.max_steps``
    (``CosineAnnealingLR`` with ``T_max``, ``warmup_cosine`` with ``total_steps``); today's
    take it from the trainer, which for those runs' step limit is the same length, so a run
    saved then resumes as the same schedule."""
    length = "${trainer.max_steps}"
    if (flat.get("scheduler._target_") == "torch.optim.lr_scheduler.CosineAnnealingLR"
            and flat.get("scheduler.T_max") == length):
        flat = {k: v for k, v in flat.items() if k != "scheduler.T_max"}
        flat["scheduler._target_"] = "flows.lit.schedules.cosine"
    elif (flat.get("scheduler._target_") == "flows.lit.schedules.warmup_cosine"
            and flat.get("scheduler.total_steps") == length):
        flat = {k: v for k, v in flat.items() if k != "scheduler.total_steps"}
    return flat


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


@functools.cache
def _start_time() -> str:
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")


@functools.cache
def _checked_run_dir(folder: str, ckpt_path: str | None) -> str:
    path = Path(folder)
    if not launched_ranks() and (path / ".hydra").exists():
        inside = ckpt_path not in (None, "last") and path.resolve() in Path(
            ckpt_path).resolve().parents
        if ckpt_path != "last" and not inside:
            raise RunFolderError(
                f"error: run folder {folder} already holds a run; resume it with "
                f"ckpt_path=last, or choose another name= (nothing was changed)"
            )
    record_new_folders(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunFolderError(
            f"error: cannot create the run folder {folder} ({error.strerror or error}); run "
            f"from a writable folder or choose one with hydra.run.dir="
        ) from None
    return folder


def launched_ranks() -> bool:
    """Whether a launcher (torchrun, SLURM, Lightning's DDP) started several processes: every
    rank resolves the same run folder and the first creates it, so only a single process can
    tell a stale run from its own siblings'."""
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) > 1


# folders this command is about to create (absolute): a run folder inside one of them is new
_new_folders: set[Path] = set()


def record_new_folders(folder: Path) -> None:
    """Record ``folder`` and its parents that do not exist yet, before they are created."""
    folder = Path(os.path.abspath(folder))
    _new_folders.update(path for path in (folder, *folder.parents) if not path.exists())


def _is_new(folder: Path) -> bool:
    folder = Path(os.path.abspath(folder))
    return any(path in _new_folders for path in (folder, *folder.parents))


class CheckRunFolder(Callback):
    """Hydra callback (``conf/hydra/default.yaml``), run before Hydra creates or writes into
    the run folder (``hydra.run.dir``) or the sweep folder (``hydra.sweep.dir``).

    A refusal of ``resolve_run_dir`` is printed as one line (exit status 1). A folder given
    as ``hydra.run.dir=<folder>`` (not through ``resolve_run_dir``) gets its checks: a folder
    holding a run only to resume it, with the run's settings. The run folder and its parents
    that do not exist yet are recorded, so ``remove_created_run_folder`` knows which folders
    are this command's.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # run.dir reads ${hydra:runtime.choices...}, which Hydra sets up only after this hook
        HydraConfig.instance().set_config(config)
        try:
            run_dir = config.hydra.run.dir
            own = "flows_run_dir" in str(config.hydra.run._get_node("dir")._value())
            # Lightning's DDP ranks get hydra.run.dir=<the folder> and write no config
            if not own and config.hydra.output_subdir is not None:
                _checked_run_dir(run_dir, config.get("ckpt_path"))
                check_resume(Path(run_dir), config.get("ckpt_path"), config)
        except RunFolderError as error:  # without OmegaConf's full_key lines
            print(str(error).splitlines()[0], file=sys.stderr)
            raise SystemExit(1) from None
        except OmegaConfBaseException:
            return  # Hydra resolves it again next and reports why
        record_new_folders(Path(run_dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        record_new_folders(Path(config.hydra.sweep.dir))


def remove_created_run_folder(run_dir: Path, fit_started: bool = False) -> None:
    """After refused input: delete ``run_dir`` if this command created it and it holds only
    what Hydra wrote (``.hydra/``, ``train.log``) or, once the fit has started (a schedule
    refused as the fit starts), nothing that training writes (no ``checkpoints/`` or
    ``results.json``; the loggers' first files go too), then its parents that this command
    created and that are left empty. A folder that existed before (a custom
    ``hydra.run.dir``, a resumed run) stays."""
    if not _is_new(run_dir):
        return
    held = {path.name for path in run_dir.iterdir()}
    if (held & {"checkpoints", "results.json"}) if fit_started else (held - {".hydra",
                                                                           "train.log"}):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in Path(os.path.abspath(run_dir)).parents:
        if not _is_new(parent):
            break
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (a temporary file, then rename), as standard
    JSON: a NaN or infinite number is written as ``null``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per writing process
    tmp.write_text(json.dumps(_finite_or_none(payload), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(item) for item in value]
    return value
