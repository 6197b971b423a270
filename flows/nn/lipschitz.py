"""Lipschitz-constrained layers for i-ResNet residual branches.

``g = linear -> act -> ... -> linear`` with every linear spectrally normalised to ``c < 1`` and
1-Lipschitz activations has ``Lip(g) <= c^L`` (``L`` linears), which makes ``x + g(x)``
invertible by fixed-point iteration and ``det(I + J_g) > 0``.

References:
    Behrmann et al., Invertible Residual Networks (2019), https://arxiv.org/abs/1811.00995
    Chen et al., Residual Flows for Invertible Generative Modeling (2019),
    https://arxiv.org/abs/1906.02735
    Miyato et al., Spectral Normalization for GANs (2018), https://arxiv.org/abs/1802.05957
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from flows.nn.activations import ACTIVATIONS
from flows.nn.mlp_jacobian import (
    logdet_exact,
    mlp_logdet_series,
    mlp_with_jacobian,
    mlp_with_slopes,
)


def _check_coeff(coeff: float) -> None:
    if not 0.0 < coeff < 1.0:
        raise ValueError(
            f"lipschitz coefficient c={coeff} must be in (0, 1): the inverse's fixed-point "
            f"iteration converges only for Lip(g) < 1; use e.g. c=0.9"
        )


class SpectralNormalization(nn.Module):
    """Parametrization ``W_hat = W / max(1, sigma_hat(W) / c)`` ("soft" spectral normalisation).

    ``sigma_hat = u^T W v`` estimates the largest singular value of ``W`` (out, in) by power
    iteration with persistent unit vectors ``u`` (out,) and ``v`` (in,) kept as buffers. In
    training mode every evaluation first runs ``n_power_iterations`` steps
    ``v <- W^T u / |W^T u|, u <- W v / |W v|``, so no training loop has to update anything.
    Weights with ``sigma_hat <= c`` pass unchanged; larger ones are scaled to ``sigma_hat = c``.
    Gradients flow through ``sigma_hat`` with ``u, v`` fixed (Miyato et al.).

    ``u^T W v <= sigma(W)`` for unit vectors, and while the weights move a few power steps per
    training step trail the true ``sigma`` (``benchmarks/spectral_lag.py``, 1,000 steps at
    the configs' rates: the default 2-D i-ResNet's layers up to ``1.12 c``; the 8x8 conv
    i-ResNet's up to ``1.05 c`` with its 5 steps; at Adam lr 1e-2 on heavy-tailed data up to
    ``1.5 c``, where a block can stop being invertible: ``flows.nn.mlp_jacobian.logdet_exact``
    then gives NaN; ``power_iteration_tol`` and ``training_svd``, below, close the gap). So
    the first eval-mode use after training, after
    loading a state dict, or after the weight changed in eval mode (another tensor, or its
    version counter moved: an optimizer step, a copy, an average; a write through ``.data``
    bypasses the version counter and is not seen, nor is anything while ``torch.compile``
    traces) first converges ``u, v``
    (``converge_``: the SVD for a matrix, the power iteration to a relative error of about 1e-6
    for a convolution): every evaluation, sample and inverse then uses weights with
    ``sigma(W_hat) <= c`` up to that tolerance, as Residual Flows does before validating.
    Vectors that are already converged for the weight (as in a state dict saved from eval
    mode) are kept as they are, so reloading reproduces evaluations exactly.

    With ``power_iteration_tol`` set (like Residual Flows' ``--sn-tol``, whose test is the
    per-element RMS ``|du| / sqrt(n) < atol + rtol max|u|``: the 2-norm here is stricter by
    about ``sqrt(n)``), every training-mode evaluation continues the power iteration until a
    step moves neither unit vector ``u, v`` by more than that (2-norm; at most
    ``TRAINING_MAX_POWER_ITERATIONS`` steps), for one host read per step
    (``last_power_iterations`` counts the steps). Near the top singular vectors the relative
    error of ``sigma_hat`` is of the order of the square of the vectors' error, so the weights
    used in training keep ``sigma(W_hat)`` close to ``c`` too (measured in
    ``benchmarks/spectral_lag.py``). A stop on ``sigma_hat``'s own changes would not do: after
    a large weight change ``sigma_hat`` can rise by 0.3% and then 0.14% a step while ``u, v``
    still turn by 0.04 a step, 13% below ``sigma``. With ``training_svd`` (matrices) every
    training-mode evaluation takes ``u, v`` from the SVD of the weight instead: ``sigma_hat``
    is then ``sigma`` and its gradient ``u v^T`` that of ``sigma`` itself (0.13 ms for a 32 x
    32 weight on 2 CPU threads, 1.3 ms for 128 x 128; a power step is ~7 us).

    Within ``frozen_power_iteration`` (the residual blocks' inverse) training mode takes no
    power-iteration step either: every evaluation uses ``u, v`` as the last training forward
    left them, so the inverse inverts exactly the map that forward applied.

    Args:
        weight: the weight to normalise, used for the shape and to initialise ``u, v``.
        coeff: the target spectral norm ``c``, in (0, 1).
        n_power_iterations: power-iteration steps per training-mode evaluation (with
            ``power_iteration_tol``: at least that many).
        eps: guards the normalisation of ``u, v``.
        power_iteration_tol: ``None``, or continue every training-mode evaluation's power
            iteration until a step moves ``u`` and ``v`` by at most this (e.g. 1e-3).
        training_svd: every training-mode evaluation takes ``u, v`` from the SVD instead of
            power steps (exact; matrices only).

    References:
        Behrmann et al., Invertible Residual Networks (2019), https://arxiv.org/abs/1811.00995
        Chen et al., Residual Flows for Invertible Generative Modeling (2019),
        https://arxiv.org/abs/1906.02735 (the tolerance-based power iteration)
    """

    def __init__(
        self, weight: Tensor, coeff: float = 0.9, n_power_iterations: int = 1, eps: float = 1e-12,
        power_iteration_tol: float | None = None, training_svd: bool = False,
    ) -> None:
        super().__init__()
        _check_coeff(coeff)
        self.check_weight(weight)
        if n_power_iterations < 1:
            raise ValueError(f"n_power_iterations={n_power_iterations} must be >= 1")
        _check_training_sigma(power_iteration_tol, training_svd)
        self.coeff = coeff
        self.n_power_iterations = n_power_iterations
        self.power_iteration_tol = power_iteration_tol
        self.training_svd = training_svd
        self.last_power_iterations = 0  # steps of the last training-mode evaluation
        self.eps = eps
        u_shape, v_shape = self.vector_shapes(weight)
        self.register_buffer("u", unit(weight.new_empty(u_shape).normal_(), eps))
        self.register_buffer("v", unit(weight.new_empty(v_shape).normal_(), eps))
        self.initialize_vectors_(weight.detach())
        self.stale = True  # u, v not converged for the current weight (see converge_)
        self.converged_for: tuple[weakref.ref, int] | None = None  # see _identity
        self.frozen = False  # set by frozen_power_iteration

    @property
    def updating(self) -> bool:
        """Whether an evaluation advances the power iteration: training mode, not frozen."""
        return self.training and not self.frozen

    def initialize_vectors_(self, weight: Tensor) -> None:
        """``u, v`` for the initial weight: its top singular vectors (``svd_vectors_``), so the
        first training forward normalises with the true ``sigma``. 15 power steps from a
        random start, as torch's ``spectral_norm``, left ``sigma_hat`` 11% below ``sigma``
        for a 128 x 128 linear of the 2-D i-ResNet."""
        self.svd_vectors_(weight)

    @torch.no_grad()
    def svd_vectors_(self, weight: Tensor) -> None:
        """``u, v``: the top singular vectors of the matrix, from its SVD (a non-finite
        element counts as 0, as in ``converge_``; no host read), in float32 at least (there is
        no SVD in half precision)."""
        matrix = _finite(weight)
        _, u, v = _top_singular_svd(matrix.to(torch.promote_types(matrix.dtype, torch.float32)))
        self.u.copy_(u)
        self.v.copy_(v)

    def check_weight(self, weight: Tensor) -> None:
        if weight.dim() != 2:
            raise ValueError(f"spectral normalisation expects a matrix, got shape {weight.shape}")

    def vector_shapes(self, weight: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``u`` (the operator's output) and ``v`` (its input)."""
        return (weight.shape[0],), (weight.shape[1],)

    def operator(self, weight: Tensor, v: Tensor) -> Tensor:
        """The operator ``W v`` whose norm is bounded (here a matrix-vector product)."""
        return _matvec(weight, v)

    def operator_adjoint(self, weight: Tensor, u: Tensor) -> Tensor:
        """Its adjoint ``W^T u``."""
        return _matvec_adjoint(weight, u)

    @torch.no_grad()
    def power_iterate_(self, weight: Tensor, num_iterations: int, tol: float | None = None
                       ) -> int:
        """Run ``num_iterations`` power-iteration steps on ``u, v`` in place, or with ``tol``
        stop after the first that moves neither by more than ``tol`` (2-norm; one host read
        per step); returns the steps taken. In float32 at least: in half precision rounding
        alone moves the vectors by more than 1e-3 a step (a tolerance then ran to the cap)."""
        dtype = torch.promote_types(weight.dtype, torch.float32)
        weight, u, v = weight.to(dtype), self.u.to(dtype), self.v.to(dtype)
        steps = 0
        while steps < num_iterations:
            steps += 1
            v_next = unit(self.operator_adjoint(weight, u), self.eps)
            u_next = unit(self.operator(weight, v_next), self.eps)
            if tol is not None:
                moved = torch.maximum(torch.linalg.vector_norm(v_next - v),
                                      torch.linalg.vector_norm(u_next - u))
            u, v = u_next, v_next
            if tol is not None and not float(moved) > tol:  # NaN too: it will not settle
                break
        self.u.copy_(u)
        self.v.copy_(v)
        return steps

    def sigma(self, weight: Tensor) -> Tensor:
        """The estimate ``sigma_hat = u^T W v = |W v|`` of the largest singular value.

        ``u^T W v = |W v|`` because every step ends with ``u = W v / |W v|``; its gradient
        ``u v^T`` treats ``u, v`` as constants (Miyato et al.).
        """
        return torch.linalg.vector_norm(self.operator(weight, self.v))

    @torch.no_grad()
    def converge_(self, weight: Tensor, max_iterations: int = 1000, rtol: float = 1e-6) -> int:
        """Converge ``u, v`` to the top singular vectors (``top_singular``, in float64: the
        SVD for a matrix, the power iteration from the current ``v`` for a convolution) and
        keep them; returns the power-iteration steps taken. If ``sigma_hat`` of the current
        ``v`` is already within ``rtol`` of the converged value, ``u, v`` stay as they were
        (so converging twice, or after reloading converged vectors, changes nothing).

        Stops after ``max_iterations`` even if not converged (nearly equal top singular values
        converge slowly; ``sigma_hat`` is then already close to ``sigma``): the health checks
        (``flows.diagnostics``) measure the resulting bound independently.
        """
        # float32 rounding would stop it ~1e-4 short of sigma; a NaN or infinite weight (which
        # the SVD refuses) counts as 0 here, so u, v stay finite and the layer's output shows it
        weight64 = _finite(weight).double()
        current = float(torch.linalg.vector_norm(self.operator(weight64, self.v.double())))
        sigma, u, v, steps = self.top_singular(weight64, max_iterations, rtol)
        if sigma - current > rtol * sigma:
            self.u.copy_(u)
            self.v.copy_(v)
        self.stale = False
        self.converged_for = _identity(weight)
        return steps

    def top_singular(self, weight: Tensor, max_iterations: int, rtol: float
                     ) -> tuple[float, Tensor, Tensor, int]:
        """``(sigma, u, v, steps)``: the largest singular value of the float64 ``weight`` and
        its singular vectors, here exactly from the SVD (0 steps). The power iteration
        (``top_singular_value``) stalls on nearly equal top singular values: measured 6e-5
        short of ``sigma`` for a 32 x 2 weight, where ``1e-6`` was asked."""
        sigma, u, v = _top_singular_svd(weight)
        return float(sigma), u, v, 0

    @torch.no_grad()
    def advance_(self, weight: Tensor) -> None:
        """Training mode, not frozen: the power-iteration steps before the last one (which
        ``spectral_normalize`` takes with the gradient's ``sigma_hat``): ``n_power_iterations
        - 1`` of them, then with ``power_iteration_tol`` on until a step moves ``u, v`` by at
        most that; with ``training_svd`` the SVD's vectors instead. Elsewhere nothing."""
        if not self.updating:
            return
        if self.training_svd:
            self.svd_vectors_(weight)
            self.last_power_iterations = 1
            return
        steps = self.n_power_iterations
        if steps > 1:
            self.power_iterate_(weight, steps - 1)
        if self.power_iteration_tol is not None:
            steps += self.power_iterate_(weight, TRAINING_MAX_POWER_ITERATIONS,
                                         self.power_iteration_tol)
        self.last_power_iterations = steps

    def refresh_(self, weight: Tensor) -> None:
        """Before a use of ``weight``. Training mode: the weight will change, mark ``u, v``
        stale, and take the power steps before the last (``advance_``). Eval mode: converge
        them if stale, or if the weight changed since they converged (``_unchanged``)."""
        if self.training:
            self.stale = True
            self.advance_(weight)
        elif self.stale or not _unchanged(weight, self.converged_for):
            self.converge_(weight)

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        self.stale = True  # new weights or vectors
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, weight: Tensor) -> Tensor:
        self.refresh_(weight)
        weight_hat, u, v = spectral_normalize(
            weight, self.u, self.v, self.coeff, self.eps, update=self.updating,
            apply=self.operator, apply_adjoint=self.operator_adjoint,
        )
        if self.updating:
            with torch.no_grad():
                self.u.copy_(u)
                self.v.copy_(v)
        return weight_hat


