"""A recipe stored with a checkpoint never runs a command or chooses where files are written."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml
from _datahelpers import png_bytes

from varkit import recipe as recipe_mod
from varkit.data import build_eval_loader
from varkit.data.shards import ShardSink
from varkit.errors import DataError, RecipeError


def _val_shards(directory: Path) -> str:
    sink = ShardSink(directory, prefix="val")
    rng = np.random.default_rng(0)
    for i in range(4):
        sink.write(
            f"{i:03d}", {"png": png_bytes(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)), "cls": b"1"}
        )
    return sink.close().pattern


def _stored(data: dict, **kw):
    recipe = _tiny_run(Path("run"), None)
    recipe["data"].update(data)
    return recipe_mod.from_dict(recipe, source="ckpt/recipe.yaml", **kw)


def _tiny_run(out: Path, cache: Path) -> dict:
    """One training step of a model of a few thousand parameters on 16 px synthetic images."""
    return {
        "out_dir": str(out),
        "tokenizer": {
            "name": "msvq",
            "image_size": 16,
            "ch": 16,
            "ch_mult": [1, 2, 2],
            "num_res_blocks": 1,
            "norm_groups": 8,
            "level_attention": False,
            "mid_attention": False,
            "vocab_size": 64,
            "code_dim": 8,
            "schedule": [1, 2, 4],
        },
        "unit": {"name": "scale"},
        "model": {"depth": 1, "width": 32, "heads": 2, "num_classes": 4},
        "data": {
            "resolution": 16,
            "num_classes": 4,
            "workers": 0,
            "cache_dir": str(cache),
            "synthetic": {"num_classes": 4, "images_per_class": 8, "val_images_per_class": 1},
        },
        "train": {
            "steps": 1,
            "batch_size": 4,
            "precision": "fp32",
            "checkpoint_minutes": 0,
            "sample_classes": 1,
            "sample_per_class": 1,
        },
        "tokenizer_train": {"steps": 0},
    }


def test_a_stored_pipe_pattern_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    shard = _val_shards(tmp_path).replace("{000000..000000}", "000000")
    command = f"pipe:touch {shlex.quote(str(marker))}; cat {shard}"
    recipe = _stored({"source": "shards", "train_shards": shard, "val_shards": command}, stored=True)
    with pytest.raises(DataError) as info:
        next(iter(build_eval_loader(recipe.data, batch_size=2)))
    assert not marker.exists()
    message = str(info.value)
    assert "data.val_shards of the recipe stored with this checkpoint is a shell command" in message
    assert "pass it on the command line" in message


def test_the_same_pattern_given_by_the_user_runs(tmp_path):
    marker = tmp_path / "ran"
    shard = _val_shards(tmp_path).replace("{000000..000000}", "000000")
    command = f"pipe:touch {shlex.quote(str(marker))}; cat {shard}"
    data = {"source": "shards", "train_shards": shard, "val_shards": "elsewhere.tar"}
    recipe = _stored(data, stored=True, overrides=[f"data.val_shards={command}"])
    assert recipe.data.val_shards == command and "val_shards" not in recipe.data.untrusted
    assert sum(len(b) for b in build_eval_loader(recipe.data, batch_size=2)) == 4
    assert marker.exists()
    # a recipe the user wrote (not stored) is the user's word too
    assert not _stored(data).data.untrusted


def test_a_stored_cache_dir_is_not_written_into(tmp_path):
    cache = tmp_path / "elsewhere"
    recipe = _stored({"cache_dir": str(cache)}, stored=True)
    with pytest.raises(DataError, match="a stored recipe does not choose where files are written"):
        build_eval_loader(recipe.data, batch_size=4)
    assert not cache.exists()
    allowed = _stored({"cache_dir": "x"}, stored=True, overrides=[f"data.cache_dir={cache}"])
    assert build_eval_loader(allowed.data, batch_size=4).samples == 4
    # once it exists, reading it writes nothing, so the stored recipe may read it
    assert build_eval_loader(recipe.data, batch_size=4).samples == 4


def test_a_stored_recipe_cannot_declare_itself_trusted():
    with pytest.raises(RecipeError, match=r"data\.untrusted: unknown key 'untrusted'"):
        _stored({"untrusted": []}, stored=True)
    assert "untrusted" not in _stored({}, stored=True).to_dict()["data"]


def test_varkit_eval_refuses_a_checkpoints_pipe_command(tmp_path, capsys):
    """End to end: a run directory from someone else whose recipe runs a shell command."""
    from varkit.cli import main
    from varkit.train import run

    out = tmp_path / "run"
    run(recipe_mod.from_dict(_tiny_run(out, tmp_path / "cache")))
    capsys.readouterr()  # what training logged (perhaps to a handler another test's main set up)
    shards = _val_shards(tmp_path / "shards")
    marker = tmp_path / "ran"
    for stored in out.rglob("recipe.yaml"):
        recipe = yaml.safe_load(stored.read_text())
        recipe["data"].update(
            source="shards", train_shards=shards, val_shards=f"pipe:touch {marker}; cat /dev/null"
        )
        stored.write_text(yaml.safe_dump(recipe))
    assert main(["eval", str(out), "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "is a shell command" in err and "Traceback" not in err
    assert not marker.exists()
    assert main(["eval", str(out), f"data.val_shards={shards}", "--batch-size", "2"]) == 0
    assert main(["eval", str(out), "model.depth=3"]) == 2
    assert "only data.* keys can be overridden" in capsys.readouterr().err
