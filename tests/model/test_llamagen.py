"""LlamaGen's release in varkit: parity with the official code, every size's layout, refusals.

The parity tests run the official LlamaGen code (``../shared/reference/LlamaGen-official``)
in its own process (``llamagen_reference.py``): it builds a small VQ and GPT with random
weights, writes them in the release's file layout and saves what it computes. varkit
imports those files and must compute the same codes, decoded images, teacher-forced
logits and generations. They skip when the reference code is absent. The full-size
layout checks need no reference: the keys and shapes of every released size are in
``data/llamagen_official_state_dicts.json`` (made by ``llamagen_reference.py shapes``).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from varkit.build import build_model, build_sampler
from varkit.cli import main
from varkit.config_types import unstructure
from varkit.errors import CheckpointError
from varkit.generation import generate_codes
from varkit.importers import llamagen
from varkit.loading import load_tokenizer_weights
from varkit.recipe import from_dict
from varkit.recipe import load as load_recipe
from varkit.weights import read_state_dict
from varkit_plugins.tokenizers.vq import VQ, convert_llamagen_vq, llamagen_vq_config

HERE = Path(__file__).parent
REFERENCE = HERE.parents[2] / "shared" / "reference" / "LlamaGen-official"
SHAPES = json.loads((HERE / "data" / "llamagen_official_state_dicts.json").read_text())
#: Released sizes: (name, parameters as the README states them).
RELEASED = {"GPT-B": 111e6, "GPT-L": 343e6, "GPT-XL": 775e6, "GPT-XXL": 1.4e9, "GPT-3B": 3.1e9}

needs_reference = pytest.mark.skipif(
    not REFERENCE.is_dir(),
    reason=f"the official LlamaGen code is not at {REFERENCE} (a clone without ../shared/reference)",
)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """Release-layout files of a small VQ and GPT, and what the official code computes with them."""
    if not REFERENCE.is_dir():
        pytest.skip(f"the official LlamaGen code is not at {REFERENCE}")
    out = tmp_path_factory.mktemp("llamagen-official")
    subprocess.run(
        [sys.executable, str(HERE / "llamagen_reference.py"), "parity", str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out, torch.load(out / "results.pt", weights_only=True)


@pytest.fixture(scope="module")
def imported(official):
    out, _ = official
    return llamagen.read_release(out / "vq.pt", out / "gpt.pt", image_size=64, heads=4)


# ------------------------------------------------------------------------------ parity


@needs_reference
def test_codes_and_decoded_images_equal_the_official_vq(official):
    _, ref = official
    # The same weights serve any image size: the VQ check runs at 32 px (2×2 codes).
    out, _ = official
    tok = VQ.from_release(read_state_dict(out / "vq.pt", "VQ"), image_size=32)
    with torch.no_grad():
        codes = tok.encode(ref["images"])
        assert torch.equal(codes[0], ref["codes"])
        decoded = tok.decoder(tok.post_quant_conv(tok.codes_to_features(codes)))  # not clamped, as theirs
    err = (decoded - ref["decoded"]).abs().max() / ref["decoded"].abs().max()
    print(f"LlamaGen VQ decoded images: max |diff| / max |pixel| = {err:.2e}")
    assert err <= 1e-5, f"decoded images differ by {err:.2e} (relative)"
    torch.testing.assert_close(decoded.clamp(-1, 1), tok.decode(codes))


@needs_reference
def test_teacher_forced_logits_equal_the_official_gpt(official, imported):
    _, ref = official
    model, tok = imported.model, imported.tokenizer
    grid = tok.schedule[-1]
    codes = [ref["tf_idx"].view(-1, *grid)]
    with torch.no_grad():
        logits = model(model.unit.teacher_forcing(codes, tok), ref["tf_labels"])
    expected = ref["tf_logits"]
    assert logits.shape == expected.shape
    rel = ((logits - expected).abs().max() / expected.abs().max()).item()
    print(f"LlamaGen teacher-forced logits: max |diff| / max |logit| = {rel:.2e}")
    assert rel <= 1e-4


@needs_reference
@pytest.mark.parametrize(
    ("name", "cfg", "interval"),
    [("greedy_cfg1", 1.0, -1), ("greedy_cfg4", 4.0, -1), ("greedy_cfg4_interval5", 4.0, 5)],
)
def test_greedy_generations_equal_the_official_ones(official, imported, name, cfg, interval):
    _, ref = official
    sampler = build_sampler(None, "llamagen", cfg=cfg, cfg_interval=interval, sample_logits=False)
    codes, _ = generate_codes(
        imported.model, imported.tokenizer, sampler, ref["gen_labels"], generator=torch.Generator()
    )
    assert torch.equal(codes[0].flatten(1), ref[name].long())


@needs_reference
def test_seeded_sampling_draws_the_official_codes(official, imported):
    """top-k, top-p, temperature and guidance in LlamaGen's order keep its random stream on the CPU."""
    _, ref = official
    sampler = build_sampler(None, "llamagen", cfg=2.0, top_k=16, top_p=0.9, temperature=1.3)
    codes, _ = generate_codes(
        imported.model,
        imported.tokenizer,
        sampler,
        ref["gen_labels"],
        generator=torch.Generator().manual_seed(11),
    )
    assert torch.equal(codes[0].flatten(1), ref["sampled"].long())


