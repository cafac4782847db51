"""What the subcommands share."""

from __future__ import annotations

import torch

OVERRIDE_HELP = (
    "overrides key.path=value, read as YAML (e.g. train.steps=20 sampler.name=greedy out_dir=/tmp/run)"
)


def device_or_default(name: str | None) -> str:
    """The --device given, else cuda when available (decided when a command runs, not when
    the parser is built)."""
    if name is not None:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"
