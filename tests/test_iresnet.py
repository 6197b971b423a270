"""i-ResNet: spectral norm, Lipschitz MLP, residual block and model, against mathematics."""

import copy
import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from flows.bijections.normalization import ActNorm
from flows.bijections.residual import ResidualBlock, logdet_power_series
from flows.bijections.residual_chain import MLPResidualChain
from flows.core import Compose, NormalizingFlow, first_nonfinite_bijection
from flows.models.iresnet import ConvIResNet, IResNet
from flows.nn import lipschitz_conv
from flows.nn.activations import ELU, LipSwish, elu
from flows.nn.compile import CompiledOrEager
from flows.nn.lipschitz import (
    LipschitzMLP,
    SpectralNormalization,
    power_iterate_,
    spectral_norm_,
    spectral_norms,
    top_singular_value,
)
from flows.nn.lipschitz_conv import LipschitzConvNet
from flows.nn.mlp_jacobian import logdet_exact
from tests.checks import assert_same_training_results, check_bijection, perturb_

TIGHT = {"inverse_atol": 1e-12, "inverse_rtol": 1e-12}


def make_net(features=2, hidden=16, num_hidden=2, activation="lipswish", coeff=0.9, seed=0):
    """A perturbed MLP whose power iteration has converged (so ``Lip(g) <= c^L`` holds)."""
    torch.manual_seed(seed)
    net = perturb_(LipschitzMLP(features, hidden, num_hidden, activation, coeff), seed=seed)
    net = net.double()
    power_iterate_(net, rtol=1e-13)
    return net.eval()


def truncated_series(jac, num_terms):
    """``sum_{k=1}^{n} (-1)^(k+1) tr(J^k) / k`` from materialised Jacobians ``(B, D, D)``."""
    total, power = jac.new_zeros(jac.shape[0]), torch.eye(jac.shape[-1], dtype=jac.dtype)
    for k in range(1, num_terms + 1):
        power = power @ jac
        total = total + (-1) ** (k + 1) / k * torch.diagonal(power, dim1=1, dim2=2).sum(1)
    return total


# Spectral normalisation -------------------------------------------------------------------


@pytest.mark.parametrize("coeff", [1.0, 1.5, 0.0, -0.5])
def test_lipschitz_coefficient_outside_unit_interval_raises(coeff):
    with pytest.raises(ValueError, match=r"must be in \(0, 1\).*fixed-point"):
        LipschitzMLP(2, 8, 1, coeff=coeff)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        SpectralNormalization(torch.randn(3, 3), coeff=coeff)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        IResNet(2, num_blocks=1, lipschitz_coeff=coeff)


def test_training_forwards_bound_spectral_norm_from_large_init():
    """Power iteration inside training forwards alone brings every sigma(W_hat) to <= c."""
    torch.manual_seed(0)
    net = perturb_(LipschitzMLP(2, 32, 2, "elu", coeff=0.7), scale=2.0).double().train()
    originals = [lin.parametrizations.weight.original for lin in net.linears]
    raw = [torch.linalg.matrix_norm(w, 2) for w in originals]
    assert min(raw) > 5.0  # far above c: the normalisation is active
    x = torch.randn(16, 2, dtype=torch.float64)
    for _ in range(200):
        net(x)
    with torch.no_grad():
        for lin, sigma in zip(net.linears, raw, strict=True):
            bound = torch.linalg.matrix_norm(lin.weight, 2)
            assert bound <= 0.7 * (1 + 1e-9)
            assert bound >= 0.7 * (1 - 1e-6)  # scaled to c, not below: sigma_hat -> sigma
            torch.testing.assert_close(spectral_norms(lin)["weight"], sigma, rtol=1e-9, atol=0.0)


def _training_mode_bounds(net, x, path, steps=20):
    """Adam at lr 0.05 on ``-|g(x)|^2`` (the weights grow fast); after every training forward,
    each linear's ``sigma(W_hat) / c`` from the SVD with the ``sigma_hat`` that forward used,
    and the power steps it took. Returns the largest ratio and the most steps."""
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    worst, most = 0.0, 0
    for _ in range(steps):
        out = net(x) if path == "forward" else net.forward_with_logdet(x)[0]
        with torch.no_grad():
            for linear in net.linears:
                weight = linear.parametrizations.weight.original
                normalization = linear.parametrizations.weight[0]
                scale = torch.clamp(normalization.sigma(weight) / net.coeff, min=1.0)
                ratio = torch.linalg.matrix_norm(weight, 2) / scale / net.coeff
                worst = max(worst, float(ratio))
                most = max(most, normalization.last_power_iterations)
        optimizer.zero_grad()
        (-out.square().mean()).backward()
        optimizer.step()
    return worst, most


@pytest.mark.parametrize("path", ["forward", "forward_with_logdet"])
def test_power_iteration_tol_bounds_the_weights_of_training_forwards(path):
    """With ``power_iteration_tol`` the weights a training forward uses keep ``sigma(W_hat)
    ~ c`` while Adam moves them fast; one power step a forward trails them by far."""
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    results = {}
    for tol, svd in ((None, False), (1e-4, False), (None, True)):
        torch.manual_seed(0)
        net = LipschitzMLP(2, 32, 2, "elu", coeff=0.9, power_iteration_tol=tol,
                           training_svd=svd).double()
        results[tol, svd] = _training_mode_bounds(net.train(), x, path)
    assert results[None, False][1] == 1  # one power step a forward
    assert results[None, False][0] > 1.5  # measured 1.66
    assert results[1e-4, False][0] <= 1 + 1e-6  # measured 1 + 2.4e-8
    assert results[1e-4, False][1] > 1
    assert results[None, True] == (pytest.approx(1.0, abs=1e-12), 1)  # exact


def test_training_sigma_options_are_checked():
    with pytest.raises(ValueError, match=r"power_iteration_tol=0 must be null .* or in \(0, 1\)"):
        LipschitzMLP(2, 8, 1, power_iteration_tol=0)
    with pytest.raises(ValueError, match=r"power_iteration_tol=0.001 and training_svd=true both"):
        IResNet(2, num_blocks=1, power_iteration_tol=1e-3, training_svd=True)


