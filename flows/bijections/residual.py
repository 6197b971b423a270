"""The invertible residual block ``z = x + g(x)`` with ``Lip(g) < 1`` (i-ResNet).

Log-det estimators (``log|det dz/dx| = log det(I + J_g)``; ``det(I + J_g) > 0`` because every
eigenvalue of ``J_g`` has modulus ``< 1``):

- exact: ``J_g`` from ``net.forward_with_jacobian`` (MLPs carry it through their layers), or
  for any other ``g`` (conv nets) the dense per-sample Jacobian by forward-mode autodiff
  (``dense_jacobian``, ``D`` JVPs per sample); ``(1 + a)(1 + d) - bc`` in 2-D, else
  ``slogdet``. Cheapest and best for small ``D`` (2-D toys; 8x8 images at evaluation).
- series: ``log det(I + J) = tr log(I + J) = sum_{k>=1} (-1)^(k+1) tr(J^k) / k``, truncated at
  ``n`` terms (bias ``O(Lip(g)^(n+1) / (n+1))`` per dimension), each trace by Hutchinson,
  ``tr(A) = E[v^T A v]`` with ``E[v v^T] = I``, and ``v^T J^k`` by ``k`` vector-Jacobian
  products (autograd's, or for MLPs ``flows.nn.mlp_jacobian``'s by hand), never materialising
  ``J``.

Gradient of the series (training): ``"backprop"`` differentiates through all ``n`` VJPs (a
graph that grows with ``n``); ``"neumann"`` (Residual Flows, Sec. 3.2) uses
``d log det(I + J) = tr((I + J)^{-1} dJ)`` with the inverse's Neumann series truncated where the
log-det series is: ``d sum_{k=1}^{n} (-1)^(k+1) tr(J^k) / k = sum_{k=0}^{n-1} (-1)^k tr(J^k dJ)``,
estimated by ``w^T dJ v`` with ``w^T = sum_{k<n} (-1)^k v^T J^k`` held constant. The first
``n - 1`` VJPs then run without a graph and one differentiable VJP ``w^T J`` carries the
gradient; its value ``w^T J v = sum_{k=1}^{n} (-1)^(k+1) v^T J^k v`` less the first ``n - 1``
terms is the ``n``-th, so no ``n``-th product is taken. The same estimate and expected
gradient, a graph whose size does not depend on ``n``, and fewer operations.
``"neumann_in_forward"`` (Residual Flows' memory-efficient estimator) differentiates that
surrogate ``w^T J v`` already in the forward pass, with respect to ``x`` and ``g``'s
parameters, and keeps the gradients instead of the VJP's graph; the backward scales them by
the log-det's upstream gradient. That is exact only when the upstream gradient is the same
for every sample (the parameters' gradient is a sum over samples), as for a mean or sum of
``log p`` over the batch, and the backward raises otherwise.

References:
    Behrmann et al., Invertible Residual Networks (2019), https://arxiv.org/abs/1811.00995
    Chen et al., Residual Flows for Invertible Generative Modeling (2019),
    https://arxiv.org/abs/1906.02735
    Hutchinson, A stochastic estimator of the trace of the influence matrix (1989)
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from flows.bijections.residual_inverse import (
    fixed_point_solve,
    newton_solve,
    not_finite,
    solve_identity_plus,
)
from flows.core import Bijection
from flows.nn.lipschitz import LipschitzMLP, frozen_power_iteration
from flows.nn.mlp_jacobian import logdet_exact
from flows.nn.power_series import per_sample_dot, power_series

LOGDET_MODES = ("auto", "exact", "series")
PROBES = ("gaussian", "rademacher")
SERIES_GRADIENTS = ("neumann", "backprop", "neumann_in_forward")
INVERSE_METHODS = ("auto", "newton", "fixed_point")
# "auto" inverts by Newton's method up to this event size (one J_g of D forward-mode
# products per step), by the fixed-point iteration above
NEWTON_MAX_FEATURES = 2


def sample_probes(like: Tensor, probe: str) -> Tensor:
    """Hutchinson probes ``v`` with ``E[v v^T] = I``: standard normal or Rademacher (+-1)."""
    if probe == "gaussian":
        return torch.randn_like(like)
    return torch.randint_like(like, 2).mul_(2).sub_(1)


def dense_jacobian(net: nn.Module, x: Tensor,
                   max_tangents: int = 2**14) -> tuple[Tensor, Tensor]:
    """``g(x)`` ``(B, *event)`` and each sample's Jacobian ``dg(x_i)/dx_i`` as ``(B, D, D)``.

    Forward-mode autodiff, ``torch.func.vmap(torch.func.jacfwd(g))``: ``D`` Jacobian-vector
    products per sample, vmapped over the batch in chunks of ``max_tangents // D`` samples to
    bound memory. ``g`` is applied once normally first, under ``parametrize.cached()``: that
    computes the (spectrally normalised) weights once, running a training-mode power-iteration
    update as a plain forward does, and the transforms then read those fixed weights.
    Differentiable in ``x`` and in the parameters. ``g`` must treat samples independently.
    """
    batch, features = x.shape[0], x[0].numel()

    def sample_output(sample: Tensor) -> Tensor:
        return net(sample.unsqueeze(0)).squeeze(0)

    with parametrize.cached():
        gx = net(x)
        jac = torch.func.vmap(torch.func.jacfwd(sample_output),
                              chunk_size=max(1, max_tangents // features))(x)
    return gx, jac.reshape(batch, features, features)


def logdet_power_series(
    net: nn.Module,
    x: Tensor,
    num_terms: int,
    num_probes: int = 1,
    probe: str = "gaussian",
    create_graph: bool = True,
    gradient: str = "neumann",
) -> tuple[Tensor, Tensor]:
    """``g(x)`` and Hutchinson samples of ``sum_{k=1}^{n} (-1)^(k+1) v^T J_g^k v / k``.

    The probes are batched by evaluating ``g`` once on ``x`` repeated ``num_probes`` times;
    ``v^T J^k`` is ``torch.autograd.grad(g(x), x, v^T J^(k-1))``. With ``create_graph`` the
    estimate is differentiable in the parameters and in ``x`` (needed for training: without it
    the log-det passes no gradient), by ``gradient``: ``"backprop"`` through every VJP, or
    ``"neumann"``: the returned value is the same estimate, its derivative that of
    ``w^T J_g v`` with ``w^T = sum_{k=0}^{n-1} (-1)^k v^T J^k`` constant, whose expectation is
    the derivative of the truncated series (see the module docstring); ``"neumann_in_forward"``
    the same derivative, computed here and attached by ``PrecomputedGradient`` (for a loss
    that weighs every sample's log-det alike). ``x`` must require grad.

    Args:
        net: ``g``, mapping ``(B, *event)`` to ``(B, *event)`` sample-wise.
        x: input ``(B, *event)``.
        num_terms: ``n``, the number of power-series terms.
        num_probes: Hutchinson probes per sample.
        probe: ``"gaussian"`` or ``"rademacher"``.
        create_graph: make the estimate differentiable for a backward pass.
        gradient: ``"neumann"`` (graph size independent of ``n``), ``"backprop"`` or
            ``"neumann_in_forward"`` (no graph kept for the log-det at all).

    Returns:
        ``g(x)`` of shape ``(B, *event)`` and the per-probe estimates ``(num_probes, B)``,
        whose mean over probes estimates the truncated series.
    """
    if gradient not in SERIES_GRADIENTS:
        raise ValueError(f"gradient={gradient!r} must be one of {SERIES_GRADIENTS}")
    batch = x.shape[0]
    x_rep = x.repeat(num_probes, *([1] * (x.dim() - 1))) if num_probes > 1 else x
    gx = net(x_rep)
    v = sample_probes(x_rep, probe).view(num_probes, batch, *x.shape[1:])
    backprop = create_graph and gradient == "backprop"

    def vjp(w: Tensor) -> Tensor:
        (product,) = torch.autograd.grad(gx, x_rep, w.flatten(0, 1), create_graph=backprop,
                                         retain_graph=True)
        return product.view_as(w)

    def surrogate(w: Tensor) -> Tensor:  # w^T J v from one differentiable VJP
        (product,) = torch.autograd.grad(gx, x_rep, w.flatten(0, 1), create_graph=True)
        return per_sample_dot(product.view_as(w), v)

    estimate, value = power_series(v, vjp, surrogate, num_terms,
                                   create_graph and gradient != "backprop")
    if value is not None and gradient == "neumann":
        estimate = estimate + (value - value.detach())
    elif value is not None:  # neumann_in_forward: differentiate now; the VJP's graph is freed
        params = [p for p in net.parameters() if p.requires_grad]
        grads = torch.autograd.grad(value.sum(), [x_rep, *params], retain_graph=True,
                                    allow_unused=True)
        estimate = estimate.detach() + PrecomputedGradient.apply(
            len(params), *grads, x_rep, *params).view(num_probes, batch)
    return gx[:batch], estimate


class PrecomputedGradient(torch.autograd.Function):
    """Zeros ``(N,)`` whose gradient is given: for an upstream gradient ``u`` ``(N,)``,
    ``u_i grad_x[i]`` for ``x`` ``(N, ...)`` and ``u_1 grad_p`` for each parameter ``p``.

    ``grad_x[i]`` and ``grad_p`` are the derivatives of ``sum_i s_i`` for some per-sample
    ``s`` (the Neumann surrogate), so the result is ``d (u . s)`` exactly when ``u_i`` does
    not depend on ``i``: ``x``'s part always (sample ``i`` only reaches ``x[i]``), the
    parameters' only then, which the backward checks on the device without a host read (a
    ``RuntimeError`` on the CPU; on a GPU a device-side assert, which ends the process).
    First derivatives only: a backward with ``create_graph=True`` raises.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, num_params: int, grad_x: Tensor,
                *rest: Tensor | None) -> Tensor:
        grad_params, x = rest[:num_params], rest[num_params]
        ctx.save_for_backward(grad_x, *grad_params)
        return x.new_zeros(x.shape[0])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 upstream: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph: the stored gradients have no derivative
            raise RuntimeError(
                "series_gradient='neumann_in_forward' stores first derivatives only; for "
                "higher derivatives (create_graph=True) use series_gradient='neumann'"
            )
        grad_x, *grad_params = ctx.saved_tensors
        torch._assert_async(
            (upstream == upstream[:1]).all(),
            "series_gradient='neumann_in_forward' needs a loss whose gradient is the same for "
            "every sample's log-det (a mean or sum of log p over the batch); use 'neumann'",
        )
        # None: the surrogate does not depend on it (a linear g has a constant Jacobian)
        input_grad = None if grad_x is None else grad_x * upstream.view(
            -1, *[1] * (grad_x.dim() - 1))
        scaled = [None if g is None else g * upstream[0] for g in grad_params]
        return None, None, *[None] * len(scaled), input_grad, *scaled


