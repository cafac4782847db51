"""Tiny AR models over the fake tokenizer, for unit, generation and engine tests."""

from __future__ import annotations

import torch

from helpers.fake_tokenizer import FakeConfig, FakeTokenizer
from varkit.plugins import registry

#: A single-scale and a multi-scale fake tokenizer, by the unit kinds that accept them.
SINGLE = (4,)
MULTI = (1, 2, 4)


def tokenizer_for(unit_name: str) -> FakeTokenizer:
    """A fake tokenizer that ``unit_name`` accepts (multi-scale for ``scale``)."""
    return FakeTokenizer(FakeConfig(schedule=MULTI if unit_name == "scale" else SINGLE))


def tiny_model(
    unit, tokenizer, *, depth: int = 2, width: int = 32, heads: int = 2, num_classes: int = 4, **model_options
):
    """An ``ARModel`` of a few thousand parameters around ``unit`` (an instance or a class).

    ``unit`` may be a registered name, a unit class, or an instance already built.
    """
    from varkit.model.transformer import ARModel, ModelConfig

    if isinstance(unit, str):
        unit = registry().get("unit", unit)
    if isinstance(unit, type):
        unit = unit(unit.Config(), tokenizer=tokenizer, width=width)
    config = ModelConfig(
        depth=depth, width=width, heads=heads, num_classes=num_classes, drop_path=0.0, **model_options
    )
    attention = registry().get("attention", "sdpa")()
    return ARModel(
        config, unit=unit, attention=attention, vocab_size=tokenizer.vocab_size, code_dim=tokenizer.code_dim
    )


def random_codes(tokenizer, b: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, tokenizer.vocab_size, (b, h, w), generator=g) for h, w in tokenizer.schedule]


def train_steps(model, tokenizer, codes, labels, *, steps: int, lr: float = 3e-3) -> list[float]:
    """Plain AdamW on fixed codes; the cross-entropy of every step."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    targets = model.unit.targets(codes)
    inputs = model.unit.teacher_forcing(codes, tokenizer).detach()
    losses = []
    for _ in range(steps):
        logits = model(inputs, labels)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
