"""The ``patch`` unit: k×k cells in raster order, predicted a cell per step."""

from __future__ import annotations

import pytest
import torch
from helpers.fake_tokenizer import FakeConfig, FakeTokenizer
from helpers.tiny import random_codes, tiny_model, train_steps
from hypothesis import given, settings
from hypothesis import strategies as st

from varkit.errors import PluginError
from varkit.masks import BlockCausal
from varkit_plugins.units.embeddings import rope2d_angles
from varkit_plugins.units.patch import NextPatch
from varkit_plugins.units.token import NextToken


def _unit(grid=(4, 4), width=16, **options):
    tokenizer = FakeTokenizer(FakeConfig(schedule=(grid,)))
    return NextPatch(NextPatch.Config(**options), tokenizer=tokenizer, width=width), tokenizer


def test_layout_cells_of_k_squared():
    unit, _ = _unit((4, 6), k=2)
    assert unit.step_lengths == (4,) * 6
    assert unit.mask() == BlockCausal((4,) * 6)
    assert unit.start_embedding().shape == (1, 4, 16)
    assert unit.position_embedding().shape == (1, 24, 16)


def test_targets_in_cell_order():
    unit, _ = _unit((4, 4), k=2)
    grid = torch.arange(16).reshape(1, 4, 4)
    assert unit.targets([grid]).tolist() == [[0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]]


def test_inputs_are_the_previous_cell_position_for_position():
    unit, tokenizer = _unit((4, 4), k=2)
    grid = torch.arange(16).reshape(1, 4, 4)
    inputs = unit.teacher_forcing([grid], tokenizer)  # cells 0..2 feed steps 1..3
    expected = tokenizer.embed(torch.tensor([[0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13]]))
    torch.testing.assert_close(inputs, expected)


@pytest.mark.parametrize(("grid", "k"), [((4, 6), 4), ((6, 4), 4), ((5, 5), 2)])
def test_k_must_divide_the_grid(grid, k):
    with pytest.raises(PluginError, match=rf"k={k}.*{grid[0]}x{grid[1]}"):
        _unit(grid, k=k)


def test_k_is_validated():
    with pytest.raises((TypeError, ValueError)):
        NextPatch.Config(k=0)


def test_multi_scale_tokenizer_is_refused():
    tokenizer = FakeTokenizer(FakeConfig(schedule=(1, 2, 4)))
    with pytest.raises(PluginError, match="scales"):
        NextPatch(NextPatch.Config(), tokenizer=tokenizer, width=8)


@settings(max_examples=20, deadline=None)
@given(h=st.integers(1, 4), w=st.integers(1, 4), k=st.sampled_from([1, 2, 4]), seed=st.integers(0, 100))
def test_cell_order_round_trips(h, w, k, seed):
    unit, tokenizer = _unit((h * k, w * k), k=k)
    codes = random_codes(tokenizer, 2, seed)
    seq = unit.targets(codes)
    state = unit.start_generation(2, tokenizer)
    for step, cell in enumerate(seq.split(k * k, dim=1)):
        unit.generation_step(state, step, cell, tokenizer.embed(cell), tokenizer)
    assert torch.equal(unit.generated_codes(state)[0], codes[0])


def test_k1_is_the_token_unit():
    torch.manual_seed(0)
    patch, tokenizer = _unit((4, 4), k=1, position="rope2d")
    token = NextToken(NextToken.Config(position="rope2d"), tokenizer=tokenizer, width=16)
    codes = random_codes(tokenizer, 2, 0)
    assert patch.step_lengths == token.step_lengths
    assert torch.equal(patch.targets(codes), token.targets(codes))
    torch.testing.assert_close(patch.rotary_angles(8), token.rotary_angles(8))


def test_rope_angles_follow_the_predicted_cell():
    unit, _ = _unit((4, 4), k=2, position="rope2d")
    angles = unit.rotary_angles(8)
    seq_rows = unit.targets([torch.arange(4).repeat_interleave(4).reshape(1, 4, 4)])[
        0
    ]  # row of each position
    seq_cols = unit.targets([torch.arange(4).repeat(4).reshape(1, 4, 4)])[0]
    torch.testing.assert_close(angles, rope2d_angles(seq_rows, seq_cols, 8, base=unit.config.rope_base))


@pytest.mark.parametrize("options", [{"k": 2}, {"k": 2, "position": "rope2d"}])
def test_a_tiny_model_learns_fixed_codes(options):
    unit, tokenizer = _unit((4, 4), width=32, **options)
    model = tiny_model(unit, tokenizer)
    codes = random_codes(tokenizer, 8, seed=0)
    losses = train_steps(model, tokenizer, codes, torch.arange(8) % 4, steps=30)
    assert losses[-1] < 0.6 * losses[0], losses
