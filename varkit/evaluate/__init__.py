"""Evaluation: how good a trained model is.

- ``varkit.evaluate.teacher_forced``: ``varkit eval``'s validation loss, perplexity,
  accuracy per step group, reconstruction error and codebook usage.
- ``varkit.evaluate.class_following``: whether generated images show the class they
  were asked for, where the data source has a classifier (the synthetic set does).
- ``varkit.evaluate.fid``: FID, sFID, IS and precision/recall of a sample set against
  a reference (``varkit metrics``), on ``varkit.evaluate.inception`` (torch-fidelity's
  TensorFlow-compatible Inception), ``varkit.evaluate.image_sets`` (``.npz``, image
  folders, shards) and ``varkit.evaluate.scores`` (the float64 arithmetic).
- ``varkit.evaluate.during_training``: FID of a few thousand samples while training
  (``train.eval_every``).
"""

from __future__ import annotations

from varkit.evaluate.class_following import class_following
from varkit.evaluate.during_training import TrainingFID
from varkit.evaluate.fid import evaluate_samples
from varkit.evaluate.image_sets import open_image_set
from varkit.evaluate.inception import Inception
from varkit.evaluate.teacher_forced import evaluate, write_report

__all__ = [
    "Inception",
    "TrainingFID",
    "class_following",
    "evaluate",
    "evaluate_samples",
    "open_image_set",
    "write_report",
]
