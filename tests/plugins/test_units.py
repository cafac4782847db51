"""Contract tests over every registered prediction unit and every tokenizer it accepts."""

from __future__ import annotations

import attrs
import pytest
import torch
from helpers.fake_tokenizer import FakeConfig, FakeTokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from varkit.errors import PluginError
from varkit.masks import BlockCausal
from varkit.plugins import registry

UNITS = [entry.name for entry in registry() if entry.kind == "unit"]
WIDTH = 16

#: Option sets worth covering for the built-in units; any other unit runs its defaults.
#: LlamaGen's layout: fed codes, rotated by the input code's cell, no start embedding.
LLAMAGEN = {"position": "rope2d", "rope_anchor": "input", "inputs": "codes", "start_embedding": False}
VARIANTS = {
    "token": [{}, {"position": "rope2d"}, LLAMAGEN],
    "patch": [{}, {"k": 4}, {"position": "rope2d"}, {"k": 2, **LLAMAGEN}],
}


def _real(name, **options):
    """A tiny build of a registered tokenizer (16 px images, 4×4 latent)."""

    def make():
        cls = registry().get("tokenizer", name)
        small = dict(image_size=16, ch=16, ch_mult=(1, 1, 2), num_res_blocks=1, norm_groups=8)
        return cls(cls.Config(**small, code_dim=8, vocab_size=32, **options))

    return make


TOKENIZERS = {
    "multi": lambda: FakeTokenizer(FakeConfig(schedule=(1, 2, 4))),
    "multi_rect": lambda: FakeTokenizer(FakeConfig(schedule=((1, 2), (2, 3), (4, 4)))),
    "single": lambda: FakeTokenizer(FakeConfig(schedule=(4,))),
    "single_8": lambda: FakeTokenizer(FakeConfig(schedule=(8,))),
    "msvq": _real("msvq", schedule=(1, 2, 3, 4)),
    "vq": _real("vq"),
}


def _build(name, options, tok_name):
    cls = registry().get("unit", name)
    tokenizer = TOKENIZERS[tok_name]()
    return cls(cls.Config(**options), tokenizer=tokenizer, width=WIDTH), tokenizer


def _accepts(name, options, tok_name):
    try:
        _build(name, options, tok_name)
    except PluginError:
        return False  # test_every_unit_accepts_some_tokenizer_and_explains_refusals covers refusals
    return True


#: Every (unit, options, tokenizer) that fits together.
CASES = [
    pytest.param(name, options, tok, id=f"{name}-{options or 'default'}-{tok}")
    for name in UNITS
    for options in VARIANTS.get(name, [{}])
    for tok in TOKENIZERS
    if _accepts(name, options, tok)
]


def _random_codes(tokenizer, b, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, tokenizer.vocab_size, (b, h, w), generator=g) for h, w in tokenizer.schedule]


def test_builtin_units_registered():
    assert {"scale", "token", "patch"} <= set(UNITS)


@pytest.mark.parametrize("name", UNITS)
def test_every_unit_accepts_some_tokenizer_and_explains_refusals(name):
    cls = registry().get("unit", name)
    accepted = []
    for tok_name, make in TOKENIZERS.items():
        tokenizer = make()
        problems = cls.check_tokenizer(tokenizer)
        assert all(isinstance(p, str) and p for p in problems)
        if problems:
            with pytest.raises(PluginError, match=name):
                cls(cls.Config(), tokenizer=tokenizer, width=WIDTH)
        else:
            accepted.append(tok_name)
    assert accepted, f"unit {name!r} accepts none of the test tokenizers"


