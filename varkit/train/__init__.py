"""Training: the AR model and tokenizers, with exact resume and torchrun scale-out.

``run(recipe)`` is what ``varkit run`` calls; :class:`TrainConfig` is the ``train:`` and
``tokenizer_train:`` section of a recipe.
"""

from __future__ import annotations

from varkit.train.config import TrainConfig

__all__ = ["TrainConfig", "run"]


def run(recipe, *, force: bool = False):
    """Train what ``recipe`` describes; see :func:`varkit.train.runner.run`."""
    from varkit.train.runner import run as _run

    return _run(recipe, force=force)
