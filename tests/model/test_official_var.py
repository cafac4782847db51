"""Official VAR transformer checkpoints: architecture, key conversion, arithmetic, refusals.

No release weights are needed: state dicts in the official layout are built from the
key list in ``var_official_state_dicts.json`` (every key and shape of var_d16..d30),
with random values for a small depth and as meta tensors for the real depths.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from varkit.errors import CheckpointError
from varkit.importers.var import convert_official_var, official_model_config, official_sizes
from varkit.masks import BlockCausal
from varkit.model import ARModel
from varkit_plugins.attention import MathAttention
from varkit_plugins.tokenizers.msvq import MSVQ, MSVQConfig
from varkit_plugins.units.scale import NextScale

#: Every key and shape of the release's var_d16..d30 state dicts (names only, no weights).
OFFICIAL = json.loads((Path(__file__).parent / "data" / "var_official_state_dicts.json").read_text())
DEPTHS = (16, 20, 24, 30)
PARAMS = {16: "310M", 20: "601M", 24: "1.03B", 30: "2.01B"}

# A small model in the official layout: depth 2, width 128, 2 heads, scales 1..4.
SMALL = {
    "depth": 2,
    "width": 128,
    "heads": 2,
    "schedule": (1, 2, 3, 4),
    "vocab": 64,
    "code_dim": 8,
    "classes": 10,
}


def _template_keys() -> list[str]:
    """The official d16 keys with block 0 standing for every block (``blocks.{i}.``)."""
    keys = []
    for key in OFFICIAL["var_d16"]:
        if key.startswith("blocks.0."):
            keys.append("blocks.{i}." + key[len("blocks.0.") :])
        elif not key.startswith("blocks."):
            keys.append(key)
    return keys


def official_shapes(*, depth, width, heads, schedule, vocab, code_dim, classes, shared=False) -> dict:
    """Key -> shape of an official state dict of this size, keys following the release's."""
    seq_len, steps, hidden = sum(n * n for n in schedule), len(schedule), 4 * width
    per_key = {
        "pos_start": (1, 1, width),
        "pos_1LC": (1, seq_len, width),
        "lvl_1L": (1, seq_len),
        "attn_bias_for_masking": (1, 1, seq_len, seq_len),
        "word_embed.weight": (width, code_dim),
        "word_embed.bias": (width,),
        "class_emb.weight": (classes + 1, width),
        "lvl_embed.weight": (steps, width),
        "attn.scale_mul_1H11": (1, heads, 1, 1),
        "attn.q_bias": (width,),
        "attn.v_bias": (width,),
        "attn.zero_k_bias": (width,),
        "attn.mat_qkv.weight": (3 * width, width),
        "attn.proj.weight": (width, width),
        "attn.proj.bias": (width,),
        "ffn.fc1.weight": (hidden, width),
        "ffn.fc1.bias": (hidden,),
        "ffn.fc2.weight": (width, hidden),
        "ffn.fc2.bias": (width,),
        "ada_lin.1.weight": (6 * width, width),
        "ada_lin.1.bias": (6 * width,),
        "head_nm.ada_lin.1.weight": (2 * width, width),
        "head_nm.ada_lin.1.bias": (2 * width,),
        "head.weight": (vocab, width),
        "head.bias": (vocab,),
    }
    shapes = {}
    for key in _template_keys():
        if key.startswith("blocks.{i}."):
            leaf = key[len("blocks.{i}.") :]
            if shared and leaf.startswith("ada_lin.1."):
                continue
            for i in range(depth):
                shapes[key.format(i=i)] = per_key[leaf]
            if shared and leaf == "attn.scale_mul_1H11":
                for i in range(depth):
                    shapes[f"blocks.{i}.ada_gss"] = (1, 1, 6, width)
        else:
            shapes[key] = per_key[key]
    if shared:
        shapes["shared_ada_lin.1.weight"] = (6 * width, width)
        shapes["shared_ada_lin.1.bias"] = (6 * width,)
    return shapes


def official_buffers(schedule) -> dict[str, torch.Tensor]:
    levels = torch.repeat_interleave(torch.arange(len(schedule)), torch.tensor([n * n for n in schedule]))
    visible = levels[None, :] <= levels[:, None]
    bias = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    return {"lvl_1L": levels[None], "attn_bias_for_masking": bias[None, None]}


