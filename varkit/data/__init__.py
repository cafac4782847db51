"""The data layer: webdataset shards of images or tokenizer codes, and the synthetic default.

- ``SOURCES``, ``register_source``, ``data_source``: the table of data sources that
  ``data.source`` names (``varkit.data.config``; the built-in rows are in
  ``varkit.data.sources``).
- ``build_train_stream`` / ``TrainStream``: endless, deterministic, resumable
  batches for one rank (``varkit.data.stream``).
- ``build_eval_loader``: the validation images once, centre-cropped.
- ``varkit shards``: image folders to shards (``varkit.data.folder``) and images to
  code shards (``varkit.data.codes``).
- ``varkit.data.synthetic``: coloured shapes written as shards on first use, and
  ``classify``, an analytic classifier of them.
"""

from __future__ import annotations

from varkit.data.config import SOURCES, DataConfig, DataSource, SyntheticConfig, data_source, register_source
from varkit.data.sources import Source, resolve_source
from varkit.data.stream import Batch, EvalLoader, TrainStream, build_eval_loader, build_train_stream

__all__ = [
    "SOURCES",
    "Batch",
    "DataConfig",
    "DataSource",
    "EvalLoader",
    "Source",
    "SyntheticConfig",
    "TrainStream",
    "build_eval_loader",
    "build_train_stream",
    "data_source",
    "register_source",
    "resolve_source",
]