def test_power_iteration_does_not_stop_while_v_still_turns():
    """``A = diag(1, 0.98, 0.3)`` from ``v ~ (0.05, 1, 1)``: the third component dies first,
    so ``sigma_hat``'s changes shrink fast (ratio ~0.09) while ``v`` still turns from the
    second axis to the first. A stop on ``sigma_hat``'s changes alone ended at 0.98006 after
    3 steps."""
    matrix = torch.diag(torch.tensor([1.0, 0.98, 0.3], dtype=torch.float64))
    start = torch.tensor([0.05, 1.0, 1.0], dtype=torch.float64)
    sigma, u, v, steps, converged = top_singular_value(
        lambda v: matrix @ v, lambda u: matrix.T @ u, start, rtol=1e-6)
    assert converged and sigma == pytest.approx(1.0, rel=2e-6)
    assert abs(float(v[0])) == pytest.approx(1.0, rel=1e-3)


def test_eval_mode_converges_the_power_iteration_once_then_leaves_it():
    torch.manual_seed(0)
    net = perturb_(LipschitzMLP(2, 8, 1, coeff=0.7), scale=2.0).double().train()
    x = torch.randn(4, 2, dtype=torch.float64)
    net(x)  # one power step: sigma_hat still below sigma
    net.eval()(x)  # the first eval use converges u, v
    for lin in net.linears:
        assert torch.linalg.matrix_norm(lin.weight, 2) <= 0.7 * (1 + 1e-4)
    before = [buf.clone() for buf in net.buffers()]
    net(x)
    net.forward_with_jacobian(x)
    net.forward_with_logdet(x)
    assert all(torch.equal(a, b) for a, b in zip(before, net.buffers(), strict=True))
    net.train()(x)
    assert not all(torch.equal(a, b) for a, b in zip(before, net.buffers(), strict=True))


def test_small_weights_are_not_rescaled():
    layer = torch.nn.Linear(4, 4).double()
    with torch.no_grad():
        layer.weight.mul_(0.1 / torch.linalg.matrix_norm(layer.weight, 2))
    raw = layer.weight.detach().clone()
    spectral_norm_(layer, coeff=0.9)
    torch.testing.assert_close(layer.eval().weight, raw)


def test_power_iterate_converges_and_reports_sigma():
    net = make_net(hidden=24, activation="elu")
    for name, sigma in spectral_norms(net).items():
        module = net.get_submodule(name.rsplit(".", 1)[0])
        exact = torch.linalg.matrix_norm(module.parametrizations.weight.original, 2)
        torch.testing.assert_close(sigma, exact, rtol=1e-9, atol=0.0)


# Activations and the Lipschitz MLP ----------------------------------------------------------


@pytest.mark.parametrize("activation", [ELU(), LipSwish()])
def test_activation_derivative_closed_form_and_bound(activation):
    activation = activation.double()
    if isinstance(activation, LipSwish):
        with torch.no_grad():
            activation.raw_beta.fill_(2.0)
    h = torch.linspace(-8, 8, 4001, dtype=torch.float64, requires_grad=True)
    out, slope = activation.forward_with_derivative(h)
    (autograd_slope,) = torch.autograd.grad(activation(h).sum(), h)
    torch.testing.assert_close(out, activation(h))
    torch.testing.assert_close(slope, autograd_slope)
    assert slope.abs().max() <= 1.0
    if isinstance(activation, LipSwish):
        assert slope.max() > 0.99  # max |d/dh swish| = 1.0998: the 1/1.1 is tight


def test_elu_is_torch_elu_with_its_first_and_second_derivatives():
    """``flows``' ELU (exp-based, not ``F.elu``'s expm1) against the closed form in float64:
    values, the VJP and its derivative (the Neumann gradient's double backward), forward mode
    and ``torch.func`` (vmap of jacfwd, as ``dense_jacobian``); float32 within an ulp of 1."""
    h = torch.linspace(-30, 30, 6001, dtype=torch.float64).requires_grad_(True)
    expected = torch.where(h > 0, h, torch.expm1(h))
    out = elu(h)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    weights = torch.randn_like(h)
    (vjp,) = torch.autograd.grad(out, h, weights, create_graph=True)
    torch.testing.assert_close(vjp, weights * torch.where(h > 0, 1.0, torch.exp(h)))
    (second,) = torch.autograd.grad(vjp.sum(), h)
    torch.testing.assert_close(second, weights * torch.where(h > 0, 0.0, torch.exp(h)))
    _, tangent_out = torch.func.jvp(elu, (h.detach(),), (weights,))
    torch.testing.assert_close(tangent_out, vjp.detach())
    small = h.detach()[:6000:500].view(3, 4)  # 12 points, per-row Jacobians (4, 4)
    jac = torch.func.vmap(torch.func.jacfwd(elu))(small)
    torch.testing.assert_close(jac, torch.diag_embed(torch.where(small > 0, 1.0, small.exp())))
    points = torch.tensor([-1.0, 0.5, -2.0, 1.5], dtype=torch.float64)  # forward over forward
    hessian = torch.func.jacfwd(torch.func.jacfwd(lambda t: elu(t).sum()))(points)
    torch.testing.assert_close(hessian, torch.diag(torch.where(points > 0, 0.0, points.exp())))
    single = h.detach().float()
    exact = torch.where(single > 0, single.double(), torch.expm1(single.double()))
    assert (elu(single).double() - exact).abs().max() <= 1.2e-7  # an ulp of 1 (F.elu: 6e-8)


def test_compiled_elu_has_the_closed_form_values_and_derivative():
    """Under ``torch.compile`` ``elu`` is ``where(h > 0, h, exp(min(h, 1)) - 1)`` in plain ops,
    fused by inductor with the backward it derives: values and the VJP against the closed form
    in float64, with ``elu'(0) = 1`` and a finite gradient where ``exp(h)`` would overflow."""
    h = torch.cat([torch.linspace(-30, 30, 6001, dtype=torch.float64),
                   torch.tensor([0.0, -1e-300, 1e-300, 800.0], dtype=torch.float64)]
                  ).requires_grad_()
    out = torch.compile(elu)(h)
    torch.testing.assert_close(out, torch.where(h > 0, h, torch.expm1(h)), rtol=0, atol=1e-15)
    weights = torch.randn_like(h)
    (vjp,) = torch.autograd.grad(out, h, weights)
    torch.testing.assert_close(vjp, weights * torch.where(h > 0, 1.0, torch.exp(h)))
    assert vjp[6001] == weights[6001]  # h = 0


