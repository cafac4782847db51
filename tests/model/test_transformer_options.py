"""The transformer's architecture options (LlamaGen's GPT beside VAR's) and how they combine."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.fake_tokenizer import FakeConfig, FakeTokenizer
from torch import nn

from varkit.config_types import structure, unstructure
from varkit.model import ARModel, ModelConfig
from varkit.plugins import registry
from varkit_plugins.attention import MathAttention

#: LlamaGen's GPT as options of the one transformer.
LLAMAGEN = {
    "conditioning": "prefix",
    "norm": "rmsnorm",
    "mlp": "swiglu",
    "mlp_multiple_of": 32,
    "bias": False,
    "attn_l2_norm": False,
    "norm_eps": 1e-5,
}
#: The token unit as LlamaGen's GPT orders and places its tokens.
LLAMAGEN_UNIT = {"position": "rope2d", "rope_anchor": "input", "inputs": "codes", "start_embedding": False}

VARIANTS = {
    "llamagen": (LLAMAGEN, LLAMAGEN_UNIT),
    "llamagen_3_class_tokens": ({**LLAMAGEN, "class_tokens": 3}, LLAMAGEN_UNIT),
    "prefix_layernorm_gelu_features": ({"conditioning": "prefix", "class_tokens": 2}, {"position": "rope2d"}),
    "adaln_rmsnorm_swiglu_no_bias": ({"norm": "rmsnorm", "mlp": "swiglu", "bias": False}, LLAMAGEN_UNIT),
    "var_with_code_inputs": ({}, {"inputs": "codes"}),
}


def build(options, unit_options, *, unit="token", k=None, width=32, depth=2, heads=2, classes=5, grid=4):
    tokenizer = FakeTokenizer(FakeConfig(schedule=(grid,), vocab_size=24, code_dim=6))
    cls = registry().get("unit", unit)
    extra = {"k": k} if k is not None else {}
    u = cls(cls.Config(**unit_options, **extra), tokenizer=tokenizer, width=width)
    config = ModelConfig(depth=depth, width=width, heads=heads, num_classes=classes, drop_path=0.0, **options)
    model = ARModel(config, unit=u, attention=MathAttention(), vocab_size=24, code_dim=6)
    return model, tokenizer


def perturb(model, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)
    return model


def codes_and_labels(model, tokenizer, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = tokenizer.schedule[-1]
    codes = [torch.randint(0, tokenizer.vocab_size, (b, h, w), generator=g)]
    labels = torch.randint(0, model.config.num_classes + 1, (b,), generator=g)
    return codes, labels


def cached(model, tokenizer, codes, labels):
    """Every step through forward_step, fed the unit's inputs: ``(b, l, v)``."""
    unit = model.unit
    inputs = unit.teacher_forcing(codes, tokenizer)
    cache = model.new_cache(labels.shape[0])
    outs, pos = [], 0
    l0 = unit.step_lengths[0]
    for step, n in enumerate(unit.step_lengths):
        x = None if step == 0 else inputs[:, pos - l0 : pos - l0 + n]
        outs.append(model.forward_step(x, labels, cache, step))
        pos += n
    assert cache.length == model.step_starts[-1] == model.prefix + unit.seq_len
    return torch.cat(outs, dim=1)


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("width", "hidden"), [(768, 2048), (1024, 2816), (1280, 3584), (1536, 4096), (3200, 8704)]
)
def test_swiglu_width_is_llamagens(width, hidden):
    config = ModelConfig(depth=2, width=width, heads=width // 64, mlp="swiglu", mlp_multiple_of=256)
    assert config.mlp_hidden == hidden
    assert ModelConfig(depth=2, width=width, heads=1).mlp_hidden == 4 * width  # gelu: VAR's, no rounding


def test_options_round_trip_and_refuse_what_does_not_combine():
    config = ModelConfig(
        depth=2, width=64, heads=2, **LLAMAGEN, class_tokens=2, token_dropout=0.1, init_std=0.02
    )
    problems = []
    assert structure(ModelConfig, unstructure(config), "model", problems) == config and not problems
    for bad, named in (
        ({"class_tokens": 2}, "class_tokens"),
        ({"conditioning": "prefix", "shared_adaln": True}, "shared_adaln"),
        ({"norm": "batchnorm"}, "norm"),
        ({"mlp": "relu"}, "mlp"),
        ({"token_dropout": 1.0}, "token_dropout"),
    ):
        problems = []
        structure(ModelConfig, {"depth": 2, **bad}, "model", problems)
        assert problems and named in problems[0].path + problems[0].message, (bad, problems)


# ---------------------------------------------------------------------------- forward


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize(("unit", "k"), [("token", None), ("patch", 2)])
def test_cached_steps_equal_teacher_forcing(variant, unit, k):
    options, unit_options = VARIANTS[variant]
    model, tokenizer = build(options, unit_options, unit=unit, k=k)
    model = perturb(model).double().eval()
    codes, labels = codes_and_labels(model, tokenizer)
    full = model(model.unit.teacher_forcing(codes, tokenizer), labels)
    assert full.shape == (3, model.unit.seq_len, 24)
    torch.testing.assert_close(cached(model, tokenizer, codes, labels), full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradient_reaches_every_parameter(variant):
    options, unit_options = VARIANTS[variant]
    model, tokenizer = build({**options, "class_dropout": 0.0}, unit_options)
    model = perturb(model).train()
    codes, _ = codes_and_labels(model, tokenizer, b=6)
    labels = torch.arange(6) % model.config.num_classes
    logits = model(model.unit.teacher_forcing(codes, tokenizer), labels)
    nn.functional.cross_entropy(logits.flatten(0, 1), model.unit.targets(codes).flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name} ({variant})"


def test_llamagen_options_have_no_adaln_and_no_bias():
    model, _ = build(LLAMAGEN, LLAMAGEN_UNIT)
    names = dict(model.named_parameters())
    assert not any("adaln" in n or n.endswith("bias") for n in names), sorted(names)
    assert isinstance(model.word_embed, nn.Embedding) and model.word_embed.weight.shape == (24, 32)
    assert {
        "blocks.0.norm1.weight",
        "blocks.0.norm2.weight",
        "head_norm.weight",
        "blocks.0.mlp.gate.weight",
    } <= set(names)
    assert model.flops_per_image(training=True) == 3 * model.flops_per_image(training=False)


def test_class_tokens_are_extra_positions_that_predict_nothing():
    model, tokenizer = build({**LLAMAGEN, "class_tokens": 3}, LLAMAGEN_UNIT)
    model = perturb(model).eval()
    assert model.prefix == 2 and model.class_embed.weight.shape == (6, 3 * 32)
    codes, labels = codes_and_labels(model, tokenizer)
    logits = model(model.unit.teacher_forcing(codes, tokenizer), labels)
    assert logits.shape == (3, 16, 24)
    # the first class token changes the prediction of the first code (it is seen by it)
    with torch.no_grad():
        model.class_embed.weight[:, :32] += 1.0
    assert not torch.allclose(model(model.unit.teacher_forcing(codes, tokenizer), labels)[:, 0], logits[:, 0])


def test_token_dropout_acts_in_train_mode_only():
    model, tokenizer = build({**LLAMAGEN, "token_dropout": 0.5, "class_dropout": 0.0}, LLAMAGEN_UNIT)
    model = perturb(model)
    codes, labels = codes_and_labels(model, tokenizer)
    inputs = model.unit.teacher_forcing(codes, tokenizer)
    model.eval()
    ref = model(inputs, labels)
    torch.testing.assert_close(model(inputs, labels), ref, rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(inputs, labels), ref)


def test_llamagen_initialisation():
    depth, width = 3, 128
    options = {**LLAMAGEN, "init_std": 0.02, "scale_residual_init": False, "head_init": 0.0}
    model, _ = build(options, LLAMAGEN_UNIT, width=width, depth=depth, heads=2)
    block = model.blocks[0]
    for weight in (
        block.attn.qkv.weight,
        block.attn.proj.weight,
        block.mlp.down.weight,
        model.word_embed.weight,
    ):
        assert weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert not model.head.weight.any()  # LlamaGen zeroes its output layer
    assert all(torch.equal(n.weight, torch.ones(width)) for n in (block.norm1, block.norm2, model.head_norm))
    var, _ = build({}, {}, width=width, depth=depth, heads=2)
    std = math.sqrt(1 / (3 * width))
    assert var.blocks[0].mlp.fc2.weight.std().item() == pytest.approx(std / math.sqrt(2 * depth), rel=0.1)


def test_rotary_tables_zero_the_class_position_in_llamagens_layout():
    model, _ = build(LLAMAGEN, LLAMAGEN_UNIT)
    cos, sin = model.unit.rotary_tables(model.config.head_dim)
    assert not cos[0].any() and not sin[0].any()
    # position s > 0 is rotated by the cell of the code it is fed, code s - 1
    varkit_layout, _ = build(LLAMAGEN, {**LLAMAGEN_UNIT, "rope_anchor": "target"})
    target_cos, target_sin = varkit_layout.unit.rotary_tables(model.config.head_dim)
    torch.testing.assert_close(cos[1:], target_cos[:-1])
    torch.testing.assert_close(sin[1:], target_sin[:-1])
    assert torch.equal(target_cos[0], torch.ones_like(target_cos[0]))
