"""Parameter groups of AdamW: no weight decay on embeddings, norms, biases, scales."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from varkit.recipe.train import TrainConfig
from varkit.train.optim import build_adamw, no_decay_names, param_groups, set_lr_wd


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.scale_mul = nn.Parameter(torch.ones(2, 1, 1, 1))  # 4-d learned scale: named, not by ndim


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.class_emb = nn.Embedding(10, 8)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, 8))
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(8, 16)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def no_weight_decay(self):
        return {"pos_start", "class_emb", "scale_mul"}


def test_no_decay_covers_named_keys_norms_biases_and_scales():
    names = no_decay_names(_Model())
    assert {"pos_start", "class_emb.weight", "blocks.0.scale_mul", "blocks.1.scale_mul"} <= names
    assert {"blocks.0.norm.weight", "blocks.0.norm.bias", "blocks.1.proj.bias", "head.bias"} <= names
    assert "blocks.0.proj.weight" not in names and "head.weight" not in names


def test_key_matches_whole_components_only():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(3, 3))
            self.pos_start = nn.Parameter(torch.zeros(3, 3))

        def no_weight_decay(self):
            return {"pos"}

    assert no_decay_names(M()) == {"pos"}


def test_embeddings_without_no_weight_decay_are_not_decayed():
    model = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 3))
    assert no_decay_names(model) == {"0.weight", "1.bias"}


def test_groups_partition_trainable_parameters():
    model = _Model()
    groups = param_groups(model, 0.05, exclude=[model.head.weight])
    by_name = {g["name"]: g for g in groups}
    assert by_name["decay"]["weight_decay"] == 0.05 and by_name["no_decay"]["weight_decay"] == 0.0
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    trainable = {id(p) for p in model.parameters() if p.requires_grad} - {id(model.head.weight)}
    assert set(ids) == trainable
    decayed = {id(p) for p in by_name["decay"]["params"]}
    assert decayed == {id(model.blocks[0].proj.weight), id(model.blocks[1].proj.weight)}


def test_adamw_decays_only_the_decay_group():
    model = _Model()
    cfg = TrainConfig(steps=1, lr=0.1, weight_decay=0.5)
    opt = build_adamw(param_groups(model, cfg.weight_decay), cfg, torch.device("cpu"))
    set_lr_wd(opt, 0.1, 0.25)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.25, 0.0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()  # zero gradients: only decoupled weight decay moves the weights
    for name, p in model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        if name.endswith("proj.weight") or name == "head.weight":
            assert moved and torch.allclose(p, before[name] * (1 - 0.1 * 0.25))
        else:
            assert not moved, name


@pytest.mark.parametrize("device", ["cpu"])
def test_adamw_settings_follow_config(device):
    cfg = TrainConfig(steps=1, batch_size=512, betas=(0.9, 0.95), eps=1e-6)
    opt = build_adamw(param_groups(nn.Linear(2, 2), 0.05), cfg, torch.device(device))
    assert opt.defaults["lr"] == pytest.approx(2e-4)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-6
    assert not opt.defaults["fused"]