@pytest.mark.parametrize(("name", "options", "tok"), CASES)
def test_layout_is_consistent_with_the_tokenizer(name, options, tok):
    unit, tokenizer = _build(name, options, tok)
    lengths = unit.step_lengths
    assert all(isinstance(n, int) and n >= 1 for n in lengths)
    assert unit.seq_len == sum(lengths)
    if name == "scale":
        assert lengths == tuple(h * w for h, w in tokenizer.schedule)
    elif name in ("token", "patch"):
        h, w = tokenizer.schedule[-1]
        assert unit.seq_len == h * w
    assert unit.mask() == BlockCausal(lengths)
    assert unit.start_embedding().shape == (1, lengths[0], WIDTH)
    assert unit.position_embedding().shape == (1, unit.seq_len, WIDTH)
    angles = unit.rotary_angles(8)
    assert angles is None or angles.shape == (unit.seq_len, 4)
    tables = unit.rotary_tables(8)
    assert (tables is None) == (angles is None)
    if tables is not None:
        assert all(t.shape == (unit.seq_len, 4) for t in tables)
        assert (tables[0].square() + tables[1].square()).max() <= 1 + 1e-6  # rotations, or zero

    codes = _random_codes(tokenizer, 3, seed=0)
    targets = unit.targets(codes)
    assert targets.shape == (3, unit.seq_len) and targets.dtype == torch.int64
    inputs = unit.teacher_forcing(codes, tokenizer)
    assert inputs.shape == _inputs_shape(unit, tokenizer, 3, unit.seq_len - lengths[0])
    assert inputs.is_floating_point() != unit.input_codes


def _inputs_shape(unit, tokenizer, b: int, n: int) -> tuple[int, ...]:
    """What a unit feeds for ``n`` positions: codes ``(b, n)`` or features ``(b, n, c)``."""
    return (b, n) if unit.input_codes else (b, n, tokenizer.code_dim)


@pytest.mark.parametrize(("name", "options", "tok"), CASES)
def test_parameters_are_all_used_and_trainable(name, options, tok):
    unit, _ = _build(name, options, tok)
    params = [p for p in unit.parameters() if p.requires_grad]
    if not params:  # e.g. LlamaGen's layout: no start embedding, positions by rotation
        return
    loss = unit.start_embedding().square().sum() + unit.position_embedding().square().sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    unused = [n for (n, _), g in zip(unit.named_parameters(), grads) if g is None]
    assert not unused, f"parameters that reach no embedding: {unused}"


@pytest.mark.parametrize(("name", "options", "tok"), CASES)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3))
def test_teacher_forcing_equals_generation_step_by_step(name, options, tok, seed, b):
    unit, tokenizer = _build(name, options, tok)
    codes = _random_codes(tokenizer, b, seed)
    targets = unit.targets(codes)
    with torch.no_grad():
        expected = unit.teacher_forcing(codes, tokenizer)  # (b, l - l_0, c)
        state = unit.start_generation(b, tokenizer)
        fed, start = [], 0
        for step, n in enumerate(unit.step_lengths):
            step_codes = targets[:, start : start + n]
            nxt = unit.generation_step(state, step, step_codes, tokenizer.embed(step_codes), tokenizer)
            start += n
            if step == len(unit.step_lengths) - 1:
                assert nxt is None, "the last step must return None"
            else:
                assert nxt.shape == _inputs_shape(unit, tokenizer, b, unit.step_lengths[step + 1])
                fed.append(nxt)
        f_hat = unit.finish_generation(state, tokenizer)
        generated = unit.generated_codes(state)
    fed = torch.cat(fed, dim=1) if fed else expected.new_zeros(_inputs_shape(unit, tokenizer, b, 0))
    torch.testing.assert_close(fed, expected, rtol=1e-5, atol=1e-5)
    assert [tuple(c.shape) for c in generated] == [tuple(c.shape) for c in codes]
    assert all(torch.equal(g, c) for g, c in zip(generated, codes))
    torch.testing.assert_close(f_hat, tokenizer.codes_to_features(codes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "options", "tok"), CASES)
def test_targets_are_a_permutation_of_the_codes(name, options, tok):
    unit, tokenizer = _build(name, options, tok)
    # Distinct values per position reveal any duplicated or dropped position.
    codes, offset = [], 0
    for h, w in tokenizer.schedule:
        codes.append(torch.arange(offset, offset + h * w).reshape(1, h, w))
        offset += h * w
    targets = unit.targets(codes)[0]
    used = torch.cat([c.flatten() for c in codes]) if name == "scale" else codes[-1].flatten()
    assert sorted(targets.tolist()) == sorted(used.tolist())


@pytest.mark.parametrize("name", UNITS)
def test_config_is_frozen_attrs(name):
    cls = registry().get("unit", name)
    assert attrs.has(cls.Config)
    config = cls.Config()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.anything = 1
