"""The AR transformer against small fake units, real units and every attention backend."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.fake_tokenizer import FakeConfig, FakeTokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import varkit
from varkit.config_types import structure, unstructure
from varkit.errors import VarkitError
from varkit.model import ARModel, KVCache, ModelConfig
from varkit.plugins import registry
from varkit_plugins.attention import MathAttention

VAR_LENGTHS = tuple(n * n for n in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
BACKENDS = [e.name for e in registry() if e.kind == "attention" and e.available()[0]]


class FakeUnit(varkit.PredictionUnit):
    """Fixed step lengths, learned start/position embeddings, optional 1-D rotary angles."""

    name = "fake_unit"

    def __init__(self, lengths, width, *, rotary=False):
        nn.Module.__init__(self)
        self.lengths = tuple(lengths)
        self.rotary = rotary
        self.pos_start = nn.Parameter(torch.randn(1, self.lengths[0], width) * 0.2)
        self.pos_embed = nn.Parameter(torch.randn(1, sum(self.lengths), width) * 0.2)

    @property
    def step_lengths(self):
        return self.lengths

    def start_embedding(self):
        return self.pos_start

    def position_embedding(self):
        return self.pos_embed

    def rotary_angles(self, head_dim):
        if not self.rotary:
            return None
        positions = torch.arange(self.seq_len, dtype=torch.float64)
        freqs = 100.0 ** (-torch.arange(head_dim // 2, dtype=torch.float64) / (head_dim // 2))
        return (positions[:, None] * freqs[None]).float()


def make_model(
    lengths=(1, 4, 9),
    *,
    width=32,
    depth=2,
    heads=2,
    vocab=16,
    code_dim=4,
    backend=None,
    rotary=False,
    **options,
):
    config = ModelConfig(depth=depth, width=width, heads=heads, num_classes=10, **options)
    return ARModel(
        config,
        unit=FakeUnit(lengths, width, rotary=rotary),
        attention=backend or MathAttention(),
        vocab_size=vocab,
        code_dim=code_dim,
    )


def make_inputs(model, b=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    length = model.unit.seq_len - model.unit.step_lengths[0]
    inputs = torch.randn(b, length, model.code_dim, generator=g).to(dtype)
    labels = torch.randint(0, model.config.num_classes + 1, (b,), generator=g)
    return inputs, labels


def perturb(model, seed=0, std=0.05):
    """Move every parameter off its init (gates near 0 would hide most of the arithmetic)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)
    return model


def cached_logits(model, inputs, labels, cache=None):
    """Every step through forward_step, concatenated: (b, l, v)."""
    cache = cache or model.new_cache(labels.shape[0])
    outs, pos = [], 0
    l0 = model.unit.step_lengths[0]
    for step, n in enumerate(model.unit.step_lengths):
        x = None if step == 0 else inputs[:, pos - l0 : pos - l0 + n]
        outs.append(model.forward_step(x, labels, cache, step))
        pos += n
    return torch.cat(outs, dim=1)


# ------------------------------------------------------------------------------ config


def test_config_resolves_var_defaults():
    c = ModelConfig(depth=16)
    assert (c.width, c.heads, c.head_dim, c.mlp_hidden) == (1024, 16, 64, 4096)
    assert c.drop_path == pytest.approx(0.1 * 16 / 24)
    assert ModelConfig(depth=30).width == 1920 and ModelConfig(depth=30).heads == 30
    assert ModelConfig(depth=2, width=96).heads == 1
    assert ModelConfig(depth=2, drop_path=0.0).drop_path == 0.0


def test_config_round_trips_through_recipe_types():
    c = ModelConfig(depth=3, class_dropout=0.2)
    data = unstructure(c)
    assert data["width"] == 192 and data["heads"] == 3 and data["drop_path"] == pytest.approx(0.0125)
    problems = []
    assert structure(ModelConfig, data, "model", problems) == c and not problems


def test_config_rejects_bad_values_with_the_key():
    problems = []
    structure(ModelConfig, {"depth": 2, "width": 100, "heads": 3}, "model", problems)
    assert problems and "divisible" in problems[0].message
    for bad in ({"depth": 0}, {"class_dropout": 1.5}, {"drop_path": -0.1}):
        problems = []
        structure(ModelConfig, bad, "model", problems)
        assert problems and next(iter(bad)) in problems[0].message


# ----------------------------------------------------------------------------- forward


def test_forward_shapes_and_dtype():
    model = make_model().eval()
    inputs, labels = make_inputs(model)
    logits = model(inputs, labels)
    assert logits.shape == (3, 14, 16) and logits.dtype == torch.float32
    with pytest.raises(VarkitError, match="inputs must be"):
        model(inputs[:, :-1], labels)


