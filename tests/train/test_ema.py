"""The EMA of weights."""

from __future__ import annotations

import torch
from torch import nn

from varkit.train.ema import EMA


def test_update_is_an_exponential_average_and_applied_restores():
    model = nn.Linear(3, 2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for name, p in model.named_parameters():
        assert torch.allclose(ema.shadow[name], start[name] + 0.1)
        assert torch.allclose(p, start[name] + 1.0)
    with ema.applied():
        assert torch.allclose(model.weight, start["weight"] + 0.1)
    assert torch.allclose(model.weight, start["weight"] + 1.0)


def test_state_dict_round_trip_includes_buffers():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.5)
    state = ema.state_dict()
    assert set(state) == set(model.state_dict())
    other = EMA(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), decay=0.5)
    other.load_state_dict(state)
    for name in ema.shadow:
        assert torch.equal(other.shadow[name], ema.shadow[name])
    model.load_state_dict(state)  # an EMA state dict is a state dict of the module


def test_state_dict_leaves_out_non_persistent_buffers():
    model = nn.Linear(2, 2)
    model.register_buffer("table", torch.ones(3), persistent=False)
    assert set(EMA(model, decay=0.5).state_dict()) == {"weight", "bias"}
