"""Every recipe in recipes/ validates, and the VAR recipes carry the release's values."""

from __future__ import annotations

from pathlib import Path

import pytest

from varkit import recipe as recipe_mod

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    recipe = recipe_mod.load(path)
    # The resolved form loads back to the same recipe.
    again = recipe_mod.from_dict(recipe.to_dict(), source=str(path))
    assert again.to_dict() == recipe.to_dict()


# depth, epochs, global batch, base lr, final lr ratio, AdaLN gamma init, weight decay end
RELEASE = {
    "var_d16": (16, 200, 768, 1e-4, 0.1, 1e-3, None),
    "var_d20": (20, 250, 768, 1e-4, 0.1, 1e-3, None),
    "var_d24": (24, 350, 768, 8e-5, 0.01, 1e-4, None),
    "var_d30": (30, 350, 1024, 8e-5, 0.01, 1e-5, 0.08),
}


@pytest.mark.parametrize("name", sorted(RELEASE))
def test_var_recipes_match_the_release(name):
    r = recipe_mod.load(RECIPES[0].parent / f"{name}.yaml")
    depth, epochs, batch, base_lr, wpe, alng, wd_end = RELEASE[name]
    assert (r.model.depth, r.model.width, r.model.heads) == (depth, 64 * depth, depth)
    assert r.train.epochs == epochs and r.train.batch_size == batch
    assert r.train.base_lr == pytest.approx(base_lr) and r.train.final_lr_ratio == pytest.approx(wpe)
    assert r.model.adaln_gamma_init == pytest.approx(alng)
    assert r.train.weight_decay_end == wd_end
    assert r.train.precision == "fp16" and r.train.schedule == "lin0" and r.train.grad_clip == 2.0
    assert r.model.drop_path == pytest.approx(0.1 * depth / 24)
    assert (r.tokenizer.name, r.unit.name) == ("msvq", "scale")
    assert r.tokenizer.config.vocab_size == 4096 and r.tokenizer.config.code_dim == 32
    assert r.sampler.config.top_k == 900 and r.sampler.config.top_p == pytest.approx(0.96)


def test_var_recipes_train_from_code_shards_written_before_training():
    for name in RELEASE:
        r = recipe_mod.load(RECIPES[0].parent / f"{name}.yaml")
        assert r.data.source == "codes" and r.data.codes.endswith(".tar") and r.data.val_shards
    header = (RECIPES[0].parent / "var_base.yaml").read_text()
    assert "varkit shards --tokenize recipes/var_d16.yaml" in header and "--crops 5" in header