def test_eval_forward_is_deterministic():
    model = perturb(make_model(class_dropout=0.5, drop_path=0.5, dropout=0.3)).eval()
    inputs, labels = make_inputs(model)
    torch.testing.assert_close(model(inputs, labels), model(inputs, labels), rtol=0, atol=0)


def test_class_dropout_only_in_train_mode():
    model = perturb(make_model(class_dropout=0.5, drop_path=0.0))
    b = 64
    inputs = make_inputs(model, b=1)[0].expand(b, -1, -1)
    labels = torch.full((b,), 3)
    model.eval()
    cond = model(inputs[:1], labels[:1])
    uncond = model(inputs[:1], torch.tensor([model.config.num_classes]))
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(model(inputs, labels), cond.expand(b, -1, -1))  # eval: never dropped
    model.train()
    out = model(inputs, labels)
    is_cond = [torch.allclose(o, cond[0], atol=1e-5) for o in out]
    is_uncond = [torch.allclose(o, uncond[0], atol=1e-5) for o in out]
    assert all(c or u for c, u in zip(is_cond, is_uncond, strict=True))
    assert 10 < sum(is_uncond) < 54  # about half of 64 dropped to "no class"


def test_drop_path_acts_in_train_mode_only():
    model = perturb(make_model(depth=3, class_dropout=0.0, drop_path=0.9), std=0.2)
    assert [b.drop_path.rate for b in model.blocks] == pytest.approx([0.0, 0.45, 0.9])
    inputs, labels = make_inputs(model, b=8)
    model.eval()
    ref = model(inputs, labels)
    model.train()
    a, b = model(inputs, labels), model(inputs, labels)
    assert not torch.allclose(a, b) and not torch.allclose(a, ref)
    plain = perturb(make_model(class_dropout=0.0, drop_path=0.0), std=0.2)
    plain.train()
    out = plain(inputs, labels)
    plain.eval()
    torch.testing.assert_close(out, plain(inputs, labels))


def test_gradient_reaches_every_parameter():
    for options in ({}, {"shared_adaln": True}, {"attn_l2_norm": False}):
        model = make_model(class_dropout=0.0, drop_path=0.0, **options).train()
        inputs, labels = make_inputs(model, b=4)
        targets = torch.randint(0, model.vocab_size, (4, model.unit.seq_len))
        nn.functional.cross_entropy(model(inputs, labels).flatten(0, 1), targets.flatten()).backward()
        for name, p in model.named_parameters():
            if name == "class_embed.weight":
                used = torch.zeros(model.config.num_classes + 1, dtype=torch.bool)
                used[labels] = True
                assert p.grad[used].abs().sum() > 0 and p.grad[~used].abs().sum() == 0
                continue
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name} ({options})"


def test_no_weight_decay_names():
    model = make_model(shared_adaln=True)
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert names <= set(params)
    assert {"unit.pos_start", "unit.pos_embed", "word_embed.bias", "head.bias", "head_adaln.bias"} <= names
    for i in range(model.config.depth):
        assert {
            f"blocks.{i}.attn.scale_mul",
            f"blocks.{i}.attn.q_bias",
            f"blocks.{i}.attn.v_bias",
            f"blocks.{i}.adaln_offset",
            f"blocks.{i}.mlp.fc1.bias",
        } <= names
    decayed = set(params) - names
    assert decayed == {n for n, p in params.items() if p.ndim == 2 and not n.startswith("unit.")} - {
        f"blocks.{i}.adaln_offset" for i in range(model.config.depth)
    }
    assert "class_embed.weight" in decayed and "head.weight" in decayed


# ---------------------------------------------------------------------------- init


def test_init_follows_var():
    depth, width = 4, 128
    model = make_model(width=width, depth=depth, heads=2, vocab=512, adaln_gamma_init=1e-3)
    std = math.sqrt(1 / (3 * width))
    block = model.blocks[0]

    def close(t, expected, rel=0.1):
        assert t.float().std().item() == pytest.approx(expected, rel=rel)

    close(block.attn.qkv.weight, std)
    close(block.mlp.fc1.weight, std)
    close(model.class_embed.weight, std)
    close(block.attn.proj.weight, std / math.sqrt(2 * depth))
    close(block.mlp.fc2.weight, std / math.sqrt(2 * depth))
    close(model.head.weight, std * 0.02)
    close(model.head_adaln.weight, std * 0.5)
    close(block.adaln.weight[: 2 * width], std * 1e-3)
    close(block.adaln.weight[2 * width :], std * 0.5)
    for b in model.blocks:
        torch.testing.assert_close(b.attn.scale_mul.exp(), torch.full((2,), 4.0))
        assert not b.attn.q_bias.any() and not b.attn.v_bias.any() and not b.adaln.bias.any()
    assert not model.head.bias.any() and not model.word_embed.bias.any()


