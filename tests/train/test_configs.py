"""Per-stage training configs, derived model fields, and recipes stored by older runs."""

from __future__ import annotations

import pytest
import yaml
from train_helpers import tiny_recipe_dict

from varkit import recipe as recipe_mod
from varkit.errors import RecipeError
from varkit.recipe.train import RETIRED_TOKENIZER_TRAIN_KEYS, TokenizerTrainConfig, TrainConfig
from varkit.train.rundir import recipe_differences


def _recipe_file(tmp_path, **sections):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path / "run", **sections)))
    return path


@pytest.mark.parametrize("key", RETIRED_TOKENIZER_TRAIN_KEYS)
def test_an_option_the_tokenizer_stage_would_ignore_is_an_unknown_key(tmp_path, key):
    value = {"ema": 0.999, "compile": True, "distributed": "fsdp", "label_smoothing": 0.1}.get(key, 2)
    with pytest.raises(RecipeError) as info:
        recipe_mod.load(_recipe_file(tmp_path), [f"tokenizer_train.{key}={value}"])
    (problem,) = info.value.problems
    assert f"tokenizer_train.{key}: unknown key {key!r}: the tokenizer stage has no such option" in problem
    assert f"(train.{key} is the AR stage's)" in problem
    assert recipe_mod.load(_recipe_file(tmp_path), [f"train.{key}={value}"])  # the AR stage has it


def test_each_section_has_its_own_class():
    r = recipe_mod.from_dict(tiny_recipe_dict("/tmp/x"))
    assert type(r.train) is TrainConfig and type(r.tokenizer_train) is TokenizerTrainConfig
    assert "ema" not in r.to_dict()["tokenizer_train"] and "ema" in r.to_dict()["train"]


def test_compile_takes_a_bool_or_what_to_compile(tmp_path):
    load = lambda value: recipe_mod.load(_recipe_file(tmp_path), [f"train.compile={value}"]).train  # noqa: E731
    assert load("true").compile_mode == "blocks" and load("false").compile_mode is None
    assert load("model").compile_mode == "model" and load("blocks").compile_mode == "blocks"
    with pytest.raises(RecipeError, match=r"train\.compile: expected bool or one of 'blocks', 'model'"):
        load("fast")


def test_a_recipe_stored_by_an_older_run_still_loads_and_still_matches():
    new = recipe_mod.from_dict(tiny_recipe_dict("/tmp/x")).to_dict()
    old = dict(new)
    old["tokenizer_train"] = {"steps": 0, "ema": None, "compile": False, "distributed": "ddp",
                              "label_smoothing": 0.0, "sample_classes": 8, "sample_per_class": 4}  # fmt: skip
    old["train"] = {k: v for k, v in new["train"].items() if k != "activation_checkpointing"}
    stored = recipe_mod.from_dict(old)
    assert stored.tokenizer_train == TokenizerTrainConfig()
    assert recipe_differences(old, new) == []  # missing and retired keys compare as their defaults
    changed = {**new, "train": {**new["train"], "label_smoothing": 0.1}}
    assert recipe_differences(old, changed) == ["train.label_smoothing: 0.0 -> 0.1"]


def test_derived_model_fields_are_resolved_when_built_and_stored_resolved(tmp_path):
    path = _recipe_file(tmp_path, model={"depth": 2, "width": 0, "heads": 0, "drop_path": None})
    r = recipe_mod.load(path)
    assert (r.model.width, r.model.heads) == (128, 2)
    assert r.model.drop_path == pytest.approx(0.1 * 2 / 24)
    stored = r.to_dict()["model"]
    assert (stored["width"], stored["heads"]) == (128, 2) and stored["drop_path"] == r.model.drop_path
    assert recipe_mod.from_dict(r.to_dict()) == r
    with pytest.raises(RecipeError, match=r"model: model\.width 128 is not divisible by model\.heads 3"):
        recipe_mod.load(path, ["model.heads=3"])


def test_the_documented_unknown_key_error_is_what_the_command_prints(capsys, monkeypatch):
    import shlex
    from pathlib import Path

    from varkit.cli import main

    root = Path(__file__).parents[2]
    lines = (root / "docs" / "training.md").read_text().splitlines()
    i = next(
        i for i, line in enumerate(lines) if line.startswith("$ varkit run") and "tokenizer_train.ema" in line
    )
    command, expected = shlex.split(lines[i][2:]), lines[i + 1]
    monkeypatch.chdir(root)
    assert main(command[1:]) == 2
    assert capsys.readouterr().err.strip() == expected
