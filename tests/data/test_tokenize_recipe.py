"""`varkit shards --tokenize RECIPE`: the VAR recipes' step before training, with the
tokenizer the recipe names in tokenizer.weights (the official VQ-VAE file for VAR)."""

from __future__ import annotations

import torch
import yaml

from varkit.cli import main
from varkit.data.shards import read_index
from varkit_plugins.tokenizers.msvq import MSVQ, MSVQConfig

TINY_MSVQ = {"image_size": 16, "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "norm_groups": 4,
             "vocab_size": 32, "code_dim": 4, "schedule": "1,2,4,8"}  # fmt: skip


def _recipe(tmp_path, weights):
    tokenizer = {"name": "msvq", **TINY_MSVQ} | ({"weights": str(weights)} if weights else {})
    path = tmp_path / "var_tiny.yaml"
    path.write_text(
        yaml.safe_dump({"tokenizer": tokenizer, "unit": {"name": "scale"}, "data": {"resolution": 16}})
    )
    return path


def test_tokenize_with_the_tokenizer_a_recipe_names(image_folder, tmp_path, capsys):
    root, _ = image_folder
    vae = MSVQ(MSVQConfig(**TINY_MSVQ))
    torch.save(vae.state_dict(), tmp_path / "vae.pth")  # a plain state dict, like the official file
    recipe = _recipe(tmp_path, tmp_path / "vae.pth")
    out = tmp_path / "codes"
    argv = ["shards", "--tokenize", str(recipe), str(root), str(out), "--crops", "5", "--no-progress"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert "images   15 (5 crops each)" in capsys.readouterr().out
    (meta,) = read_index(out)["sets"].values()
    assert meta["kind"] == "codes" and meta["crops"] == 5 and meta["vocab_size"] == 32


def test_a_recipe_without_trained_tokenizer_weights_is_refused(image_folder, tmp_path, capsys):
    recipe = _recipe(tmp_path, None)
    argv = ["shards", "--tokenize", str(recipe), str(image_folder[0]), str(tmp_path / "c"), "--device", "cpu"]
    assert main(argv) == 2
    assert "names no tokenizer.weights" in capsys.readouterr().err
