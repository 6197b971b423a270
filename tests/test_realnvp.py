import math

import pytest
import torch

from flows.bijections.coupling import (
    AdditiveCoupling,
    AffineCoupling,
    alternating_mask,
    half_mask,
    soft_clamp,
)
from flows.bijections.normalization import BatchNorm
from flows.bijections.permutation import Permutation
from flows.models.realnvp import RealNVP
from flows.nn.mlp import MLP, ThinLinear
from tests.checks import assert_same_training_results, check_bijection, perturb_

MASKS = {
    "alternate0": alternating_mask(5, 0),
    "alternate1": alternating_mask(5, 1),
    "half": half_mask(5),
    "half_reversed": ~half_mask(5),
    "custom": torch.tensor([False, True, True, False, True]),
}


# --- masks and conditioner ---------------------------------------------------------------


def test_alternating_masks_for_two_features():
    assert alternating_mask(2, 0).tolist() == [True, False]
    assert alternating_mask(2, 1).tolist() == [False, True]
    assert alternating_mask(5, 1).tolist() == [False, True, False, True, False]
    assert half_mask(5).tolist() == [True, True, False, False, False]


def test_mlp_shapes_and_zero_init():
    net = MLP(3, 4, hidden_features=8, num_hidden=2, zero_init_last=True)
    assert sum(isinstance(m, torch.nn.Linear) for m in net) == 3
    assert torch.equal(net(torch.randn(5, 3)), torch.zeros(5, 4))
    assert MLP(3, 4, num_hidden=0)(torch.randn(5, 3)).shape == (5, 4)
    with pytest.raises(ValueError, match="num_hidden"):
        MLP(3, 4, num_hidden=-1)


def test_mlp_uses_thin_linears_only_where_a_side_is_thin():
    thin = [isinstance(m, ThinLinear) for m in MLP(1, 2, hidden_features=8) if
            isinstance(m, torch.nn.Linear)]
    assert thin == [True, False, True]
    assert not any(isinstance(m, ThinLinear) for m in MLP(3, 4, hidden_features=8))


@pytest.mark.parametrize(("size_in", "size_out", "bias"),
                         [(1, 16, True), (16, 2, True), (2, 3, False)])
def test_thin_linear_compiled_matches_the_matrix_product(size_in, size_out, bias):
    """Under torch.compile the broadcast-and-sum form gives x W^T + b and its gradients."""
    torch.manual_seed(0)
    layer = ThinLinear(size_in, size_out, bias=bias).double()
    x = torch.randn(4, 5, size_in, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(lambda inp: torch.tanh(layer(inp)), dynamic=True)
    y = compiled(x)
    expected = torch.tanh(x @ layer.weight.T + (layer.bias if bias else 0))
    torch.testing.assert_close(y, expected)
    weights = list(layer.parameters())
    grads = torch.autograd.grad(y.square().sum(), [x, *weights])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *weights])
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


# --- couplings ---------------------------------------------------------------------------


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
def test_affine_coupling_bijection(mask):
    layer = perturb_(AffineCoupling(5, mask, hidden_features=16, num_hidden=2))
    check_bijection(layer, torch.randn(6, 5))


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
def test_additive_coupling_bijection_with_exactly_zero_logdet(mask):
    layer = perturb_(AdditiveCoupling(5, mask, hidden_features=16, num_hidden=1))
    check_bijection(layer, torch.randn(6, 5))
    x = torch.randn(6, 5, dtype=torch.float64)
    z, logdet = layer(x)
    assert not torch.allclose(z, x)  # perturbed: the layer does something
    assert torch.equal(logdet, torch.zeros(6, dtype=torch.float64))
    assert torch.equal(layer.inverse(z)[1], torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("cls", [AffineCoupling, AdditiveCoupling])
def test_coupling_starts_as_identity_and_copies_conditioning_features(cls, mask):
    layer = cls(5, mask, hidden_features=8)
    x = torch.randn(4, 5)
    z, logdet = layer(x)
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(4))
    z, _ = perturb_(layer)(x)
    assert torch.equal(z[:, mask], x[:, mask])
    assert not torch.allclose(z[:, ~mask], x[:, ~mask])


def test_soft_clamp_bounds_log_scale_even_for_huge_inputs():
    values = torch.tensor([-1e30, -1e6, -3.0, 0.0, 1e-3, 1e6, 1e30])
    clamped = soft_clamp(values, 2.0)
    assert clamped.abs().max() <= 2.0
    torch.testing.assert_close(clamped[4], torch.tensor(1e-3))  # identity near 0

    layer = perturb_(AffineCoupling(4, hidden_features=8, log_scale_clamp=1.5), scale=10.0)
    z, logdet = layer(1e6 * torch.randn(64, 4))
    assert torch.isfinite(z).all()
    assert logdet.abs().max() <= 1.5 * 2  # |s| <= c on each of the 2 transformed features
    assert logdet.abs().max() > 1.0  # the bound is reached, not avoided


