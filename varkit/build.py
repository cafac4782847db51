"""Building the parts of a run from a validated recipe."""

from __future__ import annotations

import logging
from typing import Any

import attrs
import torch

from varkit.base import AttentionBackend, Sampler, Tokenizer
from varkit.errors import RecipeError
from varkit.recipe import Recipe

log = logging.getLogger(__name__)


def build_tokenizer(
    recipe: Recipe, *, device: torch.device | str = "cpu", load_weights: bool = True
) -> Tokenizer:
    """The recipe's tokenizer; with ``tokenizer.weights`` set, those weights loaded."""
    section = recipe.tokenizer
    tokenizer = section.cls(section.config).to(device)
    if load_weights and section.weights:
        from varkit.pipeline import load_tokenizer_weights

        load_tokenizer_weights(tokenizer, section.weights)
        log.info("tokenizer weights from %s", section.weights)
    return tokenizer


def build_attention(recipe: Recipe) -> AttentionBackend:
    return recipe.attention.cls(recipe.attention.config)


def build_model(recipe: Recipe, tokenizer: Tokenizer, *, device: torch.device | str = "cpu"):
    """The AR transformer with the recipe's unit and attention backend."""
    from varkit.model.transformer import ARModel

    unit = recipe.unit.cls(recipe.unit.config, tokenizer=tokenizer, width=recipe.model.width)
    model = ARModel(
        recipe.model,
        unit=unit,
        attention=build_attention(recipe),
        vocab_size=tokenizer.vocab_size,
        code_dim=tokenizer.code_dim,
    )
    return model.to(device)


def build_sampler(recipe: Recipe | None = None, name: str | None = None, **options: Any) -> Sampler:
    """A sampler: the recipe's, or ``name``'s defaults, with ``options`` overriding fields.

    Raises:
        RecipeError: an option is not a field of that sampler's Config.
    """
    from varkit.plugins import registry

    if name is None and recipe is not None:
        name, config = recipe.sampler.name, recipe.sampler.config
    else:
        name = name or "topk_topp"
        config = None
    cls = registry().get("sampler", name)
    config = config if config is not None and type(config) is cls.Config else cls.Config()
    fields = {f.name for f in attrs.fields(cls.Config)}
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
