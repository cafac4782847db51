"""The API reference renders: docstrings speak markdown (mkdocstrings, Google style), not
reStructuredText roles, and the reference lists what users and plugin authors call."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
DOCS = REPO / "docs"
#: reST roles that mkdocstrings shows as literal text.
ROLE = re.compile(r":(class|func|meth|mod|data|attr|exc|obj|ref):`")


def rendered_objects() -> list[str]:
    """Every ``::: dotted.name`` of the docs pages."""
    return sorted(
        {m for page in DOCS.glob("*.md") for m in re.findall(r"^::: ([\w.]+)", page.read_text(), re.M)}
    )


def resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def docstrings(obj, name: str, seen: set[int]) -> list[tuple[str, str]]:
    """``(qualified name, docstring)`` of ``obj`` and the public members mkdocstrings shows."""
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    out = [(name, inspect.getdoc(obj) or "")] if getattr(obj, "__doc__", None) else []
    if inspect.ismodule(obj) or inspect.isclass(obj):
        for member, value in vars(obj).items():
            if member.startswith("_"):
                continue
            if inspect.ismodule(obj) and getattr(value, "__module__", obj.__name__) != obj.__name__:
                continue  # imported names are not rendered here
            if (
                inspect.isfunction(value)
                or inspect.isclass(value)
                or isinstance(value, property | classmethod | staticmethod)
            ):
                target = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                out += docstrings(target, f"{name}.{member}", seen)
    return out


OBJECTS = rendered_objects()


def test_the_reference_lists_what_users_call():
    for name in (
        "varkit.pipeline.from_official_var",
        "varkit.pipeline.load",
        "varkit.images",
        "varkit.testing",
        "varkit.data.config.register_source",
        "varkit.recipe.from_dict",
    ):
        assert name in OBJECTS, f"docs/api.md does not render {name}"


@pytest.mark.parametrize("dotted", OBJECTS)
def test_rendered_docstrings_have_no_rest_roles(dotted):
    found = [
        f"{name}: {line.strip()}"
        for name, doc in docstrings(resolve(dotted), dotted, set())
        for line in doc.splitlines()
        if ROLE.search(line)
    ]
    assert not found, (
        "reST roles render as literal text; use [`name`][dotted.path] or backticks:\n" + "\n".join(found)
    )
