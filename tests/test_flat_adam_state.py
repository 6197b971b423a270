"""Flat storage of parameters and Adam state: the same values, views in place, and a standard
Adam run that cannot tell the difference."""

import io

import pytest
import torch
from torch import nn

from flows.flat_adam_state import FlatAdamState


def net() -> nn.Module:
    """Parameters of several shapes, the first channels-last."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.Flatten(),
                          nn.Linear(32, 5))
    model[0].weight.data = model[0].weight.data.contiguous(memory_format=torch.channels_last)
    return model


def adam_steps(model: nn.Module, optimizer: torch.optim.Optimizer, seeds: range) -> None:
    for seed in seeds:
        x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
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
    storage = FlatAdamState(params, optimizers[1])
    tensors = storage.flat(amsgrad)

    # the values moved in unchanged; every parameter and state entry a view of the flat tensors
    assert len(tensors.moments) == (3 if amsgrad else 2)
    assert tensors.step.tolist() == [3.0] * len(params)
    for p, q in zip(plain.parameters(), params, strict=True):
        assert torch.equal(p, q)
        assert q.untyped_storage().data_ptr() == tensors.param.untyped_storage().data_ptr()
    assert flat[0].weight.is_contiguous(memory_format=torch.channels_last)  # layout kept
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

    # the model cast to float64: new data, moved in again as float64
    model.double()
    third = storage.flat(False)
    assert third.param.dtype == torch.float64
    assert torch.equal(third.param.float(), second.param)
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
    model[0].double()
    with pytest.raises(ValueError, match="one dtype and one device.*torch.float64"):
        FlatAdamState(list(model.parameters()), torch.optim.Adam(model.parameters())).flat(False)