TRAINING_MAX_POWER_ITERATIONS = 200
"""The cap on ``power_iteration_tol``'s steps in one training-mode evaluation."""


def _check_training_sigma(tol: float | None, training_svd: bool) -> None:
    if tol is not None and not 0.0 < tol < 1.0:
        raise ValueError(
            f"power_iteration_tol={tol} must be null (a fixed n_power_iterations) or in "
            f"(0, 1), e.g. 1e-3")
    if tol is not None and training_svd:
        raise ValueError(
            f"power_iteration_tol={tol} and training_svd=true both set how training estimates "
            f"sigma: the SVD is exact, so keep one (power_iteration_tol=null or "
            f"training_svd=false)")


def _top_singular_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(sigma, u, v)``: the largest singular value of ``matrix`` and its vectors (the SVD)."""
    left, values, right = torch.linalg.svd(matrix, full_matrices=False)
    return values[0], left[:, 0], right[0]


def _finite(weight: Tensor) -> Tensor:
    """``weight`` with its NaN and infinite elements set to 0."""
    return torch.where(torch.isfinite(weight), weight, 0.0)


def _traceable(weight: Tensor) -> bool:
    """Whether a change of ``weight`` can be told: not while ``torch.compile`` traces (dynamo
    cannot read tensor identity), not for a tensor without storage (a ``torch.func``
    transform's wrapper)."""
    if torch.compiler.is_compiling():
        return False
    try:
        weight.data_ptr()
    except RuntimeError:
        return False
    return True


def _identity(weight: Tensor) -> tuple[weakref.ref, int] | None:
    """The weight tensor itself (a weak reference: a new tensor never matches it, even at a
    freed one's address) and its version counter, which every in-place write through autograd
    moves; host-side, no device read. ``None`` where no change can be told (``_traceable``)."""
    return (weakref.ref(weight), weight._version) if _traceable(weight) else None


def _unchanged(weight: Tensor, converged_for: tuple[weakref.ref, int] | None) -> bool:
    """Whether ``weight`` is the tensor of ``converged_for`` (``_identity``), not written since;
    ``True`` where no change can be told."""
    if not _traceable(weight):
        return True
    return (converged_for is not None and converged_for[0]() is weight
            and converged_for[1] == weight._version)


@torch.no_grad()
def top_singular_value(
    apply: Callable[[Tensor], Tensor], apply_adjoint: Callable[[Tensor], Tensor], v: Tensor,
    eps: float = 1e-12, max_iterations: int = 1000, rtol: float = 1e-6,
) -> tuple[float, Tensor, Tensor, int, bool]:
    """Largest singular value of a linear operator by power iteration from ``v``.

    Steps ``u = A v / |A v|``, ``v = A^T u / |A^T u|``, ``sigma = |A v|``. The estimate rises to
    ``sigma_1`` geometrically, ``sigma_1 - sigma_k ~ r^k``, so after a change ``d_k`` about
    ``d_k r / (1 - r)`` remains, with ``r ~ d_k / d_{k-1}``: it stops when that is at most
    ``rtol * sigma_k`` (a bare small change stops too early when the top singular values are
    close) and ``v`` moved by at most ``sqrt(rtol)`` in the step, or when the change is at the
    rounding floor of the dtype. Before the geometric regime the changes can shrink for a few
    steps while ``v`` still turns towards ``sigma_1``'s vector (measured: 0.3%, then 0.14% a
    step, 13% below ``sigma_1``, with ``v`` turning by 0.04 a step): the second condition
    keeps the rule from stopping there; near ``sigma_1``'s vector the relative error of
    ``sigma`` is of the order of the square of ``v``'s. Returns ``(sigma, u, v, steps,
    converged)`` with ``u = A v / sigma``. A lower bound on ``sigma_1`` that converges to it
    from almost every start.
    """
    v = unit(v, eps)
    previous = float(torch.linalg.vector_norm(apply(v)))
    previous_change = 0.0
    floor = 16 * torch.finfo(v.dtype).eps
    for step in range(1, max_iterations + 1):
        v_next = unit(apply_adjoint(unit(apply(v), eps)), eps)
        applied = apply(v_next)
        sigma, moved = torch.stack([torch.linalg.vector_norm(applied),
                                    torch.linalg.vector_norm(v_next - v)]).tolist()
        v = v_next
        change = abs(sigma - previous)
        ratio = min(change / previous_change, 0.999) if previous_change else 0.0
        if change <= floor * sigma or (
                previous_change and change * ratio / (1.0 - ratio) <= rtol * sigma
                and moved <= math.sqrt(rtol)):
            return sigma, applied / max(sigma, eps), v, step, True
        previous, previous_change = sigma, change
    return sigma, applied / max(sigma, eps), v, max_iterations, False


def unit(x: Tensor, eps: float) -> Tensor:
    """``x / max(|x|, eps)`` with the norm over all elements (a vector or a feature map)."""
    return x / torch.linalg.vector_norm(x).clamp(min=eps)


def _matvec(weight: Tensor, v: Tensor) -> Tensor:
    return torch.mv(weight, v)


def _matvec_adjoint(weight: Tensor, u: Tensor) -> Tensor:
    return torch.mv(weight.t(), u)


def spectral_normalize(
    weight: Tensor, u: Tensor, v: Tensor, coeff: float, eps: float, update: bool,
    apply: Callable[[Tensor, Tensor], Tensor] = _matvec,
    apply_adjoint: Callable[[Tensor, Tensor], Tensor] = _matvec_adjoint,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(W / max(1, sigma_hat / c), u', v')``, the math of ``SpectralNormalization``, pure.

    With ``update`` (training) one power-iteration step first: ``v' = W^T u / |W^T u|``
    (no grad), ``sigma_hat = |W v'|`` (with grad) and ``u' = W v' / sigma_hat``; without it
    ``sigma_hat = |W v|`` and ``u' = u, v' = v``. The caller stores ``u', v'``. ``apply`` and
    ``apply_adjoint`` give the operator ``v -> W v`` and its adjoint (matrix products by
    default; a convolution and its transpose for ``ConvSpectralNormalization``).
    """
    if update:
        with torch.no_grad():
            v = unit(apply_adjoint(weight, u), eps)
    else:
        # A copy of v: a later training step must not overwrite a tensor saved for backward.
        v = v.clone()
    weight_v = apply(weight, v)
    sigma = torch.linalg.vector_norm(weight_v)
    if update:
        u = (weight_v / sigma.clamp(min=eps)).detach()
    return weight / torch.clamp(sigma / coeff, min=1.0), u, v


def spectral_norm_(
    module: nn.Module, coeff: float = 0.9, n_power_iterations: int = 1, name: str = "weight",
    power_iteration_tol: float | None = None, training_svd: bool = False,
) -> nn.Module:
    """Register ``SpectralNormalization`` on ``module.<name>`` in place and return ``module``."""
    weight = getattr(module, name)
    parametrize.register_parametrization(
        module, name, SpectralNormalization(weight, coeff, n_power_iterations,
                                            power_iteration_tol=power_iteration_tol,
                                            training_svd=training_svd)
    )
    return module


def _spectral_parametrizations(
    module: nn.Module,
) -> list[tuple[str, SpectralNormalization, Tensor]]:
    """``(qualified weight name, parametrization, raw weight)`` for every normalised weight."""
    found = []
    for prefix, sub in module.named_modules():
        if not parametrize.is_parametrized(sub):
            continue
        for tensor_name, plist in sub.parametrizations.items():
            for p in plist:
                if isinstance(p, SpectralNormalization):
                    name = f"{prefix}.{tensor_name}" if prefix else tensor_name
                    found.append((name, p, plist.original))
    return found


@contextmanager
def frozen_power_iteration(module: nn.Module) -> Iterator[None]:
    """Within it, no ``SpectralNormalization`` in ``module`` takes a power-iteration step, in
    training mode too: every normalised weight stays as the last training forward made it."""
    normalizations = [p for _, p, _ in _spectral_parametrizations(module)]
    previous = [p.frozen for p in normalizations]
    for p in normalizations:
        p.frozen = True
    try:
        yield
    finally:
        for p, frozen in zip(normalizations, previous, strict=True):
            p.frozen = frozen


@torch.no_grad()
def spectral_norms(module: nn.Module) -> dict[str, Tensor]:
    """The estimated largest singular value ``sigma_hat`` of every raw normalised weight.

    The normalised layer's spectral norm is ``min(sigma_hat, c)`` (exact once converged).
    """
    return {name: p.sigma(weight) for name, p, weight in _spectral_parametrizations(module)}


@torch.no_grad()
def power_iterate_(
    module: nn.Module, max_iterations: int = 1000, rtol: float = 1e-6
) -> dict[str, int]:
    """``SpectralNormalization.converge_`` on every normalised weight in ``module``.

    Afterwards ``sigma(W_hat) <= c`` holds up to about ``rtol`` relative (see
    ``top_singular_value``). Returns the number of steps taken per weight.
    """
    return {name: p.converge_(weight, max_iterations, rtol)
            for name, p, weight in _spectral_parametrizations(module)}


class LipschitzMLP(nn.Module):
    """``g(x) = W_L act(... act(W_1 x + b_1) ...) + b_L`` with ``Lip(g) <= c^L < 1``.

    Every linear is spectrally normalised to ``c`` (``SpectralNormalization``) and the
    activations are 1-Lipschitz, so ``Lip(g) <= c^(num_hidden + 1)``. Shapes: ``(B, D) -> (B, D)``
    with ``D = features``.

    Args:
        features: input and output dimension ``D``.
        hidden_features: width of the hidden layers.
        num_hidden: number of hidden layers (``num_hidden + 1`` linears).
        activation: ``"elu"`` or ``"lipswish"``.
        coeff: spectral-norm target ``c`` of each linear, in (0, 1).
        n_power_iterations: power-iteration steps per training-mode forward.
        power_iteration_tol: ``None``, or continue each training-mode forward's power
            iteration until a step moves ``u, v`` by at most it (``SpectralNormalization``).
        training_svd: take each training-mode forward's ``u, v`` from the SVD instead.
    """

    def __init__(
        self,
        features: int,
        hidden_features: int = 128,
        num_hidden: int = 2,
        activation: str = "lipswish",
        coeff: float = 0.9,
        n_power_iterations: int = 1,
        power_iteration_tol: float | None = None,
        training_svd: bool = False,
    ) -> None:
        super().__init__()
        _check_coeff(coeff)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {sorted(ACTIVATIONS)}")
        sizes = [features] + [hidden_features] * num_hidden + [features]
        self.linears = nn.ModuleList(
            spectral_norm_(nn.Linear(n_in, n_out), coeff, n_power_iterations,
                           power_iteration_tol=power_iteration_tol, training_svd=training_svd)
            for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.activations = nn.ModuleList(ACTIVATIONS[activation]() for _ in range(num_hidden))
        self.activation = activation
        self.coeff = coeff

    @property
    def lipschitz_bound(self) -> float:
        """``c^L``, the bound on ``Lip(g)`` once the power iterations have converged."""
        return self.coeff ** len(self.linears)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for linear, act in zip(self.linears[:-1], self.activations, strict=True):
            h = act(linear(h))
        return self.linears[-1](h)

    def forward_with_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(g(x), J_g(x))`` with ``J[b, i, j] = d g_i / d x_j``, shape ``(B, D, D)``.

        ``mlp_with_jacobian`` on the normalised weights, each read once.
        """
        weights = [linear.weight for linear in self.linears]
        biases = [linear.bias for linear in self.linears]
        return mlp_with_jacobian(x, weights, biases, self.activation, self._activation_params())

    def forward_with_logdet(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(g(x), log|det(I + J_g(x))|)``, shapes ``(B, D)`` and ``(B,)``: exact.

        The residual block's whole forward as one pure function, ``residual_exact`` on
        ``functional_arguments()``: the spectral normalisation of every weight (with its
        power-iteration step in training mode), ``mlp_with_jacobian`` and ``logdet_exact``;
        then ``store_vectors`` keeps the updated power-iteration vectors.
        """
        gx, logdet, us, vs = residual_exact(x, *self.functional_arguments())
        self.store_vectors(us, vs)
        return gx, logdet

    def forward_with_series_logdet(
        self, x: Tensor, probes: Tensor, num_terms: int, create_graph: bool, gradient: str,
    ) -> tuple[Tensor, Tensor]:
        """``g(x)`` ``(B, D)`` and the power-series log-det samples ``(P, B)`` for ``probes``
        ``(P, B, D)``: ``residual_series`` on ``functional_arguments()`` (see
        ``flows.nn.mlp_jacobian.mlp_logdet_series`` for ``create_graph`` and ``gradient``)."""
        gx, samples, us, vs = residual_series(x, probes, num_terms, create_graph, gradient,
                                              *self.functional_arguments())
        self.store_vectors(us, vs)
        return gx, samples

    def functional_arguments(self) -> tuple:
        """The arguments of ``residual_exact`` after ``x`` (and of ``residual_series`` after
        ``gradient``), read from this module's state.

        Refreshes every ``SpectralNormalization`` first (``refresh_``: in training mode its
        power steps before the last; a stale one converges in eval mode).
        """
        normalizations = self._normalizations()
        weights = [linear.parametrizations.weight.original for linear in self.linears]
        for normalization, weight in zip(normalizations, weights, strict=True):
            normalization.refresh_(weight)
        updating = normalizations[0].updating
        return (weights, [linear.bias for linear in self.linears],
                [p.u for p in normalizations], [p.v for p in normalizations],
                self._activation_params(), self.activation, self.coeff, normalizations[0].eps,
                updating)

    @torch.no_grad()
    def store_vectors(self, us: list[Tensor], vs: list[Tensor]) -> None:
        """Keep ``residual_exact``'s power-iteration vectors (training mode, not frozen; eval
        leaves them)."""
        if self._normalizations()[0].updating:
            for normalization, u, v in zip(self._normalizations(), us, vs, strict=True):
                normalization.u.copy_(u)
                normalization.v.copy_(v)

    def _normalizations(self) -> list[SpectralNormalization]:
        return [linear.parametrizations.weight[0] for linear in self.linears]

    def _activation_params(self) -> list[Tensor]:
        return [act.raw_beta for act in self.activations] if self.activation == "lipswish" else []


def residual_exact(
    x: Tensor, weights: list[Tensor], biases: list[Tensor], us: list[Tensor], vs: list[Tensor],
    activation_params: list[Tensor], activation: str, coeff: float, eps: float, update: bool,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    """``(g(x), log|det(I + J_g(x))|, u's, v's)`` from the raw weights, pure (no state)."""
    weights, us, vs = _spectral_normalize_all(weights, us, vs, coeff, eps, update)
    gx, jac = mlp_with_jacobian(x, weights, biases, activation, activation_params)
    return gx, logdet_exact(jac), us, vs


def residual_series(
    x: Tensor, probes: Tensor, num_terms: int, create_graph: bool, gradient: str,
    weights: list[Tensor], biases: list[Tensor], us: list[Tensor], vs: list[Tensor],
    activation_params: list[Tensor], activation: str, coeff: float, eps: float, update: bool,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    """``(g(x), power-series log-det samples (P, B), u's, v's)`` from the raw weights, pure.

    ``probes`` ``(P, B, D)``; ``mlp_logdet_series`` gives the samples.
    """
    weights, us, vs = _spectral_normalize_all(weights, us, vs, coeff, eps, update)
    gx, slopes = mlp_with_slopes(x, weights, biases, activation, activation_params)
    samples = mlp_logdet_series(probes, weights, slopes, num_terms, create_graph, gradient)
    return gx, samples, us, vs


def _spectral_normalize_all(
    weights: list[Tensor], us: list[Tensor], vs: list[Tensor], coeff: float, eps: float,
    update: bool,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """``spectral_normalize`` of every weight: the normalised weights, ``u'``'s and ``v'``'s."""
    normalized = [spectral_normalize(weight, u, v, coeff, eps, update)
                  for weight, u, v in zip(weights, us, vs, strict=True)]
    return [n[0] for n in normalized], [n[1] for n in normalized], [n[2] for n in normalized]
