"""Recipes: YAML files that compose plugins by name and set every option of a run.

A recipe has the sections ``tokenizer``, ``unit``, ``attention``, ``sampler`` and,
optionally, ``strategy`` (plugin sections: ``name:`` plus that plugin's ``Config``
fields; no ``strategy`` section generates step by step), ``model``, ``data``,
``train``, ``tokenizer_train`` and ``init`` (pretrained weights to fine-tune), plus
``out_dir`` and ``seed``. ``base: other.yaml``
extends another recipe (paths are relative to the file that names them). Command-line
overrides ``key.path=value`` apply last; values are read as YAML (``train.lr=3e-4``,
``sampler.name=greedy``, ``tokenizer.schedule=[1,2,4]``).

A plugin section that changes ``name`` relative to its base starts afresh: the options
inherited from the base were meant for the other plugin. Samplers are the exception:
another sampler keeps the options both samplers have (``cfg``, ``top_k``, ...), so
``sampler.name=gumbel`` keeps the recipe's guidance.

A recipe stored with a checkpoint (``from_dict(..., stored=True)``) is not the user's
word: the data layer refuses its shell commands (``pipe:`` shard patterns) and its
choice of where to write files (``data.cache_dir``) unless the same keys are given
again as overrides.

`load` validates everything before any heavy work and raises one
`RecipeError` listing every problem as
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
from varkit.data.config import GUARDED_FIELDS, DataConfig
from varkit.defaults import DEFAULT_PLUGINS
from varkit.errors import RecipeError, VarkitError, did_you_mean
from varkit.model.transformer import ModelConfig
from varkit.plugins import KINDS, registry
from varkit.recipe.finetune import InitConfig
from varkit.recipe.train import RETIRED_TOKENIZER_TRAIN_KEYS, TokenizerTrainConfig, TrainConfig

PLUGIN_SECTIONS = ("tokenizer", "unit", "attention", "sampler", "strategy")
#: Plugin sections a recipe may leave out with nothing in their place.
OPTIONAL_SECTIONS = ("strategy",)
#: Keys a plugin section holds beside the plugin's own Config fields.
SECTION_KEYS = {"tokenizer": ("name", "weights")}
TOP_LEVEL = ("base", "out_dir", "seed", *PLUGIN_SECTIONS, "model", "data", "train", "tokenizer_train", "init")
COMMAND_LINE = "command line"


#: The config class of each section that is not a plugin.
SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "tokenizer_train": TokenizerTrainConfig,
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
    """A validated recipe. Build one with `load` or `from_dict`."""

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
    #: The generation strategy (``strategy:``), or None: every step in order.
    strategy: PluginSection | None = None
    #: The file it was read from (not part of equality or of the resolved dict).
    source: str | None = attrs.field(default=None, eq=False)

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe as plain data; ``from_dict`` of it gives this recipe."""
        out: dict[str, Any] = {"out_dir": self.out_dir, "seed": self.seed}
        for kind in PLUGIN_SECTIONS:
            section = getattr(self, kind)
            if section is not None:
                out[kind] = section.to_dict()
        for key in ("model", "data", "train", "tokenizer_train", "init"):
            out[key] = unstructure(getattr(self, key))
        return out

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``) and reports a
    value its tag cannot hold (``!!int abc``) as a YAML error with its line."""


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


def _guarded(construct):
    def guarded(loader, node):
        try:
            return construct(loader, node)
        except (ValueError, KeyError, TypeError, OverflowError):
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} is not a valid {tag} value", node.start_mark
            ) from None

    return guarded


_Loader.yaml_constructors = {
    tag: (construct if tag is None else _guarded(construct))
    for tag, construct in yaml.SafeLoader.yaml_constructors.items()
}


def _yaml_problem(exc: yaml.YAMLError, source: str) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}" if mark is not None else source
    problem = getattr(exc, "problem", None) or str(exc)
    if isinstance(exc, yaml.constructor.ConstructorError) and "could not determine a constructor" in problem:
        tag = problem.split("tag", 1)[-1].strip(" '").replace("tag:yaml.org,2002:", "!!")
        return (
            f"{where}: YAML tag {tag} is not allowed: a recipe holds plain values (numbers, strings, "
            "lists, mappings), never Python objects"
        )
    if isinstance(exc, yaml.constructor.ConstructorError):
        return f"{where}: {problem}"
    return f"{where}: YAML syntax error: {problem}"


def _load_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML; returns the data and the line (1-based) of every key path.

    Raises:
        RecipeError: a syntax error, a tag that is not plain data (``!!python/...``), a
            value its tag cannot hold, or a key given twice in one mapping.
    """
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise RecipeError(_yaml_problem(exc, source)) from None
        lines: dict[str, int] = {}
        if node is None:
            return {}, lines
        twice: list[str] = []

        def walk(n: yaml.Node, path: str) -> None:
            if isinstance(n, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, value_node in n.value:
                    line = key_node.start_mark.line + 1
                    key = key_node.value
                    if isinstance(key, str) and key in seen:
                        sub = f"{path}.{key}" if path else key
                        twice.append(
                            f"{source}:{line}: {sub}: given twice in one mapping (first at line "
                            f"{seen[key]}); YAML would keep only the last, so remove one"
                        )
                    seen.setdefault(key, line)
                    sub = f"{path}.{key}" if path else str(key)
                    lines.setdefault(sub, line)
                    walk(value_node, sub)
            elif isinstance(n, yaml.SequenceNode):
                for item in n.value:
                    walk(item, path)

        walk(node, "")
        if twice:
            raise RecipeError(twice)
        try:
            data = loader.construct_document(node)
        except yaml.YAMLError as exc:
            raise RecipeError(_yaml_problem(exc, source)) from None
    finally:
        loader.dispose()
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


def _near(path: Path) -> str:
    """A did-you-mean among the recipes beside ``path``."""
    if not path.parent.is_dir():
        return ""
    return did_you_mean(path.name, [p.name for p in path.parent.glob("*.yaml")])


def read_text(path: Path, source: str | None = None) -> str:
    """The UTF-8 text of a recipe file.

    Raises:
        RecipeError: the file cannot be read or is not UTF-8 (naming the line and byte).
    """
    source = source or str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{source}: cannot be read ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError(
            f"{source}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "a recipe is a UTF-8 YAML file: save it as UTF-8"
        ) from None


def read_stored(path: str | os.PathLike) -> dict[str, Any]:
    """The plain data of a resolved recipe written into a run (``recipe.yaml``).

    Raises:
        RecipeError: the file is unreadable, not UTF-8, not YAML or not a mapping; the
            message names the file and says what to do.
    """
    path = Path(path)
    try:
        data, _ = _load_yaml(read_text(path), str(path))
    except RecipeError as exc:
        raise RecipeError(
            [
                *exc.problems[:-1],
                exc.problems[-1] + f"; {path} is varkit's copy of a run's recipe: "
                "restore it (each checkpoint holds one) or delete it to start the run directory afresh",
            ]
        ) from None
    if not isinstance(data, dict):
        raise RecipeError(
            f"{path}:1: does not hold a recipe mapping but {type(data).__name__}; restore it from a "
            "checkpoint's recipe.yaml or delete it"
        )
    return data


def _read_tree(path: Path, seen: tuple[Path, ...] = (), *, named_by: str | None = None) -> _Tree:
    source = str(path)
    if not path.is_file():
        if named_by is not None:
            raise RecipeError(
                f"{named_by}: base: recipe {source} not found{_near(path)} (`base:` paths are relative "
                "to the folder of the recipe that names them)"
            )
        raise RecipeError(f"{source}: recipe file not found{_near(path)}")
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise RecipeError(f"{source}: `base` recipes form a cycle: {chain}")
    data, lines = _load_yaml(read_text(path), source)
    if not isinstance(data, dict):
        raise RecipeError(f"{source}:1: a recipe must be a mapping of sections, got {type(data).__name__}")
    origin = {key: (source, line) for key, line in lines.items()}
    origin[""] = (source, None)
    base = data.pop("base", None)
    if base is None:
        return _Tree(data, origin)
    if not isinstance(base, str):
        raise RecipeError(f"{source}:{lines.get('base')}: base: expected a recipe path, got {base!r}")
    parent = _read_tree(path.parent / base, (*seen, path.resolve()), named_by=f"{source}:{lines.get('base')}")
    merged = _merge(parent.data, data, "")
    parent_origin = {k: v for k, v in parent.origin.items() if k}
    parent_origin.update({k: v for k, v in origin.items() if k})
    parent_origin[""] = (source, None)
    return _Tree(merged, parent_origin)


#: Plugin sections whose options keep their meaning across plugins: choosing another
#: plugin there keeps the options the new one has too (a sampler's ``cfg``, ``top_k``).
CARRY_OVER = ("sampler",)


def shared_options(kind: str, name: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that plugin ``name`` of ``kind`` has as well.

    Empty for kinds outside `CARRY_OVER` and for an unknown name (validation
    reports that).
    """
    if kind not in CARRY_OVER or not isinstance(name, str):
        return {}
    try:
        fields = attrs.fields_dict(registry().get(kind, name, require_available=False).Config)
    except VarkitError:
        return {}
    return {k: copy.deepcopy(v) for k, v in options.items() if k in fields and fields[k].init}


def _merge(base: Any, child: Any, path: str) -> Any:
    if not (isinstance(base, dict) and isinstance(child, dict)):
        return copy.deepcopy(child)
    if path in PLUGIN_SECTIONS and "name" in child and child["name"] != base.get("name"):
        # another plugin: the base's options were for the old one, except those that
        # mean the same for both (samplers)
        kept = {k: v for k, v in base.items() if k != "name"}
        return {**shared_options(path, child["name"], kept), **copy.deepcopy(child)}
    out = copy.deepcopy(base)
    for key, value in child.items():
        out[key] = (
            _merge(out[key], value, f"{path}.{key}" if path else key) if key in out else copy.deepcopy(value)
        )
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> ``(["train", "lr"], 0.0003)``.

    ``sampler=greedy`` (a plugin section given a name) is short for ``sampler.name=greedy``.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(
            f"{COMMAND_LINE}: override {text!r} is not of the form key.path=value (e.g. train.steps=20)"
        )
    try:
        value = _load_yaml(raw, COMMAND_LINE)[0] if raw.strip() else None
    except RecipeError as exc:
        problem = str(exc).removeprefix(f"{COMMAND_LINE}:1: ").removeprefix(f"{COMMAND_LINE}: ")
        raise RecipeError(f"{COMMAND_LINE}: override {text!r}: {problem}") from None
    keys = key.split(".")
    if len(keys) == 1 and keys[0] in PLUGIN_SECTIONS and isinstance(value, str):
        keys = [keys[0], "name"]
    return keys, value


def parse_overrides(texts: Iterable[str]) -> list[tuple[list[str], Any]]:
    """Every override parsed; a key given twice is an error showing both values.

    A brace pattern left unquoted on a shell command line
    (``data.train_shards=/d/train-{000000..000099}.tar``) is expanded by the shell into
    one argument per shard, each setting the key again: without this check the last one
    would win and training would read one shard.

    Raises:
        RecipeError: an override is malformed, or sets a key already set.
    """
    parsed: list[tuple[list[str], Any]] = []
    raw: dict[str, list[str]] = {}
    for text in texts:
        keys, value = parse_override(text)
        path = ".".join(keys)
        raw.setdefault(path, []).append(text.partition("=")[2])
        if len(raw[path]) == 1:
            parsed.append((keys, value))
    problems = [_given_twice(path, values) for path, values in raw.items() if len(values) > 1]
    if problems:
        raise RecipeError(problems)
    return parsed


def _given_twice(path: str, values: list[str]) -> str:
    a, b = values[0], values[1]
    times = "twice" if len(values) == 2 else f"{len(values)} times"
    message = f"{COMMAND_LINE}: {path}: given {times}, as {a!r}, {b!r}{' ...' if len(values) > 2 else ''}; give it once"
    if re.search(r"[/A-Za-z_]", a) and re.sub(r"\d+", "0", a) == re.sub(r"\d+", "0", b):
        message += (
            ". These look like one brace pattern that the shell expanded into one argument per "
            f"file: quote it, e.g. '{path}=/data/shards/train-{{000000..000547}}.tar'"
        )
    return message


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
        # choosing another plugin: keep the options set on the command line, and those
        # the new plugin shares with the old where they mean the same (samplers)
        keep = {k for k in node if tree.origin.get(f"{keys[0]}.{k}", ("",))[0] == COMMAND_LINE}
        keep |= set(shared_options(keys[0], value, node))
        for k in list(node):
            if k not in keep:
                node.pop(k)
    node[last] = value
    tree.origin[".".join(keys)] = (COMMAND_LINE, None)


# ---------------------------------------------------------------------- validation


def load(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
    """Read, merge, override and validate a recipe.

    Raises:
        RecipeError: listing every problem as ``file:line: key.path: message``.
    """
    path = Path(path)
    parsed = parse_overrides(overrides)
    tree = _read_tree(path)
    for keys, value in parsed:
        _apply_override(tree, keys, value)
    tree.data.setdefault("out_dir", str(Path("runs") / path.stem))
    return _build(tree, source=str(path))


def from_dict(
    data: Mapping[str, Any],
    *,
    source: str = "<dict>",
    stored: bool = False,
    overrides: Iterable[str] = (),
) -> Recipe:
    """Validate a recipe given as plain data (e.g. the ``recipe.yaml`` of a run).

    Args:
        data: the recipe's sections.
        source: what to name in errors (the file it came from).
        stored: the data comes from a file someone else may have written (a
            checkpoint's ``recipe.yaml``) rather than from the user: its shard patterns
            and cache directory may not run commands or choose where files are written
            (``DataConfig.untrusted``), unless ``overrides`` give them again.
        overrides: ``key.path=value`` given by the user, applied last.

    A resolved recipe that an older varkit stored may hold ``tokenizer_train`` options
    the tokenizer stage never used (`varkit.recipe.train.RETIRED_TOKENIZER_TRAIN_KEYS`);
    they are dropped here, so its checkpoint still loads. `load` (recipe files and
    command-line overrides) reports them as unknown keys.
    """
    tree = _Tree(copy.deepcopy(dict(data)), {"": (source, None)})
    tree.data.pop("base", None)
    section = tree.data.get("tokenizer_train")
    if isinstance(section, dict):
        for key in RETIRED_TOKENIZER_TRAIN_KEYS:
            section.pop(key, None)
    for keys, value in parse_overrides(overrides):
        _apply_override(tree, keys, value)
    recipe = _build(tree, source=source)
    if stored:
        given = {
            k.split(".")[1]
            for k, (file, _) in tree.origin.items()
            if file == COMMAND_LINE and k.startswith("data.")
        }
        untrusted = frozenset(GUARDED_FIELDS) - given
        recipe = attrs.evolve(recipe, data=attrs.evolve(recipe.data, untrusted=untrusted))
    return recipe


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
    if isinstance(values["seed"], int) and not 0 <= values["seed"] < 2**63:
        problems.append(Problem("seed", f"is {values['seed']}; a seed is an integer in [0, 2^63)"))
    for kind in PLUGIN_SECTIONS:
        values[kind] = _plugin_section(kind, data.get(kind), problems)
    for key, cls in SECTION_TYPES.items():
        raw = data.get(key)
        if key == "tokenizer_train" and isinstance(raw, Mapping):
            raw = _without_ar_options(raw, problems)
        values[key] = structure_attrs(cls, raw, key, problems)
    if not problems:
        _cross_check(values, problems)
    if problems:
        raise RecipeError([f"{tree.where(p.path)}: {p.path}: {p.message}" for p in problems])
    return Recipe(source=source, **values)


def _without_ar_options(raw: Mapping[str, Any], problems: list[Problem]) -> dict[str, Any]:
    """``tokenizer_train`` without the AR stage's options, each reported as an unknown key
    that names where it belongs."""
    for key in RETIRED_TOKENIZER_TRAIN_KEYS:
        if key in raw:
            problems.append(
                Problem(
                    f"tokenizer_train.{key}",
                    f"unknown key {key!r}: the tokenizer stage has no such option "
                    f"(train.{key} is the AR stage's); remove it",
                )
            )
    return {k: v for k, v in raw.items() if k not in RETIRED_TOKENIZER_TRAIN_KEYS}


def _plugin_section(kind: str, raw: Any, problems: list[Problem]) -> Any:
    title = KINDS[kind].title
    if raw is None and kind in OPTIONAL_SECTIONS:
        return None
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


def _image_size(tokenizer) -> tuple[int, int] | None:
    """``(H, W)`` of the images a tokenizer works on: its latent grid times its downsampling."""
    try:
        h, w = tokenizer.schedule[-1]
        return h * tokenizer.downsample, w * tokenizer.downsample
    except (NotImplementedError, AttributeError, TypeError, ValueError, IndexError):
        size = getattr(tokenizer.config, "image_size", None)
        return (size, size) if isinstance(size, int) else None


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
    resolution = getattr(data, "resolution", None)
    size = _image_size(tokenizer)
    if size is not None and resolution is not None:
        h, w = size
        if h != w:
            problems.append(
                Problem(
                    "tokenizer",
                    f"works on {h}x{w} px images, but the data pipeline makes square crops of "
                    f"data.resolution px; make the tokenizer's images square (for msvq and vq: "
                    f"tokenizer.image_width: null)",
                )
            )
        elif h != resolution:
            problems.append(
                Problem(
                    "data.resolution",
                    f"is {resolution} but the tokenizer works on {h} px images; make them equal",
                )
            )
    for stage in ("train", "tokenizer_train"):
        config = values[stage]
        batch, accum = getattr(config, "batch_size", None), getattr(config, "grad_accum", None)
        if isinstance(batch, int) and isinstance(accum, int) and accum > 0 and batch % accum:
            problems.append(
                Problem(
                    f"{stage}.grad_accum",
                    f"is {accum} but {stage}.batch_size {batch} does not split into {accum} "
                    f"accumulation steps; make batch_size a multiple of grad_accum (and of the number "
                    "of processes times grad_accum under torchrun)",
                )
            )
    strategy = values.get("strategy")
    if strategy is not None and not strategy.cls.supports(unit_section.name):
        problems.append(
            Problem(
                "strategy.name",
                f"strategy {strategy.name!r} does not work with unit {unit_section.name!r}; it works with "
                f"{_units_of(strategy.cls)}: choose another strategy or remove the strategy section",
            )
        )
    classes = getattr(data, "num_classes", None)
    num_classes = values["model"].num_classes
    if classes is not None and classes > num_classes:
        problems.append(Problem("model.num_classes", f"is {num_classes} but the data has {classes} classes"))


def _units_of(strategy_cls) -> str:
    units = strategy_cls.units
    return "every unit" if units is None else "the units " + ", ".join(units)
