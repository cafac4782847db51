"""Loading the official ``vae_ch160v4096z32.pth`` layout into ``msvq``.

The real file is not needed: the key list and shapes of the release are in
``var_official_state_dicts.json``. The full-size check runs on the meta device (no
memory); the numerical checks use a narrow copy of the same key structure (every
backbone width divided by 10) filled with random values.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from varkit import scales
from varkit.errors import CheckpointError
from varkit_plugins.tokenizers.msvq import MSVQ, official_vae_config

#: Every key and shape of the release's checkpoints (shared with tests/model).
SHAPES_FILE = Path(__file__).parents[1] / "model" / "data" / "var_official_state_dicts.json"


def official_shapes() -> dict[str, list[int]]:
    return json.loads(SHAPES_FILE.read_text())["vae_ch160v4096z32"]


#: Backbone widths of the release and their narrow stand-ins (160 = ch, 1920 = 3 × 640).
NARROW = {160: 16, 320: 32, 640: 64, 1920: 192}


def narrow_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The release's keys with narrow backbone widths and random values."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_shapes().items():
        if key.startswith(("encoder.", "decoder.")):
            shape = [NARROW.get(s, s) for s in shape]
        if key == "quantize.ema_vocab_hit_SV":
            state[key] = torch.rand(shape, generator=gen) * 10
        elif ".norm" in key and key.endswith(".weight"):  # norm1, norm2, norm, norm_out
            state[key] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
            state[key] = torch.randn(shape, generator=gen) / fan_in**0.5
    return state


@pytest.fixture(scope="module")
def narrow():
    state = narrow_state()
    return state, MSVQ.from_release(state, norm_groups=8)


def test_full_size_layout_maps_one_to_one_on_meta():
    shapes = official_shapes()
    meta_state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    config = official_vae_config(meta_state)
    assert (config.ch, config.ch_mult, config.num_res_blocks) == (160, (1, 1, 2, 2, 4), 2)
    assert (config.vocab_size, config.code_dim, config.z_channels, config.quant_conv_kernel) == (
        4096,
        32,
        None,
        3,
    )
    assert (config.phi, config.phi_convs, config.phi_ratio) == ("partial", 4, 0.5)
    assert config.level_attention and config.mid_attention
    assert config.grids == tuple((s, s) for s in scales.VAR_256)
    with torch.device("meta"):
        tok = MSVQ(config)
    own = {k: list(v.shape) for k, v in tok.state_dict().items()}
    assert own == shapes
    # and the loader itself consumes every key without allocating
    loaded = MSVQ.from_release(meta_state, device="meta")
    assert all(p.is_meta for p in loaded.parameters())


def test_narrow_copy_loads_every_key_as_is(narrow):
    state, tok = narrow
    own = tok.state_dict()
    assert set(own) == set(state)
    for key, value in state.items():
        assert torch.equal(own[key], value), key
    assert not tok.training
    assert tok.quantize.code_last_used.device.type == "cpu"


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda s: s.pop("decoder.up.4.attn.2.qkv.bias"), "missing: decoder.up.4.attn.2.qkv.bias"),
        (lambda s: s.__setitem__("quantize.extra", torch.zeros(1)), "unexpected: quantize.extra"),
        (
            lambda s: s.__setitem__("post_quant_conv.bias", torch.zeros(5)),
            "mismatched shapes: post_quant_conv.bias: checkpoint (5,) vs model (32,)",
        ),
        (lambda s: s.pop("quantize.embedding.weight"), "lacks 'quantize.embedding.weight'"),
    ],
)
def test_keys_that_do_not_fit_are_named(edit, named):
    state = narrow_state()
    edit(state)
    with pytest.raises(CheckpointError, match=named.replace("(", r"\(").replace(")", r"\)")):
        MSVQ.from_release(state, norm_groups=8)


def reference_encode(tok: MSVQ, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """VAR's multi-scale quantisation written out from the published arithmetic."""
    ticks = torch.linspace(1 / 12, 1 - 1 / 12, 4, dtype=torch.float64)
    convs = tok.quantize.quant_resi.qresi_ls
    pns = scales.VAR_256
    weight = tok.quantize.embedding.weight.float()
    f = tok.quant_conv(tok.encoder(images)).float()
    rest, f_hat, codes = f.clone(), torch.zeros_like(f), []
    for k, pn in enumerate(pns):
        last = k == len(pns) - 1
        r = rest if last else F.interpolate(rest, size=(pn, pn), mode="area")
        z = r.permute(0, 2, 3, 1).reshape(-1, 32)
        idx = torch.cdist(z.double(), weight.double()).argmin(dim=1)
        codes.append(idx.view(-1, pn, pn))
        h = weight[idx].view(-1, pn, pn, 32).permute(0, 3, 1, 2)
        if not last:
            h = F.interpolate(h, size=(16, 16), mode="bicubic")
        conv = convs[int((ticks - k / 9).abs().argmin())]
        h = 0.5 * h + 0.5 * F.conv2d(h, conv.weight, conv.bias, padding=1)
        f_hat = f_hat + h
        rest = rest - h
    return codes, f_hat


@torch.no_grad()
def test_narrow_copy_encodes_and_decodes_as_the_release(narrow):
    _, tok = narrow
    images = torch.rand(1, 3, 256, 256) * 2 - 1
    codes = tok.encode(images)
    assert [tuple(c.shape) for c in codes] == [(1, s, s) for s in scales.VAR_256]
    ref_codes, ref_f_hat = reference_encode(tok, images)
    # float64 cdist vs the float32 addmm of the release could only differ on a near tie
    for k, (a, b) in enumerate(zip(codes, ref_codes)):
        assert torch.equal(a, b), f"scale {k}"
    torch.testing.assert_close(tok.codes_to_features(codes), ref_f_hat, rtol=1e-5, atol=1e-5)
    out = tok.decode(codes)
    expected = tok.decoder(tok.post_quant_conv(tok.codes_to_features(codes))).clamp(-1, 1)
    assert out.shape == (1, 3, 256, 256) and out.abs().max() <= 1
    torch.testing.assert_close(out, expected)


def test_a_pth_file_loads_through_the_recipe_weights_path(tmp_path, narrow):
    from varkit.loading import load_tokenizer_weights

    state, _ = narrow
    path = tmp_path / "vae_narrow.pth"
    torch.save(state, path)
    tok = MSVQ(official_vae_config(state, norm_groups=8))
    load_tokenizer_weights(tok, path)
    assert torch.equal(tok.quantize.embedding.weight, state["quantize.embedding.weight"])
