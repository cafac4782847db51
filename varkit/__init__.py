"""varkit: a plugin framework for visual autoregressive image generation.

The public surface: the five plugin base classes and the ``hookimpl`` marker for plugin
authors, ``from_pretrained``, ``load``, ``from_official_var`` and
``from_official_llamagen`` for users (`varkit.pipeline`), and the error hierarchy.

The front-door functions are imported on first use: a plugin package's
``import varkit`` must not pull in the whole engine (the registry imports plugins,
plugins import this facade).
"""

from __future__ import annotations

from varkit.base import AttentionBackend, PredictionUnit, Sampler, Strategy, Tokenizer
from varkit.errors import (
    CheckpointError,
    DataError,
    EvaluationError,
    PluginError,
    RecipeError,
    TrainingError,
    VarkitError,
)
from varkit.hookspecs import hookimpl
from varkit.version import __version__

__all__ = [
    "AttentionBackend",
    "CheckpointError",
    "DataError",
    "EvaluationError",
    "PluginError",
    "PredictionUnit",
    "RecipeError",
    "Sampler",
    "Strategy",
    "Tokenizer",
    "TrainingError",
    "VarkitError",
    "__version__",
    "from_official_llamagen",
    "from_official_var",
    "from_pretrained",
    "hookimpl",
    "load",
]

_FRONT_DOOR = {"load", "from_pretrained", "from_official_var", "from_official_llamagen"}


def __getattr__(name: str):
    if name in _FRONT_DOOR:
        from varkit import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'varkit' has no attribute {name!r}")
