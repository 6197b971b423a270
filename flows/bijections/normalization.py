"""Normalisation layers as bijections: ActNorm and BatchNorm."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flows.core import Bijection


def _broadcast(param: Tensor, x: Tensor) -> Tensor:
    """Shape a per-feature ``(C,)`` parameter to broadcast over ``(B, C, *spatial)``."""
    return param.view(1, -1, *([1] * (x.dim() - 2)))


def _spatial_size(x: Tensor) -> int:
    return math.prod(x.shape[2:])


def _values_per_feature(x: Tensor, layer: str) -> Tensor:
    """``x`` ``(B, C, *spatial)`` as ``(C, B * H * W)``; a ``ValueError`` if that is fewer than 2
    values per feature, whose batch statistics would be degenerate (variance 0)."""
    values = x.transpose(0, 1).flatten(1)
    if values.shape[1] < 2:
        raise ValueError(
            f"{layer} in training mode takes per-feature statistics over the batch, which needs "
            f"at least 2 values per feature; got a batch of shape {tuple(x.shape)}. Train with "
            f"batches of 2 or more, or call .eval() to evaluate single samples"
        )
    return values


def actnorm(x: Tensor, shift: Tensor, log_scale: Tensor) -> tuple[Tensor, Tensor]:
    """``(z, log|det dz/dx|)`` of ``z = (x - shift) * exp(-log_scale)``, pure (``ActNorm``'s math).

    ``shift, log_scale`` ``(C,)`` act on dim 1 of ``x`` ``(B, C, *spatial)``; the log-det
    ``-H*W * sum_c log_scale_c`` is expanded to ``(B,)``.
    """
    z = (x - _broadcast(shift, x)) * _broadcast(torch.exp(-log_scale), x)
    logdet = -log_scale.sum() * _spatial_size(x)
    return z, logdet.expand(x.shape[0])


class ActNorm(Bijection):
    """Per-feature affine normalisation ``z = (x - shift) * exp(-log_scale)`` (Glow).

    Acts on dim 1 of ``(B, C)`` or ``(B, C, *spatial)``; parameters are shared over spatial
    positions, so ``log|det dz/dx| = -H*W * sum_c log_scale_c`` (``H*W = 1`` for vectors).

    Data-dependent initialisation: the first forward in training mode sets ``shift`` and
    ``log_scale`` to the batch mean and log-std per feature, so that batch comes out with
    zero mean and unit variance. Under ``torch.distributed`` the statistics are averaged over
    the ranks' batches (assumed of equal size), so every rank starts from the same values. The
    ``initialized`` buffer is saved in checkpoints, so a reloaded model is not re-initialised;
    forwards read its host copy ``needs_initialization`` (reading the buffer would make the
    host wait for a GPU in every training forward of every ActNorm).
    A feature with ``std <= eps`` in that batch (constant, or a batch of one vector) keeps
    ``log_scale = 0``: scaling it by ``1 / std`` would blow it up.

    References:
        Kingma & Dhariwal, Glow (2018), https://arxiv.org/abs/1807.03039
    """

    def __init__(self, num_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.shift = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(False))
        self.needs_initialization = True

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.needs_initialization = not bool(self.initialized)

    @property
    def initializes_on_forward(self) -> bool:
        """Whether the next forward sets the parameters from its batch (training mode, not
        yet initialised)."""
        return self.training and self.needs_initialization

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        values = x.transpose(0, 1).flatten(1)
        moments = torch.stack([values.mean(1), values.square().mean(1)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank gets the statistics of the union of the ranks' (equal-size) batches.
            torch.distributed.all_reduce(moments)
            moments /= torch.distributed.get_world_size()
        if not bool(torch.isfinite(moments).all()):  # one host read, at initialisation only
            raise ValueError(
                "ActNorm's data-dependent initialisation got NaN or inf statistics from its "
                "first training batch (the input or an earlier layer's output is not finite); "
                "it stays uninitialised: remove the non-finite values and run the batch again"
            )
        mean, mean_square = moments
        std = torch.sqrt(torch.clamp(mean_square - mean.square(), min=0.0))
        self.shift.copy_(mean)
        # A feature without spread (constant, or a batch of one vector) keeps scale 1.
        self.log_scale.copy_(torch.where(std > self.eps, torch.log(std + self.eps), 0.0))
        self.initialized.fill_(True)
        self.needs_initialization = False

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.initializes_on_forward:
            self._initialize(x)
        return actnorm(x, self.shift, self.log_scale)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x = z * _broadcast(torch.exp(self.log_scale), z) + _broadcast(self.shift, z)
        logdet = self.log_scale.sum() * _spatial_size(z)
        return x, logdet.expand(z.shape[0])


class BatchNorm(Bijection):
    """Real NVP batch normalisation ``z = (x - mu) / sqrt(var + eps) * exp(log_gamma) + beta``.

    Acts on dim 1 of ``(B, C)`` or ``(B, C, *spatial)``, with statistics over the batch and
    spatial dims and parameters shared over spatial positions, so
    ``log|det dz/dx| = H*W * sum_c (log_gamma_c - 0.5 log(var_c + eps))``, shape ``(B,)``.

    Training mode normalises with the batch mean and (biased) variance and moves the running
    statistics towards them, ``running <- (1 - momentum) running + momentum batch`` (unbiased
    variance, as ``torch.nn.BatchNorm1d``). The log-det then treats the batch statistics as
    constants: it is the per-sample Jacobian of the standard Real NVP convention, not the
    Jacobian of the whole batch map (which couples samples). Eval mode uses the running
    statistics and is an exact per-sample bijection; this is the mode ``check_bijection``
    tests. ``inverse`` always uses the running statistics, so sampling works in either mode
    (in training mode it is therefore not the exact inverse of that batch's ``forward``).

    References:
        Dinh, Sohl-Dickstein & Bengio, Density estimation using Real NVP (2017), sec. 3.7,
        https://arxiv.org/abs/1605.08803
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        if not 0 < momentum <= 1 or eps <= 0:
            raise ValueError(
                f"BatchNorm needs 0 < momentum <= 1 and eps > 0, got momentum={momentum}, "
                f"eps={eps}"
            )
        self.momentum = momentum
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _batch_statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Batch ``(mean, biased var)`` per feature; updates the running statistics of the
        features whose batch statistics are finite (a NaN or infinite value leaves its
        feature's running statistics as they were, with no host read)."""
        values = _values_per_feature(x, "BatchNorm")
        var, mean = torch.var_mean(values, dim=1, unbiased=False)
        with torch.no_grad():
            count = values.shape[1]
            unbiased = var * count / max(count - 1, 1)
            finite = torch.isfinite(mean) & torch.isfinite(unbiased)
            for running, batch in ((self.running_mean, mean), (self.running_var, unbiased)):
                running.copy_(torch.where(finite, running.lerp(batch, self.momentum), running))
        return mean, var

    def _log_scale(self, var: Tensor) -> Tensor:
        """Per-feature ``log dz/dx = log_gamma - 0.5 log(var + eps)``, shape ``(C,)``."""
        return self.log_gamma - 0.5 * torch.log(var + self.eps)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:
            mean, var = self._batch_statistics(x)
        else:
            mean, var = self.running_mean, self.running_var
        log_scale = self._log_scale(var)
        z = (x - _broadcast(mean, x)) * _broadcast(torch.exp(log_scale), x)
        z = z + _broadcast(self.beta, x)
        logdet = log_scale.sum() * _spatial_size(x)
        return z, logdet.expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        log_scale = self._log_scale(self.running_var)
        x = (z - _broadcast(self.beta, z)) * _broadcast(torch.exp(-log_scale), z)
        x = x + _broadcast(self.running_mean, z)
        logdet = -log_scale.sum() * _spatial_size(z)
        return x, logdet.expand(z.shape[0])