def fake_official_state(seed=0, shared=False, **size) -> dict[str, torch.Tensor]:
    """Random weights in the official layout, with the buffers as the release holds them."""
    size = {**SMALL, **size}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_shapes(**size, shared=shared).items():
        state[key] = torch.randn(shape, generator=g) * 0.1
        if key.endswith("scale_mul_1H11"):
            state[key] = torch.rand(shape, generator=g) * 5.0  # some above ln 100: the cap must act
    for key in state:
        if key.endswith("zero_k_bias"):
            state[key] = torch.zeros_like(state[key])
    state |= official_buffers(size["schedule"])
    return state


def small_tokenizer() -> MSVQ:
    s = SMALL
    schedule = ",".join(map(str, s["schedule"]))
    config = MSVQConfig(
        image_size=64, ch=8, norm_groups=8, code_dim=s["code_dim"], vocab_size=s["vocab"], schedule=schedule
    )
    return MSVQ(config)


def build_model(config, tokenizer) -> ARModel:
    unit = NextScale(NextScale.Config(), tokenizer=tokenizer, width=config.width)
    return ARModel(
        config,
        unit=unit,
        attention=MathAttention(),
        vocab_size=tokenizer.vocab_size,
        code_dim=tokenizer.code_dim,
    )


# ----------------------------------------------------------------------- the key list


def test_fabricated_layout_is_the_release_layout():
    """The small state's keys and shape ranks follow var_d16 exactly (blocks aside)."""
    for depth in DEPTHS:
        width = 64 * depth
        shapes = official_shapes(
            depth=depth,
            width=width,
            heads=depth,
            schedule=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
            vocab=4096,
            code_dim=32,
            classes=1000,
        )
        assert shapes == {k: tuple(v) for k, v in OFFICIAL[f"var_d{depth}"].items()}


@pytest.mark.parametrize("depth", DEPTHS)
def test_release_config_read_off_the_shapes(depth):
    state = {k: torch.empty(v, device="meta") for k, v in OFFICIAL[f"var_d{depth}"].items()}
    config = official_model_config(state)
    assert (config.depth, config.width, config.heads, config.num_classes) == (depth, 64 * depth, depth, 1000)
    assert config.mlp_ratio == 4.0 and config.attn_l2_norm and not config.shared_adaln
    assert config.adaln_gamma_init == {16: 1e-3, 20: 1e-3, 24: 1e-4, 30: 1e-5}[depth]
    assert config.drop_path == pytest.approx(0.1 * depth / 24)
    assert official_sizes(state) == {"vocab_size": 4096, "code_dim": 32, "seq_len": 680, "num_steps": 10}


@pytest.mark.parametrize("depth", DEPTHS)
def test_release_keys_convert_onto_the_model_without_allocating(depth):
    state = {k: torch.empty(v, device="meta") for k, v in OFFICIAL[f"var_d{depth}"].items()}
    converted = convert_official_var(state)
    with torch.device("meta"):
        model = build_model(official_model_config(state), MSVQ(MSVQConfig()))
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == own
    params = sum(p.numel() for p in model.parameters())
    assert params / 1e6 == pytest.approx(OFFICIAL["params_millions"][f"var_d{depth}"], abs=0.01)
    shown = f"{round(params / 1e6)}M" if params < 1e9 else f"{params / 1e9:.2f}B"
    assert shown == PARAMS[depth]


# --------------------------------------------------------------------- small, real values