def test_builds_on_meta_device_without_touching_memory():
    with torch.device("meta"):
        model = ARModel(
            ModelConfig(depth=30),
            unit=FakeUnit(VAR_LENGTHS, 1920),
            attention=MathAttention(),
            vocab_size=4096,
            code_dim=32,
        )
    assert all(p.is_meta for p in model.parameters())
    assert model.config.width == 1920 and len(model.blocks) == 30


# ------------------------------------------------------------------------ generation


@pytest.mark.parametrize("lengths", [(1, 4, 9), (1, 1, 1, 1), (2, 3, 1)])
@pytest.mark.parametrize(
    "options",
    [{}, {"shared_adaln": True}, {"attn_l2_norm": False}, {"rotary": True}],
    ids=["var", "shared_adaln", "plain_attention", "rotary"],
)
def test_cached_steps_equal_teacher_forcing(lengths, options):
    model = perturb(make_model(lengths, **options)).double().eval()
    inputs, labels = make_inputs(model, dtype=torch.float64)
    full = model(inputs, labels)
    cache = model.new_cache(labels.shape[0])
    assert cache.dtype == torch.float64 and cache.max_len == sum(lengths)
    torch.testing.assert_close(cached_logits(model, inputs, labels, cache), full, rtol=1e-5, atol=1e-5)
    assert cache.length == sum(lengths)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 5), min_size=1, max_size=5),
    b=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_cached_steps_equal_teacher_forcing_for_any_layout(lengths, b, seed):
    torch.manual_seed(seed)
    model = perturb(make_model(tuple(lengths), width=16, heads=2, depth=1), seed=seed).double().eval()
    inputs, labels = make_inputs(model, b=b, seed=seed, dtype=torch.float64)
    torch.testing.assert_close(
        cached_logits(model, inputs, labels), model(inputs, labels), rtol=1e-5, atol=1e-5
    )


def test_modulation_computed_once_per_generation(monkeypatch):
    model = perturb(make_model()).eval()
    inputs, labels = make_inputs(model)
    calls = []
    original = model._modulations
    monkeypatch.setattr(model, "_modulations", lambda cond: calls.append(1) or original(cond))
    positions = model.unit.position_embedding
    monkeypatch.setattr(model.unit, "position_embedding", lambda: calls.append(2) or positions())
    cache = model.new_cache(labels.shape[0])
    cached_logits(model, inputs, labels, cache)
    assert calls == [1, 2] and len(cache.modulation) == model.config.depth + 1
    cache.reset()
    assert cache.length == 0 and cache.modulation is None and cache.positions is None


def test_rotary_unit_must_fit_the_heads():
    with pytest.raises(VarkitError, match="even head dim"):
        make_model(width=30, heads=2, rotary=True)
    tokenizer = FakeTokenizer(FakeConfig(schedule=(4,)))
    cls = registry().get("unit", "token")
    unit = cls(cls.Config(position="rope2d"), tokenizer=tokenizer, width=12)
    with pytest.raises(VarkitError, match="cannot rotate heads of 2 channels"):
        ARModel(
            ModelConfig(depth=1, width=12, heads=6),
            unit=unit,
            attention=MathAttention(),
            vocab_size=tokenizer.vocab_size,
            code_dim=tokenizer.code_dim,
        )


def test_cache_is_written_in_place():
    model = make_model().eval()
    inputs, labels = make_inputs(model)
    cache = model.new_cache(labels.shape[0])
    storage = cache.kv.data_ptr()
    cached_logits(model, inputs, labels, cache)
    assert cache.kv.data_ptr() == storage and isinstance(cache, KVCache)
    assert cache.kv.shape == (2, 2, 3, 2, 14, 16)


def test_forward_step_refuses_misuse():
    model = make_model().eval()
    inputs, labels = make_inputs(model)
    cache = model.new_cache(3)
    with pytest.raises(VarkitError, match="in order"):
        model.forward_step(inputs[:, :4], labels, cache, 1)
    with pytest.raises(VarkitError, match="no inputs"):
        model.forward_step(inputs[:, :1], labels, cache, 0)
    model.forward_step(None, labels, cache, 0)
    with pytest.raises(VarkitError, match="step 1 must be"):
        model.forward_step(inputs[:, :3], labels, cache, 1)
    with pytest.raises(VarkitError, match="outside"):
        model.forward_step(None, labels, cache, 3)


