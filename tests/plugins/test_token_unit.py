"""The ``token`` unit: raster order, a class prefix, plain causal mask, 2-D RoPE."""

from __future__ import annotations

import pytest
import torch
from helpers.fake_tokenizer import FakeConfig, FakeTokenizer
from helpers.tiny import random_codes, tiny_model, train_steps
from hypothesis import given
from hypothesis import strategies as st

from varkit.errors import PluginError
from varkit_plugins.units.embeddings import rope2d_angles
from varkit_plugins.units.token import NextToken


def _unit(grid=(4, 4), width=16, **options):
    tokenizer = FakeTokenizer(FakeConfig(schedule=(grid,)))
    return NextToken(NextToken.Config(**options), tokenizer=tokenizer, width=width), tokenizer


def test_layout_one_token_per_step_causal():
    unit, _ = _unit((3, 5))
    assert unit.step_lengths == (1,) * 15
    assert unit.mask().is_causal
    assert unit.start_embedding().shape == (1, 1, 16)


def test_targets_and_inputs_are_raster_shifted_by_one():
    unit, tokenizer = _unit((2, 3))
    codes = [torch.tensor([[[1, 2, 3], [4, 5, 6]]])]
    assert unit.targets(codes).tolist() == [[1, 2, 3, 4, 5, 6]]
    inputs = unit.teacher_forcing(codes, tokenizer)
    torch.testing.assert_close(inputs, tokenizer.embed(torch.tensor([[1, 2, 3, 4, 5]])))


def test_multi_scale_tokenizer_is_refused_with_the_way_out():
    tokenizer = FakeTokenizer(FakeConfig(schedule=(1, 2, 4)))
    with pytest.raises(PluginError, match="3 scales") as info:
        NextToken(NextToken.Config(), tokenizer=tokenizer, width=8)
    assert "vq" in str(info.value) and "scale" in str(info.value)


def test_learned_positions_have_a_parameter_and_rope_has_none():
    learned, _ = _unit()
    rope, _ = _unit(position="rope2d")
    assert set(dict(learned.named_parameters())) == {"pos_start", "pos_embed"}
    assert set(dict(rope.named_parameters())) == {"pos_start"}
    assert learned.rotary_angles(8) is None
    assert torch.count_nonzero(rope.position_embedding()) == 0


def test_rope_angles_class_prefix_is_zero_and_axes_split():
    unit, _ = _unit((3, 4), position="rope2d")
    angles = unit.rotary_angles(16)  # 8 pairs: 4 for rows, 4 for columns
    assert angles.shape == (12, 8)
    assert torch.count_nonzero(angles[0]) == 0  # predicts (0, 0)
    # Position 5 predicts (1, 1); position 4 predicts (1, 0): same row frequencies.
    torch.testing.assert_close(angles[5, :4], angles[4, :4])
    assert not torch.allclose(angles[5, 4:], angles[4, 4:])
    torch.testing.assert_close(angles[1, :4], torch.zeros(4))  # row 0


@given(
    r=st.integers(0, 30),
    c=st.integers(0, 30),
    dr=st.integers(0, 30),
    dc=st.integers(0, 30),
    half=st.integers(2, 16),
)
def test_rope_angles_depend_on_the_offset_only(r, c, dr, dc, half):
    """RoPE's point: angle(p + Δ) - angle(p) is the same wherever p is."""
    head_dim = 2 * half
    a = rope2d_angles(torch.tensor([r, r + dr]), torch.tensor([c, c + dc]), head_dim, base=100.0)
    origin = rope2d_angles(torch.tensor([0, dr]), torch.tensor([0, dc]), head_dim, base=100.0)
    torch.testing.assert_close(a[1] - a[0], origin[1] - origin[0], rtol=1e-5, atol=1e-4)
    assert a.shape == (2, half)


def test_rope_needs_an_even_head_dim():
    with pytest.raises(ValueError, match="head_dim"):
        rope2d_angles(torch.zeros(1), torch.zeros(1), 6 - 1, base=10.0)


@pytest.mark.parametrize("position", ["learned", "rope2d"])
def test_a_tiny_model_learns_fixed_codes(position):
    unit, tokenizer = _unit(width=32, position=position)
    model = tiny_model(unit, tokenizer)
    codes = random_codes(tokenizer, 8, seed=0)
    losses = train_steps(model, tokenizer, codes, torch.arange(8) % 4, steps=30)
    assert losses[-1] < 0.6 * losses[0], losses
