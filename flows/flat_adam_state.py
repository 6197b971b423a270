"""Parameters and their Adam state as views of a few flat tensors, for one update over each."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

# The Adam state tensors shaped like their parameter, by name in ``optimizer.state[p]``.
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def memory_order(p: Tensor) -> tuple[list[int], list[int]]:
    """``(physical, inverse)``: ``p``'s sizes from its outermost to its innermost dimension in
    memory, and the permutation that takes a tensor of that shape back to ``p``'s; the layout
    of ``torch.empty_like(p)`` (``p``'s own if it is dense, e.g. channels-last; else its
    suggested memory format), size-1 dimensions innermost among equal strides."""
    strides = torch.empty_like(p).stride()
    order = sorted(range(p.dim()), key=lambda d: (-strides[d], p.shape[d] == 1))
    return [p.shape[d] for d in order], sorted(range(p.dim()), key=order.__getitem__)


class FlatTensors(NamedTuple):
    """The flat tensors: ``param``, ``moments`` (``exp_avg``, ``exp_avg_sq`` and, with
    amsgrad, ``max_exp_avg_sq``; each of ``N`` values, ``N`` the parameters' total size) and
    ``step`` (``(P,)`` float32, one count per parameter tensor, all equal)."""

    param: Tensor
    moments: tuple[Tensor, ...]
    step: Tensor


def adam_update(flat: FlatTensors, grad: Tensor, lr: Tensor, *, beta1: float, beta2: float,
                eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                decoupled_weight_decay: bool) -> tuple[list[Tensor], Tensor]:
    """``torch.optim.Adam``'s update of the flat tensors by the gradient ``grad`` (AdamW's with
    ``decoupled_weight_decay``), out of place: the new ``[param, *moments]`` and counts.

    With ``t = step + 1``: ``g = -grad`` if ``maximize``; then ``p <- p (1 - lr wd)`` if the
    decay is decoupled, else ``g <- g + wd p``; ``m <- m + (1 - beta1)(g - m)``,
    ``v <- beta2 v + (1 - beta2) g^2`` (with amsgrad ``v_max <- max(v_max, v)``, which takes
    ``v``'s place below) and ``p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t)
    + eps)``: torch's update to rounding.

    Written out rather than ``torch.optim.adam.adam`` traced into a graph: inductor inlines
    its 0-d bias corrections ``beta ** t`` into the loop over the ``N`` values, two ``pow``
    per vector of 8 (475 against 105 us for 136,208 values on 2 CPU threads). Here they are
    reductions over the ``(P,)`` equal counts, so a compiled graph computes them once.
    """
    param, exp_avg, exp_avg_sq = flat.param, flat.moments[0], flat.moments[1]
    # the bias corrections in float64, as torch's Python-float ones: 1 - beta2^t in float32
    # is off by ~1e-5 relative (beta2 = 0.999 rounded, then the difference); MPS has no float64
    exact = torch.float32 if param.device.type == "mps" else torch.float64
    count = flat.step.to(exact) + 1
    step_size = (lr.to(exact) / (1 - beta1 ** count)).amax().to(param.dtype)
    correction2_sqrt = (1 - beta2 ** count).sqrt().amax().to(param.dtype)
    if maximize:
        grad = -grad
    if weight_decay != 0:
        if decoupled_weight_decay:
            param = param * (1 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
    exp_avg = exp_avg.lerp(grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * (grad * grad)
    moments = [exp_avg, exp_avg_sq]
    if amsgrad:
        moments.append(torch.maximum(flat.moments[2], exp_avg_sq))
    denom = moments[-1].sqrt() / correction2_sqrt + eps
    return [param - step_size * (exp_avg / denom), *moments], count


class FlatAdamState:
    """``params`` and their state in ``optimizer.state`` (``torch.optim.Adam``'s layout) moved
    into flat tensors and replaced by views of them.

    Parameter ``i`` of ``n_i`` values becomes ``param[o_i : o_i + n_i]`` viewed with its own
    shape and memory layout (``o_i = n_0 + ... + n_{i-1}``); its ``exp_avg``, ``exp_avg_sq``
    (and ``max_exp_avg_sq``) become the same slices of the flat moments, and its ``step`` the
    0-d view ``step[i]``. The module, the optimizer, ``state_dict`` and checkpoints still see
    one tensor per parameter, and an update written into the flat tensors is an update of
    every parameter: a compiled step then reads and writes 4 tensors instead of ``4 P`` (fewer
    inputs to guard and to pass to its kernels; 5 instead of ``5 P`` with amsgrad). The counts
    are checked to be equal when moved in; afterwards the update writes ``step + 1``.
    As torch documents for views, ``torch.save`` of one parameter or one state entry alone
    writes the whole flat storage (``.clone()`` it first); a whole ``state_dict`` writes each
    flat storage once.

    ``flat()`` returns the flat tensors after checking that the views are still in place and
    moving the values in again where they are not: after ``optimizer.load_state_dict``
    (a resumed checkpoint), a ``module.to(...)`` that replaced the parameters' data, or a first
    step (no state yet: zeros).

    Args:
        params: the parameters, one dtype and one device.
        optimizer: the Adam optimizer whose ``state`` holds their moments.
    """

    def __init__(self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        self.params = params
        self.optimizer = optimizer
        self.moment_names = MOMENTS[:2]
        self._flat: FlatTensors | None = None
        # per parameter: its data pointer, its state entry and that entry's (name, view)s
        self._expected: list[tuple[nn.Parameter, int, dict, list[tuple[str, Tensor]]]] = []

    def flat(self, amsgrad: bool) -> FlatTensors:
        """The flat tensors, the parameters and the optimizer's state their views; with
        ``amsgrad``, ``max_exp_avg_sq`` among the moments."""
        names = MOMENTS if amsgrad else MOMENTS[:2]
        if self._flat is None or names != self.moment_names or not self._views_in_place():
            self._flat = None  # until the move succeeds: a failed one is retried whole
            self._flat, self._expected = self._move_in(names)
            self.moment_names = names
        return self._flat

    def views_of(self, flat: Tensor) -> list[Tensor]:
        """The per-parameter views of a flat tensor laid out as ``flat()``'s (a gradient,
        or a traced copy inside a compiled graph): ``split`` into the parameters' slices (whose
        gradient is one concatenation), each viewed in its parameter's memory order and
        permuted to its shape."""
        return [piece.view(physical).permute(inverse)
                for piece, (physical, inverse) in zip(flat.split(self._sizes), self._layouts,
                                                      strict=True)]

    def _views_in_place(self) -> bool:
        get = self.optimizer.state.get
        for p, pointer, entry, views in self._expected:
            if p.data_ptr() != pointer or get(p) is not entry:
                return False
            if any(entry.get(name) is not view for name, view in views):
                return False
        return True

    def _move_in(self, moment_names: tuple[str, ...]) -> tuple[FlatTensors, list]:
        """Copy the parameters' values and state into new flat tensors; point the parameters'
        ``.data`` and the state's entries (``moment_names`` and ``step``) at views of them.
        Returns the flat tensors and, per parameter, what ``_views_in_place`` checks."""
        first = self.params[0]
        kinds = {(p.dtype, p.device) for p in self.params}
        if len(kinds) > 1:
            raise ValueError(f"flat storage needs one dtype and one device for all parameters, "
                             f"got {sorted(map(str, kinds))}; move the flow with .to(...) first")
        self._sizes = [p.numel() for p in self.params]
        self._layouts = [memory_order(p) for p in self.params]
        total = sum(self._sizes)
        state = self.optimizer.state
        steps = [state[p]["step"] if "step" in state.get(p, {}) else None for p in self.params]
        counts = {float(s) for s in steps if s is not None}
        if len(counts) > 1 or (counts and None in steps):
            raise ValueError(f"the parameters have taken different numbers of Adam steps "
                             f"({sorted(counts)}, or none for some); a flat update needs one "
                             f"count for all: start from a checkpoint of a run that trained "
                             f"every parameter at every step")
        param = torch.empty(total, dtype=first.dtype, device=first.device)
        moments = tuple(torch.zeros(total, dtype=first.dtype, device=first.device)
                        for _ in moment_names)
        step = torch.full((len(self.params),), counts.pop() if counts else 0.0,
                          dtype=torch.float32, device=first.device)
        param_views = self.views_of(param)
        moment_views = [self.views_of(m) for m in moments]
        step_views = list(step.unbind(0))
        expected = []
        with torch.no_grad():
            for i, p in enumerate(self.params):
                param_views[i].copy_(p)
                p.data = param_views[i]
                entry = state[p]
                views = [(name, v[i]) for name, v in zip(moment_names, moment_views,
                                                         strict=True)]
                for name, view in views:
                    if name in entry:
                        view.copy_(entry[name])
                    entry[name] = view
                entry["step"] = step_views[i]
                expected.append((p, p.data_ptr(), entry, [*views, ("step", step_views[i])]))
        return FlatTensors(param, moments, step), expected
