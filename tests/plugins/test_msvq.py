"""The ``msvq`` tokenizer: config, shapes, and the invariants of residual quantisation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from varkit import scales
from varkit.plugins import registry
from varkit_plugins.tokenizers.msvq import MSVQ, MSVQConfig
from varkit_plugins.tokenizers.quantize import MultiScaleQuantizer

#: A tokenizer small enough to build per hypothesis example: 16 px, 2× down, 8×8 latent.
TINY = dict(image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, code_dim=8, vocab_size=64)


def tiny(**options) -> MSVQ:
    return MSVQ(MSVQConfig(**(TINY | options))).eval()


def images(b: int = 2, h: int = 16, w: int = 16) -> torch.Tensor:
    return torch.rand(b, 3, h, w) * 2 - 1


@st.composite
def schedules(draw, latent=(8, 8)):
    """Strictly growing schedules ending at ``latent`` (square or not)."""
    h, w = latent
    n = draw(st.integers(1, min(h, w)))
    hs = [*sorted(draw(st.sets(st.integers(1, h - 1), min_size=n - 1, max_size=n - 1))), h]
    ws = [*sorted(draw(st.sets(st.integers(1, w - 1), min_size=n - 1, max_size=n - 1))), w]
    return [[a, b] for a, b in zip(hs, ws)]


# --------------------------------------------------------------------------- basics


def test_registered_under_its_name():
    assert registry().get("tokenizer", "msvq") is MSVQ


def test_defaults_are_the_official_vae_built_on_meta():
    with torch.device("meta"):
        tok = MSVQ()
    assert tok.schedule == tuple((s, s) for s in scales.VAR_256)
    assert scales.num_tokens(tok.schedule) == 680
    assert (tok.vocab_size, tok.code_dim, tok.downsample) == (4096, 32, 16)
    assert sum(p.numel() for p in tok.parameters()) == pytest.approx(108.95e6, abs=0.01e6)
    assert len(tok.quantize.quant_resi.qresi_ls) == 4
    assert all(p.is_meta for p in tok.parameters())


def test_phi_ticks_of_the_release():
    # K = 10 scales, 4 convs: ticks linspace(1/12, 11/12, 4), nearest to k/9 (the tie at
    # k = 2 resolves as float64 numpy resolves it in the release).
    assert MSVQ(MSVQConfig(**TINY, schedule=[1, 2, 3, 4, 5, 6, 7, 8])).quantize.quant_resi.index == [
        0, 0, 1, 1, 2, 2, 3, 3
    ]  # fmt: skip
    with torch.device("meta"):
        assert MSVQ().quantize.quant_resi.index == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


@pytest.mark.parametrize(("phi", "convs"), [("none", 0), ("shared", 1), ("partial", 3), ("per_scale", 4)])
def test_phi_sharing(phi, convs):
    tok = tiny(schedule=[1, 2, 4, 8], phi=phi, phi_convs=3)
    assert len(tok.quantize.quant_resi.qresi_ls) == convs
    index = tok.quantize.quant_resi.index
    if phi == "none":
        assert index == [None] * 4
    else:
        assert sorted(set(index)) == list(range(convs)) and index == sorted(index)


def test_schedule_string_and_lists_mean_the_same():
    a = MSVQConfig(**TINY, schedule="1, 2, 4x4, 8")
    b = MSVQConfig(**TINY, schedule=[1, 2, [4, 4], 8])
    assert a.grids == b.grids == ((1, 1), (2, 2), (4, 4), (8, 8))
    assert MSVQConfig(**TINY).grids == scales.default(8)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"schedule": [1, 2, 4]}, "latent grid is 8x8"),
        ({"schedule": [1, 4, 2, 8]}, "grow from coarse to fine"),
        ({"schedule": "1,two,8"}, "is not a size"),
        ({"norm_groups": 3}, "norm_groups 3 does not divide"),
        ({"image_size": 17}, "multiples of 2"),
        ({"phi_ratio": 2.0}, "phi_ratio"),
        ({"disc_weight": 0.1, "disc_layers": 4}, "too small for a discriminator"),
    ],
)
def test_bad_configs_say_what_to_do(options, message):
    with pytest.raises(ValueError, match=message):
        MSVQConfig(**(TINY | options))


def test_images_of_the_wrong_size_are_refused():
    with pytest.raises(ValueError, match=r"expects images \(b, 3, 16, 16\)"):
        tiny().encode(images(1, 32, 32))


def test_encode_decode_shapes_and_range():
    tok = tiny(schedule=[1, 2, 3, 4, 6, 8])
    codes = tok.encode(images(3))
    assert [tuple(c.shape) for c in codes] == [(3, s, s) for s in (1, 2, 3, 4, 6, 8)]
    assert all(c.dtype == torch.int64 and c.min() >= 0 and c.max() < 64 for c in codes)
    out = tok.decode(codes)
    assert out.shape == (3, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    assert tok.codebook.shape == (64, 8) and tok.embed(codes[0]).shape == (3, 1, 1, 8)


def test_non_square_images_and_schedule():
    tok = tiny(image_width=24, schedule=[[1, 1], [2, 3], [4, 6], [8, 12]])
    codes = tok.encode(images(2, 16, 24))
    assert [tuple(c.shape[1:]) for c in codes] == [(1, 1), (2, 3), (4, 6), (8, 12)]
    assert tok.decode(codes).shape == (2, 3, 16, 24)
    assert tok.next_input(tok.codes_to_features(codes[:1]), 0).shape == (2, 8, 2, 3)


def test_decode_of_encode_is_deterministic():
    tok, x = tiny(), images(2)
    assert torch.equal(tok.decode(tok.encode(x)), tok.decode(tok.encode(x)))


def test_registering_builds_nothing(monkeypatch):
    import varkit_plugins.tokenizers.msvq as mod

    def boom(*args, **kwargs):
        raise AssertionError("registering must not build the tokenizer")

    monkeypatch.setattr(MSVQ, "__init__", boom)
    seen = []
    mod.varkit_register_tokenizers(register=seen.append)
    assert seen == [MSVQ]


# ---------------------------------------------------------------- residual invariants


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    grids=schedules(),
    phi=st.sampled_from(["none", "shared", "partial", "per_scale"]),
    seed=st.integers(0, 99),
)
def test_features_rebuilt_from_codes_equal_those_of_encoding(grids, phi, seed):
    torch.manual_seed(seed)
    tok = tiny(schedule=grids, phi=phi, phi_convs=2)
    with torch.no_grad():  # random phi convs, so phi is not the identity
        for conv in tok.quantize.quant_resi.qresi_ls:
            conv.weight.normal_(0, 0.1)
    f = tok.encode_features(images(2))
    codes, f_hat = tok.quantize.quantize(f)
    assert [tuple(c.shape[1:]) for c in codes] == [tuple(g) for g in grids]
    assert torch.equal(tok.codes_to_features(codes), f_hat)
    assert f_hat.dtype == torch.float32


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grids=schedules(), seed=st.integers(0, 99))
def test_teacher_forcing_equals_inputs_built_step_by_step(grids, seed):
    torch.manual_seed(seed)
    tok = tiny(schedule=grids)
    codes = [torch.randint(0, 64, (2, h, w)) for h, w in grids]
    at_once = tok.teacher_forcing_inputs(codes)
    # as generation builds them: one scale at a time, from embeddings of the codebook
    f_hat, stepwise = None, []
    for k, code in enumerate(codes[:-1]):
        emb = tok.codebook[code].permute(0, 3, 1, 2)
        f_hat = tok.add_scale(f_hat, k, emb)
        stepwise.append(tok.next_input(f_hat, k))
    assert len(at_once) == len(grids) - 1
    for k, (a, b) in enumerate(zip(at_once, stepwise)):
        assert a.shape == (2, 8, *grids[k + 1])
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_next_input_is_area_downsampling_and_refuses_the_last_scale():
    tok = tiny(schedule=[1, 2, 4, 8])
    f_hat = torch.randn(1, 8, 8, 8)
    expected = f_hat.reshape(1, 8, 2, 4, 2, 4).mean(dim=(3, 5))
    torch.testing.assert_close(tok.next_input(f_hat, 0), expected)
    with pytest.raises(ValueError, match="no next input"):
        tok.next_input(f_hat, 3)


@settings(max_examples=10, deadline=None)
@given(
    vocab=st.integers(2, 64),
    dim=st.integers(2, 16),
    side=st.integers(1, 6),
    seed=st.integers(0, 10**6),
)
def test_codebook_entries_quantise_to_themselves(vocab, dim, side, seed):
    gen = torch.Generator().manual_seed(seed)
    quantizer = MultiScaleQuantizer(
        vocab_size=vocab,
        code_dim=dim,
        grids=[(side, side)],
        phi="partial",
        phi_convs=4,
        phi_ratio=0.5,
        restart_after=0,
    )
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.randn(vocab, dim, generator=gen))
    codes = torch.randint(0, vocab, (2, side, side), generator=gen)
    f = quantizer.embedding.weight[codes].permute(0, 3, 1, 2)
    (got,), _ = quantizer.quantize(f)
    assert torch.equal(got, codes)


def test_coarse_to_fine_lowers_the_residual():
    # Each scale quantises what the coarser ones left over: with a codebook rich enough
    # to fit the features, the error of f_hat shrinks as scales are added.
    torch.manual_seed(0)
    q = MultiScaleQuantizer(
        vocab_size=512, code_dim=4, grids=[(1, 1), (2, 2), (4, 4), (8, 8)], phi="none", phi_convs=4,
        phi_ratio=0.5, restart_after=0,
    )  # fmt: skip
    with torch.no_grad():
        q.embedding.weight.normal_()
    f = torch.nn.functional.interpolate(torch.randn(2, 4, 2, 2), size=(8, 8), mode="bicubic")
    codes, _ = q.quantize(f)
    errors, f_hat = [], None
    with torch.no_grad():
        for k, code in enumerate(codes):
            delta = q.scale_delta(q.embed_map(code), k)
            f_hat = delta if f_hat is None else f_hat + delta
            errors.append(float((f - f_hat).square().mean()))
    assert errors[-1] < errors[0]


def test_codebook_usage_statistics():
    tok = tiny(schedule=[1, 8])
    codes = [torch.zeros(2, 1, 1, dtype=torch.long), torch.arange(128).reshape(2, 8, 8) % 64]
    stats = tok.codebook_usage(codes)
    assert stats["usage/0"] == pytest.approx(1 / 64) and stats["perplexity/0"] == pytest.approx(1.0)
    assert stats["usage/1"] == pytest.approx(1.0) and stats["perplexity/1"] == pytest.approx(64.0, rel=1e-4)
