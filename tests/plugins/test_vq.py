"""The single-scale ``vq`` tokenizer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from varkit.plugins import registry
from varkit_plugins.tokenizers.quantize import VectorQuantizer
from varkit_plugins.tokenizers.vq import VQ, VQConfig

TINY = dict(image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, code_dim=8, vocab_size=64)


def tiny(**options) -> VQ:
    return VQ(VQConfig(**(TINY | options))).eval()


def test_registered_under_its_name():
    assert registry().get("tokenizer", "vq") is VQ


def test_defaults_share_the_official_backbone_on_meta():
    with torch.device("meta"):
        tok = VQ()
    assert tok.schedule == ((16, 16),) and (tok.vocab_size, tok.code_dim, tok.downsample) == (4096, 32, 16)
    # the backbone's keys are those of msvq; the quantiser keeps only its codebook
    keys = set(tok.state_dict())
    assert "quantize.embedding.weight" in keys and not any(
        k.startswith("quantize.") and "embedding" not in k for k in keys
    )


@pytest.mark.parametrize("l2_norm", [False, True])
def test_one_code_map_and_decode(l2_norm):
    tok = tiny(l2_norm=l2_norm, image_width=24)
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    (codes,) = tok.encode(x)
    assert codes.shape == (2, 8, 12) and codes.dtype == torch.int64
    out = tok.decode([codes])
    assert out.shape == (2, 3, 16, 24) and out.abs().max() <= 1
    assert torch.equal(out, tok.decode(tok.encode(x)))
    assert tok.teacher_forcing_inputs([codes]) == []
    with pytest.raises(NotImplementedError, match="single scale"):
        tok.next_input(tok.codes_to_features([codes]), 0)


def test_l2_norm_codebook_rows_are_unit_vectors():
    tok = tiny(l2_norm=True)
    torch.testing.assert_close(tok.codebook.norm(dim=1), torch.ones(64))
    codes = torch.randint(0, 64, (2, 8, 8))
    f_hat = tok.codes_to_features([codes])
    torch.testing.assert_close(f_hat.norm(dim=1), torch.ones(2, 8, 8))


@settings(max_examples=10, deadline=None)
@given(
    vocab=st.integers(2, 64),
    dim=st.integers(2, 16),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    l2_norm=st.booleans(),
    scale=st.floats(0.5, 4.0),
    seed=st.integers(0, 10**6),
)
def test_codebook_entries_quantise_to_themselves(vocab, dim, h, w, l2_norm, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    q = VectorQuantizer(vocab_size=vocab, code_dim=dim, l2_norm=l2_norm, restart_after=0)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.randn(vocab, dim, generator=gen))
    codes = torch.randint(0, vocab, (2, h, w), generator=gen)
    f = q.embed_map(codes)
    if l2_norm:
        f = f * scale  # the lookup is by direction: the length of a feature does not matter
    (got,), quantised = q.quantize(f)
    assert torch.equal(got, codes)
    torch.testing.assert_close(quantised, q.embed_map(codes))


def test_unit_for_a_single_scale_tokenizer_only():
    from varkit_plugins.units.scale import NextScale

    assert NextScale.check_tokenizer(tiny())  # next-scale needs several scales