def test_coupling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one true"):
        AffineCoupling(3, [True, True, True])
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        AdditiveCoupling(3, [True, False])
    with pytest.raises(ValueError, match="log_scale_clamp"):
        AffineCoupling(2, log_scale_clamp=0.0)


# --- permutation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs", [{}, {"seed": 3}, {"permutation": [2, 0, 3, 1]}], ids=["reverse", "seed", "given"]
)
def test_permutation_bijection(kwargs):
    layer = Permutation(4, **kwargs)
    check_bijection(layer, torch.randn(5, 4))
    x = torch.arange(4.0).expand(2, 4)
    z, logdet = layer(x)
    assert torch.equal(z[0], layer.permutation.float()) and torch.equal(logdet, torch.zeros(2))


def test_permutation_defaults_and_errors():
    assert Permutation(4).permutation.tolist() == [3, 2, 1, 0]
    assert torch.equal(Permutation(6, seed=1).permutation, Permutation(6, seed=1).permutation)
    with pytest.raises(ValueError, match="ordering of range\\(3\\)"):
        Permutation(3, permutation=[0, 0, 1])
    with pytest.raises(ValueError, match="not both"):
        Permutation(3, permutation=[0, 1, 2], seed=0)


# --- batch norm --------------------------------------------------------------------------


def _trained_batchnorm(num_features: int, x: torch.Tensor, steps: int = 30) -> BatchNorm:
    layer = BatchNorm(num_features, momentum=0.2).train()
    for _ in range(steps):
        layer(x)
    return layer


def test_batchnorm_train_mode_standardises_and_updates_running_stats():
    x = torch.randn(1000, 2) * torch.tensor([3.0, 0.5]) + torch.tensor([1.0, -2.0])
    layer = BatchNorm(2, momentum=0.1).train()
    z, logdet = layer(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    expected = -0.5 * torch.log(x.var(0, unbiased=False) + layer.eps).sum()
    torch.testing.assert_close(logdet, expected.expand(1000))
    torch.testing.assert_close(layer.running_mean, 0.1 * x.mean(0))
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * x.var(0))


def test_batchnorm_eval_and_inverse_use_running_stats():
    x = torch.randn(500, 3) * 2.0 + 1.0
    layer = perturb_(_trained_batchnorm(3, x))
    mean, var = layer.running_mean.clone(), layer.running_var.clone()
    scale = torch.exp(layer.log_gamma) / torch.sqrt(var + layer.eps)
    z, _ = layer.eval()(x[:4])  # one sample at a time would give the same: no batch stats
    torch.testing.assert_close(z, (x[:4] - mean) * scale + layer.beta)
    for mode in (True, False):  # the inverse ignores the mode, so sampling works in training
        x_back, _ = layer.train(mode).inverse(z)
        torch.testing.assert_close(x_back, x[:4])
    torch.testing.assert_close(layer.running_mean, mean)  # the inverse never updates stats


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 2, 2)], ids=["vector", "image"])
def test_batchnorm_bijection_in_eval_mode(shape):
    layer = perturb_(_trained_batchnorm(3, 2.0 * torch.randn(64, *shape[1:]) + 0.5))
    check_bijection(layer, torch.randn(shape))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_batchnorm_running_stats_survive_a_non_finite_batch(bad):
    """A batch with a NaN or infinite value in feature 1 returns non-finite values there, as
    it must, but leaves feature 1's running statistics as they were; feature 0 updates."""
    x = torch.randn(256, 2) * torch.tensor([3.0, 0.5]) + torch.tensor([1.0, -2.0])
    layer = _trained_batchnorm(2, x)
    mean, var = layer.running_mean.clone(), layer.running_var.clone()
    poisoned = 2.0 * x
    poisoned[7, 1] = bad
    z, _ = layer(poisoned)
    assert not torch.isfinite(z[:, 1]).all()
    torch.testing.assert_close(layer.running_mean[1], mean[1], rtol=0, atol=0)
    torch.testing.assert_close(layer.running_var[1], var[1], rtol=0, atol=0)
    torch.testing.assert_close(layer.running_mean[0], 0.8 * mean[0] + 0.2 * poisoned[:, 0].mean())
    torch.testing.assert_close(layer.running_var[0], 0.8 * var[0] + 0.2 * poisoned[:, 0].var())


