"""Structuring plain data into attrs configs: every problem reported, round trips exact."""

from __future__ import annotations

from typing import Literal

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from varkit.config_types import Problem, structure_attrs, unstructure


@attrs.frozen(kw_only=True)
class Inner:
    depth: int = 2
    ratio: float = 4.0


@attrs.frozen(kw_only=True)
class Outer:
    name: str = "x"
    flag: bool = False
    mode: Literal["lin0", "cos"] = "lin0"
    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: tuple[int | tuple[int, int], ...] = (1, 2, (3, 4))
    inner: Inner = Inner()
    steps: int = attrs.field(default=10, validator=attrs.validators.ge(1))


def build(data):
    problems: list[Problem] = []
    return structure_attrs(Outer, data, "sec", problems), problems


def test_every_problem_is_reported_with_its_path():
    _, problems = build(
        {"name": 3, "flag": "yes", "mode": "cosine", "betas": [0.9], "inner": {"depht": 3}, "bogus": 1}
    )
    by_path = {p.path: p.message for p in problems}
    assert set(by_path) == {"sec.name", "sec.flag", "sec.mode", "sec.betas", "sec.inner.depht", "sec.bogus"}
    assert "expected str, got 3 (int)" in by_path["sec.name"]
    assert "did you mean 'cos'?" in by_path["sec.mode"]
    assert "did you mean 'depth'?" in by_path["sec.inner.depht"]


def test_validator_errors_become_problems():
    _, problems = build({"steps": 0})
    assert [p.path for p in problems] == ["sec"]
    assert "steps" in problems[0].message


def test_bool_is_not_an_int_and_ints_are_floats():
    value, problems = build({"steps": True})
    assert problems and problems[0].path == "sec.steps"
    value, problems = build({"lr": 1, "inner": {"ratio": 3}})
    assert not problems and value.lr == 1.0 and isinstance(value.inner.ratio, float)


def test_scientific_strings_are_floats():
    value, problems = build({"lr": "1e-4"})
    assert not problems and value.lr == 1e-4


sizes = st.integers(1, 64)
outers = st.builds(
    Outer,
    name=st.text(max_size=8),
    flag=st.booleans(),
    mode=st.sampled_from(["lin0", "cos"]),
    lr=st.none() | st.floats(1e-6, 1.0),
    betas=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    schedule=st.lists(sizes | st.tuples(sizes, sizes), min_size=1, max_size=6).map(tuple),
    inner=st.builds(Inner, depth=st.integers(1, 40), ratio=st.floats(0.5, 8)),
    steps=st.integers(1, 10**6),
)


@settings(max_examples=60, deadline=None)
@given(outers)
def test_unstructure_then_structure_is_identity(config):
    value, problems = build(unstructure(config))
    assert problems == []
    assert value == config
