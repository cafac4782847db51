"""Recipes that used to slip through or crash: every one is now a one-paragraph error."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch

from varkit import recipe as recipe_mod
from varkit.cli import main
from varkit.errors import RecipeError

HERE = Path(__file__).parent / "recipes"
REPO = Path(__file__).parents[2]


def problems(path, overrides=()):
    with pytest.raises(RecipeError) as info:
        recipe_mod.load(path, overrides)
    return "\n".join(info.value.problems)


def write(tmp_path, text: str | bytes, name="r.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(f"base: {HERE / 'base.yaml'}\n{text}")
    return path


# ------------------------------------------------------------ a key given twice


def test_a_key_given_twice_on_the_command_line_shows_both_values():
    text = problems(HERE / "child.yaml", ["train.steps=5", "train.steps=7"])
    assert "command line: train.steps: given twice, as '5', '7'; give it once" in text


def test_an_unquoted_brace_pattern_is_caught_with_the_fix(tmp_path):
    shards = tmp_path / "s"
    shards.mkdir()
    # What bash makes of data.train_shards=DIR/train-{000000..000002}.tar left unquoted:
    words = subprocess.run(
        ["bash", "-c", f"printf '%s\\n' data.train_shards={shards}/train-{{000000..000002}}.tar"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(words) == 3
    text = problems(HERE / "child.yaml", words)
    assert "data.train_shards: given 3 times" in text
    assert "brace pattern that the shell expanded" in text and "quote it" in text


def test_the_plugin_shorthand_counts_as_its_name():
    text = problems(HERE / "child.yaml", ["sampler=greedy", "sampler.name=gumbel"])
    assert "sampler.name: given twice" in text


# --------------------------------------------------------------- YAML itself


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "seed: !!python/object/apply:os.system ['touch x']\n",
            "YAML tag !!python/object/apply:os.system is not allowed",
        ),
        ("seed: !!int abc\n", "'abc' is not a valid !!int value"),
        ("seed: !!float x1\n", "'x1' is not a valid !!float value"),
        ("train:\n  steps: 3\n  steps: 4\n", "train.steps: given twice in one mapping (first at line"),
    ],
)
def test_yaml_that_is_not_plain_data_names_the_line(tmp_path, body, message):
    path = write(tmp_path, body)
    text = problems(path)
    assert message in text and f"{path}:" in text


def test_a_python_tag_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "seed: !!python/object/apply:os.system ['touch ran']\n")
    problems(path)
    assert not (tmp_path / "ran").exists()


def test_a_recipe_that_is_not_utf8(tmp_path):
    path = write(tmp_path, "# caf\xe9 in latin-1\nseed: 1\n".encode("latin-1"))
    assert f"{path}:1: not UTF-8 text (byte 0xe9 at offset 5)" in problems(path)


def test_a_missing_base_names_the_recipe_that_refers_to_it(tmp_path):
    path = tmp_path / "child.yaml"
    path.write_text("seed: 1\nbase: vars_base.yaml\n")
    (tmp_path / "var_base.yaml").write_text("seed: 0\n")
    text = problems(path)
    assert text.startswith(f"{path}:2: base: recipe {tmp_path / 'vars_base.yaml'} not found")
    assert "did you mean 'var_base.yaml'" in text and "relative to the folder" in text


def test_an_override_value_with_a_tag(tmp_path):
    text = problems(HERE / "child.yaml", ["seed=!!int x"])
    assert text == "command line: override 'seed=!!int x': 'x' is not a valid !!int value"


def test_a_corrupt_stored_recipe_says_what_to_do(tmp_path):
    stored = tmp_path / "recipe.yaml"
    stored.write_bytes(b"seed: [1, 2\n")
    with pytest.raises(RecipeError, match="varkit's copy of a run's recipe: restore it"):
        recipe_mod.read_stored(stored)
    stored.write_bytes(b"\xff\xfe")
    with pytest.raises(RecipeError, match="not UTF-8"):
        recipe_mod.read_stored(stored)


def test_a_corrupt_recipe_yaml_in_out_dir_does_not_block_the_run(tmp_path, capsys):
    # out_dir/recipe.yaml only mirrors the recipe of the newest checkpoint, which is what
    # a resumed run is compared with; a damaged copy (and no checkpoint) is rewritten.
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text("model: {depth: [\n")
    code = main(
        ["run", str(HERE / "child.yaml"), f"out_dir={out}", "train.steps=0", "tokenizer_train.steps=0"]
    )
    assert code == 0, capsys.readouterr().err


# ----------------------------------------------------- what run would crash on


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["seed=-1"], "seed: is -1; a seed is an integer in [0, 2^63)"),
        ([f"seed={2**63}"], "a seed is an integer in [0, 2^63)"),
        (["train.lr=.nan"], "train.lr: is NaN"),
        (["train.lr=nan"], "train.lr: is NaN"),
        (["train.batch_size=10", "train.grad_accum=3"], "train.grad_accum: is 3 but train.batch_size 10"),
        (
            ["tokenizer.image_width=128"],
            "tokenizer: works on 256x128 px images, but the data pipeline makes square",
        ),
        (["data.synthetic.seed=-3"], "synthetic.seed is -3"),
    ],
)
def test_what_run_would_crash_on_is_refused_by_validation(overrides, message):
    assert message in problems(HERE / "child.yaml", ["data.resolution=256", *overrides])


def test_a_nan_default_is_not_a_thing_but_inf_passes_through():
    r = recipe_mod.load(HERE / "child.yaml", ["train.grad_clip=.inf"])
    assert math.isinf(r.train.grad_clip)


# ------------------------------------------------------------------ samplers


def test_choosing_another_sampler_keeps_the_options_both_have():
    # topk_topp with cfg 2.0 and top_k 50 (base), top_p 0.5 (child) -> gumbel has all three
    r = recipe_mod.load(HERE / "child.yaml", ["sampler.cfg=2.0", "sampler.name=gumbel"])
    assert (r.sampler.name, r.sampler.config.cfg, r.sampler.config.top_k, r.sampler.config.top_p) == (
        "gumbel",
        2.0,
        50,
        0.5,
    )
    greedy = recipe_mod.load(HERE / "child.yaml", ["sampler=greedy"])
    assert greedy.sampler.name == "greedy"
    assert not {"top_k", "top_p"} & set(greedy.sampler.to_dict())  # options greedy lacks are gone


def test_a_child_recipe_choosing_another_sampler_keeps_the_shared_options(tmp_path):
    path = write(tmp_path, "sampler:\n  name: gumbel\n  top_p: 0.8\n")
    r = recipe_mod.load(path)
    assert (r.sampler.config.top_k, r.sampler.config.top_p) == (50, 0.8)


def test_the_python_api_carries_shared_sampler_options():
    from varkit.build import build_sampler

    recipe = recipe_mod.load(HERE / "child.yaml", ["sampler.cfg=2.0"])
    gumbel = build_sampler(recipe, "gumbel")
    assert (gumbel.name, gumbel.config.cfg, gumbel.config.top_k) == ("gumbel", 2.0, 50)
    assert build_sampler(recipe, "gumbel", top_k=3).config.top_k == 3
    with pytest.raises(RecipeError, match="sampler 'greedy' has no option 'min_p'"):
        build_sampler(recipe, "greedy", min_p=0.1)


def test_validate_prints_every_problem_and_exits_2(capsys):
    assert main(["validate", str(HERE / "child.yaml"), "seed=-1", "train.lr=nan"]) == 2
    err = capsys.readouterr().err
    assert "seed: is -1" in err and "train.lr: is NaN" in err


def test_the_pipeline_carries_shared_sampler_options_and_takes_plugin_options():
    from helpers.tiny import tiny_model, tokenizer_for

    from varkit.pipeline import Pipeline
    from varkit_plugins.samplers import TopKTopP

    tokenizer = tokenizer_for("scale")
    model = tiny_model("scale", tokenizer)
    pipe = Pipeline(tokenizer, model, sampler=TopKTopP(TopKTopP.Config(cfg=2.0, top_k=7)))
    gumbel = pipe.make_sampler("gumbel")
    assert (gumbel.name, gumbel.config.cfg, gumbel.config.top_k) == ("gumbel", 2.0, 7)
    assert pipe.make_sampler("greedy").config.cfg == 2.0
    with pytest.raises(RecipeError, match="has no option 'min_p'"):
        pipe.make_sampler("greedy", min_p=0.1)
    with pytest.raises(RecipeError, match="top_p"):
        pipe.make_sampler(top_p=2.0)  # a bad value is a VarkitError, not a bare ValueError
    hot = pipe.generate([0, 1], seed=0, sampler_options={"temperature": 0.5})
    again = pipe.generate([0, 1], seed=0, sampler_options={"temperature": 0.5})
    assert hot.shape == (2, 3, 16, 16) and torch.equal(hot, again)