@pytest.mark.parametrize(("activation", "num_hidden"), [("elu", 2), ("lipswish", 2), ("elu", 0)])
def test_forward_with_jacobian_matches_jacrev(activation, num_hidden):
    net = make_net(features=3, num_hidden=num_hidden, activation=activation)
    x = torch.randn(5, 3, dtype=torch.float64)
    gx, jac = net.forward_with_jacobian(x)
    expected = torch.func.vmap(torch.func.jacrev(net))(x)
    torch.testing.assert_close(gx, net(x))
    torch.testing.assert_close(jac, expected)


def test_forward_with_jacobian_normalises_each_weight_once():
    net = LipschitzMLP(2, 8, 2).train()
    calls = []
    for module in net.modules():
        if isinstance(module, SpectralNormalization):
            module.register_forward_hook(lambda mod, args, out: calls.append(mod))
    net.forward_with_jacobian(torch.randn(4, 2))
    assert len(calls) == 3 and len(set(map(id, calls))) == 3


@pytest.mark.parametrize("activation", ["elu", "lipswish"])
@pytest.mark.parametrize("num_hidden", [0, 2])
def test_mlp_lipschitz_bound_on_random_pairs(activation, num_hidden):
    net = make_net(features=2, hidden=32, num_hidden=num_hidden, activation=activation, coeff=0.9)
    torch.manual_seed(1)
    x = torch.randn(4096, 2, dtype=torch.float64) * 3
    y = x + torch.randn_like(x) * torch.rand(4096, 1, dtype=torch.float64)  # near and far
    ratio = (net(x) - net(y)).norm(dim=1) / (x - y).norm(dim=1)
    bound = 0.9 ** (num_hidden + 1)
    assert ratio.max() <= bound + 1e-12
    if num_hidden == 0:  # a single normalised linear attains its bound c
        assert ratio.max() >= bound * (1 - 1e-4)


# Log-det estimators -------------------------------------------------------------------------


def test_exact_logdet_closed_form_matches_slogdet():
    jac = 0.3 * torch.randn(6, 2, 2, dtype=torch.float64)
    expected = torch.linalg.slogdet(torch.eye(2, dtype=torch.float64) + jac).logabsdet
    torch.testing.assert_close(logdet_exact(jac), expected)


def test_long_series_matches_slogdet():
    """With Lip(g) <= 0.9^3 and 80 terms the truncation error is ~0.73^81 / (1 - 0.73) < 1e-10."""
    net = make_net(features=3, hidden=16, coeff=0.9, activation="elu")
    x = torch.randn(8, 3, dtype=torch.float64) * 2
    _, jac = net.forward_with_jacobian(x)
    expected = torch.linalg.slogdet(torch.eye(3, dtype=torch.float64) + jac).logabsdet
    torch.testing.assert_close(truncated_series(jac, 80), expected, atol=1e-9, rtol=0)
    # With 3 terms the series visibly differs: the comparison above is not vacuous.
    assert (truncated_series(jac, 3) - expected).abs().max() > 1e-4


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_mean_matches_truncated_series(probe):
    net = make_net(features=3, hidden=16, coeff=0.9)
    x = torch.randn(4, 3, dtype=torch.float64).requires_grad_(True)
    _, jac = net.forward_with_jacobian(x)
    expected = truncated_series(jac.detach(), 4)
    torch.manual_seed(0)
    gx, samples = logdet_power_series(net, x, 4, num_probes=4000, probe=probe, create_graph=False)
    torch.testing.assert_close(gx, net(x))
    assert samples.shape == (4000, 4)
    stderr = samples.std(0) / math.sqrt(samples.shape[0])
    assert ((samples.mean(0) - expected).abs() <= 4 * stderr).all()
    assert (stderr < 0.05 * expected.abs().max()).all()  # the test has power


def test_backprop_series_gradient_matches_explicit_estimate():
    """With backprop, v^T sum_k (-J)^(k-1) J v / k differentiates exactly like its formula."""
    net = make_net(features=2, hidden=16).train()
    block = ResidualBlock(net, logdet="series", num_terms=5, num_probes=1,
                          series_gradient="backprop").train()
    x = torch.randn(6, 2, dtype=torch.float64)
    torch.manual_seed(3)
    _, logdet = block(x)
    # Every parameter but the output bias (J does not depend on it) moves the log-det.
    params = [p for name, p in net.named_parameters() if name != "linears.2.bias"]
    grads = torch.autograd.grad(logdet.sum(), params)
    assert all(g.abs().sum() > 0 for g in grads)

    torch.manual_seed(3)
    v = torch.randn_like(x)
    # Same weights: the power iteration had converged; the eval switch's extra power steps
    # move u, v (hence d sigma / dW = u v^T) only at the 1e-9 level.
    net.eval()
    _, jac = net.forward_with_jacobian(x)
    w, explicit = v, x.new_zeros(6)
    for k in range(1, 6):
        w = torch.einsum("bi,bij->bj", w, jac)
        explicit = explicit + (-1) ** (k + 1) / k * (w * v).sum(1)
    torch.testing.assert_close(logdet, explicit, rtol=1e-9, atol=1e-12)
    expected = torch.autograd.grad(explicit.sum(), params)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=5e-9)


