"""Building the parts of a run from a validated recipe: modules with fresh weights.

Loading weights into them is `varkit.loading`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import attrs
import torch

from varkit.base import AttentionBackend, Sampler, Strategy, Tokenizer
from varkit.defaults import DEFAULT_PLUGINS
from varkit.errors import RecipeError
from varkit.model.transformer import ARModel
from varkit.plugins import registry
from varkit.recipe import Recipe

log = logging.getLogger(__name__)

#: The autocast dtype of each training precision, for describing the attention kernel.
_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build_tokenizer(recipe: Recipe, *, device: torch.device | str = "cpu") -> Tokenizer:
    """The recipe's tokenizer with freshly initialised weights (``tokenizer.weights`` is
    `varkit.loading.recipe_tokenizer`'s business)."""
    section = recipe.tokenizer
    return section.cls(section.config).to(device)


def build_attention(recipe: Recipe) -> AttentionBackend:
    return recipe.attention.cls(recipe.attention.config)


def build_model(
    recipe: Recipe, tokenizer: Tokenizer, *, device: torch.device | str = "cpu", empty: bool = False
):
    """The AR transformer with the recipe's unit and attention backend.

    With ``empty`` the transformer's parameters are left on the meta device (nothing
    allocated or initialised; load a state dict with ``assign=True``) while the unit is
    built for real (its derived buffers are needed); ``device`` is then ignored.
    """
    unit = recipe.unit.cls(recipe.unit.config, tokenizer=tokenizer, width=recipe.model.width)
    with torch.device("meta") if empty else contextlib.nullcontext():
        model = ARModel(
            recipe.model,
            unit=unit,
            attention=build_attention(recipe),
            vocab_size=tokenizer.vocab_size,
            code_dim=tokenizer.code_dim,
        )
    if empty:
        return model
    model = model.to(device)
    if log.isEnabledFor(logging.INFO):
        precision = getattr(recipe.train, "precision", "fp32")
        kernels = model.attention_kernels(device, _PRECISION_DTYPES.get(precision, torch.float32))
        log.info(
            "attention %r on %s: training: %s; cached steps: %s",
            recipe.attention.name,
            device,
            kernels["training"],
            kernels["cached steps"],
        )
    return model


def build_sampler(
    recipe: Recipe | None = None, name: str | None = None, *, carry: Any = None, **options: Any
) -> Sampler:
    """A sampler: the recipe's, or ``name``'s, with ``options`` overriding fields.

    A sampler named other than the recipe's keeps the recipe sampler's options that it
    has too (``cfg``, ``top_k``, ...): choosing ``gumbel`` over a recipe's ``topk_topp``
    with cfg 2.0 samples with cfg 2.0, not gumbel's default. ``carry`` gives that config
    directly (e.g. a pipeline's current sampler's) when there is no recipe.

    Raises:
        PluginError: the name is unknown or unavailable.
        RecipeError: an option is not a field of that sampler's Config, or a bad value.
    """
    if recipe is not None and (name is None or name == recipe.sampler.name):
        name, config = recipe.sampler.name, recipe.sampler.config
    else:
        name = name or DEFAULT_PLUGINS["sampler"]
        config = None
        if carry is None and recipe is not None:
            carry = recipe.sampler.config
    cls = registry().get("sampler", name)
    fields = {f.name for f in attrs.fields(cls.Config) if f.init}
    if config is None or type(config) is not cls.Config:
        shared = {}
        if carry is not None and attrs.has(type(carry)):
            shared = {f.name: getattr(carry, f.name) for f in attrs.fields(type(carry)) if f.name in fields}
        try:
            config = cls.Config(**shared)
        except (TypeError, ValueError):
            config = cls.Config()  # a shared option this sampler bounds otherwise: its default
    unknown = sorted(set(options) - fields)
    if unknown:
        raise RecipeError(
            f"sampler {name!r} has no option {', '.join(map(repr, unknown))}; its options are: "
            f"{', '.join(sorted(fields)) or 'none'}"
        )
    try:
        config = attrs.evolve(config, **options)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"sampler {name!r}: {exc}") from None
    return cls(config)


def build_strategy(
    recipe: Recipe | None = None, name: str | Strategy | None = None, **options: Any
) -> tuple[Strategy | None, dict[str, Any]]:
    """A generation strategy and the other models it names: the recipe's, or ``name``'s.

    ``options`` set fields of the strategy's Config; those the strategy lists in
    ``models`` (e.g. collaborative decoding's ``draft``) are returned apart, by name,
    as given (the caller loads a path), and an unset one falls back on the recipe's.
    With neither a recipe strategy nor ``name`` there is none: ``(None, {})``.

    Raises:
        PluginError: the name is unknown or unavailable.
        RecipeError: an option is not a field of that strategy's Config, or a bad value.
    """
    if isinstance(name, Strategy):
        models = {k: options.pop(k) for k in list(options) if k in type(name).models}
        if options:
            raise TypeError("pass options to the strategy's Config, not beside a Strategy instance")
        return name, models
    section = recipe.strategy if recipe is not None else None
    if name is None and section is None:
        if options:
            raise RecipeError(
                f"strategy options {', '.join(sorted(options))} given without a strategy; name one "
                "(strategy=...)"
            )
        return None, {}
    if section is not None and (name is None or name == section.name):
        name, config = section.name, section.config
    else:
        config = None
    cls = registry().get("strategy", name)
    config = config if config is not None else cls.Config()
    fields = {f.name for f in attrs.fields(cls.Config) if f.init}
    unknown = sorted(set(options) - fields - set(cls.models))
    if unknown:
        raise RecipeError(
            f"strategy {name!r} has no option {', '.join(map(repr, unknown))}; its options are: "
            f"{', '.join(sorted(fields | set(cls.models))) or 'none'}"
        )
    models = {k: options.pop(k) for k in list(options) if k in cls.models}
    for key in cls.models:
        if models.get(key) is None and getattr(config, key, None) is not None:
            models[key] = getattr(config, key)
    # a loaded model is no recipe value: its Config field keeps the path it came from, if any
    try:
        config = attrs.evolve(config, **options)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"strategy {name!r}: {exc}") from None
    return cls(config), models
