"""``torch.compile`` where it works, eager execution where it does not."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch


class CompiledOrEager:
    """Calls ``torch.compile(fn, dynamic=dynamic)``; falls back to ``fn`` if compiling fails.

    ``dynamic=True`` gives one graph for every batch size; ``False`` one per input shape
    (where inductor cannot generate code for symbolic shapes); ``None`` a static graph first
    and one dynamic in the sizes that changed if a call brings new ones (torch's default).
    ``torch.compile`` itself (and the import of its compiler stack, seconds) waits for the
    first call, so importing a module that defines one costs nothing. Compilation happens at
    the first call (seconds on a CPU; inductor caches the result on disk for later processes).
    If it raises (no C++ compiler, an unsupported platform or op), a ``RuntimeWarning`` says
    why and every later call runs ``fn`` eagerly, with the same results.

    ``activation_memory_budget`` (in ``(0, 1]``; ``None``: torch's default, 1): the graph saves
    for the backward at most this fraction of the activations that torch's partitioner
    (AOTAutograd's min-cut) would save by default, and recomputes the rest in the backward
    (``torch._functorch.config.activation_memory_budget``, set while this function compiles
    and runs; ignored by a torch without it). The values are the same up to rounding. The
    budget takes effect when a graph is compiled and torch's cache of compiled graphs does not
    key on it, so a function should be wrapped once.

    ``fullgraph=True``: a graph break (a part dynamo cannot trace) is a compile failure,
    hence the warning and eager execution, instead of a function silently split in pieces.
    ``off_switch``: the setting the warning tells the user to change to skip compiling.
    """

    def __init__(self, fn: Callable[..., Any], dynamic: bool | None = True,
                 activation_memory_budget: float | None = None,
                 fullgraph: bool = False,
                 off_switch: str = "compile=false") -> None:
        self.fn = fn
        self.off_switch = off_switch
        self.dynamic = dynamic
        self.fullgraph = fullgraph
        self.activation_memory_budget = activation_memory_budget
        self.compiled: Callable[..., Any] | None = None
        self.failed = False

    def _partitioner_settings(self) -> AbstractContextManager[Any]:
        import torch._functorch.config as functorch_config

        if (self.activation_memory_budget is None
                or not hasattr(functorch_config, "activation_memory_budget")):
            return nullcontext()
        return functorch_config.patch(activation_memory_budget=self.activation_memory_budget)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.fn, dynamic=self.dynamic,
                                                  fullgraph=self.fullgraph)
                with self._partitioner_settings():
                    return self.compiled(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - any compiler failure: run eagerly
                self.failed = True
                warnings.warn(
                    f"torch.compile failed for {self.fn.__qualname__} "
                    f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); running it "
                    f"eagerly (same results, slower); set {self.off_switch} to skip compiling",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self.fn(*args, **kwargs)