def test_bf16_autocast_training_and_cached_steps():
    model = perturb(make_model(backend=registry().get("attention", "sdpa")(), rotary=True)).eval()
    inputs, labels = make_inputs(model)
    reference = model(inputs, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(inputs, labels)
        cached = cached_logits(model, inputs, labels, model.new_cache(3, dtype=torch.bfloat16))
        model.train()
        model(inputs, labels).logsumexp(-1).mean().backward()
    assert full.dtype == cached.dtype == torch.float32
    torch.testing.assert_close(full, reference, rtol=0, atol=0.02)
    torch.testing.assert_close(cached, reference, rtol=0, atol=0.02)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_backends_get_one_dtype_under_autocast():
    # Fused kernels (xformers) refuse mixed q/k/v dtypes; rotation and l2 normalisation
    # promote q and k to float32 while v comes out of a bf16 linear.
    seen = []

    class Strict(varkit.AttentionBackend):
        name = "strict"

        def attend(self, q, k, v, *, mask, scale):
            seen.append((q.dtype, k.dtype, v.dtype))
            return registry().get("attention", "sdpa")().attend(q, k, v, mask=mask, scale=scale)

    model = perturb(make_model(backend=Strict(), rotary=True))
    inputs, labels = make_inputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(inputs, labels).logsumexp(-1).mean().backward()
        cached_logits(model.eval(), inputs, labels, model.new_cache(3, dtype=torch.bfloat16))
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen), set(seen)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("lengths", [(1, 4, 9), (1, 1, 1, 1)])
def test_every_backend_gives_the_same_logits(name, lengths):
    backend = registry().get("attention", name)()
    model = perturb(make_model(lengths)).eval()
    inputs, labels = make_inputs(model)
    reference = model(inputs, labels)
    model.attention = backend
    torch.testing.assert_close(model(inputs, labels), reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached_logits(model, inputs, labels), reference, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------- with real units


@pytest.mark.parametrize(
    "unit_name, options, schedule",
    [
        ("scale", {}, (1, 2, 4)),
        ("token", {}, (4,)),
        ("token", {"position": "rope2d"}, (4,)),
        ("patch", {"k": 2}, (4,)),
    ],
)
def test_real_units_teacher_forcing_matches_generation_steps(unit_name, options, schedule):
    tokenizer = FakeTokenizer(FakeConfig(schedule=schedule))
    cls = registry().get("unit", unit_name)
    width = 32
    unit = cls(cls.Config(**options), tokenizer=tokenizer, width=width)
    config = ModelConfig(depth=2, width=width, heads=2, num_classes=10)
    model = ARModel(
        config,
        unit=unit,
        attention=MathAttention(),
        vocab_size=tokenizer.vocab_size,
        code_dim=tokenizer.code_dim,
    )
    model = perturb(model).double().eval()
    tokenizer.double()
    g = torch.Generator().manual_seed(0)
    codes = [torch.randint(0, tokenizer.vocab_size, (2, h, w), generator=g) for h, w in tokenizer.schedule]
    labels = torch.tensor([1, 10])
    inputs = unit.teacher_forcing(codes, tokenizer)
    full = model(inputs, labels)
    assert full.shape == (2, unit.seq_len, tokenizer.vocab_size)
    # Replay the true codes through the unit's generation API, step by step.
    targets = unit.targets(codes)
    state = unit.start_generation(2, tokenizer)
    cache, x, pos, outs = model.new_cache(2), None, 0, []
    for step, n in enumerate(unit.step_lengths):
        outs.append(model.forward_step(x, labels, cache, step))
        step_codes = targets[:, pos : pos + n]
        x = unit.generation_step(state, step, step_codes, tokenizer.embed(step_codes), tokenizer)
        pos += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- flops


def test_flops_per_image_d16():
    with torch.device("meta"):
        model = ARModel(
            ModelConfig(depth=16),
            unit=FakeUnit(VAR_LENGTHS, 1024),
            attention=MathAttention(),
            vocab_size=4096,
            code_dim=32,
        )
    train, fwd = model.flops_per_image(training=True), model.flops_per_image(training=False)
    assert train == 3 * fwd
    # d16 trains at about 0.9 TFLOP per 256x256 image (0.93 if attention were dense).
    assert train / 1e12 == pytest.approx(0.93, rel=0.05)
    d, l, pairs = 1024, 680, sum(n * sum(VAR_LENGTHS[: i + 1]) for i, n in enumerate(VAR_LENGTHS))
    expected = 16 * (2 * l * 12 * d * d + 4 * pairs * d) + 16 * 12 * d * d + 4 * d * d
    expected += 2 * (l - 1) * 32 * d + 2 * l * d * 4096
    assert fwd == expected
    dense = make_model(VAR_LENGTHS[:3]).flops_per_image(training=False)
    raster = make_model((1,) * 14).flops_per_image(training=False)
    assert raster < dense  # same length, fewer visible pairs under the causal mask
