"""The benchmark's likelihood check (``benchmarks/likelihood_check.py``) on cases whose answer
is known: a flow's own log-density, the same with its log-det cut from the graph, and one
shifted by a constant."""

import importlib.util
from pathlib import Path

import pytest
import torch

from flows.models.realnvp import RealNVP

SPEC = importlib.util.spec_from_file_location(
    "likelihood_check", Path(__file__).resolve().parents[1] / "benchmarks" / "likelihood_check.py")
likelihood_check = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(likelihood_check)


@pytest.fixture
def flow():
    """A Real NVP away from its identity initialisation (random weights everywhere)."""
    torch.manual_seed(0)
    flow = RealNVP(2, num_layers=4, hidden_features=16)
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0, 0.3)
    return flow


def encode(flow):
    return lambda x: flow.transform(x)[0]


def test_a_flows_own_log_density_trains_the_likelihood(flow):
    x = torch.randn(128, 2)
    result = likelihood_check.likelihood_check(flow.log_prob, encode(flow), flow, x, draws=2)
    assert abs(result["value_gap"]) < 1e-5
    assert result["logdet_gradient_share"] == pytest.approx(1, abs=1e-4)
    assert result["gradient_error"] < 1e-4 and result["trains_likelihood"]


def test_a_log_det_without_gradient_is_found(flow):
    """FrEIA's IResNetLayer's failure: the right value, no log-det gradient."""
    def cut(x):
        z, logdet = flow.transform(x)
        return flow.base.log_prob(z) + logdet.detach()

    x = torch.randn(128, 2)
    result = likelihood_check.likelihood_check(cut, encode(flow), flow, x, draws=2)
    assert abs(result["value_gap"]) < 1e-5
    assert result["logdet_gradient_share"] == pytest.approx(0, abs=1e-4)
    assert result["gradient_error"] > 0.05 and not result["trains_likelihood"]


def test_a_shifted_log_density_shows_its_gap(flow):
    x = torch.randn(128, 2)
    result = likelihood_check.likelihood_check(lambda v: flow.log_prob(v) + 0.5, encode(flow),
                                               flow, x, draws=2)
    assert result["value_gap"] == pytest.approx(0.5, abs=1e-5)
    assert result["trains_likelihood"]