@needs_reference
def test_every_key_is_consumed_and_the_recipe_is_llamagens(official, imported):
    out, _ = official
    state = read_state_dict(out / "gpt.pt", "GPT")  # weights-only, the stored Namespace allowed
    converted = llamagen.convert_llamagen_gpt(state, imported.model.config)
    assert set(converted) == set(imported.model.state_dict())
    vq_state = read_state_dict(out / "vq.pt", "VQ")
    assert set(imported.tokenizer.state_dict()) == set(convert_llamagen_vq(vq_state)) - {
        "quantize.codebook_used"
    }
    recipe = imported.recipe
    assert (recipe.unit.name, recipe.tokenizer.name, recipe.sampler.name) == ("token", "vq", "llamagen")
    assert recipe.model.conditioning == "prefix" and recipe.tokenizer.config.l2_norm


@needs_reference
def test_import_writes_a_pretrained_directory_that_loads_and_samples(official, tmp_path, capsys):
    out, _ = official
    target = tmp_path / "llamagen-small"
    argv = [
        "import",
        "llamagen",
        "--vq",
        str(out / "vq.pt"),
        "--gpt",
        str(out / "gpt.pt"),
        "--out",
        str(target),
    ]
    assert main([*argv, "--image-size", "64", "--heads", "4"]) == 0
    assert {p.name for p in target.iterdir()} == {
        "README.md",
        "recipe.yaml",
        "model.safetensors",
        "tokenizer.safetensors",
    }
    card = (target / "README.md").read_text()
    assert "license: mit" in card and "varkit import llamagen" in card and "Recipe" in card
    assert (
        main(["sample", str(target), "--classes", "1,5", "--per-class", "1", "--out", str(tmp_path / "s")])
        == 0
    )
    assert (tmp_path / "s" / "samples.npz").is_file()
    # the tokenizer alone, for a recipe's tokenizer.weights
    tok_dir = tmp_path / "vq-only"
    assert main(["import", "llamagen", "--vq", str(out / "vq.pt"), "--out", str(tok_dir)]) == 0
    assert not (tok_dir / "model.safetensors").exists()
    capsys.readouterr()
    assert main(["sample", str(tok_dir), "--per-class", "1", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "tokenizer.weights" in err and err.count("\n") == 1


@needs_reference
def test_the_release_vq_file_loads_as_tokenizer_weights(official):
    out, ref = official
    config = llamagen_vq_config(read_state_dict(out / "vq.pt", "VQ"), image_size=32)
    tok = VQ(config)
    load_tokenizer_weights(tok, out / "vq.pt")  # converted through the plugin's from_release
    with torch.no_grad():
        assert torch.equal(tok.encode(ref["images"])[0], ref["codes"])


# ------------------------------------------------------------------- released sizes


def _meta_state(name: str) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in SHAPES[name].items()}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_every_released_size_maps_one_to_one(name):
    state = _meta_state(name)
    config = llamagen.llamagen_model_config(state)
    depth, width = config.depth, config.width
    assert llamagen.SIZES[(depth, width)][0] == name.removeprefix("GPT-")
    tok_config = llamagen_vq_config(_meta_state("VQ-16"), image_size=384)
    recipe = from_dict(llamagen.llamagen_recipe(tok_config, config, size=None, out_dir="runs/x"))
    with torch.device("meta"):
        tokenizer = VQ(tok_config)
    model = build_model(recipe, tokenizer, empty=True)
    converted = llamagen.convert_llamagen_gpt(state, config)
    own = model.state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in own.items()}
    params = sum(math.prod(v.shape) for v in converted.values())
    assert params == pytest.approx(RELEASED[name], rel=0.02)
    assert model.unit.seq_len == 24 * 24


def test_the_release_vq_maps_one_to_one_on_meta():
    state = _meta_state("VQ-16")
    config = llamagen_vq_config(state)
    assert (config.ch, config.ch_mult, config.z_channels, config.code_dim, config.vocab_size) == (
        128,
        (1, 1, 2, 2, 4),
        256,
        8,
        16384,
    )
    assert config.quant_conv_kernel == 1 and config.l2_norm
    tok = VQ.from_release(state, device="meta")
    assert sum(p.numel() for p in tok.parameters()) == pytest.approx(72e6, rel=0.01)


