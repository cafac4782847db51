"""Scale schedules (varkit.scales): properties of the defaults, errors, recipe overrides."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from varkit import recipe as recipe_mod
from varkit import scales as schedule
from varkit.errors import RecipeError

HERE = Path(__file__).parent / "recipes"

sides = st.integers(1, 64)


def strictly_growing(grids) -> bool:
    return all(
        h1 >= h0 and w1 >= w0 and (h1, w1) != (h0, w0) for (h0, w0), (h1, w1) in itertools.pairwise(grids)
    )


@settings(max_examples=60, deadline=None)
@given(side=sides, data=st.data())
def test_square_defaults_grow_end_at_the_grid_and_count_tokens(side, data):
    n = data.draw(st.integers(1, min(side, 12)))
    grids = schedule.default(side, n)
    assert len(grids) == n
    assert grids[-1] == (side, side) and grids[0][0] >= 1
    assert all(h == w for h, w in grids)
    assert strictly_growing(grids)
    assert schedule.num_tokens(grids) == sum(h * w for h, w in grids)
    assert schedule.validate(grids, (side, side)) == []


@settings(max_examples=60, deadline=None)
@given(h=sides, w=sides)
def test_non_square_defaults_end_at_the_grid(h, w):
    grids = schedule.default((h, w))
    assert grids[-1] == (h, w)
    assert strictly_growing(grids)
    assert all(1 <= gh <= h and 1 <= gw <= w for gh, gw in grids)
    assert schedule.check(grids, (h, w)) == grids


def test_the_releases_schedules():
    assert schedule.default(16) == tuple((s, s) for s in schedule.VAR_256)
    assert schedule.num_tokens(schedule.default(16)) == 680
    assert schedule.default(32) == tuple((s, s) for s in schedule.VAR_512)


@settings(max_examples=40, deadline=None)
@given(spec=st.lists(st.one_of(sides, st.tuples(sides, sides)), min_size=1, max_size=8))
def test_parse_round_trips_ints_and_pairs(spec):
    grids = schedule.parse(spec)
    assert len(grids) == len(spec)
    for entry, grid in zip(spec, grids, strict=True):
        assert grid == ((entry, entry) if isinstance(entry, int) else tuple(entry))


@settings(max_examples=40, deadline=None)
@given(grids=st.lists(st.tuples(sides, sides), min_size=2, max_size=8))
def test_validate_finds_what_does_not_grow(grids):
    problems = schedule.validate(grids)
    assert (problems == []) == strictly_growing(grids)


@pytest.mark.parametrize(
    ("grids", "latent", "message"),
    [
        ([], None, "empty"),
        ([(1, 1), (2, 2), (2, 2)], None, "grow from coarse to fine"),
        ([(1, 1), (4, 4), (2, 2)], None, "4x4 is followed by 2x2"),
        ([(1, 2), (2, 1)], None, "grow"),
        ([(0, 0), (2, 2)], None, "below 1"),
        ([(1, 1), (2, 2)], (4, 4), "end the schedule at the latent grid"),
    ],
)
def test_errors_say_what_is_wrong(grids, latent, message):
    with pytest.raises(RecipeError, match=message):
        schedule.check(grids, latent)


@pytest.mark.parametrize("entry", [True, "3", [1, 2, 3], 2.5])
def test_parse_refuses_what_is_not_a_size(entry):
    with pytest.raises(RecipeError, match="not a size"):
        schedule.parse([1, entry])


def test_too_many_scales_for_the_grid():
    with pytest.raises(RecipeError, match=r"1\.\.4 scales"):
        schedule.default(4, 5)


# a tokenizer with a 4×4 latent: 32 px images, 8× down (cheap to build)
SMALL = [
    "tokenizer.image_size=32",
    "tokenizer.ch=16",
    "tokenizer.ch_mult=[1,1,2,2]",
    "tokenizer.norm_groups=8",
    "data.resolution=32",
]


def test_recipe_override_sets_the_schedule_and_round_trips():
    r = recipe_mod.load(HERE / "base.yaml", [*SMALL, "tokenizer.schedule=[1,2,4]"])
    assert r.tokenizer.config.grids == ((1, 1), (2, 2), (4, 4))
    again = recipe_mod.from_dict(r.to_dict())
    assert again == r
    as_text = recipe_mod.load(HERE / "base.yaml", [*SMALL, "tokenizer.schedule='1,2,4'"])
    assert as_text.tokenizer.config.grids == r.tokenizer.config.grids


def test_recipe_override_with_a_non_square_schedule():
    r = recipe_mod.load(HERE / "base.yaml", [*SMALL, "tokenizer.schedule=[[1,1],[2,3],[4,4]]"])
    assert r.tokenizer.config.grids == ((1, 1), (2, 3), (4, 4))
    assert recipe_mod.from_dict(r.to_dict()) == r


def test_recipe_schedule_that_misses_the_grid_is_a_recipe_error():
    with pytest.raises(RecipeError, match=r"tokenizer.*latent grid is 4x4"):
        recipe_mod.load(HERE / "base.yaml", [*SMALL, "tokenizer.schedule=[1,2]"])
