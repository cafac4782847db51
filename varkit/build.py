"""Building the parts of a run from a validated recipe: modules with fresh weights.

Loading weights into them is :mod:`varkit.loading`.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import torch

from varkit.base import AttentionBackend, Sampler, Tokenizer
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
    :func:`varkit.loading.recipe_tokenizer`'s business)."""
    section = recipe.tokenizer
    return section.cls(section.config).to(device)


def build_attention(recipe: Recipe) -> AttentionBackend:
    return recipe.attention.cls(recipe.attention.config)


def build_model(recipe: Recipe, tokenizer: Tokenizer, *, device: torch.device | str = "cpu"):
    """The AR transformer with the recipe's unit and attention backend."""
    unit = recipe.unit.cls(recipe.unit.config, tokenizer=tokenizer, width=recipe.model.width)
    model = ARModel(
        recipe.model,
        unit=unit,
        attention=build_attention(recipe),
        vocab_size=tokenizer.vocab_size,
        code_dim=tokenizer.code_dim,
    )
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


def build_sampler(recipe: Recipe | None = None, name: str | None = None, **options: Any) -> Sampler:
    """A sampler: the recipe's, or ``name``'s defaults, with ``options`` overriding fields.

    Raises:
        RecipeError: an option is not a field of that sampler's Config.
    """
    if name is None and recipe is not None:
        name, config = recipe.sampler.name, recipe.sampler.config
    else:
        name = name or DEFAULT_PLUGINS["sampler"]
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
