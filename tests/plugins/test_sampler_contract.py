"""Contract tests over every registered sampler, plus the top-k/top-p arithmetic."""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from varkit.plugins import registry
from varkit_plugins.samplers import Greedy, Gumbel, TopKTopP, filter_top_k_top_p

SAMPLERS = [entry.name for entry in registry() if entry.kind == "sampler"]


def _logits(b=3, l=5, v=50, seed=0):
    return torch.randn(b, l, v, generator=torch.Generator().manual_seed(seed)) * 3


def _make(name, **options):
    cls = registry().get("sampler", name)
    fields = {f.name for f in attrs.fields(cls.Config)}
    return cls(cls.Config(**{k: val for k, val in options.items() if k in fields}))


def test_builtin_samplers_registered():
    assert {"topk_topp", "greedy", "gumbel"} <= set(SAMPLERS)


@pytest.mark.parametrize("name", SAMPLERS)
def test_shapes_and_range(name):
    sampler = _make(name)
    logits = _logits()
    codes = sampler.sample(logits, step=2, num_steps=4, generator=torch.Generator().manual_seed(1))
    assert codes.shape == (3, 5) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < 50
    weights = sampler.soft_weights(logits, step=2, num_steps=4, generator=torch.Generator().manual_seed(1))
    if weights is not None:
        assert weights.shape == (3, 5, 50)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 5))
        assert weights.min() >= 0


@pytest.mark.parametrize("name", SAMPLERS)
def test_reproducible_with_the_same_seed(name):
    sampler = _make(name, top_k=20, top_p=0.9)
    logits = _logits(b=4, l=16, v=64)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        codes = sampler.sample(logits, step=1, num_steps=3, generator=g)
        weights = sampler.soft_weights(logits, step=1, num_steps=3, generator=g)
        return codes, weights

    (c1, w1), (c2, w2) = run(7), run(7)
    assert torch.equal(c1, c2)
    assert (w1 is None and w2 is None) or torch.equal(w1, w2)


@pytest.mark.parametrize("name", SAMPLERS)
def test_guidance_scale_is_a_float(name):
    sampler = _make(name)
    for s in range(4):
        t = sampler.guidance_scale(s, 4)
        assert isinstance(t, float) and t >= 0


WITH_TOP_K = [n for n in SAMPLERS if "top_k" in attrs.fields_dict(registry().get("sampler", n).Config)]


@pytest.mark.parametrize("name", WITH_TOP_K)
def test_top_k_one_equals_greedy(name):
    sampler = _make(name, top_k=1)
    logits = _logits(b=2, l=30, v=40, seed=3)
    codes = sampler.sample(logits, step=0, num_steps=2, generator=torch.Generator().manual_seed(0))
    greedy = Greedy().sample(logits, step=0, num_steps=2, generator=torch.Generator())
    assert torch.equal(codes, greedy)


def test_linear_guidance_ramp_and_constant():
    ramp = TopKTopP(TopKTopP.Config(cfg=2.0))
    assert [ramp.guidance_scale(s, 5) for s in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert ramp.guidance_scale(0, 1) == 2.0
    const = Greedy(Greedy.Config(cfg=3.0, guidance="constant"))
    assert {const.guidance_scale(s, 7) for s in range(7)} == {3.0}
    assert Greedy(Greedy.Config(cfg=0.0)).guidance_scale(3, 4) == 0.0


def test_config_validation_says_what_to_do():
    with pytest.raises(ValueError, match="top_p must lie in"):
        TopKTopP.Config(top_p=1.5)
    with pytest.raises(ValueError):
        TopKTopP.Config(top_k=-1)
    with pytest.raises(ValueError):
        Greedy.Config(guidance="cosine")


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.4, 0.3, 0.15, 0.1]])
    logits = probs.log()
    for p, expected in [(0.4, {1}), (0.41, {1, 2}), (0.7, {1, 2}), (0.71, {1, 2, 3}), (0.86, {1, 2, 3, 4})]:
        values, index = filter_top_k_top_p(logits, top_k=0, top_p=p)
        kept = set(index[values.isfinite()].tolist())
        assert kept == expected, (p, kept)


def test_top_p_after_top_k_renormalises():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
    # top-2 leaves 0.5/0.8 = 0.625 and 0.375: p = 0.6 keeps only the first
    values, index = filter_top_k_top_p(probs.log(), top_k=2, top_p=0.6)
    assert index[values.isfinite()].tolist() == [0]
    values, index = filter_top_k_top_p(probs.log(), top_k=2, top_p=0.7)
    assert sorted(index[values.isfinite()].tolist()) == [0, 1]


def test_no_filter_returns_the_logits_themselves():
    logits = torch.randn(2, 10)
    for top_k, top_p in [(0, 0.0), (0, 1.0), (10, 0.0), (50, 1.0)]:
        values, index = filter_top_k_top_p(logits, top_k=top_k, top_p=top_p)
        assert index is None and values is logits


