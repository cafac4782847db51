"""Recipes: YAML files that compose plugins by name and set every option of a run.

A recipe has the sections ``tokenizer``, ``unit``, ``attention``, ``sampler`` (plugin
sections: ``name:`` plus that plugin's ``Config`` fields), ``model``, ``data``,
``train``, ``tokenizer_train`` and ``init`` (pretrained weights to fine-tune), plus
``out_dir`` and ``seed``. ``base: other.yaml``
extends another recipe (paths are relative to the file that names them). Command-line
overrides ``key.path=value`` apply last; values are read as YAML (``train.lr=3e-4``,
``sampler.name=greedy``, ``tokenizer.schedule=[1,2,4]``).

A plugin section that changes ``name`` relative to its base starts afresh: the options
inherited from the base were meant for the other plugin.

:func:`load` validates everything before any heavy work and raises one
:class:`~varkit.errors.RecipeError` listing every problem as
``file:line: key.path: message``.
"""

from __future__ import annotations

import copy
import inspect
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
import yaml

from varkit.config_types import Problem, structure, structure_attrs, unstructure
from varkit.data.config import DataConfig
from varkit.defaults import DEFAULT_PLUGINS
from varkit.errors import RecipeError, VarkitError, did_you_mean
from varkit.model.transformer import ModelConfig
from varkit.plugins import KINDS, registry
from varkit.recipe.finetune import InitConfig
from varkit.recipe.train import TrainConfig

PLUGIN_SECTIONS = ("tokenizer", "unit", "attention", "sampler")
#: Keys a plugin section holds beside the plugin's own Config fields.
SECTION_KEYS = {"tokenizer": ("name", "weights")}
TOP_LEVEL = ("base", "out_dir", "seed", *PLUGIN_SECTIONS, "model", "data", "train", "tokenizer_train", "init")
COMMAND_LINE = "command line"


#: The config class of each section that is not a plugin.
SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "tokenizer_train": TrainConfig,
    "init": InitConfig,
}


@attrs.frozen(kw_only=True)
class PluginSection:
    """A plugin chosen by name, with its built Config."""

    kind: str
    name: str
    config: Any
    #: Tokenizer sections only: weights to start from (a run or checkpoint directory).
    weights: str | None = None

    @property
    def cls(self) -> type:
        return registry().get(self.kind, self.name)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.kind == "tokenizer":
            out["weights"] = self.weights
        out.update(unstructure(self.config))
        return out


