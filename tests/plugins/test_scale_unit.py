"""The ``scale`` unit: VAR's sequence layout, parameter names and initialisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.fake_tokenizer import FakeConfig, FakeTokenizer
from helpers.tiny import random_codes, tiny_model, train_steps

from varkit import scales as schedules
from varkit.errors import PluginError, VarkitError
from varkit.masks import BlockCausal
from varkit_plugins.units.scale import NextScale


def _unit(schedule=(1, 2, 4), width=16):
    tokenizer = FakeTokenizer(FakeConfig(schedule=schedule))
    return NextScale(NextScale.Config(), tokenizer=tokenizer, width=width), tokenizer


def test_var_layout_680_positions():
    unit, _ = _unit(schedules.VAR_256, width=8)
    assert unit.step_lengths == (1, 4, 9, 16, 25, 36, 64, 100, 169, 256)
    assert unit.seq_len == 680
    assert unit.mask() == BlockCausal(unit.step_lengths)


def test_parameter_names_and_shapes_match_the_official_converter():
    unit, _ = _unit(schedules.VAR_256, width=8)
    shapes = {name: tuple(t.shape) for name, t in unit.state_dict().items()}
    assert shapes == {"pos_start": (1, 1, 8), "pos_embed": (1, 680, 8), "level_embed.weight": (10, 8)}


def test_init_is_vars_truncated_normal():
    unit, _ = _unit(schedules.VAR_256, width=256)
    std = math.sqrt(1 / (3 * 256))
    values = unit.pos_embed.detach().flatten()
    assert values.std().item() == pytest.approx(std, rel=0.02)
    assert abs(values.mean().item()) < 0.1 * std
    assert unit.level_embed.weight.std().item() == pytest.approx(std, rel=0.15)


def test_position_embedding_adds_each_positions_level():
    unit, _ = _unit((1, 2, 3), width=4)
    pos = unit.position_embedding()
    levels = [0] + [1] * 4 + [2] * 9
    expected = unit.pos_embed + unit.level_embed.weight[levels][None]
    torch.testing.assert_close(pos, expected)


def test_targets_are_scales_row_major_coarse_to_fine():
    unit, _ = _unit((1, 2), width=4)
    codes = [torch.tensor([[[7]]]), torch.tensor([[[1, 2], [3, 4]]])]
    assert unit.targets(codes).tolist() == [[7, 1, 2, 3, 4]]


def test_teacher_forcing_is_the_downsampled_running_f_hat():
    unit, tokenizer = _unit((1, 2, 4), width=4)
    codes = random_codes(tokenizer, 2, seed=3)
    got = unit.teacher_forcing(codes, tokenizer)  # (b, 4 + 16, c)
    f_hat = None
    expected = []
    for k in range(2):
        f_hat = tokenizer.add_scale(f_hat, k, tokenizer.embed(codes[k]).permute(0, 3, 1, 2))
        h, w = tokenizer.schedule[k + 1]
        expected.append(F.interpolate(f_hat, size=(h, w), mode="area").flatten(2).transpose(1, 2))
    torch.testing.assert_close(got, torch.cat(expected, dim=1))


def test_codes_off_the_schedule_are_refused():
    unit, _ = _unit((1, 2, 4), width=4)
    with pytest.raises(VarkitError, match="schedule"):
        unit.targets([torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros(1, 3, 3, dtype=torch.long)])


def test_single_scale_tokenizer_is_refused_with_the_way_out():
    tokenizer = FakeTokenizer(FakeConfig(schedule=(4,)))
    (problem,) = NextScale.check_tokenizer(tokenizer)
    assert "multi-scale" in problem and "token" in problem
    with pytest.raises(PluginError, match="scale"):
        NextScale(NextScale.Config(), tokenizer=tokenizer, width=8)


def test_state_dict_round_trip_into_a_model():
    torch.manual_seed(0)
    _, tokenizer = _unit()
    a, b = tiny_model("scale", tokenizer), tiny_model("scale", tokenizer)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.unit.position_embedding(), b.unit.position_embedding())
    assert {"unit.pos_start", "unit.pos_embed", "unit.level_embed.weight"} <= a.no_weight_decay()


def test_a_tiny_model_learns_fixed_codes():
    _, tokenizer = _unit()
    model = tiny_model("scale", tokenizer)
    codes = random_codes(tokenizer, 8, seed=0)
    losses = train_steps(model, tokenizer, codes, torch.arange(8) % 4, steps=30)
    assert losses[-1] < 0.6 * losses[0], losses
