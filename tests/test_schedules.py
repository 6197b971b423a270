"""The warmup-then-cosine learning-rate schedule against its formula."""

import math

import pytest
import torch
from hydra.utils import instantiate

from flows.lit.schedules import warmup_cosine
from tests.test_configs import compose_train


def rates(scheduler, optimizer, steps):
    """The learning rate used at each of ``steps`` training steps."""
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


def test_warmup_then_cosine_to_zero():
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=2e-3)
    used = rates(warmup_cosine(optimizer, warmup_steps=4, total_steps=12), optimizer, 13)
    expected = [2e-3 * (t + 1) / 4 for t in range(4)]
    expected += [2e-3 * (1 + math.cos(math.pi * (t - 4) / 8)) / 2 for t in range(4, 13)]
    assert used == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert used[3] == used[4] == pytest.approx(2e-3) and used[12] == pytest.approx(0.0)


def test_resumed_schedule_continues():
    """A scheduler rebuilt from the config and loaded from a state dict mid-warmup gives the
    same rates as one that never stopped (as a resumed run rebuilds it)."""
    def fresh():
        optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
        return optimizer, warmup_cosine(optimizer, warmup_steps=5, total_steps=20)

    optimizer, scheduler = fresh()
    straight = rates(scheduler, optimizer, 20)
    optimizer, scheduler = fresh()
    first = rates(scheduler, optimizer, 3)
    state = (optimizer.state_dict(), scheduler.state_dict())
    optimizer, scheduler = fresh()
    optimizer.load_state_dict(state[0])
    scheduler.load_state_dict(state[1])
    assert first + rates(scheduler, optimizer, 17) == pytest.approx(straight, rel=1e-12)


@pytest.mark.parametrize(("warmup", "total"), [(0, 10), (10, 10), (20, 10)])
def test_bad_warmup_is_refused(warmup, total):
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    with pytest.raises(ValueError, match="need 1 <= warmup_steps < total_steps.*max_steps"):
        warmup_cosine(optimizer, warmup_steps=warmup, total_steps=total)


def test_config_warms_up_over_the_run():
    cfg = compose_train("scheduler=warmup_cosine", "trainer.max_steps=3000")
    optimizer = instantiate(cfg.optim)([torch.zeros(1, requires_grad=True)])
    base = optimizer.param_groups[0]["lr"]
    used = rates(instantiate(cfg.scheduler)(optimizer), optimizer, 3001)
    assert used[0] == pytest.approx(base / 1000) and used[999] == pytest.approx(base)
    assert used[3000] == pytest.approx(0.0, abs=1e-12)
