"""`varkit validate` checks what a recipe names (shards, weights) without running anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from varkit import recipe as recipe_mod
from varkit.build import build_tokenizer
from varkit.cli import main
from varkit.data.shards import ShardSink

HERE = Path(__file__).parent / "recipes"
SMALL = [
    "tokenizer.image_size=16",
    "tokenizer.ch=16",
    "tokenizer.ch_mult=[1,2,2]",
    "tokenizer.num_res_blocks=1",
    "tokenizer.norm_groups=8",
    "tokenizer.vocab_size=32",
    "tokenizer.code_dim=8",
    "tokenizer.schedule=[1,2,4]",
    "data.resolution=16",
]


def validate(capsys, *overrides, schema_only=False):
    argv = ["validate", str(HERE / "child.yaml"), *SMALL, *overrides]
    code = main([*argv, "--schema-only"] if schema_only else argv)
    out, err = capsys.readouterr()
    return code, out + err


@pytest.fixture
def shards(tmp_path) -> str:
    sink = ShardSink(tmp_path / "shards", prefix="train")
    for i in range(3):
        sink.write(f"{i}", {"png": b"x", "cls": b"0"})
    return sink.close().pattern


def test_missing_shards_are_found_before_anything_runs(capsys, tmp_path, shards):
    missing = shards.replace("000000}", "000004}")
    code, text = validate(capsys, "data.source=shards", f"data.train_shards={missing}")
    assert code == 2 and "data.train_shards: 4 of the 5 shards" in text and "Traceback" not in text
    code, text = validate(
        capsys, "data.source=shards", f"data.train_shards={shards}", f"data.val_shards={tmp_path}/v.tar"
    )
    assert code == 2 and "data.val_shards: no shard of" in text
    assert validate(capsys, "data.source=shards", f"data.train_shards={missing}", schema_only=True)[0] == 0
    assert validate(capsys, "data.source=shards", f"data.train_shards={shards}")[0] == 0


def test_image_shards_where_codes_are_wanted(capsys, shards):
    code, text = validate(capsys, "data.source=codes", f"data.codes={shards}")
    assert code == 2 and "holds images, not codes" in text


def test_a_pipe_pattern_is_not_run(capsys, tmp_path):
    marker = tmp_path / "ran"
    code, _ = validate(capsys, "data.source=shards", f"data.train_shards=pipe:touch {marker}")
    assert code == 0 and not marker.exists()


def _tokenizer(*overrides):
    keys = {o.split("=")[0] for o in overrides}
    small = [o for o in SMALL if o.split("=")[0] not in keys]
    return build_tokenizer(recipe_mod.load(HERE / "child.yaml", [*small, *overrides]))


def test_tokenizer_weights_exist_and_fit(capsys, tmp_path):
    code, text = validate(capsys, f"tokenizer.weights={tmp_path}/vae.pth")
    assert code == 2 and "tokenizer.weights: tokenizer weights file" in text and "does not exist" in text

    good = tmp_path / "good.safetensors"
    save_file(_tokenizer().state_dict(), good)
    assert validate(capsys, f"tokenizer.weights={good}") == (0, f"{HERE / 'child.yaml'}: ok\n")

    other = tmp_path / "other.pth"
    torch.save(_tokenizer("tokenizer.vocab_size=64").state_dict(), other)
    code, text = validate(capsys, f"tokenizer.weights={other}")
    assert (
        code == 2
        and "mismatched shapes:" in text
        and "quantize.embedding.weight: checkpoint (64, 8) vs model (32, 8)" in text
    )

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(np.random.default_rng(0).bytes(300))
    code, text = validate(capsys, f"tokenizer.weights={garbage}")
    assert code == 2 and "not a complete safetensors file" in text
