"""Each block computes its own AdaLN modulation in training (FSDP gathers a block's weights
once); generation computes them all once at step 0 and reuses them."""

from __future__ import annotations

import pytest
import torch
from helpers.fake_tokenizer import FakeConfig, FakeTokenizer

from varkit.model import ARModel, ModelConfig
from varkit.plugins import registry


def _model(**options) -> tuple[ARModel, FakeTokenizer]:
    tokenizer = FakeTokenizer(FakeConfig(schedule=(1, 2, 4)))
    unit = registry().get("unit", "scale")
    model = ARModel(
        ModelConfig(depth=3, width=32, heads=2, num_classes=10, **options),
        unit=unit(unit.Config(), tokenizer=tokenizer, width=32),
        attention=registry().get("attention", "sdpa")(),
        vocab_size=tokenizer.vocab_size,
        code_dim=tokenizer.code_dim,
    )
    return model, tokenizer


@pytest.mark.parametrize("shared", [False, True])
def test_training_forward_runs_each_blocks_adaln_inside_that_block(monkeypatch, shared):
    model, tokenizer = _model(shared_adaln=shared)
    events = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda *_, i=i: events.append(("enter", i)))
        block.register_forward_hook(lambda *_, i=i: events.append(("leave", i)))
        if block.adaln is not None:
            block.adaln.register_forward_hook(lambda *_, i=i: events.append(("adaln", i)))
        # The public method is what FSDP wraps for generation; forward must not go through it.
        monkeypatch.setattr(block, "modulation", lambda *a: pytest.fail("forward called block.modulation"))
    codes = [torch.randint(0, tokenizer.vocab_size, (2, h, w)) for h, w in tokenizer.schedule]
    inputs = model.unit.teacher_forcing(codes, tokenizer).detach()
    model(inputs, torch.tensor([0, 3])).sum().backward()
    expected = [
        event
        for i in range(3)
        for event in (("enter", i), *((("adaln", i),) if not shared else ()), ("leave", i))
    ]
    assert events == expected