# ---------------------------------------------------------------------------- refusals


def _write(tmp_path, name, state, wrap=True):
    path = tmp_path / name
    torch.save({"model": state} if wrap else state, path)
    return path


def _small_gpt_state(dim=64, vocab=32, classes=10, hidden=256):
    """A one-layer GPT in the release's key layout, with small shapes."""
    shapes = {
        "cls_embedding.embedding_table.weight": (classes + 1, dim),
        "tok_embeddings.weight": (vocab, dim),
        "layers.0.attention.wqkv.weight": (3 * dim, dim),
        "layers.0.attention.wo.weight": (dim, dim),
        "layers.0.feed_forward.w1.weight": (hidden, dim),
        "layers.0.feed_forward.w3.weight": (hidden, dim),
        "layers.0.feed_forward.w2.weight": (dim, hidden),
        "layers.0.attention_norm.weight": (dim,),
        "layers.0.ffn_norm.weight": (dim,),
        "norm.weight": (dim,),
        "output.weight": (vocab, dim),
    }
    assert set(shapes) == {
        k for k in SHAPES["GPT-B"] if not k.startswith("layers.") or k.startswith("layers.0.")
    }
    return {k: torch.zeros(s) for k, s in shapes.items()}


def test_a_var_file_given_as_llamagen_and_back_is_named(tmp_path, capsys):
    var_like = _write(
        tmp_path,
        "var_d16.pth",
        {"class_emb.weight": torch.zeros(11, 8), "blocks.0.attn.mat_qkv.weight": torch.zeros(24, 8)},
        wrap=False,
    )
    gpt = _write(tmp_path, "c2i_B_256.pt", _small_gpt_state())
    vq_like = _write(
        tmp_path,
        "vq_ds16_c2i.pt",
        {
            "quantize.embedding.weight": torch.zeros(4, 2),
            "encoder.conv_blocks.0.res.0.conv1.weight": torch.zeros(1),
        },
    )
    cases = [
        (["import", "llamagen", "--vq", str(var_like), "--gpt", str(gpt)], "official VAR transformer"),
        (["import", "llamagen", "--vq", str(gpt), "--gpt", str(gpt)], "a LlamaGen GPT"),
        (["import", "var", "--vae", str(vq_like), "--var", str(var_like)], "LlamaGen's VQ tokenizer"),
        (["import", "var", "--vae", str(vq_like), "--var", str(gpt)], "LlamaGen"),
    ]
    for argv, named in cases:
        assert main([*argv, "--out", str(tmp_path / "out")]) == 2, argv
        err = capsys.readouterr().err
        assert named in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_gpt_with_keys_missing_or_foreign_is_named():
    state = _small_gpt_state()
    config = llamagen.llamagen_model_config(state, heads=4)
    state.pop("layers.0.ffn_norm.weight")
    state["layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError, match=r"missing: layers.0.ffn_norm.weight.*unexpected: layers.0.extra.weight"
    ):
        llamagen.convert_llamagen_gpt(state, config)


def test_heads_of_an_unknown_size_must_be_given():
    state = _small_gpt_state()
    with pytest.raises(CheckpointError, match="--heads"):
        llamagen.llamagen_model_config(state)


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("c2i_B_256.pt", 256),
        ("c2i_L_384.pt", 384),
        ("c2i_X_384L.pt", 384),
        ("c2i_3B_384.pt", 384),
        ("gpt.pt", None),
    ],
)
def test_image_size_from_the_file_name(name, size):
    assert llamagen.image_size_of(name) == size


def test_the_llamagen_b_recipe_is_the_release_and_its_training():
    """recipes/llamagen_b.yaml builds what `varkit import llamagen` reads off c2i_B_256.pt, trained as LlamaGen."""
    recipe = load_recipe(Path(__file__).parents[2] / "recipes" / "llamagen_b.yaml")
    assert recipe.model == llamagen.llamagen_model_config(_meta_state("GPT-B"))
    assert recipe.tokenizer.config == llamagen_vq_config(_meta_state("VQ-16"))
    assert {"name": recipe.unit.name, **unstructure(recipe.unit.config)} == llamagen.UNIT
    train = unstructure(recipe.train)
    assert {k: train[k] for k in llamagen.TRAIN} == llamagen.TRAIN
    assert (recipe.sampler.name, recipe.sampler.config.cfg) == ("llamagen", llamagen.CFG["B"])