def reference_logits(state, inputs, labels):
    """VAR's forward written directly on the official keys (from the published arithmetic)."""
    W = state
    d = W["class_emb.weight"].shape[1]
    nh = W["blocks.0.attn.scale_mul_1H11"].shape[1]
    depth = len({k.split(".")[1] for k in W if k.startswith("blocks.")})
    cond = W["class_emb.weight"][labels]  # (b, d)
    sos = cond[:, None] + W["pos_start"]
    words = inputs @ W["word_embed.weight"].T + W["word_embed.bias"]
    x = torch.cat((sos, words), 1) + W["lvl_embed.weight"][W["lvl_1L"][0]][None] + W["pos_1LC"]
    b, l, _ = x.shape

    def ln(t):
        return F.layer_norm(t, (d,), eps=1e-6)

    for i in range(depth):
        p = f"blocks.{i}."
        ada = (F.silu(cond) @ W[p + "ada_lin.1.weight"].T + W[p + "ada_lin.1.bias"]).view(b, 1, 6, d)
        g1, g2, s1, s2, t1, t2 = ada.unbind(2)
        h = ln(x) * (1 + s1) + t1
        qkv_bias = torch.cat((W[p + "attn.q_bias"], W[p + "attn.zero_k_bias"], W[p + "attn.v_bias"]))
        qkv = (
            (h @ W[p + "attn.mat_qkv.weight"].T + qkv_bias).view(b, l, 3, nh, d // nh).permute(2, 0, 3, 1, 4)
        )
        q, k, v = F.normalize(qkv[0], dim=-1), F.normalize(qkv[1], dim=-1), qkv[2]
        q = q * W[p + "attn.scale_mul_1H11"].clamp(max=math.log(100)).exp()
        att = (q @ k.transpose(-1, -2) + W["attn_bias_for_masking"]).softmax(-1) @ v
        att = att.transpose(1, 2).reshape(b, l, d) @ W[p + "attn.proj.weight"].T + W[p + "attn.proj.bias"]
        x = x + g1 * att
        h = ln(x) * (1 + s2) + t2
        h = F.gelu(h @ W[p + "ffn.fc1.weight"].T + W[p + "ffn.fc1.bias"], approximate="tanh")
        x = x + g2 * (h @ W[p + "ffn.fc2.weight"].T + W[p + "ffn.fc2.bias"])
    scale, shift = (
        (F.silu(cond) @ W["head_nm.ada_lin.1.weight"].T + W["head_nm.ada_lin.1.bias"])
        .view(b, 1, 2, d)
        .unbind(2)
    )
    return (ln(x) * (1 + scale) + shift) @ W["head.weight"].T + W["head.bias"]


def test_small_official_state_loads_strictly_and_computes_vars_logits():
    state = fake_official_state()
    config = official_model_config(state)
    assert (config.depth, config.width, config.heads, config.num_classes) == (2, 128, 2, 10)
    model = build_model(config, small_tokenizer())
    model.load_state_dict(convert_official_var(state), strict=True)
    torch.testing.assert_close(
        model.blocks[1].attn.scale_mul, state["blocks.1.attn.scale_mul_1H11"].flatten()
    )
    torch.testing.assert_close(model.unit.pos_embed, state["pos_1LC"])
    model = model.double().eval()
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(3, model.unit.seq_len - 1, SMALL["code_dim"], generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 7, 10])
    expected = reference_logits(
        {k: v.double() if v.is_floating_point() else v for k, v in state.items()}, inputs, labels
    )
    torch.testing.assert_close(model(inputs, labels).double(), expected, rtol=1e-4, atol=1e-4)
    # The mask the model hands the backend is the one the release stored as a bias.
    assert model.unit.mask() == BlockCausal(tuple(n * n for n in SMALL["schedule"]))


def test_shared_adaln_state_is_detected_and_loads():
    state = fake_official_state(shared=True)
    config = official_model_config(state)
    assert config.shared_adaln
    model = build_model(config, small_tokenizer())
    model.load_state_dict(convert_official_var(state), strict=True)
    torch.testing.assert_close(model.blocks[0].adaln_offset, state["blocks.0.ada_gss"].reshape(6, -1))


def test_ddp_prefixed_state_converts():
    state = {"module." + k: v for k, v in fake_official_state().items()}
    model = build_model(official_model_config(state), small_tokenizer())
    model.load_state_dict(convert_official_var(state), strict=True)


# --------------------------------------------------------------------------- refusals


def test_truncated_state_names_the_missing_keys():
    state = fake_official_state()
    for key in ("blocks.1.ffn.fc2.weight", "blocks.1.ffn.fc2.bias", "head.bias"):
        del state[key]
    with pytest.raises(
        CheckpointError, match=r"missing: blocks\.1\.ffn\.fc2\.bias, blocks\.1\.ffn\.fc2\.weight, head\.bias"
    ):
        convert_official_var(state)


def test_mismatched_and_unexpected_keys_are_named():
    state = fake_official_state()
    state["blocks.0.attn.proj.weight"] = torch.zeros(128, 64)
    state["blocks.0.attn.k_bias"] = torch.zeros(128)
    with pytest.raises(CheckpointError) as info:
        convert_official_var(state)
    text = str(info.value)
    assert "unexpected: blocks.0.attn.k_bias" in text
    assert "mismatched shapes: blocks.0.attn.proj.weight: (128, 64), expected (128, 128)" in text


