"""The data layer: webdataset shards of images or tokenizer codes, and the synthetic default.

- :func:`build_train_stream` / :class:`TrainStream`: endless, deterministic, resumable
  batches for one rank (``varkit.data.stream``).
- :func:`build_eval_loader`: the validation images once, centre-cropped.
- ``varkit shards``: image folders to shards (``varkit.data.folder``) and images to
  code shards (``varkit.data.codes``).
- ``varkit.data.synthetic``: coloured shapes written as shards on first use, and
  ``classify``, an analytic classifier of them.
"""

from __future__ import annotations

from varkit.data.config import DataConfig, SyntheticConfig
from varkit.data.stream import Batch, EvalLoader, TrainStream, build_eval_loader, build_train_stream

__all__ = [
    "Batch",
    "DataConfig",
    "EvalLoader",
    "SyntheticConfig",
    "TrainStream",
    "build_eval_loader",
    "build_train_stream",
]