def _tf32_hint(z: Tensor) -> str:
    """What to add to a non-convergence warning when TF32 rounds g on this GPU."""
    if z.is_cuda and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32):
        return ("; on this GPU, TF32 matmuls/convolutions round g to ~1e-3 relative: set "
                "torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = "
                "False (flows' commands do, unless tf32=true)")
    return ""


class ResidualBlock(Bijection):
    """``z = x + g(x)`` with ``Lip(g) < 1``; ``log|det dz/dx| = log det(I + J_g(x))``, ``(B,)``.

    ``inverse`` solves ``x + g(x) = z`` (``flows.bijections.residual_inverse``) by the
    fixed-point iteration ``x <- z - g(x)`` from ``x = z`` (a contraction with rate ``Lip(g)``)
    or by safeguarded Newton steps ``x <- x - (I + J_g)^{-1} (x + g(x) - z)`` (quadratic near
    the solution, one ``J_g`` per step: for small ``D``; ``inverse_method`` ``"auto"`` takes
    Newton for ``D <= 2``). It stops when the last step moved every element by at most ``atol +
    rtol |x|`` or after ``inverse_max_iterations`` steps, records ``last_inverse_iterations``
    and ``last_inverse_residual`` (the achieved ``max |x + g(x) - z|``) and warns if it did not
    converge. The inverse log-det is minus the forward log-det at the recovered ``x``. Under
    grad mode the recovered ``x`` carries implicit-function gradients: exact
    ``dx = (I + J_g)^{-1} (dz - dg)`` when the log-det is exact, the one-step approximation
    ``dx = dz - dg`` in series mode. Sample under ``torch.no_grad()`` to skip that work. The
    inverse takes no power-iteration step of ``g``'s spectral normalisation, in training mode
    either (``frozen_power_iteration``): it inverts the map of the last forward.

    Log-det: ``logdet="exact"`` uses ``net.forward_with_jacobian`` where the net has it, else
    ``dense_jacobian`` (``D`` forward-mode products per sample); ``"series"`` the truncated
    power series with Hutchinson probes (``num_terms``/``num_probes`` in training,
    ``eval_num_terms``/``eval_num_probes`` in eval; more terms at evaluation make the bias
    negligible: i-ResNet App. E finds it numerically 0 at 20 terms); ``"auto"`` is exact for
    ``D <= exact_max_features`` and series above. Nets with ``forward_with_series_logdet``
    (``LipschitzMLP``, ``LipschitzConvNet``) give the series from hand-written Jacobian
    products, all probes on one evaluation of ``g``; for any other net, and for
    ``series_gradient="neumann_in_forward"`` in training, it takes autograd VJPs, which it runs
    even under ``torch.no_grad()`` or ``torch.inference_mode()`` (grad enabled locally,
    detached results).

    Args:
        net: ``g``, e.g. a ``LipschitzMLP``; ``Lip(g) < 1`` is the caller's guarantee.
        logdet: ``"auto"``, ``"exact"`` or ``"series"``.
        num_terms: power-series terms in training (i-ResNet CIFAR-10: 5).
        num_probes: Hutchinson probes per sample in training.
        eval_num_terms: power-series terms in eval mode.
        eval_num_probes: Hutchinson probes per sample in eval mode.
        probe: ``"gaussian"`` or ``"rademacher"``.
        series_gradient: how training differentiates the series: ``"neumann"`` (memory
            independent of ``num_terms``, faster), ``"backprop"`` or, for nets other than
            ``LipschitzMLP``, ``"neumann_in_forward"`` (the Neumann gradient taken in the
            forward pass of training: less memory, for a mean or sum NLL; eval mode uses
            ``"neumann"``; see the module docstring).
        exact_max_features: largest ``D`` for which ``"auto"`` picks the exact log-det.
        inverse_method: ``"auto"``, ``"newton"`` or ``"fixed_point"``.
        inverse_atol: absolute tolerance of the inverse's last step.
        inverse_rtol: relative tolerance of the inverse's last step.
        inverse_max_iterations: iteration cap of the inverse (Newton: evaluations of
            ``g`` and ``J_g``).

    References:
        Behrmann et al., Invertible Residual Networks (2019), https://arxiv.org/abs/1811.00995
        Chen et al., Residual Flows (2019), https://arxiv.org/abs/1906.02735
    """

    def __init__(
        self,
        net: nn.Module,
        logdet: str = "auto",
        num_terms: int = 5,
        num_probes: int = 1,
        eval_num_terms: int = 20,
        eval_num_probes: int = 4,
        probe: str = "gaussian",
        series_gradient: str = "neumann",
        exact_max_features: int = 2,
        inverse_method: str = "auto",
        inverse_atol: float = 1e-5,
        inverse_rtol: float = 1e-5,
        inverse_max_iterations: int = 1000,
    ) -> None:
        super().__init__()
        if logdet not in LOGDET_MODES:
            raise ValueError(f"logdet={logdet!r} must be one of {LOGDET_MODES}")
        if probe not in PROBES:
            raise ValueError(f"probe={probe!r} must be one of {PROBES}")
        if series_gradient not in SERIES_GRADIENTS:
            raise ValueError(
                f"series_gradient={series_gradient!r} must be one of {SERIES_GRADIENTS}"
            )
        if series_gradient == "neumann_in_forward" and isinstance(net, LipschitzMLP):
            raise ValueError(
                f"series_gradient='neumann_in_forward' takes autograd's products, but "
                f"{type(net).__name__} computes its series by hand-written ones, whose Neumann "
                f"gradient keeps no VJP graph to save; use series_gradient='neumann'"
            )
        if min(num_terms, num_probes, eval_num_terms, eval_num_probes) < 1:
            raise ValueError("num_terms, num_probes, eval_num_terms, eval_num_probes must be >= 1")
        if inverse_method not in INVERSE_METHODS:
            raise ValueError(f"inverse_method={inverse_method!r} must be one of "
                             f"{INVERSE_METHODS}")
        if inverse_max_iterations < 1:
            raise ValueError(f"inverse_max_iterations={inverse_max_iterations} must be >= 1")
        self.net = net
        self.logdet = logdet
        self.num_terms = num_terms
        self.num_probes = num_probes
        self.eval_num_terms = eval_num_terms
        self.eval_num_probes = eval_num_probes
        self.probe = probe
        self.series_gradient = series_gradient
        self.exact_max_features = exact_max_features
        self.inverse_method = inverse_method
        self.inverse_atol = inverse_atol
        self.inverse_rtol = inverse_rtol
        self.inverse_max_iterations = inverse_max_iterations
        self.last_inverse_iterations: int | None = None
        self.last_inverse_residual: float | None = None

    def uses_exact(self, x: Tensor) -> bool:
        """Whether ``forward(x)`` computes the exact log-det."""
        if self.logdet == "auto":
            return x[0].numel() <= self.exact_max_features
        return self.logdet == "exact"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.uses_exact(x):
            return self._forward_series(x)
        if hasattr(self.net, "forward_with_logdet"):
            gx, logdet = self.net.forward_with_logdet(x)
            return x + gx, logdet
        gx, jac = self._jacobian(x)
        return x + gx, logdet_exact(jac)

    def _jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``g(x)`` and ``J_g(x)`` ``(B, D, D)``: carried through the net, or dense."""
        if hasattr(self.net, "forward_with_jacobian"):
            return self.net.forward_with_jacobian(x)
        return dense_jacobian(self.net, x)

    def series_settings(self) -> tuple[int, int]:
        """``(terms, probes)`` of the power series in the current (training or eval) mode."""
        if self.training:
            return self.num_terms, self.num_probes
        return self.eval_num_terms, self.eval_num_probes

    def draw_probes(self, x: Tensor) -> Tensor:
        """Hutchinson probes ``(P, *x.shape)`` for ``x``, ``P`` of the current mode."""
        return sample_probes(x.new_empty(self.series_settings()[1], *x.shape), self.probe)

    def _forward_series(self, x: Tensor) -> tuple[Tensor, Tensor]:
        caller_grad = torch.is_grad_enabled()
        num_terms, num_probes = self.series_settings()
        # the gradient taken in the forward is for training steps; in eval mode a caller that
        # wants gradients gets them from the Neumann graph (any loss weighting)
        gradient = self.series_gradient
        if gradient == "neumann_in_forward" and not self.training:
            gradient = "neumann"
        if hasattr(self.net, "forward_with_series_logdet") and gradient != "neumann_in_forward":
            gx, samples = self.net.forward_with_series_logdet(  # hand-written products
                x, self.draw_probes(x), num_terms, caller_grad, gradient)
            return x + gx, samples.mean(0)
        # The VJPs need autograd even under no_grad or inference_mode (Lightning's default
        # for validation); an inference tensor must be cloned to enter a graph.
        with torch.inference_mode(False), torch.enable_grad():
            x_in = x.clone() if x.is_inference() else x
            if not x_in.requires_grad:
                x_in = x_in.detach().requires_grad_(True)
            gx, samples = logdet_power_series(
                self.net, x_in, num_terms, num_probes, self.probe, create_graph=caller_grad,
                gradient=gradient,
            )
        if caller_grad:
            return x + gx, samples.mean(0)
        return x + gx.detach(), samples.mean(0).detach()

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        with frozen_power_iteration(self.net):  # in training mode too: the last forward's g
            x, iterations, converged = self._solve(z)
            if torch.is_grad_enabled():
                x = self._implicit_gradient(x, z)
            z_back, logdet = self(x)
        error = (z_back - z).detach().abs().flatten(1)
        lost = not_finite(error)
        # the finite samples' residual (a lost sample's NaN would hide it); NaN if none is
        residual = float(error[~lost].max()) if not bool(lost.all()) else math.nan
        self.last_inverse_iterations = iterations
        self.last_inverse_residual = residual
        if bool(lost.any()):
            from_z = int((lost & not_finite(z)).sum())
            warnings.warn(
                f"ResidualBlock inverse: {int(lost.sum())} of {len(z)} samples are not finite "
                f"(NaN or inf), {from_z} of them already in its input z (else from this block: "
                f"non-finite weights, or I + J_g singular where Lip(g) >= 1). Find where the "
                f"first non-finite value appears",
                RuntimeWarning,
                stacklevel=2,
            )
        if not converged:
            warnings.warn(
                f"ResidualBlock inverse did not converge: max|x + g(x) - z| = {residual:.3g} "
                f"after {iterations} {'Newton' if self.newton_inverse(z) else 'fixed-point'} "
                f"iterations (atol={self.inverse_atol}, "
                f"rtol={self.inverse_rtol}); Lip(g) may be close to 1 (run the power iteration "
                f"to convergence, lower the Lipschitz coefficient) or raise "
                f"inverse_max_iterations{_tf32_hint(z)}",
                RuntimeWarning,
                stacklevel=2,
            )
        return x, -logdet

    def newton_inverse(self, z: Tensor) -> bool:
        """Whether ``inverse(z)`` takes Newton steps (else the fixed-point iteration)."""
        if self.inverse_method == "auto":
            return z[0].numel() <= NEWTON_MAX_FEATURES
        return self.inverse_method == "newton"

    @torch.no_grad()
    def _solve(self, z: Tensor) -> tuple[Tensor, int, bool]:
        """``x`` with ``x + g(x) = z``: ``(x, iterations, converged)``."""
        settings = (self.inverse_atol, self.inverse_rtol, self.inverse_max_iterations)
        with parametrize.cached():  # normalise each weight once, not once per iteration
            if self.newton_inverse(z):
                return newton_solve(self._jacobian, z, *settings)
            return fixed_point_solve(self.net, z, *settings)

    def _implicit_gradient(self, x: Tensor, z: Tensor) -> Tensor:
        """``x`` in value, with the derivatives of the solution of ``x + g(x) = z``.

        A Newton step ``x - M r`` with ``r = x + g(x) - z`` (value ~0) and ``M`` detached
        contributes only its derivative ``-M dr = M (dz - dg)``: ``M = (I + J_g)^{-1}`` (the
        implicit function theorem, exact) when the log-det is exact, else ``M = I``.
        """
        x = x.detach()
        if self.uses_exact(x):
            gx, jac = self._jacobian(x)
            step = solve_identity_plus(jac.detach(), (x + gx - z).flatten(1)).view_as(x)
        else:
            step = x + self.net(x) - z
        return x + (step.detach() - step)


def has_series_logdet(flow: nn.Module) -> bool:
    """Whether any ``ResidualBlock`` of ``flow`` estimates its log-det by the power series.

    ``"auto"`` blocks count when their event size exceeds ``exact_max_features``, judged from
    the flow's ``event_shape`` (the blocks of an image flow see squeezed shapes of the same
    size or, after a factor-out, smaller: still far above the exact threshold).
    """
    num_dims = math.prod(getattr(flow, "event_shape", ()) or (0,))
    return any(block.logdet == "series"
               or (block.logdet == "auto" and num_dims > block.exact_max_features)
               for block in flow.modules() if isinstance(block, ResidualBlock))