@attrs.frozen(kw_only=True)
class Recipe:
    """A validated recipe. Build one with :func:`load` or :func:`from_dict`."""

    out_dir: str
    seed: int
    tokenizer: PluginSection
    unit: PluginSection
    attention: PluginSection
    sampler: PluginSection
    model: Any
    data: Any
    train: Any
    tokenizer_train: Any
    #: Fine-tuning: pretrained weights the AR stage starts from (``init:``).
    init: Any = attrs.field(factory=InitConfig)
    #: The file it was read from (not part of equality or of the resolved dict).
    source: str | None = attrs.field(default=None, eq=False)

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe as plain data; ``from_dict`` of it gives this recipe."""
        out: dict[str, Any] = {"out_dir": self.out_dir, "seed": self.seed}
        for kind in PLUGIN_SECTIONS:
            out[kind] = getattr(self, kind).to_dict()
        for key in ("model", "data", "train", "tokenizer_train", "init"):
            out[key] = unstructure(getattr(self, key))
        return out

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _load_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML; returns the data and the line (1-based) of every key path."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{where}: YAML syntax error: {problem}") from None
    lines: dict[str, int] = {}
    if node is None:
        return {}, lines

    def walk(n: yaml.Node, path: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                sub = f"{path}.{key_node.value}" if path else str(key_node.value)
                lines[sub] = key_node.start_mark.line + 1
                walk(value_node, sub)

    walk(node, "")
    data = yaml.load(text, Loader=_Loader)
    return data, lines


def dump_yaml(data: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=None, width=100)


# ----------------------------------------------------------------------- reading


@attrs.define
class _Tree:
    """Merged raw recipe data, with where each key was set."""

    data: dict[str, Any]
    origin: dict[str, tuple[str, int | None]]  # key path -> (file, line)

    def where(self, path: str) -> str:
        probe = path
        while probe:
            if probe in self.origin:
                file, line = self.origin[probe]
                return f"{file}:{line}" if line else file
            probe = probe.rpartition(".")[0].split("[")[0] if "." in probe else ""
        return self.origin.get("", ("<recipe>", None))[0]


def _read_tree(path: Path, seen: tuple[Path, ...] = ()) -> _Tree:
    source = str(path)
    if not path.is_file():
        hint = ""
        if path.parent.is_dir():
            names = [p.name for p in path.parent.glob("*.yaml")]
            hint = did_you_mean(path.name, names)
        raise RecipeError(f"{source}: recipe file not found{hint}")
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise RecipeError(f"{source}: `base` recipes form a cycle: {chain}")
    data, lines = _load_yaml(path.read_text(), source)
    if not isinstance(data, dict):
        raise RecipeError(f"{source}:1: a recipe must be a mapping of sections, got {type(data).__name__}")
    origin = {key: (source, line) for key, line in lines.items()}
    origin[""] = (source, None)
    base = data.pop("base", None)
    if base is None:
        return _Tree(data, origin)
    if not isinstance(base, str):
        raise RecipeError(f"{source}:{lines.get('base')}: base: expected a recipe path, got {base!r}")
    parent = _read_tree((path.parent / base), (*seen, path.resolve()))
    merged = _merge(parent.data, data, "")
    parent_origin = {k: v for k, v in parent.origin.items() if k}
    parent_origin.update({k: v for k, v in origin.items() if k})
    parent_origin[""] = (source, None)
    return _Tree(merged, parent_origin)


def _merge(base: Any, child: Any, path: str) -> Any:
    if not (isinstance(base, dict) and isinstance(child, dict)):
        return copy.deepcopy(child)
    if path in PLUGIN_SECTIONS and "name" in child and child["name"] != base.get("name"):
        return copy.deepcopy(child)  # another plugin: the base's options were for the old one
    out = copy.deepcopy(base)
    for key, value in child.items():
        out[key] = (
            _merge(out[key], value, f"{path}.{key}" if path else key) if key in out else copy.deepcopy(value)
        )
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> ``(["train", "lr"], 0.0003)``."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(
            f"{COMMAND_LINE}: override {text!r} is not of the form key.path=value (e.g. train.steps=20)"
        )
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{COMMAND_LINE}: override {text!r}: value is not valid YAML: {exc}") from None
    return key.split("."), value


def _apply_override(tree: _Tree, keys: list[str], value: Any) -> None:
    node = tree.data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            path = ".".join(keys[: i + 1])
            raise RecipeError(
                f"{COMMAND_LINE}: {path}: is {child!r}, not a section; cannot set {'.'.join(keys)}"
            )
        node = child
    last = keys[-1]
    if len(keys) == 2 and keys[0] in PLUGIN_SECTIONS and last == "name" and node.get("name") != value:
        # choosing another plugin: keep only the options set on the command line
        keep = {k for k in node if tree.origin.get(f"{keys[0]}.{k}", ("",))[0] == COMMAND_LINE}
        for k in list(node):
            if k not in keep:
                node.pop(k)
    if len(keys) == 1 and keys[0] in PLUGIN_SECTIONS and isinstance(value, str):
        value = {"name": value}  # `sampler=greedy` is short for `sampler.name=greedy`
    node[last] = value
    tree.origin[".".join(keys)] = (COMMAND_LINE, None)


# ---------------------------------------------------------------------- validation


def load(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
    """Read, merge, override and validate a recipe.

    Raises:
        RecipeError: listing every problem as ``file:line: key.path: message``.
    """
    path = Path(path)
    tree = _read_tree(path)
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(tree, keys, value)
    tree.data.setdefault("out_dir", str(Path("runs") / path.stem))
    return _build(tree, source=str(path))


def from_dict(data: Mapping[str, Any], *, source: str = "<dict>") -> Recipe:
    """Validate a recipe given as plain data (e.g. the ``recipe.yaml`` of a run)."""
    tree = _Tree(copy.deepcopy(dict(data)), {"": (source, None)})
    tree.data.pop("base", None)
    return _build(tree, source=source)


def _build(tree: _Tree, *, source: str) -> Recipe:
    problems: list[Problem] = []
    data = tree.data
    for key in data:
        if key not in TOP_LEVEL:
            problems.append(
                Problem(
                    key,
                    f"unknown section {key!r}{did_you_mean(str(key), TOP_LEVEL)}; "
                    f"the sections are: {', '.join(TOP_LEVEL[1:])}",
                )
            )
    values: dict[str, Any] = {}
    values["out_dir"] = structure(str, data.get("out_dir"), "out_dir", problems)
    values["seed"] = structure(int, data.get("seed", 0), "seed", problems)
    for kind in PLUGIN_SECTIONS:
        values[kind] = _plugin_section(kind, data.get(kind), problems)
    for key, cls in SECTION_TYPES.items():
        values[key] = structure_attrs(cls, data.get(key), key, problems)
    if not problems:
        _cross_check(values, problems)
    if problems:
        raise RecipeError([f"{tree.where(p.path)}: {p.path}: {p.message}" for p in problems])
    return Recipe(source=source, **values)


def _plugin_section(kind: str, raw: Any, problems: list[Problem]) -> Any:
    title = KINDS[kind].title
    if raw is None and kind in DEFAULT_PLUGINS:
        raw = {"name": DEFAULT_PLUGINS[kind]}
    if raw is None:
        problems.append(
            Problem(kind, f"missing section; name the {title} to use, e.g. `{kind}: {{name: ...}}`")
        )
        return None
    if not isinstance(raw, Mapping):
        problems.append(
            Problem(kind, f"expected a mapping with `name:` and the {title}'s options, got {raw!r}")
        )
        return None
    options = dict(raw)
    name = options.pop("name", None)
    if not isinstance(name, str):
        problems.append(Problem(f"{kind}.name", f"expected the name of a {title}, got {name!r}"))
        return None
    extra = {key: options.pop(key) for key in SECTION_KEYS.get(kind, ()) if key in options}
    try:
        cls = registry().get(kind, name)
    except VarkitError as exc:
        problems.append(Problem(f"{kind}.name", str(exc)))
        return None
    config = structure_attrs(cls.Config, options, kind, problems)
    weights = extra.get("weights")
    if weights is not None and not isinstance(weights, str):
        problems.append(Problem(f"{kind}.weights", f"expected a path, got {weights!r}"))
    if config is None or any(p.path.startswith(kind) for p in problems):
        return None
    return PluginSection(kind=kind, name=name, config=config, weights=weights)


def _cross_check(values: dict[str, Any], problems: list[Problem]) -> None:
    """Checks between sections: unit vs tokenizer, tokenizer vs data, classes."""
    tok_section, unit_section = values["tokenizer"], values["unit"]
    try:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            tokenizer = tok_section.cls(tok_section.config)
    except (ValueError, TypeError, VarkitError) as exc:
        problems.append(Problem("tokenizer", f"cannot build tokenizer {tok_section.name!r}: {exc}"))
        return
    check = unit_section.cls.check_tokenizer
    accepts_config = "config" in inspect.signature(check).parameters
    for message in check(tokenizer, config=unit_section.config) if accepts_config else check(tokenizer):
        problems.append(
            Problem("unit.name", f"unit {unit_section.name!r} with tokenizer {tok_section.name!r}: {message}")
        )
    data = values["data"]
    image_size = getattr(tokenizer.config, "image_size", None)
    resolution = getattr(data, "resolution", None)
    if image_size is not None and resolution is not None:
        size = image_size if isinstance(image_size, int) else tuple(image_size)
        if size not in (resolution, (resolution, resolution)):
            problems.append(
                Problem(
                    "data.resolution",
                    f"is {resolution} but the tokenizer works on {size} px images; make them equal",
                )
            )
    classes = getattr(data, "num_classes", None)
    num_classes = values["model"].num_classes
    if classes is not None and classes > num_classes:
        problems.append(Problem("model.num_classes", f"is {num_classes} but the data has {classes} classes"))
