"""Training: the AR model and tokenizers, with exact resume and torchrun scale-out.

``run(recipe)`` is what ``varkit run`` calls (:mod:`varkit.train.runner`); the options
of each stage are the recipe's ``train:`` and ``tokenizer_train:`` sections
(:mod:`varkit.recipe.train`).
"""

from __future__ import annotations

from varkit.train.runner import run

__all__ = ["run"]
