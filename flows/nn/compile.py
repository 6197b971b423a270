"""``torch.compile`` where it works, eager execution where it does not."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch


class CompiledOrEager:
    """Calls ``torch.compile(fn, dynamic=dynamic)``; falls back to ``fn`` if compiling fails.

    ``dynamic=True`` gives one graph for every batch size; ``False`` one per input shape
    (where inductor cannot generate code for symbolic shapes). ``torch.compile`` itself (and the
    import of its compiler stack, seconds) waits for the first call, so importing a module that
    defines one costs nothing. Compilation happens at the first call (seconds on a CPU;
    inductor caches the result on disk for later processes). If it raises (no C++ compiler, an
    unsupported platform or op), a ``RuntimeWarning`` says why and every later call runs ``fn``
    eagerly, with the same results.
    """

    def __init__(self, fn: Callable[..., Any], dynamic: bool = True) -> None:
        self.fn = fn
        self.dynamic = dynamic
        self.compiled: Callable[..., Any] | None = None
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.fn, dynamic=self.dynamic)
                return self.compiled(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - any compiler failure: run eagerly
                self.failed = True
                warnings.warn(
                    f"torch.compile failed for {self.fn.__qualname__} "
                    f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); running it "
                    f"eagerly (same results, slower); set compile=false to skip compiling",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self.fn(*args, **kwargs)