class AutogradOnly(torch.nn.Module):
    """``g`` without ``forward_with_series_logdet``: the block takes autograd's VJPs."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("gradient", ["neumann", "neumann_in_forward"])
@pytest.mark.parametrize("num_terms", [1, 2])
def test_neumann_series_gradient_is_unbiased_for_the_truncated_series(num_terms, gradient):
    """Mean Neumann gradient (params and x) = gradient of sum_k (-1)^(k+1) tr(J^k) / k.

    The target is computed from the materialised float64 Jacobian; the Monte Carlo mean over
    200 x 50 Gaussian probes must lie within 4.5 standard errors of it in every component.
    Large weights and positive biases (ELU in its linear part) make ``J`` large enough that
    one term more or less moves the gradient by > 5 standard errors: the test has power.
    """
    torch.manual_seed(0)
    net = perturb_(LipschitzMLP(2, 16, 2, "elu", 0.99), scale=1.0).double()
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "bias" in name:
                param.add_(2.0)
    power_iterate_(net, rtol=1e-13)
    # neumann_in_forward takes autograd's products: the MLP without its hand-written ones
    g = net if gradient == "neumann" else AutogradOnly(net)
    block = ResidualBlock(g, logdet="series", num_terms=num_terms, num_probes=50,
                          series_gradient=gradient).train()
    params = [p for name, p in net.named_parameters() if name != "linears.2.bias"]
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    values, grads = [], []
    for _ in range(200):
        _, logdet = block(x)
        values.append(logdet.detach())
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(logdet.sum(),
                                                                         [x, *params])]))
    values, grads = torch.stack(values), torch.stack(grads)

    net.eval()  # same weights: the power iteration had converged
    _, jac = net.forward_with_jacobian(x)
    expected = truncated_series(jac, num_terms)
    expected_grad = torch.cat([g.flatten() for g in torch.autograd.grad(expected.sum(),
                                                                        [x, *params])])
    value_se = values.std(0) / math.sqrt(len(values))
    assert ((values.mean(0) - expected.detach()).abs() <= 4.5 * value_se).all()
    grad_se = grads.std(0) / math.sqrt(len(grads))
    assert ((grads.mean(0) - expected_grad).abs() <= 4.5 * grad_se + 1e-12).all()
    # power: the standard errors are small against the gradient being checked
    assert grad_se.max() < 0.05 * expected_grad.abs().max()


@pytest.mark.parametrize("gradient", ["neumann", "neumann_in_forward"])
@pytest.mark.parametrize("num_terms", [1, 2, 5])
def test_neumann_modes_take_the_last_term_from_the_surrogate(num_terms, gradient):
    """With the Neumann gradient the n-th term v^T J^n v is the surrogate w^T J v less the
    first n - 1 terms, not an n-th product: the estimate equals, sample for sample (same
    probes), the one from all n products, and n - 1 products plus one differentiable VJP run."""
    torch.manual_seed(0)
    net = perturb_(LipschitzConvNet((2, 3, 3), hidden_channels=4, coeff=0.95), scale=1.0)
    net = net.double().eval()  # fixed weights: no power step between the two evaluations
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    _, all_products = logdet_power_series(net, x, num_terms, num_probes=3, create_graph=False)
    calls = []
    hook = net.convs[-1].register_full_backward_hook(lambda *args: calls.append(1))
    try:
        torch.manual_seed(1)
        _, estimate = logdet_power_series(net, x, num_terms, num_probes=3, gradient=gradient)
    finally:
        hook.remove()
    torch.testing.assert_close(estimate.detach(), all_products, rtol=1e-12, atol=1e-12)
    assert len(calls) == num_terms  # VJPs through g: n - 1 without a graph, 1 with


@pytest.mark.parametrize("num_terms", [1, 2, 5])
def test_hand_written_neumann_series_takes_the_last_term_from_the_surrogate(num_terms,
                                                                           monkeypatch):
    """The MLP's hand-written series with the Neumann gradient: the same samples as all ``n``
    products (same probes) from ``n - 1`` VJPs and one differentiable JVP."""
    import flows.nn.mlp_jacobian as mlp_jacobian

    net = make_net(features=3, hidden=16, activation="elu", coeff=0.95)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    probes = torch.randn(2, 5, 3, dtype=torch.float64)
    _, all_products = net.forward_with_series_logdet(x, probes, num_terms, False, "neumann")
    calls = []
    vjp = mlp_jacobian.mlp_vjp
    monkeypatch.setattr(mlp_jacobian, "mlp_vjp", lambda *args: calls.append(1) or vjp(*args))
    _, estimate = net.forward_with_series_logdet(x, probes, num_terms, True, "neumann")
    torch.testing.assert_close(estimate.detach(), all_products, rtol=1e-12, atol=1e-12)
    assert len(calls) == num_terms - 1


@pytest.mark.parametrize("gradient", ["neumann", "backprop"])
@pytest.mark.parametrize(("activation", "probe"),
                         [("elu", "gaussian"), ("lipswish", "rademacher")])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_hand_written_series_matches_autograd_vjps(kind, gradient, activation, probe):
    """The MLP's and the conv branch's hand-written Jacobian products give autograd's series:
    the same samples (same seed, 3 probes sharing one evaluation of g) and the same gradients
    in x and every parameter, in training (with a power-iteration step) and in eval under
    no_grad."""
    if kind == "mlp":
        net = make_net(features=3, hidden=16, activation=activation).train()
        x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    else:
        torch.manual_seed(0)
        net = perturb_(LipschitzConvNet((2, 3, 3), 4, activation, coeff=0.9), scale=1.0)
        power_iterate_(net, rtol=1e-13)
        net = net.double().train()
        x = torch.randn(5, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    blocks = [ResidualBlock(module, logdet="series", num_terms=6, num_probes=3, probe=probe,
                            series_gradient=gradient, eval_num_terms=9, eval_num_probes=2)
              for module in (copy.deepcopy(net), AutogradOnly(copy.deepcopy(net)))]
    results = []
    for block in blocks:
        torch.manual_seed(0)
        z, logdet = block.train()(x)
        params = list(block.parameters())
        grads = torch.autograd.grad((logdet * torch.arange(1.0, 6.0)).sum() + z.sum(),
                                    [x, *params])
        block.eval()
        torch.manual_seed(1)
        with torch.no_grad():
            _, eval_logdet = block(x)
        results.append((z, logdet, grads, eval_logdet))
    (z, logdet, grads, eval_logdet), (z_ref, logdet_ref, grads_ref, eval_ref) = results
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(logdet, logdet_ref)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(eval_logdet, eval_ref)
    assert not eval_logdet.requires_grad
    assert all(g.abs().sum() > 0 for g in grads)  # the comparison covers every input


def test_conv_hand_written_series_takes_one_power_step_and_runs_under_inference_mode():
    """The conv branch's hand-written series advances every spectral norm's power iteration
    exactly as a plain forward does (non-square images, vectors not yet converged), and in eval
    mode under ``torch.inference_mode`` (Lightning's validation) gives autograd's samples."""
    torch.manual_seed(0)
    net = perturb_(LipschitzConvNet((2, 3, 5), 4, coeff=0.9), scale=1.0).double().train()
    x = torch.randn(4, 2, 3, 5, dtype=torch.float64)
    plain, hand = copy.deepcopy(net), copy.deepcopy(net)
    plain(x)
    hand.forward_with_series_logdet(x, torch.randn(2, *x.shape, dtype=x.dtype), 3, True,
                                    "neumann")
    for name, buffer in plain.named_buffers():
        assert torch.equal(buffer, dict(hand.named_buffers())[name]), name
    assert not torch.equal(plain.convs[0].parametrizations.weight[0].u,
                           net.convs[0].parametrizations.weight[0].u)  # it did take a step
    samples = []
    for module in (copy.deepcopy(net), AutogradOnly(copy.deepcopy(net))):
        block = ResidualBlock(module, logdet="series", eval_num_terms=7, eval_num_probes=3).eval()
        torch.manual_seed(1)
        with torch.inference_mode():
            z, logdet = block(x)
        samples.append((z, logdet))
    torch.testing.assert_close(samples[0][0], samples[1][0])
    torch.testing.assert_close(samples[0][1], samples[1][1])


def saved_tensor_bytes(block, x):
    """Bytes of every tensor the autograd graph of ``block(x)`` saves for backward."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        block(x)
    return total


def test_neumann_series_graph_does_not_grow_with_the_number_of_terms():
    """The memory-saving property: the saved graph is the same size for 2 and 12 terms."""
    net = make_net(features=4, hidden=32).train()
    x = torch.randn(64, 4, dtype=torch.float64)
    sizes = {}
    for gradient in ("neumann", "backprop"):
        for num_terms in (2, 12):
            block = ResidualBlock(net, logdet="series", num_terms=num_terms,
                                  series_gradient=gradient).train()
            sizes[gradient, num_terms] = saved_tensor_bytes(block, x)
    assert sizes["neumann", 2] == sizes["neumann", 12]
    assert sizes["backprop", 12] > 3 * sizes["backprop", 2]  # backprop's graph grows


def conv_flow(gradient):
    """Two conv residual blocks with an ActNorm between (float64, perturbed weights)."""
    torch.manual_seed(0)
    blocks = [ResidualBlock(perturb_(LipschitzConvNet((2, 4, 4), 6, coeff=0.9)),
                            logdet="series", num_terms=4, num_probes=2,
                            series_gradient=gradient) for _ in range(2)]
    return Compose(blocks[0], perturb_(ActNorm(2)), blocks[1]).double().train()


def test_neumann_in_forward_gives_the_neumann_gradient_of_a_mean_nll():
    """Gradients taken in the forward pass, scaled in the backward: for a mean NLL the same
    value and the same gradients in x and every parameter as the Neumann surrogate's graph
    (same probes), through two blocks, so the second block's gradient reaches the first."""
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    results = []
    for gradient in ("neumann", "neumann_in_forward"):
        flow = conv_flow(gradient)
        torch.manual_seed(1)
        z, logdet = flow(x)
        nll = (0.5 * z.pow(2).flatten(1).sum(1) - logdet).mean()
        results.append((logdet, torch.autograd.grad(nll, [x, *flow.parameters()])))
    (logdet, grads), (logdet_ref, grads_ref) = results[1], results[0]
    torch.testing.assert_close(logdet, logdet_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in grads)


class Saved:
    """A tensor saved for backward, as the graph holds it (weak-referenceable)."""

    def __init__(self, tensor):
        self.tensor = tensor


def retained_saved_bytes(module, x):
    """Bytes of the saved tensors that the graph of ``module(x)`` still holds once the forward
    returns (graphs built and dropped inside the forward are not counted)."""
    refs = []

    def pack(tensor):
        saved = Saved(tensor)
        refs.append(weakref.ref(saved))
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
        output = module(x)
    gc.collect()
    alive = [ref() for ref in refs if ref() is not None]
    del output
    return sum(saved.tensor.numel() * saved.tensor.element_size() for saved in alive)


def test_neumann_in_forward_with_a_linear_g_whose_jacobian_ignores_x():
    """A linear ``g``: the surrogate has no gradient in ``x``, only in the weights."""
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    grads = []
    for gradient in ("neumann", "neumann_in_forward"):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(2, 2, 3, padding=1).double()
        with torch.no_grad():
            conv.weight.mul_(0.1)
        block = ResidualBlock(AutogradOnly(conv), logdet="series", num_terms=3,
                              series_gradient=gradient).train()
        torch.manual_seed(1)
        z, logdet = block(x)
        grads.append(torch.autograd.grad((z.pow(2).flatten(1).sum(1) - logdet).mean(),
                                         [x, *block.parameters()]))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_neumann_in_forward_keeps_no_vjp_graph():
    """The memory it saves: the graph that a forward leaves for the backward holds less than
    the Neumann surrogate's, which keeps the differentiable VJP's tensors."""
    x = torch.randn(8, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    sizes = {gradient: retained_saved_bytes(conv_flow(gradient), x)
             for gradient in ("neumann", "neumann_in_forward")}
    assert 0 < sizes["neumann_in_forward"] < 0.7 * sizes["neumann"], sizes


def test_neumann_in_forward_refuses_unequal_sample_weights_and_hand_written_nets():
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    _, logdet = conv_flow("neumann_in_forward")(x)
    with pytest.raises(RuntimeError, match="the same for every sample's log-det"):
        (logdet * weights).sum().backward()
    _, logdet = conv_flow("neumann_in_forward")(x)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(logdet.sum(), x, create_graph=True)  # for a second derivative
    with pytest.raises(ValueError, match="hand-written"):
        ResidualBlock(LipschitzMLP(2, 8, 1), series_gradient="neumann_in_forward")
    # the conv branch's hand-written products refuse it too (the block routes it to autograd)
    net = LipschitzConvNet((2, 4, 4), 6).double()
    with pytest.raises(ValueError, match="'neumann' or 'backprop', got 'neumann_in_forward'"):
        net.forward_with_series_logdet(x, torch.randn(1, *x.shape, dtype=x.dtype), 3, True,
                                       "neumann_in_forward")


def test_neumann_in_forward_is_the_neumann_graph_in_eval_mode():
    """Eval mode keeps no precomputed gradients: any weighting of the samples works."""
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    grads = []
    for gradient in ("neumann", "neumann_in_forward"):
        flow = conv_flow(gradient).eval()
        torch.manual_seed(1)
        _, logdet = flow(x)
        grads.append(torch.autograd.grad((logdet * weights).sum(), [x, *flow.parameters()],
                                         allow_unused=True))  # eval: cached weights
    assert grads[0][0].abs().sum() > 0
    for got, want in zip(*grads, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_series_in_eval_under_no_grad_is_detached_and_accurate():
    net = make_net(features=3, hidden=16, coeff=0.5)
    block = ResidualBlock(net, logdet="series", eval_num_terms=20, eval_num_probes=2000).eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        z, logdet = block(x)
    assert not z.requires_grad and not logdet.requires_grad
    _, jac = net.forward_with_jacobian(x)
    expected = torch.linalg.slogdet(torch.eye(3, dtype=torch.float64) + jac).logabsdet
    torch.testing.assert_close(logdet, expected.detach(), atol=0.02, rtol=0)
    with torch.inference_mode():  # Lightning's default for validation and test
        z_inference, logdet_inference = block(x)
    torch.testing.assert_close(z_inference, z)
    torch.testing.assert_close(logdet_inference, expected.detach(), atol=0.02, rtol=0)


def test_auto_logdet_is_exact_in_2d_and_series_above():
    block = ResidualBlock(LipschitzMLP(2, 8, 1))
    assert block.uses_exact(torch.zeros(1, 2))
    assert not block.uses_exact(torch.zeros(1, 3))


# Bijection contract and inverse -------------------------------------------------------------


@pytest.mark.parametrize("activation", ["elu", "lipswish"])
def test_residual_block_bijection(activation):
    block = ResidualBlock(make_net(activation=activation), **TIGHT)
    check_bijection(block, 2 * torch.randn(6, 2))
    assert 1 < block.last_inverse_iterations < block.inverse_max_iterations


def test_residual_block_bijection_3d_slogdet():
    block = ResidualBlock(make_net(features=3), logdet="exact", **TIGHT)
    check_bijection(block, torch.randn(5, 3))


def test_iresnet_bijection_and_log_prob():
    torch.manual_seed(0)
    model = perturb_(IResNet(2, num_blocks=3, hidden_features=16, **TIGHT), scale=0.5)
    power_iterate_(model, rtol=1e-12)
    check_bijection(model, torch.randn(5, 2))
    x = torch.randn(7, 2, dtype=torch.float64)
    z, logdet = model(x)
    torch.testing.assert_close(model.log_prob(x), model.base.log_prob(z) + logdet)


@pytest.mark.parametrize("method", ["fixed_point", "newton"])
def test_inverse_meets_tolerance_and_reports(method):
    block = ResidualBlock(make_net().float(), inverse_method=method, inverse_atol=1e-5,
                          inverse_rtol=1e-5).eval()
    x = 3 * torch.randn(256, 2)
    with torch.no_grad():
        z, _ = block(x)
        x_back, _ = block.inverse(z)
    assert 1 < block.last_inverse_iterations < 200
    assert block.last_inverse_residual <= 1e-4
    torch.testing.assert_close(x_back, x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("method", "name", "cap"), [("fixed_point", "fixed-point", 2),
                                                   ("newton", "Newton", 1)])
def test_inverse_warns_when_cap_is_hit(method, name, cap):
    block = ResidualBlock(make_net(), inverse_method=method, inverse_max_iterations=cap).eval()
    z = 3 * torch.randn(8, 2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=f"did not converge.*after {cap} {name}"):
        block.inverse(z)
    assert block.last_inverse_iterations == cap
    assert block.last_inverse_residual > 10 * block.inverse_atol


def _trained_iresnet(**kwargs) -> IResNet:
    """A float64 2-D i-ResNet after 5 Adam steps at a large learning rate: its power-iteration
    vectors lag the moved weights."""
    torch.manual_seed(0)
    model = IResNet(2, num_blocks=3, hidden_features=16, **kwargs).double().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(64, 2, dtype=torch.float64)
    for _ in range(5):
        optimizer.zero_grad()
        (-model.log_prob(x).mean()).backward()
        optimizer.step()
    return model


def test_training_mode_inverse_inverts_the_last_forward():
    model = _trained_iresnet(**TIGHT)
    x = torch.randn(16, 2, dtype=torch.float64)
    with torch.no_grad():
        z, logdet = model(x)  # a training forward: one power step per weight
        vectors = [buffer.clone() for buffer in model.buffers()]
        x_back, inverse_logdet = model.inverse(z)
    torch.testing.assert_close(x_back, x, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(inverse_logdet, -logdet)
    assert all(torch.equal(a, b) for a, b in zip(vectors, model.buffers(), strict=True))
    model(x)  # and training forwards go on stepping
    assert not all(torch.equal(a, b) for a, b in zip(vectors, model.buffers(), strict=True))


def test_reloaded_iresnet_evaluates_exactly_as_before():
    model = _trained_iresnet().eval()
    x = torch.randn(32, 2, dtype=torch.float64)
    with torch.no_grad():
        log_prob = model.log_prob(x)  # converges the power iteration once
        reloaded = IResNet(2, num_blocks=3, hidden_features=16).double().eval()
        reloaded.load_state_dict(model.state_dict())
        assert torch.equal(reloaded.log_prob(x), log_prob)
        model.load_state_dict(model.state_dict())  # reloading converged vectors again
        assert torch.equal(model.log_prob(x), log_prob)


def test_training_step_and_sampling_smoke():
    torch.manual_seed(0)
    for logdet in ["exact", "series"]:
        model = IResNet(2, num_blocks=2, hidden_features=16, logdet=logdet).train()
        x = torch.randn(64, 2)
        loss = -model.log_prob(x).mean()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for p in model.parameters())
        model.eval()
        with torch.no_grad():
            samples = model.sample(32)
        assert samples.shape == (32, 2) and torch.isfinite(samples).all()


# torch.compile ------------------------------------------------------------------------------


def layer_by_layer(model: IResNet) -> NormalizingFlow:
    """The same layers in a plain ``Compose``: the reference the fused chain must reproduce."""
    return NormalizingFlow(Compose(*model.transform.bijections), model.base)


@pytest.mark.parametrize(("activation", "compile_", "per_call", "series"),
                         [("elu", True, 2, {}), ("lipswish", False, 1, {}),
                          ("lipswish", True, 4, {"logdet": "series", "num_probes": 2}),
                          ("elu", False, 2, {"logdet": "series", "series_gradient": "backprop"})])
def test_fused_chain_matches_layer_by_layer(activation, compile_, per_call, series):
    """The fused (and compiled) forward, exact or power series, gives the layer-by-layer
    values, gradients and state: power-iteration vectors after training steps, ActNorm init,
    eval mode (20 series terms, 4 probes); 3 blocks, so a group may hold fewer than
    ``blocks_per_call``; the same seed gives both the same probes."""
    models = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = perturb_(IResNet(3, num_blocks=3, hidden_features=16, activation=activation,
                                 n_power_iterations=2, compile=compile_,
                                 blocks_per_call=per_call, **series), scale=0.5).double().train()
        models.append(model if fused else layer_by_layer(model))
    x = torch.randn(37, 3, dtype=torch.float64)  # float64: only the math, not rounding, counts
    chain = models[1].transform
    assert not chain.fusable(x)  # ActNorm's data-dependent init runs layer by layer
    assert_same_training_results(*models, x, seed=1)
    assert chain.fusable(x)
    assert_same_training_results(*models, x.flip(0), seed=2)  # a second step: updated u, v
    for model in models:
        model.eval()
    assert chain.fusable(x[:5])
    assert_same_training_results(*models, x[:5], seed=3)


@pytest.mark.parametrize(("activation", "gradient"),
                         [("elu", "neumann"), ("lipswish", "backprop")])
def test_compiled_conv_iresnet_matches_eager(activation, gradient):
    """``ConvIResNet(compile=True)`` gives the eager model's log p(x), gradients and state
    (power-iteration vectors, ActNorm init) over two training steps (two scales, so two
    compiled graphs; the same seed gives both the same probes), then in eval mode."""
    models = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = ConvIResNet((1, 4, 4), num_scales=2, num_blocks=2, hidden_channels=4,
                            activation=activation, lipschitz_coeff=0.9, num_terms=4,
                            series_gradient=gradient, eval_num_terms=6, eval_num_probes=2,
                            n_power_iterations=2, compile=compile_)
        models.append(perturb_(model, scale=0.5).double().train())
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64) * 0.9 + 0.05
    assert_same_training_results(*models, x, seed=1)
    compiled = lipschitz_conv._conv_branch_series_compiled
    assert compiled.compiled is not None and not compiled.failed  # it did compile
    assert_same_training_results(*models, x.flip(0), seed=2)  # updated u, v; ActNorm set
    for model in models:
        model.eval()
    assert_same_training_results(*models, x[:3], seed=3)


def test_chain_runs_layer_by_layer_under_hooks_and_for_mixed_logdets():
    """Forward hooks (``first_nonfinite_bijection``) and blocks whose log-dets are computed
    differently see every layer."""
    torch.manual_seed(0)
    model = IResNet(2, num_blocks=3, hidden_features=8).eval()
    x = torch.randn(16, 2)
    assert model.transform.fusable(x)
    with torch.no_grad():
        model.transform.bijections[2].net.linears[1].bias.fill_(math.nan)
    assert first_nonfinite_bijection(model, x) == "transform.bijections.2 (ResidualBlock)"
    mixed = IResNet(2, num_blocks=2, hidden_features=8, logdet="series").eval()
    assert mixed.transform.fusable(x)
    mixed.transform.blocks[1].eval_num_terms = 7
    assert not mixed.transform.fusable(x)
    mixed.transform.blocks[1].logdet = "exact"
    assert not mixed.transform.fusable(x)


def test_chain_refuses_blocks_it_cannot_fuse():
    blocks = [ResidualBlock(LipschitzMLP(2, 8, activation=a)) for a in ("elu", "lipswish")]
    with pytest.raises(ValueError, match="share the activation"):
        MLPResidualChain(blocks)
    with pytest.raises(ValueError, match="one ActNorm per block"):
        MLPResidualChain(blocks[:1], [ActNorm(2), ActNorm(2)])


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    def double(x):
        return 2 * x

    attempts = []

    def broken_compiler(x):
        attempts.append(x)
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda fn, **options: broken_compiler)
    function = CompiledOrEager(double)
    with pytest.warns(RuntimeWarning, match="torch.compile failed for .*double.*no C\\+\\+ comp"):
        assert function(torch.ones(2)).tolist() == [2.0, 2.0]
    assert function(torch.ones(1)).tolist() == [2.0]
    assert len(attempts) == 1  # later calls go straight to eager


def _conv_chain(x, weights):
    for weight in weights:
        x = torch.sin(F.conv2d(x, weight, padding=1))
    return x


def conv_chain_default_budget(x, weights):
    return _conv_chain(x, weights)


def conv_chain_small_budget(x, weights):  # another code object: its own compiled graphs
    return _conv_chain(x, weights)


def test_activation_memory_budget_keeps_less_for_the_backward_with_the_same_gradients():
    """``CompiledOrEager(activation_memory_budget=...)`` reaches the partitioner: the graph
    a forward leaves holds fewer bytes for the backward (it recomputes convolutions there),
    and the gradients are the eager ones."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(3, 3, 3, 3, dtype=torch.float64, requires_grad=True) / 5
               for _ in range(4)]

    def saved_bytes_and_grads(fn):
        saved = retained_saved_bytes(lambda inputs: fn(inputs, weights), x)
        return saved, torch.autograd.grad(fn(x, weights).sum(), [x, *weights])

    eager_bytes, eager_grads = saved_bytes_and_grads(_conv_chain)
    wrappers = {None: CompiledOrEager(conv_chain_default_budget),
                0.1: CompiledOrEager(conv_chain_small_budget, activation_memory_budget=0.1)}
    results = {budget: saved_bytes_and_grads(wrapper) for budget, wrapper in wrappers.items()}
    assert not any(wrapper.failed for wrapper in wrappers.values())  # both compiled
    for _, grads in results.values():
        for got, want in zip(grads, eager_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert 0 < results[0.1][0] < 0.7 * results[None][0], (results[0.1][0], results[None][0],
                                                         eager_bytes)


def test_a_weight_changed_in_eval_mode_is_normalised_again():
    """An optimizer step (or a copy) made while the model is in eval mode: the next
    evaluation converges ``u, v`` for the new weight, so ``sigma(W_hat) <= c`` still holds."""
    torch.manual_seed(0)
    flow = IResNet(2, num_blocks=2, hidden_features=16, num_hidden=2, activation="elu",
                   lipschitz_coeff=0.9).eval()
    flow.log_prob(torch.randn(8, 2))
    with torch.no_grad():
        for linear in flow.modules():
            if isinstance(linear, torch.nn.Linear):
                original = linear.parametrizations.weight.original
                original.add_(torch.randn_like(original))  # new singular vectors
    flow.log_prob(torch.randn(8, 2))
    for name in spectral_norms(flow):
        weight = dict(flow.named_modules())[name.rsplit(".", 1)[0]].weight
        assert torch.linalg.matrix_norm(weight.double(), 2) <= 0.9 * (1 + 1e-6), name


def test_eval_convergence_is_exact_for_nearly_equal_top_singular_values():
    """A matrix with singular values 1 and 1 - 1e-5: the power iteration stalls short of the
    top one; the eval-mode convergence takes it from the SVD."""
    torch.manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(2, 2, dtype=torch.float64))
    weight = (left[:, :2] * torch.tensor([2.0, 2.0 - 2e-5], dtype=torch.float64)) @ right.T
    normalization = SpectralNormalization(weight.float(), coeff=0.9)
    normalization.converge_(weight.float())
    true = torch.linalg.matrix_norm(weight, 2)
    assert abs(float(normalization.sigma(weight.float())) - float(true)) < 1e-6 * float(true)


@pytest.mark.parametrize("features", [1, 2, 3])
def test_exact_logdet_is_nan_where_the_block_is_not_invertible(features):
    """``det(I + J) < 0`` (a block whose ``Lip(g) >= 1``): NaN, not ``log |det|``, so that the
    non-finite stop names the block instead of training on a map that folds."""
    torch.manual_seed(0)
    jac = 0.3 * torch.randn(4, features, features, dtype=torch.float64)
    jac[2] = 0.0
    jac[2, 0, 0] = -3.0  # I + J = diag(-2, 1, ...): det -2
    logdet = logdet_exact(jac)
    expected = torch.linalg.det(torch.eye(features, dtype=torch.float64) + jac).log()
    assert torch.isnan(logdet[2]) and torch.isnan(expected[2])
    keep = [0, 1, 3]
    torch.testing.assert_close(logdet[keep], expected[keep])


def test_fresh_weights_at_a_freed_weights_address_are_normalised():
    """``torch.func.functional_call`` with new weights each call: a new tensor can take a freed
    one's address and version 0, and must still count as a change."""
    torch.manual_seed(0)
    flow = IResNet(2, num_blocks=1, hidden_features=8, num_hidden=1, activation="elu",
                   lipschitz_coeff=0.9).eval()
    x = torch.randn(4, 2)
    for _ in range(4):
        params = {name: p.detach() + torch.randn_like(p) for name, p in flow.named_parameters()}
        torch.func.functional_call(flow, params, (x,))
        for name, normalization in [(n, m) for n, m in flow.named_modules()
                                    if isinstance(m, SpectralNormalization)]:
            weight = params[name.rsplit(".", 1)[0] + ".original"]
            normalized = weight / max(1.0, float(normalization.sigma(weight)) / 0.9)
            assert torch.linalg.matrix_norm(normalized.double(), 2) <= 0.9 * (1 + 1e-6), name


def test_a_whole_eval_flow_compiles_into_one_graph():
    """The change check reads host-side tensor state that dynamo cannot trace; while it traces,
    the check stands aside (``fullgraph=True`` would raise on a graph break)."""
    torch.manual_seed(0)
    flow = IResNet(2, num_blocks=2, hidden_features=8, lipschitz_coeff=0.9,
                   logdet="exact").eval()
    x = torch.randn(16, 2)
    expected = flow.log_prob(x)
    with torch.no_grad():
        got = torch.compile(flow.log_prob, fullgraph=True)(x)
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)


