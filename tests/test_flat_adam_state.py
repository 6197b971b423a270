"""Flat storage of parameters and Adam state: the same values, views in place, and a standard
Adam run that cannot tell the difference."""

import io

import pytest
import torch
from torch import nn

from flows.flat_adam_state import FlatAdamState


class Net(nn.Module):
    """Parameters of several layouts: a channels-last convolution weight with one input
    channel (strides ``(9, 1, 3, 1)``), a transposed matrix (strides ``(1, 64)``), a 0-d
    scale and plain biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.conv.weight.data = torch.empty_strided((4, 1, 3, 3), (9, 1, 3, 1)).copy_(
            self.conv.weight.data)
        self.weight = nn.Parameter(torch.randn(5, 64).t() / 8)
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (torch.relu(self.conv(x)).flatten(1) @ self.weight)


def net() -> nn.Module:
    torch.manual_seed(0)
    return Net()


def adam_steps(model: nn.Module, optimizer: torch.optim.Optimizer, seeds: range) -> None:
    for seed in seeds:
        x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(seed))
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("amsgrad", [False, True])
def test_flattening_mid_run_changes_nothing_in_a_standard_adam_run(amsgrad):
    plain, flat = net(), net()
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2, amsgrad=amsgrad, fused=True)
                  for m in (plain, flat)]
    for model, optimizer in zip((plain, flat), optimizers, strict=True):
        adam_steps(model, optimizer, range(3))
    params = list(flat.parameters())
    layouts = [(p.shape, p.stride()) for p in params]
    assert flat.conv.weight.stride() == (9, 1, 3, 1) and flat.weight.stride() == (1, 64)
    storage = FlatAdamState(params, optimizers[1])
    tensors = storage.flat(amsgrad)

    # the values moved in unchanged; every parameter and state entry a view of the flat tensors
    assert len(tensors.moments) == (3 if amsgrad else 2)
    assert tensors.step.tolist() == [3.0] * len(params)
    for p, q in zip(plain.parameters(), params, strict=True):
        assert torch.equal(p, q)
        assert q.untyped_storage().data_ptr() == tensors.param.untyped_storage().data_ptr()
    assert [(p.shape, p.stride()) for p in params] == layouts  # every layout kept
    for index, (got, want) in enumerate(zip(storage.views_of(tensors.param), params,
                                            strict=True)):
        assert got.data_ptr() == want.data_ptr() and got.stride() == want.stride(), index
    want_state = optimizers[0].state_dict()["state"]
    for index, entry in optimizers[1].state_dict()["state"].items():
        assert entry.keys() == want_state[index].keys()
        for key, value in entry.items():
            assert torch.equal(value, want_state[index][key]), (index, key)

    # an edit of the flat tensors is an edit of every parameter and state entry
    before = [p.clone() for p in params]
    saved = tensors.param.clone(), tensors.moments[0].clone()
    tensors.param.add_(1.0)
    tensors.moments[0].add_(2.0)
    for p, q, b in zip(params, plain.parameters(), before, strict=True):
        assert torch.equal(p, b + 1.0)
        assert torch.equal(optimizers[1].state[p]["exp_avg"],
                           optimizers[0].state[q]["exp_avg"] + 2.0)
    tensors.param.copy_(saved[0])
    tensors.moments[0].copy_(saved[1])

    # fused Adam, which increments each parameter's step, goes on exactly as on the plain model
    for model, optimizer in zip((plain, flat), optimizers, strict=True):
        adam_steps(model, optimizer, range(3, 6))
    for p, q in zip(plain.parameters(), flat.parameters(), strict=True):
        assert torch.equal(p, q)
    assert tensors.step.tolist() == [6.0] * len(params)
    assert storage.flat(amsgrad) is tensors  # the views are still in place


def test_replaced_views_are_moved_in_again():
    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    adam_steps(model, optimizer, range(2))
    storage = FlatAdamState(list(model.parameters()), optimizer)
    first = storage.flat(False)

    # a checkpoint's optimizer state loaded: new state tensors, moved in with their values
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    optimizer.load_state_dict(torch.load(buffer))
    second = storage.flat(False)
    assert second is not first
    assert torch.equal(second.moments[1], first.moments[1])
    assert torch.equal(second.step, first.step)

    # amsgrad turned on: a third moment, zeros, beside the two moved in again
    fourth = storage.flat(True)
    assert len(fourth.moments) == 3 and not fourth.moments[2].any()
    assert torch.equal(fourth.moments[0], second.moments[0])
    assert storage.flat(True) is fourth

    # the model cast to float64: new data, moved in again as float64
    model.double()
    third = storage.flat(True)
    assert third.param.dtype == torch.float64
    assert torch.equal(third.param.float(), second.param)
    assert torch.equal(third.moments[2].float(), fourth.moments[2])
    assert all(p.untyped_storage().data_ptr() == third.param.untyped_storage().data_ptr()
               for p in model.parameters())


def test_bad_layouts_are_refused_with_the_reason():
    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    adam_steps(model, optimizer, range(2))
    params = list(model.parameters())
    optimizer.state[params[1]]["step"] = torch.tensor(7.0)
    with pytest.raises(ValueError, match=r"different numbers of Adam steps \(\[2.0, 7.0\]"):
        FlatAdamState(params, optimizer).flat(False)

    model = net()
    model.conv.double()
    with pytest.raises(ValueError, match="one dtype and one device.*torch.float64"):
        FlatAdamState(list(model.parameters()), torch.optim.Adam(model.parameters())).flat(False)
