"""The generation loop over every registered unit: KV-cache consistency, guidance, seeds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.tiny import tiny_model, tokenizer_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from varkit.errors import VarkitError
from varkit.generation import generate_codes, generate_images
from varkit.plugins import registry

UNITS = [entry.name for entry in registry() if entry.kind == "unit"]
VARIANTS = {"token": [{}, {"position": "rope2d"}], "patch": [{}, {"position": "rope2d", "k": 2}]}
CASES = [
    pytest.param(name, options, id=f"{name}-{options or 'default'}")
    for name in UNITS
    for options in VARIANTS.get(name, [{}])
]
NUM_CLASSES = 4


def _setup(name, options=None, seed=0):
    torch.manual_seed(seed)
    tokenizer = tokenizer_for(name)
    cls = registry().get("unit", name)
    unit = cls(cls.Config(**(options or {})), tokenizer=tokenizer, width=32)
    model = tiny_model(unit, tokenizer, num_classes=NUM_CLASSES).eval()
    return model, tokenizer


def _sampler(name="topk_topp", **options):
    cls = registry().get("sampler", name)
    return cls(cls.Config(**options))


class Recorder:
    """Wraps ``model.forward_step`` and ``model.new_cache`` to see what the loop asks."""

    def __init__(self, model, monkeypatch):
        self.logits, self.labels, self.inputs, self.cache_batches = [], [], [], []
        step, cache = model.forward_step, model.new_cache

        def forward_step(inputs, labels, kv, s):
            out = step(inputs, labels, kv, s)
            self.logits.append(out.clone())
            self.labels.append(labels.clone())
            self.inputs.append(None if inputs is None else inputs.clone())
            return out

        def new_cache(batch, **kwargs):
            self.cache_batches.append(batch)
            return cache(batch, **kwargs)

        monkeypatch.setattr(model, "forward_step", forward_step)
        monkeypatch.setattr(model, "new_cache", new_cache)


@pytest.mark.parametrize(("name", "options"), CASES)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), cfg=st.sampled_from([0.0, 2.0]))
def test_cached_steps_match_the_teacher_forced_pass(name, options, seed, cfg, monkeypatch):
    """Logits of cached generation == the full teacher-forced pass on the generated codes."""
    model, tokenizer = _setup(name, options, seed=seed % 1000)
    rec = Recorder(model, monkeypatch)
    labels = torch.tensor([0, 3, 1])
    sampler = _sampler(cfg=cfg, top_k=0, top_p=0.0)
    codes, _ = generate_codes(
        model, tokenizer, sampler, labels, generator=torch.Generator().manual_seed(seed)
    )
    monkeypatch.undo()
    cached = torch.cat(rec.logits, dim=1)  # (b or 2b, l, v), before guidance
    with torch.no_grad():
        inputs = model.unit.teacher_forcing(codes, tokenizer)
        full = model(inputs, labels)
        torch.testing.assert_close(cached[:3], full, rtol=1e-4, atol=1e-4)
        if cfg > 0:
            uncond = model(inputs, torch.full_like(labels, NUM_CLASSES))
            torch.testing.assert_close(cached[3:], uncond, rtol=1e-4, atol=1e-4)
    assert [tuple(c.shape) for c in codes] == [(3, h, w) for h, w in tokenizer.schedule]


@pytest.mark.parametrize(("name", "options"), CASES)
def test_images_reproducible_for_a_seed(name, options):
    model, tokenizer = _setup(name, options)
    sampler = _sampler(cfg=1.5, top_k=8, top_p=0.9)
    labels = torch.tensor([0, 1, 2, 3, 0])

    def run(seed):
        return generate_images(
            model, tokenizer, sampler, labels, generator=torch.Generator().manual_seed(seed)
        )

    a, b, c = run(5), run(5), run(6)
    size = tokenizer.schedule[-1][0] * tokenizer.downsample
    assert a.shape == (5, 3, size, size) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c), "another seed should give other images"


@pytest.mark.parametrize(("name", "options"), CASES)
def test_greedy_ignores_the_seed(name, options):
    model, tokenizer = _setup(name, options)
    sampler = _sampler("greedy", cfg=1.0)
    labels = torch.tensor([1, 2])
    a, _ = generate_codes(model, tokenizer, sampler, labels, generator=torch.Generator().manual_seed(0))
    b, _ = generate_codes(model, tokenizer, sampler, labels, generator=torch.Generator().manual_seed(99))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", UNITS)
def test_no_guidance_means_no_batch_doubling(name, monkeypatch):
    model, tokenizer = _setup(name)
    rec = Recorder(model, monkeypatch)
    labels = torch.tensor([0, 1, 2])
    generate_codes(model, tokenizer, _sampler(cfg=0.0), labels, generator=torch.Generator().manual_seed(0))
    assert rec.cache_batches == [3]
    assert all(torch.equal(lab, labels) for lab in rec.labels)
    assert len(rec.logits) == len(model.unit.step_lengths)


@pytest.mark.parametrize("name", UNITS)
def test_guidance_doubles_the_batch_with_the_no_class_index(name, monkeypatch):
    model, tokenizer = _setup(name)
    rec = Recorder(model, monkeypatch)
    labels = torch.tensor([0, 1, 2])
    generate_codes(model, tokenizer, _sampler(cfg=1.5), labels, generator=torch.Generator().manual_seed(0))
    assert rec.cache_batches == [6]
    expected = torch.tensor([0, 1, 2, NUM_CLASSES, NUM_CLASSES, NUM_CLASSES])
    assert all(torch.equal(lab, expected) for lab in rec.labels)
    for inputs in rec.inputs[1:]:  # both halves are fed the same (conditional) codes
        torch.testing.assert_close(inputs[:3], inputs[3:])


class SpySampler:
    """Greedy on whatever logits it is given, recording them; a fixed guidance ``t``."""

    name = "spy"

    def __init__(self, t, soft_shift=None, vocab=None):
        self.t, self.seen, self.soft_shift, self.vocab = t, [], soft_shift, vocab

    def guidance_scale(self, step, num_steps):
        return self.t * step / max(1, num_steps - 1)

    def sample(self, logits, *, step, num_steps, generator):
        self.seen.append(logits.clone())
        return logits.argmax(-1)

    def soft_weights(self, logits, *, step, num_steps, generator):
        if self.soft_shift is None:
            return None
        return F.one_hot((logits.argmax(-1) + self.soft_shift) % self.vocab, self.vocab).float()


@pytest.mark.parametrize("name", UNITS)
def test_guidance_arithmetic(name, monkeypatch):
    model, tokenizer = _setup(name)
    rec = Recorder(model, monkeypatch)
    spy = SpySampler(t=2.0)
    labels = torch.tensor([1, 2])
    generate_codes(model, tokenizer, spy, labels, generator=torch.Generator())
    num_steps = len(model.unit.step_lengths)
    for step, (raw, guided) in enumerate(zip(rec.logits, spy.seen)):
        t = 2.0 * step / max(1, num_steps - 1)
        cond, uncond = raw.chunk(2)
        torch.testing.assert_close(guided, (1 + t) * cond - t * uncond)


@pytest.mark.parametrize("name", UNITS)
def test_soft_weights_feed_a_codebook_mixture(name, monkeypatch):
    """With soft weights, the inputs of later steps are ``weights @ codebook``."""
    model, tokenizer = _setup(name)
    rec = Recorder(model, monkeypatch)
    spy = SpySampler(t=0.0, soft_shift=1, vocab=tokenizer.vocab_size)  # one-hot on code + 1
    labels = torch.tensor([1, 2])
    codes, _ = generate_codes(model, tokenizer, spy, labels, generator=torch.Generator())
    shifted = [(c + 1) % tokenizer.vocab_size for c in codes]
    fed = torch.cat([x for x in rec.inputs if x is not None], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(fed, model.unit.teacher_forcing(shifted, tokenizer), rtol=1e-5, atol=1e-5)


def test_gumbel_smooth_mode_runs_and_is_reproducible():
    model, tokenizer = _setup("scale")
    sampler = _sampler("gumbel", cfg=1.5, top_k=8, top_p=0.9)
    labels = torch.tensor([0, 1])
    a = generate_images(model, tokenizer, sampler, labels, generator=torch.Generator().manual_seed(3))
    b = generate_images(model, tokenizer, sampler, labels, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_model_mode_is_restored_and_generation_runs_in_eval():
    model, tokenizer = _setup("scale")
    model.train()
    codes_train, _ = generate_codes(
        model, tokenizer, _sampler("greedy", cfg=1.0), torch.tensor([0, 1]), generator=torch.Generator()
    )
    assert model.training
    model.eval()
    codes_eval, _ = generate_codes(
        model, tokenizer, _sampler("greedy", cfg=1.0), torch.tensor([0, 1]), generator=torch.Generator()
    )
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(codes_train, codes_eval))


@pytest.mark.parametrize(
    "labels",
    [torch.tensor([0, NUM_CLASSES + 1]), torch.tensor([-1]), torch.tensor([[0, 1]]), torch.tensor([0.0])],
)
def test_bad_labels_are_refused(labels):
    model, tokenizer = _setup("token")
    with pytest.raises(VarkitError, match="labels"):
        generate_codes(model, tokenizer, _sampler(), labels, generator=torch.Generator())


def test_unconditional_labels_are_allowed():
    model, tokenizer = _setup("token")
    labels = torch.tensor([NUM_CLASSES, NUM_CLASSES])
    _, f_hat = generate_codes(model, tokenizer, _sampler(cfg=0.0), labels, generator=torch.Generator())
    assert f_hat.shape == (2, tokenizer.code_dim, 4, 4)


@pytest.mark.parametrize("name", UNITS)
def test_bfloat16_autocast(name):
    model, tokenizer = _setup(name)
    labels = torch.tensor([0, 1])
    images = generate_images(
        model,
        tokenizer,
        _sampler(cfg=1.5),
        labels,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.bfloat16,
    )
    assert images.dtype == torch.float32 and images.shape[:2] == (2, 3)
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("name", UNITS)
def test_generated_codes_are_the_units_codes(name):
    model, tokenizer = _setup(name)
    codes, f_hat = generate_codes(
        model, tokenizer, _sampler("greedy", cfg=0.0), torch.tensor([0, 3]), generator=torch.Generator()
    )
    torch.testing.assert_close(f_hat, tokenizer.codes_to_features(codes), rtol=1e-5, atol=1e-5)
    assert all(c.dtype == torch.int64 and c.min() >= 0 and c.max() < tokenizer.vocab_size for c in codes)
    assert [tuple(c.shape) for c in codes] == [(2, h, w) for h, w in tokenizer.schedule]
    # Returned tensors are ordinary ones: training code may use them with autograd.
    loss = tokenizer.codes_to_features(codes).sum()
    loss.backward()


def _real_tokenizer(name, **options):
    cls = registry().get("tokenizer", name)
    small = dict(
        image_size=16, ch=16, ch_mult=(1, 1, 2), num_res_blocks=1, norm_groups=8, code_dim=8, vocab_size=32
    )
    return cls(cls.Config(**small, **options)).eval()


@pytest.mark.parametrize(
    ("unit_name", "tok_name", "tok_options"),
    [("scale", "msvq", {"schedule": (1, 2, 3, 4)}), ("token", "vq", {}), ("patch", "vq", {})],
)
def test_with_the_real_tokenizers(unit_name, tok_name, tok_options, monkeypatch):
    torch.manual_seed(0)
    tokenizer = _real_tokenizer(tok_name, **tok_options)
    model = tiny_model(unit_name, tokenizer, num_classes=NUM_CLASSES).eval()
    sampler = _sampler(cfg=1.5, top_k=8, top_p=0.9)
    labels = torch.tensor([0, 2])
    a = generate_images(model, tokenizer, sampler, labels, generator=torch.Generator().manual_seed(1))
    b = generate_images(model, tokenizer, sampler, labels, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)
    rec = Recorder(model, monkeypatch)
    codes, f_hat = generate_codes(
        model, tokenizer, sampler, labels, generator=torch.Generator().manual_seed(1)
    )
    monkeypatch.undo()
    with torch.no_grad():
        full = model(model.unit.teacher_forcing(codes, tokenizer), labels)
        torch.testing.assert_close(f_hat, tokenizer.codes_to_features(codes), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(rec.logits, dim=1)[:2], full, rtol=1e-4, atol=1e-4)