def test_samples_follow_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = probs.log().expand(1, 4000, 4)
    codes = TopKTopP(TopKTopP.Config(top_k=0, top_p=0.0)).sample(
        logits, step=0, num_steps=1, generator=torch.Generator().manual_seed(0)
    )
    freq = torch.bincount(codes.flatten(), minlength=4).float() / 4000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(2, 80),
    top_k=st.integers(1, 80),
    top_p=st.sampled_from([0.0, 0.5, 0.9, 0.96, 1.0]),
    name=st.sampled_from(["topk_topp", "gumbel"]),
)
def test_sampled_codes_lie_in_the_top_k_set(seed, vocab, top_k, top_p, name):
    logits = torch.randn(2, 7, vocab, generator=torch.Generator().manual_seed(seed)) * 4
    sampler = _make(name, top_k=top_k, top_p=top_p)
    g = torch.Generator().manual_seed(seed)
    codes = sampler.sample(logits, step=1, num_steps=3, generator=g)
    k = min(top_k, vocab)
    top = logits.topk(k, dim=-1).indices
    assert (top == codes[..., None]).any(-1).all()
    weights = sampler.soft_weights(logits, step=1, num_steps=3, generator=g)
    if weights is not None:  # the soft mixture stays on the same candidates
        outside = torch.ones_like(weights, dtype=torch.bool).scatter_(-1, top, False)
        assert not weights[outside].any()


def test_gumbel_sharpens_towards_the_last_step():
    sampler = Gumbel(Gumbel.Config(top_k=0, top_p=0.0))
    logits = _logits(b=2, l=64, v=30)
    first = sampler.soft_weights(logits, step=0, num_steps=10, generator=torch.Generator().manual_seed(0))
    last = sampler.soft_weights(logits, step=9, num_steps=10, generator=torch.Generator().manual_seed(0))
    assert last.amax(-1).mean() > first.amax(-1).mean()


def test_topk_topp_has_no_soft_weights():
    assert TopKTopP().soft_weights(_logits(), step=0, num_steps=2, generator=torch.Generator()) is None


# ------------------------------------------------------------ the exponential race


def _chi2_quantile(dof: int, z: float) -> float:
    """The chi-square quantile of standard-normal quantile ``z`` (Wilson-Hilferty)."""
    c = 2 / (9 * dof)
    return dof * (1 - c + z * c**0.5) ** 3


@pytest.mark.parametrize(
    ("top_k", "top_p", "temperature", "t"),
    [(0, 0.0, 1.0, 0.0), (5, 0.0, 1.0, 0.0), (0, 0.8, 1.0, 0.0), (6, 0.9, 0.7, 0.0), (0, 0.0, 1.3, 1.5)],
)
def test_the_race_draws_from_the_filtered_softmax(top_k, top_p, temperature, t):
    """Chi-square goodness of fit of 40,000 draws per row against the probabilities the
    filter leaves (guidance and temperature applied first); a code the filter drops is
    never drawn."""
    vocab, n = 10, 40_000
    g = torch.Generator().manual_seed(top_k + 10 * int(top_p * 10))
    cond, uncond = torch.randn(2, 1, vocab, generator=g) * 1.5
    sampler = TopKTopP(TopKTopP.Config(top_k=top_k, top_p=top_p, temperature=temperature))
    codes, weights = sampler.sample_guided(
        cond.expand(n, 1, vocab),
        uncond.expand(n, 1, vocab),
        t=t,
        step=1,
        num_steps=2,
        generator=torch.Generator().manual_seed(1),
    )
    assert weights is None
    guided = ((1 + t) * cond - t * uncond) / temperature  # (1, v)
    values, index = filter_top_k_top_p(guided, top_k=top_k, top_p=top_p)
    probs = values.softmax(-1)
    probs = probs[0] if index is None else torch.zeros(1, vocab).scatter_(-1, index, probs)[0]
    counts = torch.bincount(codes.flatten(), minlength=vocab).double()
    assert counts[probs == 0].sum() == 0
    expected = probs.double() * n
    kept = expected > 0
    chi2 = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())
    dof = int(kept.sum()) - 1
    assert chi2 < _chi2_quantile(dof, 3.29), (chi2, dof)  # p > 0.0005 under the null


def test_fused_guidance_draws_what_the_unfused_rule_draws():
    """sample_guided (guidance fused into the sampler's pass) == guidance, then sample."""
    from varkit.base import apply_guidance

    cond, uncond = _logits(b=4, l=9, v=40, seed=5), _logits(b=4, l=9, v=40, seed=6)
    for name in ("topk_topp", "gumbel"):
        sampler = _make(name, top_k=12, top_p=0.9, temperature=0.8)
        for t in (0.0, 1.5):
            fused = sampler.sample_guided(
                cond, uncond, t=t, step=1, num_steps=3, generator=torch.Generator().manual_seed(2)
            )
            g = torch.Generator().manual_seed(2)
            logits = apply_guidance(cond, uncond, t)
            codes = sampler.sample(logits, step=1, num_steps=3, generator=g)
            weights = sampler.soft_weights(logits, step=1, num_steps=3, generator=g)
            assert torch.equal(fused[0], codes)
            assert (weights is None and fused[1] is None) or torch.allclose(fused[1], weights, atol=1e-6)


def test_no_multinomial(monkeypatch):
    """torch.multinomial reads its result back to the host; the built-in samplers never call it."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.multinomial called")

    monkeypatch.setattr(torch, "multinomial", refuse)
    for name in ("topk_topp", "gumbel", "greedy"):
        sampler = _make(name, top_k=5, top_p=0.9)
        sampler.sample_guided(
            _logits(), _logits(seed=1), t=1.0, step=0, num_steps=2, generator=torch.Generator()
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a CUDA matter")
def test_sampling_does_not_synchronise_with_the_host():
    logits = _logits(b=8, l=64, v=4096).cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name in ("topk_topp", "gumbel"):
            _make(name, top_k=900, top_p=0.96).sample_guided(
                logits, logits.flip(0), t=1.5, step=3, num_steps=10, generator=torch.Generator("cuda")
            )
    finally:
        torch.cuda.set_sync_debug_mode("default")
