"""varkit: a plugin framework for visual autoregressive image generation.

The public surface: the four plugin base classes and the ``hookimpl`` marker for plugin
authors, ``load`` and ``from_official_var`` for users, and the error hierarchy.
"""

from __future__ import annotations

from varkit.base import AttentionBackend, PredictionUnit, Sampler, Tokenizer
from varkit.errors import CheckpointError, DataError, PluginError, RecipeError, TrainingError, VarkitError
from varkit.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "AttentionBackend",
    "CheckpointError",
    "DataError",
    "PluginError",
    "PredictionUnit",
    "RecipeError",
    "Sampler",
    "Tokenizer",
    "TrainingError",
    "VarkitError",
    "__version__",
    "from_official_var",
    "hookimpl",
    "load",
]


def load(path, **kwargs):
    """Load a pipeline from a run directory or a varkit checkpoint directory."""
    from varkit.pipeline import load as _load

    return _load(path, **kwargs)


def from_official_var(vae_ckpt, var_ckpt, **kwargs):
    """A pipeline from the official VAR release files (``vae_ch160v4096z32.pth``, ``var_dN.pth``)."""
    from varkit.official import from_official_var as _from_official_var

    return _from_official_var(vae_ckpt, var_ckpt, **kwargs)