def test_missing_block_is_reported():
    state = {k: v for k, v in fake_official_state(depth=3).items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointError, match=r"lacks every key of blocks \[1\]"):
        official_model_config(state)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda s: s["blocks.1.attn.zero_k_bias"].fill_(0.5), "blocks.1.attn.zero_k_bias is not zero"),
        (lambda s: s["lvl_1L"][0, 3:8].fill_(3), "lvl_1L does not count up"),
        (lambda s: s["attn_bias_for_masking"][0, 0, 0, 5].fill_(0.0), "not the block-causal mask"),
    ],
    ids=["k_bias", "levels", "mask"],
)
def test_buffers_are_checked(corrupt, message):
    state = fake_official_state()
    corrupt(state)
    with pytest.raises(CheckpointError, match=message):
        convert_official_var(state)


def test_not_a_var_checkpoint():
    with pytest.raises(CheckpointError, match="not an official VAR transformer"):
        official_model_config({"encoder.conv_in.weight": torch.zeros(3)})


def test_wrong_tokenizer_is_a_load_error_not_a_silent_success():
    """A converted state only fits a model whose tokenizer has the release's sizes."""
    state = fake_official_state()
    tok = MSVQ(MSVQConfig(image_size=64, ch=8, norm_groups=8, code_dim=4, vocab_size=64, schedule="1,2,3,4"))
    model = build_model(official_model_config(state), tok)
    with pytest.raises(RuntimeError, match=r"word_embed\.weight"):
        model.load_state_dict(convert_official_var(state), strict=True)


# ------------------------------------------------------------------------- end to end


def test_release_files_become_a_pipeline_and_a_pretrained_directory(tmp_path):
    """Files in the release's format -> varkit.from_official_var -> images; import -> from_pretrained."""
    import varkit
    from varkit.importers.var import import_release as import_var
    from varkit_plugins.tokenizers.msvq import official_vae_config

    vae = MSVQ(
        MSVQConfig(
            ch=32,
            num_res_blocks=1,
            code_dim=SMALL["code_dim"],
            vocab_size=SMALL["vocab"],
            schedule="1,2,3,16",
        )
    )
    # The VAE file says how many scales there are; the release's schedule for that many.
    schedule = tuple(h for h, _ in official_vae_config(vae.state_dict()).grids)
    var_state = fake_official_state(schedule=schedule)
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    torch.save(var_state, tmp_path / "var.pth")

    pipe = varkit.from_official_var(tmp_path / "vae.pth", tmp_path / "var.pth")
    assert pipe.model.config.depth == 2 and pipe.model.unit.step_lengths == tuple(n * n for n in schedule)
    torch.testing.assert_close(pipe.model.head.weight, var_state["head.weight"])
    images = pipe.generate([1], seed=0)
    assert images.shape == (1, 3, 256, 256) and images.min() >= 0 and images.max() <= 1

    # `varkit import var` writes a pretrained directory with a model card; it loads through the one call
    out = import_var(tmp_path / "vae.pth", tmp_path / "var.pth", tmp_path / "var-small")
    assert {p.name for p in out.iterdir()} == {
        "README.md",
        "recipe.yaml",
        "model.safetensors",
        "tokenizer.safetensors",
    }
    card = (out / "README.md").read_text()
    assert (
        card.startswith("---\nlibrary_name: varkit\nlicense: mit")
        and "# VAR-d2" in card
        and "Conversion" in card
    )
    loaded = varkit.from_pretrained(out)
    assert loaded.card.license == "mit" and loaded.card.source.endswith("var.pth with vae.pth")
    for mine, theirs in ((loaded.model, pipe.model), (loaded.tokenizer, pipe.tokenizer)):
        expected = theirs.state_dict()
        assert mine.state_dict().keys() == expected.keys()
        for key, value in mine.state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0)

    var_state.pop("blocks.0.attn.q_bias")
    torch.save(var_state, tmp_path / "var.pth")
    with pytest.raises(CheckpointError, match=r"missing: blocks\.0\.attn\.q_bias"):
        varkit.from_official_var(tmp_path / "vae.pth", tmp_path / "var.pth")