def test_health_checks_flag_a_block_with_non_finite_weights():
    """A NaN weight makes the block's Lipschitz bound and inverse residual NaN, and the
    validation health check names the block (the SVD raised ``LinAlgError`` there, and a NaN
    passed ``>= 1`` and ``max``)."""
    from types import SimpleNamespace

    from flows.diagnostics import residual_lipschitz_bounds
    from flows.lit.callbacks import FlowDiagnostics

    torch.manual_seed(0)
    flow = IResNet(2, num_blocks=2, hidden_features=8)
    names = [n for n, m in flow.named_modules() if isinstance(m, ResidualBlock)]
    broken = flow.get_submodule(names[1])
    with torch.no_grad():
        broken.net.linears[0].parametrizations.weight.original[0, 0] = float("nan")
    bounds = residual_lipschitz_bounds(flow)
    assert bounds[names[0]] < 1 and math.isnan(bounds[names[1]])
    logged = {}
    module = SimpleNamespace(flow=flow, device="cpu", dtype=torch.float32,
                             log_dict=lambda metrics, **_: logged.update(metrics))
    trainer = SimpleNamespace(sanity_checking=False, global_step=7, datamodule=SimpleNamespace(
        splits={"val": torch.randn(16, 2)}))
    with pytest.warns(Warning) as record:
        FlowDiagnostics(num_points=16).on_validation_epoch_end(trainer, module)
    messages = " | ".join(str(w.message) for w in record)
    assert f"not contractive (Lip bound >= 1), the likelihood is not valid: {{'{names[1]}'" \
        in messages
    assert "fixed-point inverses not converged" in messages
    assert math.isnan(logged["diagnostics/max_lipschitz_bound"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_svd_runs_in_half_precision(dtype):
    """There is no SVD in half precision (it raised NotImplementedError in bfloat16): the
    vectors come from a float32 SVD, and the normalised weights meet c to that precision."""
    torch.manual_seed(0)
    net = perturb_(LipschitzMLP(2, 16, 1, coeff=0.9, training_svd=True), scale=2.0)
    net = net.to(dtype).train()
    net(torch.randn(4, 2, dtype=dtype))
    for linear in net.linears:
        weight = linear.parametrizations.weight.original
        scale = max(1.0, float(linear.parametrizations.weight[0].sigma(weight)) / 0.9)
        exact = float(torch.linalg.matrix_norm(weight.float(), 2))
        assert exact > 1.0  # the normalisation is active
        assert exact / scale == pytest.approx(0.9, rel=2e-2)


def test_power_iteration_tol_converges_in_bfloat16():
    """The tolerance's steps run in float32: in bfloat16 rounding alone moved the vectors by
    more than 1e-3 a step, and forwards ran to the 200-step cap."""
    torch.manual_seed(0)
    net = LipschitzMLP(2, 32, 2, power_iteration_tol=1e-3).to(torch.bfloat16).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    steps = []
    for _ in range(10):
        out = net(torch.randn(64, 2, dtype=torch.bfloat16))
        (-out.float().square().mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
        steps.append(max(linear.parametrizations.weight[0].last_power_iterations
                         for linear in net.linears))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert max(steps) < 100, steps


def test_power_iteration_tol_stops_at_a_nan_step():
    """A NaN weight makes every step's movement NaN, which never settles: the loop ends at
    the first step (it ran to the cap)."""
    weight = torch.randn(5, 3)
    normalization = SpectralNormalization(weight, power_iteration_tol=1e-3)
    weight[0, 0] = float("nan")
    assert normalization.power_iterate_(weight, 200, 1e-3) == 1