def test_batchnorm_rejects_bad_momentum():
    with pytest.raises(ValueError, match="momentum"):
        BatchNorm(2, momentum=0.0)


def test_batchnorm_training_batch_of_one_vector_is_refused():
    layer = BatchNorm(2).train()
    with pytest.raises(ValueError, match=r"at least 2 values per feature.*shape \(1, 2\)"):
        layer(torch.randn(1, 2))
    assert torch.equal(layer.running_var, torch.ones(2))  # nothing updated
    z, _ = layer(torch.randn(1, 2, 2, 2))  # one image still has 4 values per channel
    assert torch.isfinite(z).all()
    layer.eval()(torch.randn(1, 2))  # eval mode uses the running statistics


# --- the model ---------------------------------------------------------------------------


@pytest.mark.parametrize("permutation", ["alternate", "reverse", "random"])
@pytest.mark.parametrize("normalization", [None, "actnorm", "batchnorm"])
@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_realnvp_bijection(coupling, normalization, permutation):
    model = RealNVP(
        5,
        num_layers=3,
        hidden_features=16,
        coupling=coupling,
        normalization=normalization,
        permutation=permutation,
    )
    model.train()(3.0 * torch.randn(64, 5) + 1.0)  # initialise ActNorm, move BatchNorm stats
    check_bijection(perturb_(model.transform), torch.randn(6, 5))
    num_norms = 0 if normalization is None else 2
    num_perms = 0 if permutation == "alternate" else 2
    assert len(model.transform.bijections) == 3 + num_norms + num_perms


def test_realnvp_log_prob_and_sample_follow_dtype():
    model = perturb_(RealNVP(3, num_layers=2, hidden_features=8)).double().eval()
    x = model.sample(7)
    assert x.shape == (7, 3) and x.dtype == torch.float64
    z, logdet = model(x)
    torch.testing.assert_close(model.log_prob(x), model.base.log_prob(z) + logdet)


def test_realnvp_rejects_bad_arguments():
    with pytest.raises(ValueError, match="features >= 2"):
        RealNVP(1)
    with pytest.raises(ValueError, match="coupling must be one of \\['affine', 'additive'\\]"):
        RealNVP(2, coupling="spline")
    with pytest.raises(ValueError, match="normalization must be one of"):
        RealNVP(2, normalization="layernorm")
    with pytest.raises(ValueError, match="permutation must be one of"):
        RealNVP(2, permutation="shuffle")
    with pytest.raises(ValueError, match="num_layers >= 1"):
        RealNVP(2, num_layers=0)
    with pytest.raises(ValueError, match="log_scale_clamp"):
        RealNVP(2, log_scale_clamp=-1.0)


@pytest.mark.parametrize(
    ("coupling", "normalization"),
    [("affine", None), ("additive", "actnorm"), ("affine", "batchnorm")],
)
def test_training_on_gaussian_reaches_its_entropy(coupling, normalization):
    # x = A eps is N(0, A A^T), whose entropy is log(2 pi e) + log|det A| in 2-D. Maximum
    # likelihood drives the cross-entropy E[-log q(x)] = H + KL(p || q) down to H; a 4-layer
    # flow can represent the (linear) map exactly, so the gap left is optimisation error.
    torch.manual_seed(0)
    matrix = torch.tensor([[2.0, 0.0], [1.5, 0.5]])
    entropy = math.log(2 * math.pi * math.e) + math.log(abs(torch.linalg.det(matrix).item()))
    model = RealNVP(
        2, num_layers=4, hidden_features=32, coupling=coupling, normalization=normalization
    )
    steps = 400
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        loss = -model.log_prob(torch.randn(256, 2) @ matrix.T).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        # 50k held-out samples: the Monte Carlo standard error of the NLL is sqrt(1/50k) = 0.005.
        x = torch.randn(50_000, 2, generator=torch.Generator().manual_seed(1)) @ matrix.T
        nll = -model.eval().log_prob(x).mean().item()
    assert -0.015 < nll - entropy < 0.03


@pytest.mark.parametrize("normalization", [None, "actnorm"])
def test_compiled_realnvp_matches_eager(normalization):
    """compile=True gives the eager log p(x), gradients and ActNorm initialisation."""
    models = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        models.append(perturb_(RealNVP(3, num_layers=3, hidden_features=16,
                                       normalization=normalization, compile=compile_),
                               scale=0.5).double())
    x = torch.randn(37, 3, dtype=torch.float64)  # float64: only the math, not rounding, counts
    assert_same_training_results(*models, x)
    z, logdet = models[0](x)
    z_compiled, logdet_compiled = models[1](x)
    torch.testing.assert_close(z_compiled, z)
    torch.testing.assert_close(logdet_compiled, logdet)
