"""Every registered plugin through the contract checks that varkit ships for plugin authors
(``varkit.testing``): the built-ins pass the same checks a third-party package runs."""

from __future__ import annotations

import pytest

from varkit.plugins import registry
from varkit.testing import (
    ToyConfig,
    ToyTokenizer,
    check_attention_backend,
    check_sampler,
    check_tokenizer,
    check_unit,
)

ENTRIES = list(registry())
#: Small configs of the built-in tokenizers (a third-party tokenizer runs its defaults).
SMALL_TOKENIZERS = {
    "msvq": dict(
        image_size=16,
        ch=16,
        ch_mult=(1, 1, 2),
        num_res_blocks=1,
        norm_groups=8,
        code_dim=8,
        vocab_size=32,
        schedule=(1, 2, 4),
        lpips_weight=0.0,
        disc_weight=0.0,
    ),
    "vq": dict(
        image_size=16,
        ch=16,
        ch_mult=(1, 1, 2),
        num_res_blocks=1,
        norm_groups=8,
        code_dim=8,
        vocab_size=32,
        lpips_weight=0.0,
        disc_weight=0.0,
    ),
}
TOYS = {
    "multi": ToyConfig(schedule=(1, 2, 4)),
    "multi_rect": ToyConfig(schedule=((1, 2), (2, 3), (4, 4))),
    "single": ToyConfig(schedule=(4,)),
}


def _names(kind):
    return [e.name for e in ENTRIES if e.kind == kind]


@pytest.mark.parametrize("name", _names("sampler"))
def test_sampler_contract(name):
    check_sampler(registry().get("sampler", name))


@pytest.mark.parametrize("name", _names("attention"))
def test_attention_backend_contract(name):
    check_attention_backend(registry().get("attention", name, require_available=False))


@pytest.mark.parametrize("name", _names("tokenizer"))
def test_tokenizer_contract(name):
    cls = registry().get("tokenizer", name)
    options = SMALL_TOKENIZERS.get(name)
    if options is None:
        pytest.skip(f"no small config known for tokenizer {name!r}; its package runs check_tokenizer")
    check_tokenizer(cls, cls.Config(**options))


@pytest.mark.parametrize("toy", list(TOYS))
def test_the_toy_tokenizer_keeps_the_contract(toy):
    check_tokenizer(ToyTokenizer, TOYS[toy])


@pytest.mark.parametrize("name", _names("unit"))
def test_unit_contract(name):
    cls = registry().get("unit", name)
    toys = [ToyTokenizer(config) for config in TOYS.values()]
    accepted = [t for t in toys if not cls.check_tokenizer(t)]
    assert accepted, f"unit {name!r} accepts none of the toy tokenizers"
    for tokenizer in accepted:
        check_unit(cls, tokenizer, batches=(2,), seeds=(0,), others=toys)
