"""Does a model's training loss train the likelihood? Its log-density and that log-density's
gradient to the weights, against the exact change of variables of its own map x -> z.

For a model with a map ``z = f(x)`` onto a standard normal base (``Candidate.encode``) the
exact log-density is ``log p(x) = log N(f(x); 0, I) + log |det df/dx|``, here with the
``D x D`` Jacobian from ``D`` autograd passes (``create_graph``, so both terms have gradients
to the weights; ``D`` small: the 2-D cases). Against it, over ``draws`` calls of the model's
own ``log_prob`` (each a fresh draw of any Hutchinson probes or series lengths), all on the
same points:

- ``value_gap``: the mean over draws of the batch-mean ``log_prob`` minus the exact batch
  mean (nats per point): 0 where the loss is the NLL; a surrogate or a biased estimate is
  not 0.
- ``logdet_gradient_share``: how much of the exact log-det's gradient the model's gradient
  carries: the mean over draws of ``grad log_prob - grad log N(f(x))`` projected on
  ``grad log |det|``, over that vector's squared norm. 1 where the log-det trains the weights
  (exactly, or in expectation up to noise); 0 where it passes them no gradient.
- ``gradient_error``: ``|mean_draws grad log_prob - grad log p| / |grad log p|``, and
  ``gradient_noise``, the standard error of that mean in the same units (the part of the
  error that more draws would remove); what is left is the estimator's bias.

A model is counted as training the likelihood when ``|share - 1| < SHARE_TOLERANCE``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

SHARE_TOLERANCE = 0.25
LOG_2PI = math.log(2 * math.pi)


def exact_log_prob(encode: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """``log N(f(x); 0, I)`` and ``log |det df/dx|`` per row of ``x`` (N, D), differentiable to
    the weights. Row ``k`` of ``df/dx`` comes from ``d sum_n z_nk / dx``: each ``z_n`` depends
    on ``x_n`` alone (no batch statistics in training mode). Run eagerly: a compiled graph has
    no second-order backward."""
    x = x.detach().requires_grad_(True)
    with torch.compiler.set_stance("force_eager"):
        z = encode(x)
        jacobian = torch.stack([torch.autograd.grad(z[:, k].sum(), x, create_graph=True)[0]
                                for k in range(z.shape[1])], dim=1)  # (N, D, D): dz_k / dx_j
    _, logdet = torch.linalg.slogdet(jacobian)
    return -0.5 * z.pow(2).sum(1) - 0.5 * z.shape[1] * LOG_2PI, logdet


def _gradient(value: Tensor, parameters: list[nn.Parameter], retain_graph: bool = False
              ) -> Tensor:
    """``d value / d parameters`` flattened, zeros where a weight gets none."""
    grads = torch.autograd.grad(value, parameters, allow_unused=True, retain_graph=retain_graph)
    return torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten()
                      for g, p in zip(grads, parameters, strict=True)])


def likelihood_check(log_prob: Callable[[Tensor], Tensor], encode: Callable[[Tensor], Tensor],
                     model: nn.Module, x: Tensor, draws: int = 16) -> dict[str, float | bool]:
    """The module docstring's figures for ``log_prob`` on the points ``x``, against the exact
    log-density of ``encode``."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    base, logdet = exact_log_prob(encode, x)
    base_gradient = _gradient(base.mean(), parameters, retain_graph=True)
    logdet_gradient = _gradient(logdet.mean(), parameters)
    exact = (base.mean() + logdet.mean()).item()
    values, gradients = [], []
    for draw in range(draws):
        torch.manual_seed(draw)
        value = log_prob(x).mean()
        values.append(value.item())
        gradients.append(_gradient(value, parameters))
    gradients = torch.stack(gradients)
    mean = gradients.mean(0)
    exact_gradient = base_gradient + logdet_gradient
    scale = float(exact_gradient.norm())
    noise = (gradients - mean).pow(2).sum() / max(draws - 1, 1) / draws
    share = float((mean - base_gradient) @ logdet_gradient / logdet_gradient.pow(2).sum())
    return {"value_gap": sum(values) / draws - exact,
            "logdet_gradient_share": share,
            "gradient_error": float((mean - exact_gradient).norm()) / scale,
            "gradient_noise": float(noise.sqrt()) / scale,
            "draws": draws,
            "trains_likelihood": abs(share - 1) < SHARE_TOLERANCE}
