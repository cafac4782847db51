"""The pretrained-model layout: one directory that holds a model as users expect it.

::

    DIR/
      README.md               the model card: what it is, how to use it, parameter
                              counts, known metrics, source and licence of the weights,
                              how they were converted, and the resolved recipe
      recipe.yaml             the resolved recipe (the architecture is read from it)
      model.safetensors       the AR transformer (the EMA weights when the run kept them)
      tokenizer.safetensors   the frozen tokenizer
      classes.json            {class name: index}, when the classes have names

A tokenizer-only directory (``varkit import llamagen --vq ...`` without ``--gpt``)
lacks ``model.safetensors``; it serves as ``tokenizer.weights``. The README opens with
YAML front matter (``library_name``, ``license``, ``tags`` and varkit's own facts), the
form the Hugging Face Hub reads, so a directory can be uploaded as it is.

A directory is written under a temporary name beside its final one and renamed into
place, so an interrupted save leaves either the old directory or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import attrs
import torch
import yaml
from safetensors.torch import save_file

from varkit.checkpoint import RECIPE, dump_recipe, fsync_dir, fsync_file, plain_tensors
from varkit.errors import CheckpointError

MODEL = "model.safetensors"
TOKENIZER = "tokenizer.safetensors"
CARD = "README.md"
CLASSES = "classes.json"
#: The files of the layout, required first.
FILES = (RECIPE, MODEL, TOKENIZER, CARD, CLASSES)
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


@attrs.frozen(kw_only=True)
class ModelCard:
    """What a pretrained directory's README says beyond what the recipe tells.

    Attributes:
        title: the heading, e.g. ``LlamaGen-B (ImageNet 256×256)``.
        summary: a paragraph on what the model is.
        license: licence of the weights as an SPDX id (``mit``) or words; None: unknown.
        source: where the weights come from (a URL, a release file, a run directory).
        conversion: how they were converted into varkit's layout, if they were.
        metrics: known results, ``{"FID-50k ImageNet 256 (cfg 2.0)": "5.46 (LlamaGen README)"}``.
        paper: the paper that describes the model.
        tags: extra Hub tags.
    """

    title: str
    summary: str = ""
    license: str | None = None
    source: str | None = None
    conversion: str | None = None
    metrics: dict[str, str] = attrs.field(factory=dict)
    paper: str | None = None
    tags: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        fields = {f.name for f in attrs.fields(cls)}
        known = {k: v for k, v in data.items() if k in fields}
        known["metrics"] = {str(k): str(v) for k, v in (known.get("metrics") or {}).items()}
        known["tags"] = tuple(known.get("tags") or ())
        known.setdefault("title", "varkit model")
        return cls(**known)


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def render_card(card: ModelCard, *, recipe: dict[str, Any], facts: dict[str, Any]) -> str:
    """The README of a pretrained directory.

    Args:
        card: what the card says in words.
        recipe: the resolved recipe written beside it.
        facts: ``parameters`` (``{"model": n, "tokenizer": n}``), ``classes`` (count),
            ``class_names`` (or None), ``steps`` (the unit's steps) and ``tokens``.
    """
    tags = ["varkit", "image-generation", "autoregressive", "class-conditional", *card.tags]
    front = {
        "library_name": "varkit",
        "license": card.license or "other",
        "tags": list(dict.fromkeys(tags)),
        "varkit": {
            "card": card.to_dict(),
            "parameters": facts.get("parameters", {}),
            "unit": recipe.get("unit", {}).get("name"),
            "tokenizer": recipe.get("tokenizer", {}).get("name"),
        },
    }
    params = facts.get("parameters", {})
    model, tok = recipe.get("model", {}), recipe.get("tokenizer", {})
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, width=100, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {card.title}",
        "",
    ]
    if card.summary:
        lines += [card.summary, ""]
    lines += [
        "## Use",
        "",
        "```python",
        "import varkit",
        "",
        'pipe = varkit.from_pretrained("THIS_DIRECTORY_OR_HUB_ID")',
        "images = pipe.generate([0, 1, 2, 3], seed=0)  # (4, 3, H, W) in [0, 1]",
        "```",
        "",
        "or `varkit sample THIS_DIRECTORY --classes 0,1,2,3 --per-class 4 --out samples --grid`"
        + (" (classes by name work too)." if facts.get("class_names") else "."),
        "",
        "## Model",
        "",
        "| | |",
        "| --- | --- |",
    ]
    if "model" in params:
        lines.append(
            f"| transformer | depth {model.get('depth')}, width {model.get('width')}, {model.get('heads')} heads; "
            f"conditioning {model.get('conditioning', 'adaln')}, {model.get('norm', 'layernorm')}, "
            f"{model.get('mlp', 'gelu')} MLP; {_human(params['model'])} parameters |"
        )
        lines.append(
            f"| prediction unit | `{recipe.get('unit', {}).get('name')}`: {facts.get('tokens')} tokens "
            f"in {facts.get('steps')} steps |"
        )
    lines.append(
        f"| tokenizer | `{tok.get('name')}`: {tok.get('vocab_size')} codes of {tok.get('code_dim')} dims, "
        f"{tok.get('image_size')} px images; {_human(params.get('tokenizer', 0))} parameters |"
    )
    names = facts.get("class_names")
    shown = ""
    if names:
        shown = ": " + ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
    lines.append(f"| classes | {facts.get('classes')}{shown} |")
    sampler = recipe.get("sampler", {})
    options = ", ".join(f"{k} {v}" for k, v in sampler.items() if k != "name")
    lines += [f"| sampler | `{sampler.get('name')}`: {options} |", ""]
    lines += ["## Metrics", ""]
    if card.metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in card.metrics.items()]
    else:
        lines.append("None known.")
    lines += ["", "## Source and licence", ""]
    lines.append(f"- Source: {card.source or 'not recorded'}")
    lines.append(f"- Licence of the weights: {card.license or 'not stated'}")
    if card.paper:
        lines.append(f"- Paper: {card.paper}")
    if card.conversion:
        lines.append(f"- Conversion: {card.conversion}")
    lines += ["", "## Recipe", "", "```yaml", dump_recipe(recipe).rstrip(), "```", ""]
    return "\n".join(lines)


def read_card(directory: str | os.PathLike) -> ModelCard | None:
    """The `ModelCard` in a directory's README front matter, or None without one."""
    path = Path(directory) / CARD
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return None
    try:
        front = yaml.safe_load(text[4 : text.index("\n---", 4)])
    except (ValueError, yaml.YAMLError):
        return None
    data = (front or {}).get("varkit", {}).get("card") if isinstance(front, dict) else None
    return ModelCard.from_dict(data) if isinstance(data, dict) else None


def read_class_names(directory: str | os.PathLike) -> tuple[str, ...] | None:
    """The class names of ``classes.json`` (``{name: index}``) in index order, or None.

    Raises:
        CheckpointError: the file is not a mapping of names onto the indices 0..n-1.
    """
    path = Path(directory) / CLASSES
    if not path.is_file():
        return None
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    return class_names_from_mapping(mapping, str(path))


def class_names_from_mapping(mapping: Any, where: str) -> tuple[str, ...]:
    """``{name: index}`` with the indices 0..n-1 -> the names in index order.

    Raises:
        CheckpointError: naming what is wrong with the mapping.
    """
    if not isinstance(mapping, dict) or not all(isinstance(i, int) for i in mapping.values()):
        raise CheckpointError(f'{where} must map class names to class indices, e.g. {{"cat": 0, "dog": 1}}')
    indices = sorted(mapping.values())
    if indices != list(range(len(mapping))):
        raise CheckpointError(f"{where} must give the class indices 0..{len(mapping) - 1} once each")
    return tuple(name for name, _ in sorted(mapping.items(), key=lambda item: item[1]))


def missing_files(directory: str | os.PathLike, *, need_model: bool = True) -> list[str]:
    """The required files of the layout that ``directory`` lacks."""
    directory = Path(directory)
    required = (RECIPE, MODEL, TOKENIZER) if need_model else (RECIPE, TOKENIZER)
    return [name for name in required if not (directory / name).is_file()]


def looks_pretrained(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is (or was meant to be) a pretrained directory: it holds
    weights or a card of the layout, and no ``checkpoints/`` of a run."""
    directory = Path(directory)
    if not directory.is_dir() or (directory / "checkpoints").is_dir():
        return False
    return any((directory / name).is_file() for name in (MODEL, TOKENIZER, CARD))


def write_pretrained(
    directory: str | os.PathLike,
    *,
    recipe: dict[str, Any],
    tokenizer: dict[str, torch.Tensor],
    model: dict[str, torch.Tensor] | None,
    card: str,
    class_names: tuple[str, ...] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a pretrained directory atomically (see the module docs).

    Args:
        directory: the directory; an existing pretrained directory is replaced, any
            other existing non-empty directory is refused.
        recipe: the resolved recipe.
        tokenizer: the tokenizer's state dict.
        model: the transformer's state dict; None writes a tokenizer-only directory.
        card: the README text.
        class_names: the class names in index order, written as ``classes.json``.
        metadata: strings stored in the safetensors headers.

    Returns:
        The directory.

    Raises:
        CheckpointError: ``directory`` exists and holds something else.
    """
    final = Path(directory)
    if final.exists() and not final.is_dir():
        raise CheckpointError(f"{final} is a file; give a directory to write the pretrained model into")
    if final.is_dir() and any(final.iterdir()) and not looks_pretrained(final):
        raise CheckpointError(
            f"{final} exists and is not a pretrained directory (it has no recipe.yaml and weights, or it "
            "holds a run's checkpoints/); choose a new directory, nothing there was changed"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{_TMP_PREFIX}{final.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = {"format": "pt", **(metadata or {})}
    weights = {TOKENIZER: tokenizer} if model is None else {MODEL: model, TOKENIZER: tokenizer}
    for name, state in weights.items():
        save_file(plain_tensors(state), str(tmp / name), metadata=meta)
    (tmp / RECIPE).write_text(dump_recipe(recipe), encoding="utf-8")
    (tmp / CARD).write_text(card, encoding="utf-8")
    if class_names:
        mapping = {name: i for i, name in enumerate(class_names)}
        (tmp / CLASSES).write_text(json.dumps(mapping, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for path in tmp.iterdir():
        fsync_file(path)
    fsync_dir(tmp)
    if final.exists():
        old = final.with_name(f"{_OLD_PREFIX}{final.name}.{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)
    return final
