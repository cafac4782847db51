"""Turning plain YAML values into attrs config classes, collecting every problem.

Configs are attrs classes whose fields carry plain annotations: ``int``, ``float``,
``bool``, ``str``, ``pathlib.Path``, ``X | None``, ``Literal[...]``, ``tuple[T, ...]``,
fixed tuples, ``list[T]``, ``dict[K, V]``, bare ``tuple``/``list``/``dict``,
``collections.abc.Sequence[T]``/``Mapping[K, V]``, ``Any`` and nested attrs classes.
`structure` checks a value against such a class and reports each problem with
its key path, so a recipe with five mistakes gets five messages at once;
`unstructure` is its inverse. `unsupported` says, when a plugin registers,
which of its Config fields the loader could not fill.

A field with ``metadata={"recipe": False}`` is not a recipe key: a recipe cannot set it
and `unstructure` leaves it out.
"""

from __future__ import annotations

import collections.abc
import contextlib
import functools
import math
import pathlib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

import attrs

from varkit.errors import did_you_mean

_MISSING = object()


@attrs.define
class Problem:
    """One validation problem at a key path (``train.lr``)."""

    path: str
    message: str


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every attrs field of ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in attrs.fields(cls)}


def is_recipe_field(field: attrs.Attribute) -> bool:
    """Whether a recipe sets this attrs field (an init field not marked ``recipe: False``)."""
    return field.init and field.metadata.get("recipe", True)


_SCALARS = (bool, int, float, str)
_SEQUENCES = (tuple, list, collections.abc.Sequence)
_MAPPINGS = (dict, collections.abc.Mapping)


def _is_path(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, pathlib.PurePath)


def unsupported(tp: Any) -> str | None:
    """Why the recipe loader cannot fill a field annotated ``tp``, or None when it can."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is type(None) or tp in _SCALARS or _is_path(tp) or tp in _SEQUENCES or tp in _MAPPINGS:
        return None
    if isinstance(tp, type) and attrs.has(tp):
        for name, sub in field_types(tp).items():
            why = unsupported(sub)
            if why is not None:
                return f"{tp.__name__}.{name}: {why}"
        return None
    if origin is Literal:
        bad = [a for a in typing.get_args(tp) if not isinstance(a, _SCALARS) and a is not None]
        return f"Literal values must be plain scalars, not {bad[0]!r}" if bad else None
    if origin in (Union, types.UnionType, tuple, list, dict, *_SEQUENCES, *_MAPPINGS):
        for arg in typing.get_args(tp):
            if arg is Ellipsis:
                continue
            why = unsupported(arg)
            if why is not None:
                return why
        return None
    return (
        f"{getattr(tp, '__name__', tp)!s} is not a type a recipe can hold (use int, float, bool, "
        "str, pathlib.Path, Literal, X | None, tuple, list, dict or a nested attrs class)"
    )


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if _is_path(tp):
        return "a path"
    if tp in _SEQUENCES:
        return "a list"
    if tp in _MAPPINGS:
        return "a mapping"
    if origin in (list, collections.abc.Sequence):
        return f"a list of ({_describe(typing.get_args(tp)[0])})"
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({_describe(args[0])})"
        return "a list of " + str(len(args)) + " items (" + ", ".join(_describe(a) for a in args) + ")"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    if isinstance(tp, type) and attrs.has(tp):
        return "a mapping of options"
    return getattr(tp, "__name__", str(tp))


def _got(value: Any) -> str:
    return f"got {value!r} ({type(value).__name__})"


def structure(tp: Any, value: Any, path: str, problems: list[Problem]) -> Any:
    """Check ``value`` against the annotation ``tp``; returns the converted value.

    On a problem, appends to ``problems`` and returns ``_MISSING`` for that value.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
    elif isinstance(tp, type) and attrs.has(tp):
        return structure_attrs(tp, value, path, problems)
    elif origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[Problem] = []
            out = structure(arg, value, path, trial)
            if not trial:
                return out
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:  # Optional[X]: report X's own, more precise problem
            return structure(non_none[0], value, path, problems)
    elif origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and not isinstance(value, bool):
            return value
        hint = did_you_mean(str(value), [str(c) for c in choices]) if isinstance(value, str) else ""
        problems.append(Problem(path, f"expected {_describe(tp)}, {_got(value)}{hint}"))
        return _MISSING
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, list | tuple):
            items = args[0:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
            if len(items) == len(value):
                before = len(problems)
                out = tuple(
                    structure(t, v, f"{path}[{i}]", problems) for i, (t, v) in enumerate(zip(items, value))
                )
                return out if len(problems) == before else _MISSING
    elif origin in (list, collections.abc.Sequence) or tp in _SEQUENCES:
        (item_t,) = typing.get_args(tp) or (Any,)
        if isinstance(value, list | tuple):
            before = len(problems)
            out = [structure(item_t, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
            if len(problems) > before:
                return _MISSING
            return out if (origin or tp) is list else tuple(out)
    elif origin in (dict, collections.abc.Mapping) or tp in _MAPPINGS:
        key_t, val_t = typing.get_args(tp) or (Any, Any)
        if isinstance(value, Mapping):
            before = len(problems)
            out = {
                structure(key_t, k, path, problems): structure(val_t, v, f"{path}.{k}", problems)
                for k, v in value.items()
            }
            return out if len(problems) == before else _MISSING
    elif _is_path(tp):
        if isinstance(value, str | pathlib.PurePath) and str(value):
            return tp(value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None and math.isnan(number):
            problems.append(Problem(path, "is NaN; give a number"))
            return _MISSING
        if number is not None:
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config annotation {tp!r} at {path} is not supported by the recipe loader")
    problems.append(Problem(path, f"expected {_describe(tp)}, {_got(value)}"))
    return _MISSING


def structure_attrs(cls: type, value: Any, path: str, problems: list[Problem]) -> Any:
    """Build the attrs class ``cls`` from a mapping, reporting unknown keys and bad values."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        problems.append(Problem(path, f"expected a mapping of options, {_got(value)}"))
        return _MISSING
    types_ = field_types(cls)
    fields = {f.name: f for f in attrs.fields(cls)}
    kwargs = {}
    before = len(problems)
    for key, item in value.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields or not is_recipe_field(fields[key]):
            valid = [n for n, f in fields.items() if is_recipe_field(f)]
            problems.append(
                Problem(
                    sub,
                    f"unknown key {key!r}{did_you_mean(str(key), valid)}; valid keys here: {', '.join(valid) or 'none'}",
                )
            )
            continue
        out = structure(types_[key], item, sub, problems)
        if out is not _MISSING:
            kwargs[fields[key].alias or key] = out
    if len(problems) > before:
        return _MISSING
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problems.append(Problem(path or "(top level)", str(exc)))
        return _MISSING


def unstructure(obj: Any) -> Any:
    """The plain-data form of a config (what YAML holds): dicts, lists, scalars."""
    if attrs.has(type(obj)):
        return {
            f.name: unstructure(getattr(obj, f.name)) for f in attrs.fields(type(obj)) if is_recipe_field(f)
        }
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if isinstance(obj, tuple | list):
        return [unstructure(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: unstructure(v) for k, v in obj.items()}
    return obj
