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
    training step trail the true ``sigma`` (measured: 1-3% low for a conv i-ResNet at Adam lr
    5e-3, so the layers ran at up to ``1.03 c``; up to ``1.07 c`` for the default 2-D
    i-ResNet; at Adam lr 1e-2 with c = 0.99 up to ``1.3-1.4 c``, where a block can stop being
    invertible: ``flows.nn.mlp_jacobian.logdet_exact`` then gives NaN; more steps per forward,
    ``n_power_iterations``, narrow the lag). So the first eval-mode use after training, after
    loading a state dict, or after the weight changed in eval mode (another tensor, or its
    version counter moved: an optimizer step, a copy, an average; a write through ``.data``
    bypasses the version counter and is not seen, nor is anything while ``torch.compile``
    traces) first converges ``u, v``
    (``converge_``: the SVD for a matrix, the power iteration to a relative error of about 1e-6
    for a convolution): every evaluation, sample and inverse then uses weights with
    ``sigma(W_hat) <= c`` up to that tolerance, as Residual Flows does before validating.
    Vectors that are already converged for the weight (as in a state dict saved from eval
    mode) are kept as they are, so reloading reproduces evaluations exactly.

    Within ``frozen_power_iteration`` (the residual blocks' inverse) training mode takes no
    power-iteration step either: every evaluation uses ``u, v`` as the last training forward
    left them, so the inverse inverts exactly the map that forward applied.

    Args:
        weight: the weight to normalise, used for the shape and to initialise ``u, v``.
        coeff: the target spectral norm ``c``, in (0, 1).
        n_power_iterations: power-iteration steps per training-mode evaluation.
        eps: guards the normalisation of ``u, v``.

    References:
        Behrmann et al., Invertible Residual Networks (2019), https://arxiv.org/abs/1811.00995
    """

    def __init__(
        self, weight: Tensor, coeff: float = 0.9, n_power_iterations: int = 1, eps: float = 1e-12
    ) -> None:
        super().__init__()
        _check_coeff(coeff)
        self.check_weight(weight)
        if n_power_iterations < 1:
            raise ValueError(f"n_power_iterations={n_power_iterations} must be >= 1")
        self.coeff = coeff
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        u_shape, v_shape = self.vector_shapes(weight)
        self.register_buffer("u", unit(weight.new_empty(u_shape).normal_(), eps))
        self.register_buffer("v", unit(weight.new_empty(v_shape).normal_(), eps))
        # 15 steps at construction, as torch's spectral_norm, so the first batch is already close.
        self.power_iterate_(weight.detach(), 15)
        self.stale = True  # u, v not converged for the current weight (see converge_)
        self.converged_for: tuple[weakref.ref, int] | None = None  # see _identity
        self.frozen = False  # set by frozen_power_iteration

    @property
    def updating(self) -> bool:
        """Whether an evaluation advances the power iteration: training mode, not frozen."""
        return self.training and not self.frozen

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
    def power_iterate_(self, weight: Tensor, num_iterations: int) -> None:
        """Run ``num_iterations`` power-iteration steps on ``u, v`` in place."""
        u, v = self.u, self.v
        for _ in range(num_iterations):
            v = unit(self.operator_adjoint(weight, u), self.eps)
            u = unit(self.operator(weight, v), self.eps)
        self.u.copy_(u)
        self.v.copy_(v)

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
        weight64 = weight.double()  # float32 rounding would stop it ~1e-4 short of sigma
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
        left, values, right = torch.linalg.svd(weight, full_matrices=False)
        return float(values[0]), left[:, 0], right[0], 0

    def refresh_(self, weight: Tensor) -> None:
        """Training mode: the weight will change, mark ``u, v`` stale. Eval mode: converge
        them if stale, or if the weight changed since they converged (``_unchanged``)."""
        if self.training:
            self.stale = True
        elif self.stale or not _unchanged(weight, self.converged_for):
            self.converge_(weight)

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        self.stale = True  # new weights or vectors
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, weight: Tensor) -> Tensor:
        self.refresh_(weight)
        if self.updating and self.n_power_iterations > 1:
            self.power_iterate_(weight, self.n_power_iterations - 1)
        weight_hat, u, v = spectral_normalize(
            weight, self.u, self.v, self.coeff, self.eps, update=self.updating,
            apply=self.operator, apply_adjoint=self.operator_adjoint,
        )
        if self.updating:
            with torch.no_grad():
                self.u.copy_(u)
                self.v.copy_(v)
        return weight_hat


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
    close) or when the change is at the rounding floor of the dtype. Returns ``(sigma, u, v,
    steps, converged)`` with ``u = A v / sigma``. A lower bound on ``sigma_1`` that converges
    to it from almost every start.
    """
    v = unit(v, eps)
    previous = float(torch.linalg.vector_norm(apply(v)))
    previous_change = 0.0
    floor = 16 * torch.finfo(v.dtype).eps
    for step in range(1, max_iterations + 1):
        v = unit(apply_adjoint(unit(apply(v), eps)), eps)
        applied = apply(v)
        sigma = float(torch.linalg.vector_norm(applied))
        change = abs(sigma - previous)
        ratio = min(change / previous_change, 0.999) if previous_change else 0.0
        if change <= floor * sigma or (
                previous_change and change * ratio / (1.0 - ratio) <= rtol * sigma):
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
    module: nn.Module, coeff: float = 0.9, n_power_iterations: int = 1, name: str = "weight"
) -> nn.Module:
    """Register ``SpectralNormalization`` on ``module.<name>`` in place and return ``module``."""
    weight = getattr(module, name)
    parametrize.register_parametrization(
        module, name, SpectralNormalization(weight, coeff, n_power_iterations)
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
    """

    def __init__(
        self,
        features: int,
        hidden_features: int = 128,
        num_hidden: int = 2,
        activation: str = "lipswish",
        coeff: float = 0.9,
        n_power_iterations: int = 1,
    ) -> None:
        super().__init__()
        _check_coeff(coeff)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {sorted(ACTIVATIONS)}")
        sizes = [features] + [hidden_features] * num_hidden + [features]
        self.linears = nn.ModuleList(
            spectral_norm_(nn.Linear(n_in, n_out), coeff, n_power_iterations)
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

        Refreshes every ``SpectralNormalization`` first (a stale one converges in eval mode)
        and, in training mode with ``n_power_iterations > 1``, runs the extra power steps.
        """
        normalizations = self._normalizations()
        weights = [linear.parametrizations.weight.original for linear in self.linears]
        for normalization, weight in zip(normalizations, weights, strict=True):
            normalization.refresh_(weight)
        updating = normalizations[0].updating
        if updating and normalizations[0].n_power_iterations > 1:
            for normalization, weight in zip(normalizations, weights, strict=True):
                normalization.power_iterate_(weight, normalization.n_power_iterations - 1)
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
