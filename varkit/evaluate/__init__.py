"""Evaluation: how good a trained model is.

- :mod:`varkit.evaluate.teacher_forced`: ``varkit eval``'s validation loss, perplexity,
  accuracy per step group, reconstruction error and codebook usage.
- :mod:`varkit.evaluate.class_following`: whether generated images show the class they
  were asked for, where the data source has a classifier (the synthetic set does).
"""

from __future__ import annotations

from varkit.evaluate.class_following import class_following
from varkit.evaluate.teacher_forced import evaluate, write_report

__all__ = ["class_following", "evaluate", "write_report"]
