"""A maximum-likelihood Adam step (loss, gradient, clipping, update) as one compiled graph."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value
from torch.nn.utils import parametrize

from flows.bijections.normalization import ActNorm, BatchNorm
from flows.core import Bijection, Compose, NormalizingFlow, domain_checked
from flows.flat_adam_state import FlatAdamState, FlatTensors, adam_update
from flows.nn.compile import CompiledOrEager

# What a layer's forward pass writes, by kind of layer (ActNorm's one-off initialisation runs
# eagerly before the graph: see CompiledAdamStep).
_STATE_UPDATES = {BatchNorm: "updates its running statistics"}


class StepOutput(NamedTuple):
    """What a step returns, each a 0-d tensor: the loss ``-mean log p(x)`` in nats, the total
    gradient norm (before clipping) and whether both were finite (the update was applied)."""

    loss: Tensor
    grad_norm: Tensor
    finite: Tensor


def unsupported_layer(flow: NormalizingFlow) -> str | None:
    """Say which layer of ``flow`` updates state in its forward pass and how, or ``None``:
    BatchNorm, and any layer with spectrally normalised (parametrised) weights."""
    bijections: list[tuple[str, nn.Module]] = []
    for name, module in flow.named_modules():
        if isinstance(module, Bijection) and not isinstance(module, Compose):
            bijections.append((name, module))
        for kind, update in _STATE_UPDATES.items():
            if isinstance(module, kind):
                return f"{name} ({type(module).__name__}) {update}"
        if parametrize.is_parametrized(module):
            owner, layer = next(((n, m) for n, m in reversed(bijections)
                                 if name.startswith(f"{n}.")), (name, module))
            return (f"{owner} ({type(layer).__name__}) updates the power-iteration vectors of "
                    f"its spectral normalisation")
    return None


class CompiledAdamStep:
    """``step(x)``: one Adam step of ``flow`` on the batch ``x`` by exact maximum likelihood,
    traced by ``torch.compile`` into a single graph.

    The step computes ``L = -(1/B) sum_i [log N(f(x_i); 0, I) + log|det df/dx(x_i)|]`` and its
    gradient by ``torch.func.grad_and_value`` over ``torch.func.functional_call`` (no autograd
    graph kept between calls, nothing written to ``.grad``), the total norm ``||g||_2`` over
    all parameters, clips as ``torch.nn.utils.clip_grad_norm_`` does (``g * max_grad_norm /
    (||g|| + 1e-6)`` when ``||g|| > max_grad_norm``), then applies torch's Adam update
    (``flat_adam_state.adam_update``: torch's formula, its bias corrections computed once;
    the optimizer's hyper-parameters read at every call, so a learning-rate schedule applies)
    to the weights and to ``optimizer.state`` (``step``, ``exp_avg``, ``exp_avg_sq`` and
    with amsgrad ``max_exp_avg_sq``; the layout ``torch.optim.Adam`` itself keeps, so a
    checkpoint resumes with either step). The update is committed only if the loss and the
    norm are finite: after a non-finite step the weights and the optimizer state are as they
    were.
    ActNorm layers not yet initialised are initialised first, by one eager forward pass
    without gradients on the batch (what the first forward of an eager step does); the graph
    then sees plain parameters (a first batch with NaNs initialises them with NaNs, as the
    eager step's first forward does). Value checks on the batch (``Bijection.check_domain``:
    the logit's ``[0, 1]``) run eagerly before the graph, so a refused batch changes nothing.
    The weights and the Adam state live in flat tensors (``FlatAdamState``: the parameters and
    the state's entries become views of them on the first call), so the gradient, its norm and
    the update are each one pass over one tensor.

    One graph instead of the forward graph, autograd's backward, gradient accumulation and a
    fused-Adam call: Real NVP 2-D (8 couplings 1-128-128-2, batch 512, 2 CPU threads) steps in
    0.69-0.91 of the time of the compiled transform with a fused Adam step, the Glow (2 x 8
    steps, 64 channels, batch 64) in 0.69 of the eager step's time at 1x8x8 and 0.88 at
    1x28x28 (README).

    Args:
        flow: a flow whose forward pass is a pure function of its parameters and input once
            ActNorm is initialised (no BatchNorm or spectral normalisation:
            ``unsupported_layer``).
        optimizer: a ``torch.optim.Adam`` (or ``AdamW``) with one parameter group holding
            exactly the flow's trainable float32 or float64 parameters; ``fused``,
            ``foreach``, ``capturable`` and ``differentiable`` are ignored (the update is
            compiled with the rest, and no gradient flows through it).
        max_grad_norm: the clipping threshold, ``None`` for no clipping.

    Compiling takes seconds to a minute on a first call (inductor caches the code on disk for
    later processes); if it fails, a warning says why and the same step runs eagerly. The
    learning rate enters the graph as a tensor, so a schedule needs no new graph; the other
    hyper-parameters are constants of the graph, so a schedule of Adam's betas would compile
    a graph per value, and every instance adds one to the same function's cache: after
    torch's limit (``torch._dynamo.config.recompile_limit``, 8) the step runs eagerly, with
    the warning (``torch._dynamo.reset()`` empties the cache).
    """

    def __init__(self, flow: NormalizingFlow, optimizer: torch.optim.Optimizer,
                 max_grad_norm: float | None = None) -> None:
        check_supported(flow, optimizer)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.flow = flow
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        params = list(optimizer.param_groups[0]["params"])
        names = {id(p): name for name, p in flow.transform.named_parameters()}
        self.names = [names[id(p)] for p in params]
        self.storage = FlatAdamState(params, optimizer)
        self._actnorms = [m for m in flow.modules() if isinstance(m, ActNorm)]
        # dynamic=None: the parameters and optimizer state never change shape, so the graph is
        # static; a new batch size adds one graph dynamic in the batch dimension only
        self._compiled = CompiledOrEager(self._step, dynamic=None, fullgraph=True,
                                         off_switch="compile_step=false")

    @property
    def group(self) -> dict:
        """The optimizer's parameter group, looked up at every use: ``load_state_dict``
        (resuming from a checkpoint) replaces it."""
        return self.optimizer.param_groups[0]

    def __call__(self, x: Tensor) -> StepOutput:
        self.flow.check_input(x)
        with domain_checked(self.flow.transform, x):
            return self._checked_call(x)

    def _checked_call(self, x: Tensor) -> StepOutput:
        if any(m.initializes_on_forward for m in self._actnorms):
            with torch.no_grad():
                self.flow.transform(x)
        group = self.group
        flat = self.storage.flat(group["amsgrad"])
        lr = group["lr"]  # a tensor: a schedule's new value each step is no new graph
        lr = lr if isinstance(lr, Tensor) else torch.tensor(lr, dtype=flat.param.dtype,
                                                             device=flat.param.device)
        beta1, beta2 = group["betas"]
        hyper = dict(beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
                     maximize=group["maximize"],
                     decoupled_weight_decay=group.get("decoupled_weight_decay", False))
        return self._compiled(flat, x, lr, hyper)

    def _loss(self, param: Tensor, x: Tensor) -> Tensor:
        views = dict(zip(self.names, self.storage.views_of(param), strict=True))
        z, logdet = functional_call(self.flow.transform, views, (x,), strict=False)
        return -(self.flow.base.log_prob(z) + logdet).mean()

    def _step(self, flat: FlatTensors, x: Tensor, lr: Tensor,
              hyper: dict[str, float | bool]) -> StepOutput:
        grad, loss = grad_and_value(self._loss)(flat.param, x)
        norm = torch.linalg.vector_norm(grad)
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        if self.max_grad_norm is not None:
            scale = torch.where(norm > self.max_grad_norm,
                                self.max_grad_norm / (norm + 1e-6), torch.ones_like(norm))
            grad = grad * scale
        updated, count = adam_update(flat, grad, lr, **hyper)
        for old, new in zip([flat.param, *flat.moments], updated, strict=True):
            old.copy_(torch.where(finite, new, old))
        flat.step.copy_(torch.where(finite, count.to(flat.step.dtype), flat.step))
        return StepOutput(loss.detach(), norm.detach(), finite)


def check_supported(flow: NormalizingFlow, optimizer: torch.optim.Optimizer) -> None:
    """Raise a ``ValueError`` saying why ``CompiledAdamStep`` cannot train ``flow`` with
    ``optimizer``, if it cannot."""
    fix = "; train with the standard step instead (compile_step=false)"
    if not isinstance(optimizer, torch.optim.Adam):
        raise ValueError(f"the compiled step runs Adam or AdamW, got "
                         f"{type(optimizer).__name__}{fix}")
    layer = unsupported_layer(flow)
    if layer is not None:
        raise ValueError(f"the compiled step needs a forward pass without state updates, but "
                         f"{layer} in its forward pass{fix}")
    trainable = [p for p in flow.parameters() if p.requires_grad]
    groups = optimizer.param_groups
    if len(groups) != 1 or {id(p) for p in groups[0]["params"]} != {id(p) for p in trainable}:
        raise ValueError(f"the compiled step needs one optimizer parameter group holding exactly "
                         f"the flow's {len(trainable)} trainable parameters, got "
                         f"{[len(g['params']) for g in groups]} parameters in "
                         f"{len(groups)} group(s){fix}")
    dtypes = sorted({str(p.dtype) for p in trainable} - {"torch.float32", "torch.float64"})
    if dtypes:
        raise ValueError(f"the compiled step trains float32 or float64 weights (Adam's step "
                         f"count and bias corrections would round in lower precision), got "
                         f"{', '.join(dtypes)}{fix}")
    transform = {id(p) for p in flow.transform.parameters()}
    if any(id(p) not in transform for p in trainable):
        raise ValueError(f"the compiled step trains the transform's parameters; this flow's "
                         f"base distribution has trainable parameters{fix}")
