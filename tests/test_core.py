import math

import pytest
import torch

from flows.bijections.normalization import ActNorm
from flows.core import Compose, Inverse, NormalizingFlow
from flows.distributions import StandardNormal
from tests.checks import check_bijection, perturb_


def test_standard_normal_log_prob_matches_torch_distributions():
    base = StandardNormal((3,)).double()
    z = torch.randn(5, 3, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    torch.testing.assert_close(base.log_prob(z), expected)


def test_standard_normal_sample_follows_dtype_and_temperature():
    base = StandardNormal((2,)).double()
    torch.manual_seed(0)
    z = base.sample(200_000, temperature=0.5)
    assert z.dtype == torch.float64 and z.shape == (200_000, 2)
    assert abs(z.std().item() - 0.5) < 0.005


def test_actnorm_bijection_after_perturbation():
    layer = perturb_(ActNorm(3))
    check_bijection(layer, torch.randn(6, 3))


def test_actnorm_image_logdet_counts_spatial_positions():
    layer = perturb_(ActNorm(2))
    check_bijection(layer, torch.randn(3, 2, 2, 3))


def test_actnorm_data_dependent_init_standardises_and_survives_reload():
    x = torch.randn(1000, 2) * torch.tensor([3.0, 0.5]) + torch.tensor([1.0, -2.0])
    layer = ActNorm(2).train()
    z, _ = layer(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    reloaded = ActNorm(2)
    reloaded.load_state_dict(layer.state_dict())
    reloaded.train()(x + 100.0)  # a second training batch must not re-initialise
    torch.testing.assert_close(reloaded.shift, layer.shift)
    # and an uninitialised state loaded into an initialised layer initialises at the next batch
    layer.load_state_dict(ActNorm(2).state_dict())
    layer(x + 100.0)
    torch.testing.assert_close(layer.shift, x.mean(0) + 100.0)


def test_actnorm_refuses_to_initialise_from_a_non_finite_batch():
    """NaN statistics would make every later output NaN; the layer refuses and stays
    uninitialised, so the next (clean) batch initialises it."""
    x = torch.randn(64, 2)
    x[5, 1] = float("nan")
    layer = ActNorm(2).train()
    with pytest.raises(ValueError, match="NaN or inf statistics from its first training batch"):
        layer(x)
    assert layer.needs_initialization and not bool(layer.initialized)
    clean = torch.randn(64, 2)
    z, _ = layer(clean)
    torch.testing.assert_close(z.mean(0), torch.zeros(2), atol=1e-5, rtol=0)


def test_actnorm_feature_without_spread_keeps_unit_scale():
    x = torch.randn(64, 2)
    x[:, 1] = 3.0
    layer = ActNorm(2).train()
    z, logdet = layer(x)
    torch.testing.assert_close(layer.shift, x.mean(0))
    log_scale = layer.log_scale.detach()
    assert float(log_scale[1]) == 0.0 and float(log_scale[0]) != 0.0
    torch.testing.assert_close(logdet, -log_scale[0].expand(64))
    torch.testing.assert_close(z[:, 1], torch.zeros(64))
    # a first batch of one vector: shifted to 0, nothing scaled by 1 / eps
    single = ActNorm(2).train()
    z, logdet = single(x[:1])
    assert torch.equal(single.log_scale, torch.zeros(2)) and torch.equal(logdet, torch.zeros(1))
    torch.testing.assert_close(z, torch.zeros(1, 2))


def test_compose_and_inverse_sum_logdets():
    flow = perturb_(Compose(ActNorm(2), Inverse(ActNorm(2)), ActNorm(2)))
    check_bijection(flow, torch.randn(5, 2))


def test_flow_log_prob_of_affine_gaussian_is_closed_form():
    # z = (x - m) / s with x ~ N(m, s^2): log p(x) is the Gaussian density of N(m, s^2 I).
    layer = ActNorm(2)
    with torch.no_grad():
        layer.shift.copy_(torch.tensor([1.0, -1.0]))
        layer.log_scale.copy_(torch.log(torch.tensor([2.0, 0.5])))
    flow = NormalizingFlow(layer, StandardNormal((2,))).double().eval()
    x = torch.randn(7, 2, dtype=torch.float64)
    mean = torch.tensor([1.0, -1.0], dtype=torch.float64)
    std = torch.tensor([2.0, 0.5], dtype=torch.float64)
    expected = torch.distributions.Normal(mean, std).log_prob(x).sum(1)
    torch.testing.assert_close(flow.log_prob(x), expected)
    assert math.isclose(flow.base.num_dims, 2)


def test_flow_rejects_wrong_event_shape():
    flow = NormalizingFlow(ActNorm(2), StandardNormal((2,)))
    try:
        flow.log_prob(torch.randn(4, 3))
    except ValueError as err:
        assert "(2,)" in str(err) and "(4, 3)" in str(err)
    else:
        raise AssertionError("a 3-D batch was accepted by a 2-D flow")


def test_flow_sample_round_trips_through_latent():
    flow = NormalizingFlow(perturb_(ActNorm(2)), StandardNormal((2,))).eval()
    x = flow.sample(10, temperature=0.7)
    z, _ = flow(x)
    x_back, _ = flow.inverse(z)
    torch.testing.assert_close(x_back, x)


@pytest.mark.parametrize(("x", "message"), [
    (torch.ones(4, 2, dtype=torch.int64), "takes floating-point data, got torch.int64"),
    (torch.ones(4, 2, dtype=torch.float64), "weights are torch.float32 but the data is"),
    (torch.ones(0, 2), "the batch is empty"),
])
def test_bad_batches_are_named(x, message):
    from flows.models.realnvp import RealNVP

    flow = RealNVP(2, num_layers=2, hidden_features=8)
    with pytest.raises(ValueError, match=message):
        flow.log_prob(x)
