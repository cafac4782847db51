"""Recipes: inheritance, overrides, validation messages, and exact round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from varkit import recipe as recipe_mod
from varkit.errors import RecipeError

HERE = Path(__file__).parent / "recipes"
REPO = Path(__file__).parents[2]


def problems_of(path, overrides=()):
    with pytest.raises(RecipeError) as info:
        recipe_mod.load(path, overrides)
    return info.value.problems


def test_base_is_extended_key_by_key():
    r = recipe_mod.load(HERE / "child.yaml")
    assert r.seed == 2 and r.model.depth == 3
    assert r.sampler.config.top_k == 50  # from the base
    assert r.sampler.config.top_p == 0.5  # from the child
    assert r.out_dir == "runs/test-base"


def test_overrides_apply_last_and_are_read_as_yaml():
    r = recipe_mod.load(HERE / "child.yaml", ["train.steps=20", "train.lr=3e-4", "out_dir=/tmp/x", "seed=7"])
    assert (r.train.steps, r.train.lr, r.out_dir, r.seed) == (20, 3e-4, "/tmp/x", 7)


def test_choosing_another_plugin_drops_the_old_plugins_options():
    r = recipe_mod.load(HERE / "child.yaml", ["sampler.name=greedy"])
    assert r.sampler.name == "greedy"


def test_every_problem_is_reported_with_file_line_and_closest_match():
    problems = problems_of(HERE / "bad_keys.yaml", ["model.width=wide"])
    text = "\n".join(problems)
    assert len(problems) == 4, text
    path = str(HERE / "bad_keys.yaml")
    assert f"{path}:3: model.depht: unknown key 'depht' (did you mean 'depth'?)" in text
    assert f"{path}:5: train.steps: expected int, got 'many' (str)" in text
    assert f"{path}:7: sampler.name: unknown sampler 'topk_top' (did you mean 'topk_topp'?)" in text
    assert "The samplers registered are: " in text
    assert "command line: model.width: expected int or null, got 'wide' (str)" in text or (
        "command line: model.width:" in text
    )


def test_yaml_syntax_error_names_file_and_line():
    (problem,) = problems_of(HERE / "bad_yaml.yaml")
    assert problem.startswith(f"{HERE / 'bad_yaml.yaml'}:3: YAML syntax error")


def test_missing_file_suggests_the_closest_recipe():
    (problem,) = problems_of(HERE / "chlid.yaml")
    assert "recipe file not found (did you mean 'child.yaml'?)" in problem


def test_unknown_section_and_bad_override():
    problems = problems_of(HERE / "base.yaml", ["trian.steps=3"])
    assert any("unknown section 'trian' (did you mean 'train'?)" in p for p in problems)
    with pytest.raises(RecipeError, match=r"not of the form key\.path=value"):
        recipe_mod.load(HERE / "base.yaml", ["train.steps"])


def test_schedule_must_end_at_the_latent_grid():
    problems = problems_of(HERE / "base.yaml", ["tokenizer.schedule=[1,2,4,8]"])
    assert any("tokenizer" in p and "latent" in p for p in problems), problems


def test_unit_must_accept_the_tokenizer():
    problems = problems_of(HERE / "base.yaml", ["tokenizer.name=vq"])
    assert any(p.split(": ")[1] == "unit.name" for p in problems), problems


def test_resolved_recipe_round_trips():
    r = recipe_mod.load(HERE / "child.yaml")
    again = recipe_mod.from_dict(r.to_dict())
    assert again == r
    assert recipe_mod.from_dict(recipe_mod.dump_yaml and r.to_dict()) == r


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_round_trips(path):
    if path.name.startswith("_"):
        pytest.skip("a base fragment, validated through the recipes that extend it")
    r = recipe_mod.load(path)
    assert recipe_mod.from_dict(r.to_dict()) == r


overrides = st.fixed_dictionaries(
    {},
    optional={
        "seed": st.integers(0, 2**31 - 1),
        "model.depth": st.integers(1, 30),
        "train.steps": st.integers(1, 10**6),
        "train.lr": st.floats(1e-6, 1e-2),
        "sampler.cfg": st.floats(0, 10),
        "sampler.top_k": st.integers(0, 4096),
        "sampler.top_p": st.floats(0.01, 1.0),
        "out_dir": st.text(alphabet="abcdefgh_/", min_size=1, max_size=12),
    },
)


@settings(max_examples=30, deadline=None)
@given(overrides)
def test_load_resolve_load_is_identity(values):
    args = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in values.items()]
    r = recipe_mod.load(HERE / "child.yaml", args)
    for key, value in values.items():
        section, _, field = key.partition(".")
        got = (
            getattr(r, section)
            if not field
            else getattr(getattr(r, section).config if section == "sampler" else getattr(r, section), field)
        )
        assert got == pytest.approx(value) if isinstance(value, float) else got == value
    text = recipe_mod.dump_yaml(r.to_dict())
    import yaml

    assert recipe_mod.from_dict(yaml.safe_load(text)) == r
